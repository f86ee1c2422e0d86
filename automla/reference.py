"""The dense reference of a search: the space's fixed model with dense attention, trained once.

A user searches MLA layouts to learn whether MLA pays against plain dense attention, so every
search (unless its file says `reference: none`) trains the fixed model once more with dense
attention and no head pruning, on the same data, steps and seed as the trials. It runs as one
Ray task beside the trials (not in the trial budget, never on the front) and is recorded in the
run folder as `reference.json`; a resumed search keeps a completed one. The report places it on
the plot, states each front point's ratios to it, and uses its metrics as the hypervolume's
reference point.

A searched setting that still applies to dense attention (`model.d_model`, `lr`, ...) takes the
domain's middle value (`domains.middle_value`), the one the trials' feasibility probe tries
first.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from automla.domains import middle_value
from automla.schema import SearchConfig
from automla.space import applies, apply
from automla.trainers.config import TrainConfig, to_dict

REFERENCE_FILE = "reference.json"
LABEL = "dense reference"

# objectives compared as a difference (a loss, an accuracy); every other one as a ratio
_DIFFERENCE = ("val_loss", "train_loss", "mqar_acc")


def reference_config(config: SearchConfig) -> TrainConfig:
    """The reference's TrainConfig: the fixed settings, dense attention, pruning off, and the
    middle value of each searched setting that applies to dense attention."""
    fixed = json.loads(json.dumps(config.fixed))
    fixed.setdefault("model", {})["attention"] = "dense"
    fixed.setdefault("pruning", {})["enabled"] = False
    values = {
        path: middle_value(domain)
        for path, domain in config.space.items()
        if path not in ("model.attention", "pruning.enabled") and applies(path, {}, fixed)
    }
    return apply(fixed, values)


def load_reference(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's reference record, or None when it has none."""
    path = Path(run_dir) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):  # cut short by a killed driver
        return None  # (or damaged): a resume trains it again
    return record if isinstance(record, dict) else None


def needs_training(config: SearchConfig, run_dir: str | Path) -> bool:
    """A reference is wanted and the run folder holds no completed one."""
    if config.reference == "none":
        return False
    done = load_reference(run_dir)
    return done is None or done.get("state") != "completed"


def start(
    config: SearchConfig,
    train_fn: Callable[..., dict] | None,
    resources: dict[str, float],
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
) -> Any:
    """Start training the reference in a Ray task (reserving what one trial reserves); returns
    its ObjectRef, whose value is the list of metrics the trainer reported."""
    import ray

    task = ray.remote(_train_reference).options(
        num_cpus=resources.get("cpu", 1.0),
        num_gpus=resources.get("gpu", 0.0),
        max_retries=0,
        name="automla-dense-reference",
    )
    return task.remote(reference_config(config), train_fn, workers, cpus_per_worker, use_gpu)


def record(
    run_dir: str | Path,
    config: TrainConfig,
    history: list[dict[str, Any]] | None,
    error: str = "",
) -> dict[str, Any]:
    """Write `reference.json`: the config, every reported evaluation and the final metrics
    (`state` completed, or failed with the reason)."""
    history = history or []
    last = history[-1] if history else {}
    state = "completed" if not error and last.get("step", 0) >= config.steps else "failed"
    if state == "failed" and not error:
        error = f"stopped at step {last.get('step', 0)} of {config.steps}"
    entry = {
        "label": LABEL,
        "state": state,
        "reason": error,
        "metrics": {k: v for k, v in last.items() if not isinstance(v, (dict, list))},
        "history": history,
        "config": to_dict(config),
    }
    Path(run_dir, REFERENCE_FILE).write_text(json.dumps(entry, indent=1) + "\n")
    return entry


def compare(
    metrics: Mapping[str, Any], reference: Mapping[str, Any], objectives: list[str]
) -> dict[str, dict[str, float | str]]:
    """Each objective of `metrics` against the reference's: losses and accuracies as a
    difference (`-0.09 val_loss`), everything else as a ratio (`1.9x tokens_per_s`)."""
    out: dict[str, dict[str, float | str]] = {}
    for m in objectives:
        v, r = metrics.get(m), reference.get(m)
        if not (_finite(v) and _finite(r)):
            continue
        if m in _DIFFERENCE:
            out[m] = {"difference": v - r, "text": f"{v - r:+.2g} {m}"}
        elif r != 0:
            out[m] = {"ratio": v / r, "text": f"{v / r:.2g}x {m}"}
    return out


def compare_text(comparison: Mapping[str, Mapping[str, Any]]) -> str:
    """'1.9x tokens_per_s, -0.09 val_loss' (empty without a reference)."""
    return ", ".join(str(c["text"]) for c in comparison.values())


def _train_reference(
    config: TrainConfig,
    train_fn: Callable[..., dict] | None,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
) -> list[dict[str, Any]]:
    """In the Ray task: train like a trial of this search would, collect every evaluation."""
    import torch

    from automla.distributed import run_training

    threads = max(1, int(cpus_per_worker))
    torch.set_num_threads(threads)
    if config.threads is None:
        config.threads = threads
    history: list[dict[str, Any]] = []

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        history.append(dict(metrics))

    # the trainer's files stay on the worker's node; the metrics travel back in the result
    with tempfile.TemporaryDirectory(prefix="automla-reference-") as tmp:
        out_dir = Path(tmp) / "train"
        run_training(
            config, report, out_dir,
            workers=workers, cpus=cpus_per_worker, use_gpu=use_gpu, train_fn=train_fn,
        )  # fmt: skip
    return history


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
