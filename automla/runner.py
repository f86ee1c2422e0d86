"""Run a search: Ray Tune trials proposed by a multi-objective OptunaSearch.

`run_search` starts a local Ray with its dashboard (or joins `address` / RAY_ADDRESS), keeps the
Optuna study in `<run>/study.db`, runs every trial as a thin wrapper around
`automla.trainers.train`, shows live progress, and writes the run folder (see `report`).
`resume_search` continues an interrupted one from its run folder. Failed trials are recorded
with a kind and a reason and told to Optuna as FAIL; early-stopped ones as PRUNED.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import optuna
import ray
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from automla import reference as reference_mod
from automla import report as report_mod
from automla.benchmark_plan import throughput_method
from automla.distributed import (
    ResourceError,
    max_concurrent_trials,
    run_distributed_trial,
    trial_resources,
    validate_resources,
)
from automla.domains import Domain
from automla.gpu_usage import GpuSampler
from automla.metrics import known_metrics
from automla.preflight import ClusterError, check_data, cluster_address
from automla.report import GPU_USAGE_FILE, SearchFailed, SearchInterrupted
from automla.run_folder import relative_trial_path, study_name, study_url
from automla.schema import (
    RATIOS,
    SearchConfig,
    SpaceError,
    load,
    scheduler_max_t,
    to_yaml_dict,
)
from automla.space import apply, decode, define_by_run, flat_values, trial_label
from automla.trainers.config import ConfigError, to_dict

TrainFn = Callable[..., dict]

# Ray's INFO lines would tear through the live table.
_RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


def default_name(space_file: str | Path) -> str:
    """`<space stem>-<YYYYmmdd-HHMMSS>`."""
    return f"{Path(space_file).stem}-{datetime.now():%Y%m%d-%H%M%S}"


def run_search(
    config: SearchConfig,
    out_dir: str | Path,
    name: str,
    trials: int | None = None,
    address: str | None = None,
    *,
    train_fn: TrainFn | None = None,
    console: Console | None = None,
) -> Path:
    """Run the search described by `config`; returns the run folder `out_dir/name`.

    Args:
        trials: overrides `config.trials`.
        address: a Ray cluster to join; None starts a local Ray with its dashboard unless
            RAY_ADDRESS is set.
        train_fn: the trainer (default `automla.trainers.train`); it must be importable or
            picklable by value in Ray's workers.

    Raises SearchFailed when no trial completed, SearchInterrupted when the search stopped
    early (Ctrl-C; the run folder is written first in both cases), ClusterError when the
    cluster does not answer and SpaceError when the data cannot train (both before any folder
    is made).
    """
    if trials is not None and trials < 1:
        raise SpaceError(config.source, "trials", f"expected an integer >= 1, got {trials}")
    config = dataclasses.replace(
        config, trials=trials or config.trials, fixed=copy.deepcopy(config.fixed)
    )
    make_sampler(config)  # a bad sampler stops the run before anything is written
    run_dir = Path(out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} already exists; choose another --name or --out, or continue it with "
            f"--resume {run_dir}"
        )
    # what can be known before Ray starts is checked before the run folder exists
    address = _checked_address(address)
    check_data(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir.resolve()
    _absolute_paths(config)
    (run_dir / "space.yaml").write_text(yaml.safe_dump(to_yaml_dict(config), sort_keys=False))
    try:
        return _execute(config, run_dir, address, train_fn, console or Console(), resume=False)
    except (SpaceError, ClusterError):
        # Ray could not start, or the cluster cannot run this search (checked before any
        # trial): leave no half folder
        if not (run_dir / "ray").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_search(
    run_dir: str | Path,
    address: str | None = None,
    *,
    train_fn: TrainFn | None = None,
    console: Console | None = None,
) -> Path:
    """Continue an interrupted search (Ctrl-C, a killed driver) from its run folder.

    Ray Tune restores its experiment state and the searcher (the Optuna study with the
    sampler's state): finished trials are kept, unfinished ones restart from their last
    checkpoint, and the trial budget counts what is done. Optuna trials that the driver had
    proposed after Ray's last experiment checkpoint are marked failed ("lost") so that they
    are neither rerun nor counted.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "space.yaml").is_file():
        raise report_mod.RunError(f"{run_dir}: not a run folder (space.yaml is missing)")
    if not tune.Tuner.can_restore(str(run_dir / "ray")):
        raise report_mod.RunError(
            f"{run_dir}: Ray saved no experiment state before the search stopped; "
            "start it again instead"
        )
    config = load(run_dir / "space.yaml")
    address = _checked_address(address)
    check_data(config)
    return _execute(config, run_dir, address, train_fn, console or Console(), resume=True)


