"""Benchmark planning: what the trainer's throughput benchmark must measure for a search's
objectives and resources, and how its tokens_per_s is measured, in words."""

from __future__ import annotations

from typing import TYPE_CHECKING

from automla.metrics import metric_context

if TYPE_CHECKING:
    from automla.schema import Objective, Resources, Scheduler


def plan_benchmark(
    fixed: dict,
    user_train: dict,
    objectives: list[Objective],
    scheduler: Scheduler | None,
    resources: Resources,
    runs_at_once: int = 1,
) -> None:
    """Ask the trainer for what the objectives need: `tokens_per_s@T` adds T to the benchmark's
    contexts; trials sharing a GPU, or the CPUs of one machine with other runs, get the
    exclusive benchmark unless the file says otherwise (their training clock would measure the
    neighbours)."""
    bench = fixed.setdefault("benchmark", {})
    names = [o.metric for o in objectives] + ([scheduler.metric] if scheduler else [])
    wanted = {t for t in map(metric_context, names) if t is not None}
    if wanted:
        bench["contexts"] = sorted(set(bench.get("contexts") or []) | wanted)
    user = user_train.get("benchmark")
    explicit = isinstance(user, dict) and "enabled" in user
    shares_cpus = resources.gpus == 0 and runs_at_once > 1
    if not explicit and (0 < resources.gpus < 1 or shares_cpus):
        bench["enabled"] = True


def throughput_method(fixed: dict) -> str:
    """How a search's tokens_per_s is measured, in words (for the run folder)."""
    bench = fixed.get("benchmark") or {}
    contexts = bench.get("contexts") or []
    if bench.get("enabled"):
        text = (
            f"exclusive benchmark at each evaluation: median of {bench.get('steps')} training "
            f"steps after {bench.get('warmup')} warm-up, on a copy of the model, with every "
            "other trial on the device paused; the training clock's figure is "
            "train_tokens_per_s"
        )
    else:
        text = (
            "training clock: steady-state steps between evaluations (shared with whatever "
            "else runs on the device)"
        )
    if contexts:
        text += "; tokens_per_s@T: the same benchmark at context T, batch " + str(
            bench.get("context_batch", 1)
        )
    return text
