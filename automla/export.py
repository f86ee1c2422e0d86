"""Pick one configuration off a run and write it as a complete trainer config file.

`--where` filters the completed trials first (`val_loss<=3.1`, `tokens_per_s>20000`, several
joined by commas or given more than once; names are metrics or searched settings as in
trials.csv). Text, true/false and null settings take `==` and `!=` with a word, case ignored
(`pruning.regrow==true`, `model.mla.gate.activation!=tanh`, `pruning.granularity==null`); a
trial without the name never matches. `--pick` then chooses: `knee` (of the Pareto front of
what is left), `min:METRIC` or `max:METRIC` (over everything left).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from automla import pareto
from automla.report import completed, finite_number, load_run
from automla.trainers.config import TrainConfig, build, to_dict

_OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*$")


class ExportError(ValueError):
    """A bad --pick or --where, or nothing left to pick from."""


def parse_where(expressions: Sequence[str]) -> list[tuple[str, str, float | str]]:
    """`['val_loss<=3.1, pruning.regrow==true']` -> [(name, op, value), ...]; a value that is
    not a number stays text (lower case), allowed with == and != only."""
    out: list[tuple[str, str, float | str]] = []
    for expr in expressions:
        for part in expr.split(","):
            if not part.strip():
                continue
            m = _CONDITION.match(part)
            if not m:
                raise ExportError(
                    f"--where {part.strip()!r}: expected NAME OP NUMBER with OP one of "
                    f"{' '.join(_OPS)}, or NAME==TEXT / NAME!=TEXT, e.g. 'val_loss<=3.1', "
                    "'pruning.regrow==true'"
                )
            name, op, raw = m.groups()
            value: float | str
            try:
                value = float(raw)
            except ValueError:
                if op not in ("==", "!="):
                    raise ExportError(
                        f"--where {part.strip()!r}: {raw!r} is not a number, and {op!r} needs "
                        "a number; text settings take == or !="
                    ) from None
                value = raw.lower()
            out.append((name, op, value))
    return out


def parse_pick(pick: str) -> tuple[str, str | None]:
    """'knee' -> ('knee', None); 'min:val_loss' -> ('min', 'val_loss')."""
    if pick == "knee":
        return "knee", None
    kind, _, metric = pick.partition(":")
    if kind not in ("min", "max") or not metric:
        raise ExportError(f"--pick {pick!r}: expected knee, min:METRIC or max:METRIC")
    return kind, metric


def select(
    trials: list[dict[str, Any]],
    metrics: list[str],
    modes: list[str],
    pick: str,
    where: Sequence[str] = (),
) -> dict[str, Any]:
    """The chosen trial record among the completed `trials`."""
    kind, target = parse_pick(pick)
    conditions = parse_where(where)
    # each record beside its settings and metrics merged once: --where and --pick look names up
    pool = [(t, _fields(t)) for t in completed(trials, metrics)]
    if not pool:
        raise ExportError("the run has no completed trial to pick from")
    names = sorted({k for _, f in pool for k, v in f.items() if finite_number(v)})
    texts = {k for t, _ in pool for k, v in t.get("params", {}).items() if _text(v) is not None}
    for name, op, value in conditions:
        shown = f"--where {_shown(name, op, value)!r}"
        if name not in names and name not in texts:
            known = ", ".join(sorted({*names, *texts}))
            raise ExportError(f"--where: unknown name {name!r}; expected one of {known}")
        if isinstance(value, str) and name not in texts:
            raise ExportError(f"{shown}: {name} is a number; compare it with a number")
        if not isinstance(value, str) and name not in names:
            raise ExportError(
                f"{shown}: {name} is a text setting; it takes == or != with a word "
                "(true/false, null for a null choice)"
            )
    if target is not None and target not in names:
        raise ExportError(f"--pick: unknown metric {target!r}; expected one of {', '.join(names)}")
    left = [(t, f) for t, f in pool if all(_holds(f.get(n), op, v) for n, op, v in conditions)]
    if not left:
        shown = ", ".join(_shown(*c) for c in conditions)
        raise ExportError(f"no completed trial satisfies {shown} ({len(pool)} completed)")
    if kind == "knee":
        points = [[t["metrics"][m] for m in metrics] for t, _ in left]
        return left[pareto.knee(points, modes)][0]
    candidates = [(t, f) for t, f in left if finite_number(f.get(target))]
    if not candidates:
        raise ExportError(f"--pick: no remaining trial reports {target!r}")
    sign = 1 if kind == "min" else -1
    return min(candidates, key=lambda tf: sign * tf[1][target])[0]


def export(
    run_dir: str | Path,
    pick: str,
    out: str | Path,
    where: Sequence[str] = (),
    *,
    replace: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Write the chosen trial's full TrainConfig to `out` (YAML); returns (record, path). An
    existing `out` (perhaps edited by hand) is replaced only where `replace`."""
    config, trials = load_run(run_dir)
    record = select(trials, config.metrics, config.modes, pick, where)
    if not isinstance(record.get("config"), dict):
        raise ExportError(
            f"{Path(run_dir) / 'trials.json'}: trial {record['trial_id']} has no trainer config; "
            f"move the file aside and `automla report {run_dir}` rebuilds it from study.db"
        )
    train_config = build(TrainConfig, record["config"])  # validates what is written
    path = Path(out)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists; --force replaces it, or -o names another file")
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# AutoMLA export: trial {record['trial_id']} of {Path(run_dir).name}, pick {pick}"
        + (f", where {' and '.join(where)}" if where else "")
        + "\n# "
        + ", ".join(f"{m}={record['metrics'][m]:.6g}" for m in config.metrics)
        + "\n"
    )
    path.write_text(header + yaml.safe_dump(to_dict(train_config), sort_keys=False))
    return record, path


def _fields(t: dict[str, Any]) -> dict[str, Any]:
    return {**t.get("params", {}), **t.get("metrics", {})}


def _text(v: Any) -> str | None:
    """A text, true/false or null setting as the lower-case word --where compares it with
    (`silu`, `true`, `null`); None for any other value."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return v.lower() if isinstance(v, str) else None


def _holds(v: Any, op: str, value: float | str) -> bool:
    """Whether a trial's `v` satisfies `op value`; a value of the other kind never does."""
    if isinstance(value, str):
        text = _text(v)
        return text is not None and _OPS[op](text, value)
    return finite_number(v) and _OPS[op](v, value)


def _shown(name: str, op: str, value: float | str) -> str:
    return f"{name}{op}{value if isinstance(value, str) else format(value, 'g')}"