def _checked_address(address: str | None) -> str | None:
    """The cluster to join, probed (see `preflight.cluster_address`); a caller's running Ray
    (a notebook, tests) is used as it is."""
    return None if ray.is_initialized() else cluster_address(address)


def _execute(
    config: SearchConfig,
    run_dir: Path,
    address: str | None,
    train_fn: TrainFn | None,
    console: Console,
    *,
    resume: bool,
) -> Path:
    name = run_dir.name
    log = _log_to(run_dir / "search.log")
    log.info(
        "%s %s: %d trials, concurrency %d, space %s",
        "resume" if resume else "search",
        name,
        config.trials,
        config.concurrency,
        config.source,
    )
    log.info("tokens_per_s: %s", throughput_method(config.fixed))
    started = time.time()
    owns_ray = not ray.is_initialized()
    try:
        ctx = _start_ray(address, name) if owns_ray else ray.get_runtime_context()
    except (ConnectionError, TimeoutError) as e:
        where = f"cluster {address}" if address else "a local Ray"
        raise ClusterError(f"could not start or join {where}: {e}") from None
    try:
        dashboard = ctx.dashboard_url if owns_ray else ray._private.worker.get_dashboard_url()
        url = f"http://{dashboard}" if dashboard else None
        _print_banner(console, run_dir, url, address)
        log.info("ray dashboard: %s; ray gcs: %s", url, ray.get_runtime_context().gcs_address)
        res = config.resources
        workers, gpus = res.n_workers, res.gpus_per_worker
        cluster = ray.cluster_resources()
        try:
            validate_resources(res.cpus, gpus, workers, cluster)
        except ResourceError as e:
            raise SpaceError(config.source, "resources", str(e)) from None
        fit = max_concurrent_trials(res.cpus, gpus, workers, cluster)
        if fit < config.concurrency:
            log.info(
                "concurrency %d capped at %d: the cluster fits no more", config.concurrency, fit
            )
            config = dataclasses.replace(config, concurrency=fit)
        with _ray_output_to(log):
            trainable = tune.with_resources(
                tune.with_parameters(
                    automla_trial,
                    fixed=config.fixed,
                    space=config.space,
                    cpus=res.cpus,
                    train_fn=train_fn,
                    workers=workers,
                    use_gpu=gpus > 0,
                ),
                trial_resources(res.cpus, gpus, workers),
            )
            progress = _Progress(console, config, name, started, log)
            if resume:
                _repoint_search_state(run_dir / "ray")
                tuner = tune.Tuner.restore(
                    str(run_dir / "ray"),
                    trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=False,
                )
                # the callbacks come back from Tune's pickle without the display
                tuner._local_tuner.get_run_config().callbacks = [progress]
            else:
                tuner = _new_tuner(config, run_dir, trainable, progress)
            reference = None
            if reference_mod.needs_training(config, run_dir):
                # a Ray task beside the trials, holding what one trial holds
                resources = trial_resources(res.cpus, gpus, workers)
                reference = reference_mod.start(
                    config, train_fn, resources, workers, res.cpus, gpus > 0
                )
                log.info("dense reference: training beside the trials")
                console.print(
                    "[bold]Dense reference[/]: the fixed model with dense attention, trained "
                    "once beside the trials (reference.json)"
                )
            # GPU utilisation of the driver's machine, sampled while trials run
            with progress, GpuSampler(run_dir / GPU_USAGE_FILE), _OptunaSearch.study_in(run_dir):
                results = tuner.fit()
        numbers = _settle_study(run_dir, {_trial_id(r) for r in results})
        records = _records(results, config, numbers, run_dir)
        if reference is not None:
            interrupted = len(records) < config.trials or any(
                r["state"] == report_mod.STOPPED for r in records
            )
            _finish_reference(reference, config, run_dir, interrupted, log)
    finally:
        if owns_ray and ray.is_initialized():  # a caller's Ray (a notebook, tests) stays up
            ray.shutdown()
    (run_dir / "trials.json").write_text(json.dumps(records, indent=1) + "\n")
    summary = report_mod.write_outputs(run_dir, config, records)
    wall = time.time() - started
    counts = {s: sum(r["state"] == s for r in records) for s in report_mod.STATES}
    log.info("done in %.1f s: %s", wall, counts)
    console.print(report_mod.front_table(summary, name))
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    console.print(
        f"{summary['trials']} trials ({shown}) in {_duration(wall)} · "
        f"hypervolume {report_mod.hypervolume_text(summary)} · run folder {run_dir}"
    )
    if summary.get("gpu_usage"):
        u = summary["gpu_usage"]
        console.print(
            f"GPU utilisation {u['mean_util_pct']:.0f}% (mean over {len(u['gpus'])} GPUs, "
            f"{u['samples']} samples), peak memory {u['peak_mem_mib'] / 1024:.1f} GiB"
        )
    if counts[report_mod.STOPPED] or len(records) < config.trials:
        raise SearchInterrupted(run_dir)
    _prune_checkpoints(run_dir / "ray")  # nothing left to resume: keep each trial's newest
    if records and not counts[report_mod.COMPLETED] and not counts[report_mod.PRUNED]:
        raise SearchFailed(run_dir, [f"{r['trial_id']}: {r['reason']}" for r in records])
    return run_dir


