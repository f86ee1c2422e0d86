"""Trial outcomes: how a trial ended (`classify`, the one rule the searcher, the live display
and the records share), one record per finished Ray trial (state, reason, failure kind,
metrics, the config the trial built) and the failure kind and root-cause reason of an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from automla import compat
from automla import report as report_mod
from automla.metrics import known_metrics
from automla.run_folder import relative_trial_path
from automla.schema import SearchConfig
from automla.space import apply, decode
from automla.trainers.config import ConfigError
from automla.trial import BUILT, FAILURE, FINAL, built_description


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: one of `report.STATES`, with a failure kind and a reason."""

    state: str
    failure: str = ""
    """Why a failed trial failed: 'invalid', 'diverged', 'out_of_memory', 'worker_died',
    'exception' or 'no_result'; empty unless the state is failed."""
    reason: str = ""


def classify(
    last: Mapping[str, Any],
    metrics: Sequence[str],
    *,
    error: BaseException | bool | None = None,
    ended: bool | None = None,
    steps: int | None = None,
) -> Outcome:
    """How a trial ended, from its last result (`{}` when it reported none).

    Args:
        metrics: the objectives; a trial that ran to its end without a finite value of each
            failed ('no_result').
        error: the trial's error (True when it errored but the error is not at hand).
        ended: whether Tune ended the trial; None reads it from the result's `done`. A trial
            that stopped before its last step was early-stopped by the scheduler (pruned) if
            Tune ended it, else interrupted (stopped: Ctrl-C, a lost driver; resumable).
        steps: the trial's step budget, for a result that does not say whether it is final.
    """
    if isinstance(error, BaseException):
        return Outcome(report_mod.FAILED, failure_kind(error), error_reason(error))
    if error:
        return Outcome(report_mod.FAILED, "exception")
    if last.get(FAILURE):
        return Outcome(report_mod.FAILED, str(last[FAILURE]), str(last.get("reason", "")))
    step = last.get("step", 0)
    if not last.get(FINAL, True) or (steps and step < steps):
        at = f"at step {step} of {steps}" if steps else f"at step {step}"
        if last.get("done") if ended is None else ended:
            return Outcome(report_mod.PRUNED, reason=f"early-stopped {at}")
        return Outcome(report_mod.STOPPED, reason=f"interrupted {at}")
    missing = [m for m in metrics if not report_mod.finite_number(last.get(m))]
    if missing:
        return Outcome(report_mod.FAILED, "no_result", f"no finite {', '.join(missing)} reported")
    return Outcome(report_mod.COMPLETED)


def trial_records(
    results: Any, config: SearchConfig, numbers: dict[str, int], run_dir: Path
) -> list[dict]:
    """One record per trial: id, state, reason, failure kind, retries, node, searched values,
    final metrics, full config (as the trial built it)."""
    retries = compat.trial_failures(results)
    records = []
    for result in results:
        trial_id = result_trial_id(result)
        last = result.metrics or {}
        record: dict[str, Any] = {
            "trial_id": trial_id,
            "optuna_trial": numbers.get(trial_id),
            "state": report_mod.COMPLETED,
            "reason": "",
            "failure": "",
            # Ray counts failures; the last one of a failed trial was not followed by a retry
            "retries": max(0, retries.get(trial_id, 0) - (result.error is not None)),
            "node_ip": last.get("node_ip", ""),
            "node_id": last.get("node_id", ""),
            "label": "",
            "params": {},
            "metrics": {k: last[k] for k in _metric_keys(last)},
            "config": None,
            "finished": last.get("timestamp"),
            "path": relative_trial_path(run_dir, result.path),
        }
        built = reported_build(result) or _build(dict(result.config or {}), config)
        record.update(label=built["label"], params=built["params"], config=built["config"])
        if built.get("invalid") and result.error is None and not last.get(FAILURE):
            outcome = Outcome(report_mod.FAILED, "invalid", built["invalid"])
        else:  # an error, or what the trial said of its end, comes first
            steps = (record["config"] or {}).get("steps")
            outcome = classify(last, config.metrics, error=result.error, steps=steps)
        record.update(state=outcome.state, failure=outcome.failure, reason=outcome.reason)
        records.append(record)
    records.sort(key=report_mod.proposal_order)
    return records


def reported_build(result: Any) -> dict[str, Any] | None:
    """What the trial reported of the config it built (see `trial.built_description`), from
    the first result that carries it; None when it reported none."""
    field = (result.metrics or {}).get(BUILT)
    if field is None and result.path:
        path = Path(str(result.path)) / "result.json"
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        for line in lines:
            try:
                field = json.loads(line).get(BUILT)
            except (json.JSONDecodeError, AttributeError):  # cut short by a killed driver
                continue
            if field is not None:
                break
    return json.loads(field) if isinstance(field, str) else None


def _build(params: dict[str, Any], config: SearchConfig) -> dict[str, Any]:
    """The description of a trial that reported no config (stopped, or failed, before its
    first result): built from its Optuna parameters as the trial would have."""
    try:
        trial_config = apply(config.fixed, decode(config.space, params, config.fixed))
    except (ConfigError, ValueError) as e:
        return {"label": "", "params": params, "config": None, "invalid": f"invalid config: {e}"}
    return built_description(trial_config, config.space)


def failure_kind(error: BaseException) -> str:
    """'out_of_memory', 'worker_died', 'diverged' or 'exception' for a trial's error."""
    names = " ".join(type(c).__name__ for c in _causes(error)) + " " + error_reason(error)
    if "OutOfMemoryError" in names or "MemoryError" in names:
        return "out_of_memory"
    if any(k in names for k in ("ActorDied", "ActorError", "WorkerCrashed", "ActorUnavailable")):
        return "worker_died"
    if "FloatingPointError" in names:
        return "diverged"
    return "exception"


def _metric_keys(last: dict[str, Any]) -> list[str]:
    keys = known_metrics(last)
    keys += [k for k in ("active_heads_per_layer", "time_total_s") if k in last]
    return keys


def result_trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    return Path(str(result.path)).name.removeprefix("trial_") if result.path else "?"


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what caused it, outermost first: Ray's wrappers keep the original error in
    `.cause`, plain Python chains in `__cause__`."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and all(cause is not c for c in chain):
        chain.append(cause)
        cause = getattr(cause, "cause", None) or cause.__cause__
    return chain


def error_reason(error: BaseException) -> str:
    """The root cause in one line: 'FloatingPointError: val_loss is nan at step 40'."""
    cause = _causes(error)[-1]
    text = str(cause).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's RayTaskError text ends with the original 'Type: message' line
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:300]
    name = type(cause).__name__
    return f"{name}: {lines[-1] if lines else ''}"[:300]
