"""Multi-worker trials: Ray Train's TorchTrainer inside a Ray Tune trial, and resource checks.

A trial asking for several workers runs `run_distributed_trial` in its Tune function: it starts
a TorchTrainer (one process per worker, gloo on CPU, NCCL on GPUs), every worker calls
`automla.trainers.train` with the same config (batch_size is the global batch), and rank 0's
evaluations come back to the trial's own process through a Ray queue, where `report` forwards
them to Tune; rank 0 trains on once that is done, as in a one-worker trial. The trial itself
holds no resources (see `trial_resources`): the workers reserve theirs, and they are owned by
the trial, so a trial stopped by Tune takes its workers with it.

Ray 2.60 runs Ray Train v2, which no longer accepts a TorchTrainer as a Tune trainable; calling
`fit()` inside a function trainable is the supported way.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from automla.trainers.config import TrainConfig

Report = Callable[[dict, Path | None], None]


# Tune rejects an empty request; a multi-worker trial's own process only waits on its workers.
DRIVER_CPUS = 0.01


class ResourceError(ValueError):
    """A resource request that cannot be met (raised before any trial starts)."""


def validate_resources(
    cpus: float, gpus: float, workers: int, cluster_resources: Mapping[str, float]
) -> None:
    """Check a per-trial request against the cluster (`ray.cluster_resources()`).

    cpus and gpus are per worker; a trial takes workers x each. gpus is 0, a fraction below 1
    (one worker, several trials sharing a GPU) or exactly 1 (one GPU per worker: a trial on N
    GPUs asks for N workers). A multi-worker trial's process holds DRIVER_CPUS besides.
    Raises ResourceError naming what was asked and what exists.
    """
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ResourceError(f"workers must be an integer >= 1, got {workers!r}")
    if workers < 1:
        raise ResourceError(f"workers must be an integer >= 1, got {workers}")
    if not (isinstance(cpus, int | float) and math.isfinite(cpus) and cpus > 0):
        raise ResourceError(f"cpus per worker must be > 0, got {cpus!r}")
    if not (isinstance(gpus, int | float) and math.isfinite(gpus) and gpus >= 0):
        raise ResourceError(f"gpus per worker must be >= 0, got {gpus!r}")
    if 0 < gpus < 1 and workers > 1:
        raise ResourceError(
            f"a GPU fraction ({gpus}) is for one-worker trials sharing a GPU; several workers "
            "of one trial need a GPU each (gpus: 1)"
        )
    if gpus > 1 and gpus != int(gpus):
        raise ResourceError(
            f"gpus={gpus}: use a fraction below 1 (trials share a GPU) or a whole number "
            "of GPUs, one per worker (workers: N, gpus: 1)"
        )
    if gpus > 1:
        n = int(workers * gpus)
        raise ResourceError(
            f"each worker trains on one GPU: for {n} GPUs per trial ask for workers: {n} "
            f"with gpus: 1, not gpus={gpus:g}"
        )

    total_cpus, total_gpus = workers * cpus, workers * gpus
    have_cpus = float(cluster_resources.get("CPU", 0.0))
    have_gpus = float(cluster_resources.get("GPU", 0.0))
    each = f" ({workers} workers x {{}})" if workers > 1 else ""
    if total_gpus > 0 and have_gpus == 0:
        raise ResourceError(f"{total_gpus:g} GPUs per trial asked for, but the cluster has no GPUs")
    if total_gpus > have_gpus + 1e-9:
        raise ResourceError(
            f"{total_gpus:g} GPUs per trial{each.format(f'{gpus:g}')} asked for, but the "
            f"cluster has {have_gpus:g}"
        )
    need = _trial_cpus(cpus, workers)
    if need > have_cpus + 1e-9:
        if workers > 1:  # the trial's own process holds a token share beside its workers
            fit = math.floor((have_cpus - DRIVER_CPUS) / workers * 100) / 100
            hint = f"; cpus: {fit:g} per worker fits" if fit > 0 else ""
            raise ResourceError(
                f"{need:g} CPUs per trial ({workers} workers x {cpus:g}, and {DRIVER_CPUS:g} "
                f"for the trial's own process) asked for, but the cluster has {have_cpus:g}" + hint
            )
        raise ResourceError(
            f"{total_cpus:g} CPUs per trial asked for, but the cluster has {have_cpus:g}"
        )


def max_concurrent_trials(
    cpus: float, gpus: float, workers: int, cluster_resources: Mapping[str, float]
) -> int:
    """How many such trials fit on the cluster at once (at least 1). A multi-worker trial whose
    workers cannot be placed waits with its driver started: cap concurrency at this."""
    fits = [(float(cluster_resources.get("CPU", 0.0)) + 1e-9) // _trial_cpus(cpus, workers)]
    if gpus > 0:
        fits.append((float(cluster_resources.get("GPU", 0.0)) + 1e-9) // (workers * gpus))
    return max(1, int(min(fits)))


def _trial_cpus(cpus: float, workers: int) -> float:
    """CPUs one trial takes from the cluster: its workers', plus its own process's token share
    when that process only waits on them."""
    return workers * cpus + (DRIVER_CPUS if workers > 1 else 0)


def trial_resources(cpus: float, gpus: float, workers: int) -> dict[str, float]:
    """What `tune.with_resources` should reserve for the trial process itself: everything for
    one worker (it trains in the trial), a token CPU share for several (the TorchTrainer's
    workers reserve their own; a trial holding them too would starve its own workers)."""
    if workers == 1:
        return {"cpu": cpus, "gpu": gpus}
    return {"cpu": DRIVER_CPUS}


def run_training(
    config: TrainConfig,
    report: Report,
    out_dir: Path,
    *,
    workers: int,
    cpus: float,
    use_gpu: bool,
    train_fn: Callable[..., dict] | None = None,
    resume: str | Path | None = None,
) -> None:
    """Train `config` in this process (one worker) or on `workers` Ray Train workers
    (`run_distributed_trial`), resuming from the checkpoint folder `resume` when given; every
    evaluation goes to report(metrics, checkpoint_dir)."""
    if workers > 1:
        run_distributed_trial(
            config, workers, use_gpu, report,
            out_dir=out_dir, cpus_per_worker=cpus, resume=resume, train_fn=train_fn,
        )  # fmt: skip
        return
    if train_fn is None:
        from automla.trainers import train as train_fn
    extra = {} if resume is None else {"resume": resume}
    train_fn(config, out_dir=out_dir, report=report, **extra)


def run_distributed_trial(
    config: TrainConfig,
    workers: int,
    use_gpu: bool,
    report: Report | None,
    *,
    out_dir: str | Path | None = None,
    cpus_per_worker: float = 1.0,
    resume: str | Path | None = None,
    storage_path: str | Path | None = None,
    train_fn: Callable[..., dict] | None = None,
) -> dict:
    """Train `config` on `workers` data-parallel workers started by Ray Train's TorchTrainer.

    Call it from a Ray Tune function trainable (or any Ray driver). report(metrics,
    checkpoint_dir) is called in this process for each of rank 0's evaluations, with
    `world_size` added to the metrics; checkpoint_dir is the folder rank 0 wrote (under out_dir)
    or None, left as it is until report returns (rank 0 waits for it). Returns rank 0's final
    metrics. A worker's failure (or a NaN loss, raised on every rank alike) is raised here, so
    the trial fails with it; a worker whose process died raises WorkerDiedError naming its rank.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Empty, Queue

    from automla.trainers.distributed import check_batch

    # before any worker starts; sequence-parallel workers share rows, workers / P groups split them
    check_batch(config.batch_size, workers // config.sequence_parallel)
    if train_fn is None:
        from automla.trainers import train as train_fn
    threads = max(1, int(cpus_per_worker))
    out = str(out_dir) if out_dir is not None else None
    resume_at = str(resume) if resume is not None else None
    channel = Queue(actor_options={"num_cpus": 0})
    # a token per evaluation once `report` has returned. Tune's report copies the checkpoint
    # folder and syncs the trial folder (out_dir lies inside it): rank 0 going on meanwhile
    # rewrites them under the copy (the next step's checkpoint, or checkpoint.tmp renamed away
    # mid-copy: FileNotFoundError, and the trial fails as if it had crashed)
    reported = Queue(actor_options={"num_cpus": 0})

    def worker_loop(_loop_config: dict) -> None:
        import torch
        from ray import train as ray_train

        from automla.trainers import distributed as dist

        torch.set_num_threads(threads)
        ctx = ray_train.get_context()
        world = ctx.get_world_size()
        cfg = config
        if cfg.threads is None:
            cfg = dataclasses.replace(cfg, threads=threads)

        def forward(metrics: dict, checkpoint_dir: Path | None) -> None:
            # the trainer reports on rank 0 only
            ckpt = str(checkpoint_dir) if checkpoint_dir is not None else None
            channel.put(({**metrics, "world_size": world}, ckpt))
            reported.get()  # out_dir is Tune's until the trial has reported this

        train_fn(cfg, out_dir=out if dist.is_main() else None, report=forward, resume=resume_at)

    if storage_path is None:
        storage_path = _trial_dir() or (Path(out) / "ray_train" if out else None)
    trainer = TorchTrainer(
        worker_loop,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="ray_train",
            storage_path=str(storage_path) if storage_path is not None else None,
            failure_config=FailureConfig(max_failures=0),
        ),
    )

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    # fit() blocks; the caller's thread stays free to hand each evaluation to Tune as it comes
    runner = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    runner.start()
    final: dict = {}

    def deliver(item: tuple[dict, str | None]) -> None:
        nonlocal final
        metrics, ckpt = item
        final = metrics
        if report is not None:
            report(dict(metrics), Path(ckpt) if ckpt is not None else None)
        reported.put(None)

    try:
        while runner.is_alive():
            try:
                deliver(channel.get(timeout=0.5))
            except (Empty, queue.Empty):
                continue
        runner.join()
        while True:  # what rank 0 put before fit() returned
            try:
                deliver(channel.get_nowait())
            except (Empty, queue.Empty):
                break
    finally:  # a rank 0 still waiting (report raised) fails with the queues
        channel.shutdown(force=True)
        reported.shutdown(force=True)
    if "error" in outcome:
        raise _worker_death(outcome["error"], workers) or outcome["error"]
    result = outcome["result"]
    if getattr(result, "error", None) is not None:
        raise _worker_death(result.error, workers) or result.error
    return final