def _repoint_search_state(experiment_dir: Path) -> None:
    """Point the saved search generator's storage at where the run folder lies now.

    Ray Tune (2.60) restores moved trials into the new folder, but its search generator comes
    back with the Experiment it pickled, storage path included: trials proposed after the
    resume of a moved run folder would write into the old one (or fail where it is gone)."""
    from ray import cloudpickle

    run_dir = str(experiment_dir.parent)
    for path in experiment_dir.glob("search_gen_state-*"):
        state = cloudpickle.loads(path.read_bytes())
        storage = getattr(state.get("experiment"), "storage", None)
        if storage is not None and storage.storage_fs_path != run_dir:
            storage.storage_fs_path = run_dir
            path.write_bytes(cloudpickle.dumps(state))


def _finish_reference(
    task: Any, config: SearchConfig, run_dir: Path, interrupted: bool, log: logging.Logger
) -> None:
    """Wait for the dense reference and write reference.json; an interrupted search that has
    not finished it cancels it (a resume trains it again)."""
    ready, _ = ray.wait([task], timeout=0)
    if interrupted and not ready:
        ray.cancel(task, force=True)
        log.info("dense reference: cancelled with the search; a resume trains it")
        return
    ref_config = reference_mod.reference_config(config)
    try:
        history = ray.get(task)
    except Exception as e:  # recorded, never fatal: the trials are the search
        entry = reference_mod.record(run_dir, ref_config, None, _reason(e))
    else:
        entry = reference_mod.record(run_dir, ref_config, history)
    log.info("dense reference: %s %s", entry["state"], entry["reason"] or entry["metrics"])


def _new_tuner(config: SearchConfig, run_dir: Path, trainable: Any, progress: Any) -> Any:
    searcher = _OptunaSearch(
        space=define_by_run(config.space, config.fixed),
        metric=config.metrics,
        mode=config.modes,
        sampler=make_sampler(config),
        study_name=run_dir.name,
        storage=optuna.storages.RDBStorage(study_url(run_dir)),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_scheduler(config),
            num_samples=config.trials,
            max_concurrent_trials=config.concurrency,
            trial_dirname_creator=_trial_dirname,
            # a fresh worker per trial would re-import torch each time (seconds on CPU)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=tune.FailureConfig(max_failures=config.max_failures, fail_fast=False),
            # every checkpoint is kept while the search runs: Ray deletes superseded ones as
            # soon as a newer one registers, but its experiment state (what --resume reads) may
            # still name the old one; `_prune_checkpoints` trims them once the search ends
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            # trials write into a staging folder; bring train/, stdout, stderr home
            sync_config=tune.SyncConfig(sync_artifacts=True),
            callbacks=[progress],
            verbose=0,
            log_to_file=True,
        ),
    )


def make_scheduler(config: SearchConfig) -> Any:
    """ASHA on the file's scheduler metric, with trainer steps as its clock; None without one."""
    s = config.scheduler
    if s is None:
        return None
    return tune.schedulers.ASHAScheduler(
        time_attr="step",
        metric=s.metric,
        mode=s.mode,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        max_t=scheduler_max_t(config),
    )


