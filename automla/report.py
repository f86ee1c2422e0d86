"""A run folder's results: the trial table, the Pareto front, hypervolume, and the plot.

`trials.json` is the source of truth (one record per trial, with its full trainer config);
`write_outputs` derives `trials.csv`, `pareto.json`, `hypervolume.csv` and `pareto.png` from it,
so `automla report` can be run again on a folder at any time.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from automla import pareto
from automla.schema import METRICS, SearchConfig, load

_RATIOS = "model.mla.ratios"
COMPLETED = "completed"
FAILED = "failed"
STOPPED = "stopped"
"""Trial states in trials.csv; only completed trials count for the front."""


class RunError(ValueError):
    """A run folder is missing or incomplete."""


def load_run(run_dir: str | Path) -> tuple[SearchConfig, list[dict[str, Any]]]:
    """The resolved search config and the trial records of a run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    for name in ("space.yaml", "trials.json"):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a complete run folder ({name} is missing)")
    config = load(run / "space.yaml")
    trials = json.loads((run / "trials.json").read_text())
    return config, trials


def completed(trials: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Completed trials whose objectives are all finite numbers."""
    out = []
    for t in trials:
        values = [t.get("metrics", {}).get(m) for m in metrics]
        if t.get("state") == COMPLETED and all(finite_number(v) for v in values):
            out.append(t)
    return out


def summarise(config: SearchConfig, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The front (records), the knee, the hypervolume and its history over completions."""
    metrics, modes = config.metrics, config.modes
    done = completed(trials, metrics)
    points = [[t["metrics"][m] for m in metrics] for t in done]
    front_idx = pareto.non_dominated(points, modes) if points else []
    knee_id = done[pareto.knee(points, modes)]["trial_id"] if points else None
    by_time = sorted(range(len(done)), key=lambda i: (done[i].get("finished") or 0, i))
    history = pareto.hypervolume_history([points[i] for i in by_time], modes)
    front = sorted((done[i] for i in front_idx), key=lambda t: t["metrics"][metrics[0]])
    return {
        "objectives": [{"metric": m, "mode": d} for m, d in zip(metrics, modes)],
        "trials": len(trials),
        "completed": len(done),
        "failed": sum(t.get("state") == FAILED for t in trials),
        "knee": knee_id,
        "hypervolume": history[-1] if history else 0.0,
        "hypervolume_note": "normalised objectives (0 best, 1 worst over completed trials), "
        "reference point 1.1 on every axis",
        "hypervolume_history": [
            {"completed": n + 1, "trial_id": done[i]["trial_id"], "hypervolume": hv}
            for n, (i, hv) in enumerate(zip(by_time, history))
        ],
        "front": [_front_entry(t, t["trial_id"] == knee_id) for t in front],
    }


def write_outputs(
    run_dir: str | Path, config: SearchConfig, trials: list[dict[str, Any]]
) -> dict[str, Any]:
    """(Re)write trials.csv, pareto.json, hypervolume.csv and pareto.png; return the summary."""
    run = Path(run_dir)
    summary = summarise(config, trials)
    _write_csv(run / "trials.csv", trials)
    (run / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(run / "hypervolume.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["completed", "trial_id", "hypervolume"])
        for h in summary["hypervolume_history"]:
            w.writerow([h["completed"], h["trial_id"], f"{h['hypervolume']:.6f}"])
    plot(run / "pareto.png", config, trials, summary)
    return summary


def report(
    run_dir: str | Path, *, console: Console | None = None, as_json: bool = False
) -> dict[str, Any]:
    """Re-derive a run folder's outputs and print the front (a rich table, or JSON)."""
    config, trials = load_run(run_dir)
    summary = write_outputs(run_dir, config, trials)
    console = console or Console()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(front_table(summary, Path(run_dir).name))
        console.print(
            f"{summary['completed']} completed, {summary['failed']} failed of "
            f"{summary['trials']} trials · hypervolume {summary['hypervolume']:.4f} "
            f"(normalised) · plot {Path(run_dir) / 'pareto.png'}"
        )
    return summary


def front_table(summary: dict[str, Any], title: str = "") -> Table:
    """The Pareto front as a rich table, best first on the first objective; knee marked."""
    metrics = [o["metric"] for o in summary["objectives"]]
    params = []
    for entry in summary["front"]:
        params += [k for k in entry["params"] if k not in params and not k.startswith(_RATIOS)]
    table = Table(title=f"Pareto front {title}".strip(), title_justify="left")
    table.add_column("trial", no_wrap=True)
    for o in summary["objectives"]:
        table.add_column(f"{o['metric']} ({o['mode']})", justify="right")
    table.add_column("ratios", no_wrap=True)
    for p in params:
        table.add_column(short_name(p), justify="left" if p.endswith(".hidden") else "right")
    for entry in summary["front"]:
        table.add_row(
            entry["trial_id"] + (" (knee)" if entry["knee"] else ""),
            *[_fmt(entry["metrics"][m]) for m in metrics],
            entry["label"],
            *[_fmt(entry["params"].get(p, "")) for p in params],
            style="bold" if entry["knee"] else None,
        )
    return table


def short_name(path: str) -> str:
    """'model.mla.gate.hidden' -> 'gate.hidden', 'model.d_model' -> 'd_model'."""
    for prefix in ("model.mla.", "model."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def plot(
    path: str | Path, config: SearchConfig, trials: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """The first two objectives: dominated trials grey, the front highlighted and labelled by
    ratios, the knee starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mx, my = config.metrics[0], config.metrics[1]
    done = completed(trials, config.metrics)
    front_ids = {e["trial_id"] for e in summary["front"]}
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    rest = [t for t in done if t["trial_id"] not in front_ids]
    ax.scatter(
        [t["metrics"][mx] for t in rest],
        [t["metrics"][my] for t in rest],
        color="0.7",
        s=28,
        label="dominated",
    )
    front = sorted(summary["front"], key=lambda e: e["metrics"][mx])
    fx = [e["metrics"][mx] for e in front]
    fy = [e["metrics"][my] for e in front]
    if front:
        # the attainment staircase: a point covers larger x when x is minimised
        steps = "steps-post" if config.modes[0] == "min" else "steps-pre"
        ax.plot(fx, fy, color="tab:blue", lw=1.2, alpha=0.6, drawstyle=steps)
        ax.scatter(fx, fy, color="tab:blue", s=46, zorder=3, label="Pareto front")
        for e, x, y in zip(front, fx, fy):
            ax.annotate(e["label"], (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
        knee = [e for e in front if e["knee"]]
        if knee:
            ax.scatter(
                [knee[0]["metrics"][mx]],
                [knee[0]["metrics"][my]],
                marker="*",
                s=220,
                color="tab:orange",
                zorder=4,
                label="knee",
            )
    arrow = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(f"{mx} ({arrow[config.modes[0]]})")
    ax.set_ylabel(f"{my} ({arrow[config.modes[1]]})")
    failed = summary["failed"]
    ax.set_title(
        f"{summary['completed']} completed trials"
        + (f", {failed} failed (not shown)" if failed else "")
        + f" · hypervolume {summary['hypervolume']:.3f}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _front_entry(t: dict[str, Any], is_knee: bool) -> dict[str, Any]:
    return {
        "trial_id": t["trial_id"],
        "knee": is_knee,
        "label": t.get("label", ""),
        "params": t.get("params", {}),
        "metrics": t["metrics"],
        "config": t["config"],
    }


def _write_csv(path: Path, trials: list[dict[str, Any]]) -> None:
    params: list[str] = []
    for t in trials:
        params += [k for k in t.get("params", {}) if k not in params]
    metrics = [m for m in METRICS if any(m in t.get("metrics", {}) for t in trials)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "optuna_trial", "state", "reason", "ratios", *params, *metrics])
        for t in trials:
            w.writerow(
                [
                    t["trial_id"],
                    t.get("optuna_trial", ""),
                    t["state"],
                    t.get("reason", ""),
                    t.get("label", ""),
                    *[_cell(t.get("params", {}).get(p)) for p in params],
                    *[_cell(t.get("metrics", {}).get(m)) for m in metrics],
                ]
            )


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def finite_number(v: Any) -> bool:
    """A real, finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)
