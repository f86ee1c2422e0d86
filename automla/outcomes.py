"""Trial outcomes: one record per finished Ray trial (state, reason, failure kind, metrics,
config) and the failure kind and root-cause reason of a trial's error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from automla import report as report_mod
from automla.metrics import known_metrics
from automla.run_folder import relative_trial_path
from automla.schema import SearchConfig
from automla.space import apply, decode, flat_values, trial_label
from automla.trainers.config import ConfigError, to_dict
from automla.trial import FAILURE, FINAL


def trial_records(
    results: Any, config: SearchConfig, numbers: dict[str, int], run_dir: Path
) -> list[dict]:
    """One record per trial: id, state, reason, failure kind, retries, node, searched values,
    final metrics, full config."""
    metrics = config.metrics
    retries = {t.trial_id: t.num_failures for t in results._experiment_analysis.trials}
    records = []
    for result in results:
        params = dict(result.config or {})
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
            "metrics": {},
            "config": None,
            "finished": last.get("timestamp"),
            "path": relative_trial_path(run_dir, result.path),
        }
        try:
            values = decode(config.space, params, config.fixed)
            trial_config = apply(config.fixed, values)
            record["config"] = to_dict(trial_config)
            record["params"] = flat_values(trial_config, config.space)
            record["label"] = trial_label(trial_config)
        except (ConfigError, ValueError) as e:
            record["params"] = params
            record["state"], record["reason"] = report_mod.FAILED, f"invalid config: {e}"
            record["failure"] = "invalid"
        record["metrics"] = {k: last[k] for k in _metric_keys(last)}
        steps = (record["config"] or {}).get("steps")
        if result.error is not None:
            record["state"], record["reason"] = report_mod.FAILED, error_reason(result.error)
            record["failure"] = failure_kind(result.error)
        elif last.get(FAILURE):
            record["state"], record["failure"] = report_mod.FAILED, last[FAILURE]
            record["reason"] = last.get("reason", "")
        elif record["state"] == report_mod.COMPLETED:
            missing = [m for m in metrics if not report_mod.finite_number(record["metrics"].get(m))]
            if not last.get(FINAL, True) or (steps and record["metrics"].get("step", 0) < steps):
                at = f"at step {record['metrics'].get('step', 0)} of {steps}"
                if last.get("done"):  # the scheduler stopped it
                    record["state"], record["reason"] = report_mod.PRUNED, f"early-stopped {at}"
                else:  # interrupted (Ctrl-C, a lost driver): resumable
                    record["state"], record["reason"] = report_mod.STOPPED, f"interrupted {at}"
            elif missing:
                record["state"], record["failure"] = report_mod.FAILED, "no_result"
                record["reason"] = f"no finite {', '.join(missing)} reported"
        records.append(record)
    records.sort(key=report_mod.proposal_order)
    return records


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