def make_sampler(config: SearchConfig) -> Any:
    """The seeded Optuna sampler named in the file."""
    s = config.sampler
    startup = s.startup_trials
    if startup is None:
        # the samplers' defaults (10, 50) would leave a small budget entirely random
        startup = max(2, min(10, config.trials // 2))
    if s.name == "tpe":
        # group: conditional settings (MLA ones only under MLA attention) are modelled
        # within each group of trials that share a set of parameters
        with warnings.catch_warnings():  # group is experimental, and the right tool here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=s.seed,
                n_startup_trials=startup,
                multivariate=True,
                group=True,
                constant_liar=True,
            )
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(2, startup))
    if s.name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise SpaceError(
                config.source,
                "sampler.name",
                "'gp' needs scipy, which is not installed (pip install scipy)",
            ) from None
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=s.seed)


FAILURE = "automla_failure"
"""Result key of a trial that ended without a usable result and must not be retried."""
FINAL = "automla_final"
"""Result key: True once the trainer reached its last step (an early-stopped trial never does)."""


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
    if config.threads is None:
        config.threads = threads
    if train_fn is None:
        from automla.trainers import train as train_fn

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        for key in ("train_loss", "val_loss"):
            v = metrics.get(key)
            if isinstance(v, float) and not math.isfinite(v):
                raise FloatingPointError(f"{key} is {v} at step {metrics.get('step')}")
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        final = metrics.get("step", 0) >= config.steps
        tune.report({**metrics, FINAL: final, **node}, checkpoint=checkpoint)

    out_dir = Path(tune.get_context().get_trial_dir()) / "train"

    def run(resume: str | None = None) -> None:
        if workers > 1:
            run_distributed_trial(
                config,
                workers,
                use_gpu,
                report,
                out_dir=out_dir,
                cpus_per_worker=cpus,
                resume=resume,
                train_fn=train_fn,
            )
        elif resume is None:
            train_fn(config, out_dir=out_dir, report=report)
        else:
            train_fn(config, out_dir=out_dir, report=report, resume=resume)

    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run()
        else:  # a retry or a resumed search: continue from the last reported checkpoint
            with checkpoint.as_directory() as path:
                run(path)
    except FloatingPointError as e:
        tune.report({FAILURE: "diverged", "reason": f"FloatingPointError: {e}", **node})
    except ConfigError as e:  # the trainer rejected it (its data): the same on every retry
        tune.report({FAILURE: "invalid", "reason": f"invalid config: {e}", **node})
    except (torch.OutOfMemoryError, MemoryError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'out of memory'}"
        tune.report({FAILURE: "out_of_memory", "reason": reason[:300], **node})


def _records(
    results: Any, config: SearchConfig, numbers: dict[str, int], run_dir: Path
) -> list[dict]:
    """One record per trial: id, state, reason, failure kind, retries, node, searched values,
    final metrics, full config."""
    metrics = config.metrics
    retries = {t.trial_id: t.num_failures for t in results._experiment_analysis.trials}
    records = []
    for result in results:
        params = dict(result.config or {})
        trial_id = _trial_id(result)
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
            record["state"], record["reason"] = report_mod.FAILED, _reason(result.error)
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
    names = " ".join(type(c).__name__ for c in _causes(error)) + " " + _reason(error)
    if "OutOfMemoryError" in names or "MemoryError" in names:
        return "out_of_memory"
    if any(k in names for k in ("ActorDied", "ActorError", "WorkerCrashed", "ActorUnavailable")):
        return "worker_died"
    if "FloatingPointError" in names:
        return "diverged"
    return "exception"


def _prune_checkpoints(ray_dir: Path) -> None:
    """Keep only each trial's newest checkpoint, after Ray has written its final state."""
    for trial_dir in ray_dir.glob("trial_*"):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        for old in checkpoints[:-1]:
            shutil.rmtree(old, ignore_errors=True)


def _settle_study(run_dir: Path, ray_ids: set[str]) -> dict[str, int]:
    """Mark Optuna trials Ray does not know (proposed after its last experiment checkpoint
    before the driver died) as failed, so a resume neither reruns nor counts them; return
    Ray trial id -> Optuna trial number."""
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name(run_dir), storage=study_url(run_dir))
    numbers = {}
    for t in study.get_trials(deepcopy=False):
        rid = t.user_attrs.get("ray_trial_id")
        if rid in ray_ids:
            numbers[rid] = t.number
        elif t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "failure", "lost with the driver")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return numbers


