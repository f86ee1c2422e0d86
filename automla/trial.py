"""The Ray Tune trial function: build one trial's config, train it, forward every evaluation to
Tune, and end a trial that would fail the same way on a retry with a FAILURE result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune

from automla import compat
from automla.distributed import run_training
from automla.domains import Domain
from automla.space import apply, decode, flat_values, trial_label
from automla.trainers.config import ConfigError, TrainConfig, to_dict

TrainFn = Callable[..., dict]


FAILURE = "automla_failure"
"""Result key of a trial that ended without a usable result and must not be retried."""


FINAL = "automla_final"
"""Result key: True once the trainer reached its last step (an early-stopped trial never does)."""


BUILT = "automla_built"
"""Result key of a trial's first result (per attempt): the config it built, as JSON of
`built_description`, so the driver (records, live display) never rebuilds it."""


def built_description(config: TrainConfig, space: Mapping[str, Domain]) -> dict[str, Any]:
    """A built trial config as the records show it: its label ('dense', 'L50 G25 S25'), its
    searched values one column each, and the whole config."""
    return {
        "label": trial_label(config),
        "params": flat_values(config, space),
        "config": to_dict(config),
    }


def automla_trial(
    params: dict[str, Any],
    *,
    fixed: dict[str, Any],
    space: dict[str, Domain],
    cpus: float,
    train_fn: TrainFn | None,
    workers: int = 1,
    use_gpu: bool = False,
) -> None:
    """One Ray Tune trial: build the config, train, forward every evaluation to Tune.

    With several workers the trial starts them through Ray Train and forwards rank 0's
    evaluations.

    A diverged (NaN/inf loss), out-of-memory or invalid trial ends with a FAILURE result rather
    than an exception: retrying it would fail the same way. Anything else raises, and Ray
    retries the trial up to `max_failures` times from its last checkpoint.
    """
    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    try:
        config = apply(fixed, decode(space, params, fixed))
    except ConfigError as e:
        tune.report({FAILURE: "invalid", "reason": f"invalid config: {e}", **node})
        return
    # the config as searched, before this worker's thread count is filled in
    built = {BUILT: json.dumps(built_description(config, space))}

    def send(result: dict, checkpoint: tune.Checkpoint | None = None) -> None:
        """Report to Tune; the attempt's first result carries the built config."""
        tune.report({**result, **built, **node}, checkpoint=checkpoint)
        built.clear()

    if config.threads is None:
        config.threads = threads

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        for key in ("train_loss", "val_loss"):
            v = metrics.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"{key} is {v} at step {metrics.get('step')}")
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        final = metrics.get("step", 0) >= config.steps
        send({**metrics, FINAL: final}, checkpoint)

    # the same folder on every attempt, the one Tune syncs home (see compat.trial_working_dir)
    out_dir = compat.trial_working_dir() / "train"

    def run(resume: str | None = None) -> None:
        run_training(
            config, report, out_dir,
            workers=workers, cpus=cpus, use_gpu=use_gpu, train_fn=train_fn, resume=resume,
        )  # fmt: skip

    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run()
        else:  # a retry or a resumed search: continue from the last reported checkpoint
            with checkpoint.as_directory() as path:
                run(path)
    except FloatingPointError as e:
        send({FAILURE: "diverged", "reason": f"FloatingPointError: {e}"})
    except ConfigError as e:  # the trainer rejected it (its data): the same on every retry
        send({FAILURE: "invalid", "reason": f"invalid config: {e}"})
    except (torch.OutOfMemoryError, MemoryError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'out of memory'}"
        send({FAILURE: "out_of_memory", "reason": reason[:300]})