class WorkerDiedError(RuntimeError):
    """A Ray Train worker of a multi-worker trial died (its process exited, was killed, or its
    node went away). Raised in the trial, so Tune retries it or records it failed."""


def _worker_death(error: BaseException, workers: int) -> WorkerDiedError | None:
    """A WorkerDiedError naming the dead rank when `error` (Ray Train's WorkerGroupError) says
    that a worker's process died; None for any other failure.

    Why: when one rank dies, the others fail too, on their next collective (gloo's "Connection
    reset by peer"), and the WorkerGroupError lists every rank. Its text ends with such a
    surviving rank's error, so the trial's recorded reason would blame a network error (and
    carry "[/path/pair.cc:537]", which rich reads as markup). The reason must name the death.
    """
    from ray.exceptions import RayActorError

    dead = []
    for rank, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        # a dead worker fails Ray Train's health check with the actor's own error inside
        cause = getattr(failure, "health_check_failure", None) or failure
        if isinstance(cause, RayActorError):
            dead.append((rank, cause))
    if not dead:
        return None
    rank, cause = dead[0]
    how = re.search(r"Worker exit type: (\w+)", str(cause))
    died = WorkerDiedError(
        f"worker rank {rank} of {workers} died ({type(cause).__name__}"
        + (f", exit type {how.group(1)}" if how else "")
        + ")"
    )
    # not chained: the recorded reason is the innermost cause's last line, so the original
    # error travels as a note (shown in tracebacks, e.g. search.log), not as __cause__
    died.__notes__ = [str(error)]
    return died


def _trial_dir() -> str | None:
    """The Tune trial's working folder when running inside a trial, else None."""
    from automla import compat

    try:
        return str(compat.trial_working_dir())
    except Exception:  # not in a Tune session
        return None