def _metric_keys(last: dict[str, Any]) -> list[str]:
    keys = known_metrics(last)
    keys += [k for k in ("active_heads_per_layer", "time_total_s") if k in last]
    return keys


def _trial_id(result: Any) -> str:
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


def _reason(error: BaseException) -> str:
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


def _start_ray(address: str | None, run_name: str) -> Any:
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # the run's name labels the driver job in the dashboard and in `ray list jobs`
    job = ray.job_config.JobConfig(metadata={"automla_run": run_name})
    if address:
        return ray.init(
            address=address, log_to_driver=False, logging_level=logging.WARNING, job_config=job
        )
    # A new local cluster keeps Ray's default: token authentication on (~/.ray/auth_token).
    # None: the dashboard starts wherever its packages are installed (ray[default]); where
    # they are not, the search runs without it rather than failing
    return ray.init(
        include_dashboard=None,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
        job_config=job,
    )


def _print_banner(console: Console, run_dir: Path, url: str | None, address: str | None) -> None:
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    rel = os.path.relpath(run_dir)
    where = f"joined {address}" if address else "local Ray"
    if url:
        console.print(f"[bold]Ray dashboard[/] ({where}): {url}")
        if os.environ.get(AUTH_MODE_ENV_VAR, "token").lower() == "token":
            console.print(
                "  token-protected: run `ray get-auth-token` (or read ~/.ray/auth_token) and "
                "paste it when the page asks; API clients send "
                "`Authorization: Bearer <token>`"
            )
    else:
        console.print(f"[yellow]Ray dashboard not available[/] ({where})")
    console.print(
        f"[bold]Optuna dashboard[/]: automla dashboard {rel}  "
        f"(or: optuna-dashboard {study_url(run_dir)})"
    )
    console.print(f"[bold]Run folder[/]: {rel}")


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that records every trial's outcome in the study: a failed trial, or one that
    reported a NaN or no objective, is told FAIL (the stock searcher leaves it RUNNING when
    Optuna rejects the values), an early-stopped one PRUNED; the Ray trial id is kept as a
    user attribute.

    Its saved state names no path: the storage, the study and the trials are reopened from the
    run folder's study.db when Tune restores it (see `study_in`), so a copied or moved run
    folder resumes (and never writes into the study of the folder it was copied from)."""

    study_dir: ClassVar[Path | None] = None
    """The run folder whose study.db a restored searcher opens, set around `tuner.fit()`."""

    @classmethod
    @contextlib.contextmanager
    def study_in(cls, run_dir: Path) -> Iterator[None]:
        cls.study_dir = run_dir
        try:
            yield
        finally:
            cls.study_dir = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        # trial ids stand for the trials (already ids in a copy not reopened yet)
        state["_ot_trials"] = {k: getattr(t, "_trial_id", t) for k, t in self._ot_trials.items()}
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._reopen()

    def _reopen(self) -> None:
        if self._ot_study is not None:
            return
        if self.study_dir is None:
            raise RuntimeError("a restored search needs its run folder: use resume_search")
        self._storage = optuna.storages.RDBStorage(study_url(self.study_dir))
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler
        )
        self._ot_trials = {
            k: optuna.trial.Trial(self._ot_study, t) if isinstance(t, int) else t
            for k, t in self._ot_trials.items()
        }

    def suggest(self, trial_id: str) -> dict | None:
        self._reopen()
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._reopen()
        ot_trial = self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)
        # a resumed driver may replay a trial its predecessor already told the study
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():
            return
        result = result or {}
        values = [result.get(m) for m in self._metric]
        if error or result.get(FAILURE):
            ot_trial.set_user_attr("failure", result.get(FAILURE) or "error")
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif not result.get(FINAL, True):
            # stopped early by the scheduler: its metrics are those of a shorter run
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        elif all(report_mod.finite_number(v) for v in values):
            self._ot_study.tell(ot_trial, values, state=TrialState.COMPLETE)
        else:
            ot_trial.set_user_attr("failure", f"objectives {values}")
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)


class _Progress(tune.Callback):
    """Live progress: a rich table on a terminal, one line per event otherwise."""

    def __init__(
        self, console: Console, config: SearchConfig, name: str, started: float, log: logging.Logger
    ):
        self.console = console
        self.config = config
        self.name = name
        self.started = started
        self.log = log
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = (
            Live(
                console=console, refresh_per_second=2, get_renderable=self._render, transient=False
            )
            if console.is_terminal
            else None
        )

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the display does not travel.
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live", "log")}

    def __enter__(self) -> _Progress:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.stop()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = "running"
        self._event(f"start  {trial.trial_id}  {row['desc']}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._row(trial)["last"] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        last = row.get("last") or {}
        if last.get(FAILURE):
            row["state"], row["reason"] = "failed", last.get("reason", "")
            self._event(f"FAILED {trial.trial_id}  {row['reason']}")
        elif not last.get(FINAL, True):
            row["state"] = "pruned"
            self._event(f"pruned {trial.trial_id}  at step {last.get('step')}")
        else:
            row["state"] = "done"
            shown = " ".join(f"{m}={_num(last.get(m))}" for m in self.config.metrics)
            self._event(f"done   {trial.trial_id}  {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = "failed"
        reason = ""
        try:  # the error files are still in the driver's staging folder at this point
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as f:
                    reason = _reason(ray.cloudpickle.load(f))
        except Exception:  # cosmetic here; trials.csv records the reason from the results
            pass
        row["reason"] = reason
        self._event(f"FAILED {trial.trial_id}  {reason}")

    def _row(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self.rows:
            desc = ""
            try:
                fixed = self.config.fixed
                cfg = apply(fixed, decode(self.config.space, trial.config, fixed))
                values = flat_values(cfg, self.config.space)
                desc = " ".join(
                    [trial_label(cfg)]
                    + [
                        f"{report_mod.short_name(k)}={v}"
                        for k, v in values.items()
                        if not k.startswith(RATIOS + ".")
                    ]
                )
            except Exception as e:  # shown as failed by the trial itself
                desc = f"(invalid: {e})"
            self.rows[trial.trial_id] = {"desc": desc, "state": "pending", "last": None}
        return self.rows[trial.trial_id]

    def _event(self, text: str) -> None:
        self.log.info(text)
        if not self.live:
            # markup off: a failure's text may hold "[/path...]", which rich would parse as a tag
            stamp = f"[{_duration(time.time() - self.started)}]"
            self.console.print(f"{stamp} {text}", highlight=False, markup=False)

    def _render(self) -> Group:
        states = [r["state"] for r in self.rows.values()]
        done, failed = states.count("done"), states.count("failed")
        running, pruned = states.count("running"), states.count("pruned")
        head = Text(
            f"search {self.name} · {done + failed + pruned}/{self.config.trials} finished "
            f"({done} completed, {pruned} pruned, {failed} failed, {running} running) · "
            f"{_duration(time.time() - self.started)}"
        )
        table = Table(box=None, pad_edge=False)
        for col in ("trial", "state", "config", "step", *self.config.metrics):
            table.add_column(
                col, justify="right" if col not in ("trial", "state", "config") else "left"
            )
        for tid, r in list(self.rows.items())[-14:]:
            last = r.get("last") or {}
            style = {"failed": "red", "running": "cyan", "pruned": "dim"}.get(r["state"])
            table.add_row(
                tid,
                r["state"],
                Text(r["desc"] if r["state"] != "failed" else r.get("reason", "")[:70]),
                _num(last.get("step")),
                *[_num(last.get(m)) for m in self.config.metrics],
                style=style,
            )
        return Group(head, table)


@contextlib.contextmanager
def _ray_output_to(log: logging.Logger) -> Iterator[None]:
    """Send Ray's and Optuna's log lines to search.log while the live display runs, and use
    Tune's quiet legacy output (the new engine prints every trial's error block)."""
    ray_log = logging.getLogger("ray")
    saved = ray_log.handlers[:]
    ray_log.handlers = log.handlers[:]
    env = {
        "RAY_AIR_NEW_OUTPUT": "0",
        # a failed trial's last result carries no objectives; _records checks them instead
        "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        ray_log.handlers = saved
        optuna.logging.set_verbosity(optuna_level)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _absolute_paths(config: SearchConfig) -> None:
    # trials may run in another working directory
    data = config.fixed.get("data", {})
    if data.get("path") and not os.path.isabs(data["path"]):
        data["path"] = os.path.abspath(data["path"])


def _log_to(path: Path) -> logging.Logger:
    log = logging.getLogger(f"automla.search.{path.parent.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.handlers = [handler]
    return log


def _num(v: Any) -> str:
    return "" if v is None else report_mod.format_value(v)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
