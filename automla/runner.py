"""Run a search: Ray Tune trials proposed by a multi-objective OptunaSearch.

`run_search` starts a local Ray with its dashboard (or joins `address` / RAY_ADDRESS), keeps the
Optuna study in `<run>/study.db`, runs every trial as a thin wrapper around
`automla.trainers.train`, shows live progress, and writes the run folder (see `report`).
`resume_search` continues an interrupted one from its run folder. Failed trials are recorded
with a kind and a reason and told to Optuna as FAIL; early-stopped ones as PRUNED.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from ray import tune
from rich.console import Console

from automla import compat
from automla import reference as reference_mod
from automla import report as report_mod
from automla.benchmark_plan import throughput_method
from automla.display import Progress, duration
from automla.distributed import (
    ResourceError,
    max_concurrent_trials,
    trial_resources,
    validate_resources,
)
from automla.factories import make_sampler, make_scheduler
from automla.gpu_usage import GpuSampler
from automla.outcomes import error_reason, result_trial_id, trial_records
from automla.preflight import ClusterError, check_data, cluster_address
from automla.ray_setup import print_banner, ray_output_to, start_ray
from automla.report import GPU_USAGE_FILE, SearchFailed, SearchInterrupted
from automla.run_folder import study_name, study_url
from automla.schema import SearchConfig, SpaceError, load, to_yaml_dict
from automla.searcher import StudyOptunaSearch
from automla.space import define_by_run
from automla.trial import TrainFn, automla_trial

# Tune pickles the searcher and the callbacks with its experiment state: run folders saved
# before the search layer was split into modules name these two under this module.
_OptunaSearch = StudyOptunaSearch
_Progress = Progress


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
    except KeyboardInterrupt:
        # Ctrl-C before Ray saved any experiment state: nothing in the folder can be resumed,
        # and kept, it would stop the same search from starting again under its name
        if not tune.Tuner.can_restore(str(run_dir / "ray")):
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
    if not run_dir.is_dir():
        raise report_mod.RunError(f"{run_dir}: no such run folder")
    if not (run_dir / "space.yaml").is_file():
        raise report_mod.RunError(f"{run_dir}: not a run folder (space.yaml is missing)")
    config = load(run_dir / "space.yaml")
    finished = _finished_trials(run_dir, config)
    if finished:
        (console or Console()).print(
            f"{run_dir.name}: the search finished ({finished} trials); nothing to resume. "
            f"`automla report {run_dir}` shows its front."
        )
        return run_dir
    if not tune.Tuner.can_restore(str(run_dir / "ray")):
        raise report_mod.RunError(
            f"{run_dir}: Ray saved no experiment state before the search stopped; "
            "start it again instead"
        )
    address = _checked_address(address)
    check_data(config)
    return _execute(config, run_dir, address, train_fn, console or Console(), resume=True)


def _finished_trials(run_dir: Path, config: SearchConfig) -> int:
    """How many trials a search that ran its whole budget recorded (trials.json, none stopped
    by an interruption); 0 if it did not, or the file cannot tell."""
    try:
        records = json.loads((run_dir / "trials.json").read_text())
        states = [r["state"] for r in records]
    except (OSError, ValueError, TypeError, KeyError):
        return 0
    done = len(states) >= config.trials and report_mod.STOPPED not in states
    return len(states) if done else 0


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
        ctx = start_ray(address, name) if owns_ray else None
    except (ConnectionError, TimeoutError) as e:
        where = f"cluster {address}" if address else "a local Ray"
        raise ClusterError(f"could not start or join {where}: {e}") from None
    try:
        # ray.init tells who starts Ray where its dashboard is; a caller's Ray must be asked
        dashboard = ctx.dashboard_url if ctx is not None else compat.dashboard_url()
        url = f"http://{dashboard}" if dashboard else None
        print_banner(console, run_dir, url, address)
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
        with ray_output_to(log):
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
            progress = Progress(console, config, name, started, log)
            if resume:
                compat.repoint_search_state(run_dir / "ray")
                tuner = tune.Tuner.restore(
                    str(run_dir / "ray"),
                    trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=False,
                )
                # the callbacks come back from Tune's pickle without the display
                compat.set_restored_callbacks(tuner, [progress])
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
            with (
                progress,
                GpuSampler(run_dir / GPU_USAGE_FILE),
                StudyOptunaSearch.study_in(run_dir),
            ):
                results = tuner.fit()
        numbers = _settle_study(run_dir, {result_trial_id(r) for r in results})
        records = trial_records(results, config, numbers, run_dir)
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
        f"{summary['trials']}"
        + (f" of {config.trials}" if summary["trials"] < config.trials else "")
        + f" trials ({shown}) in {duration(wall)}"
        + (" (this session)" if resume else "")
        + f" · hypervolume {report_mod.hypervolume_text(summary)} · run folder {run_dir}"
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
        entry = reference_mod.record(run_dir, ref_config, None, error_reason(e))
    else:
        entry = reference_mod.record(run_dir, ref_config, history)
    log.info("dense reference: %s %s", entry["state"], entry["reason"] or entry["metrics"])


def _new_tuner(config: SearchConfig, run_dir: Path, trainable: Any, progress: Any) -> Any:
    searcher = StudyOptunaSearch(
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

    storage = optuna.storages.RDBStorage(study_url(run_dir))
    name = study_name(run_dir)
    study = optuna.load_study(study_name=name, storage=storage)
    study_id = storage.get_study_id_from_name(name)
    numbers = {}
    for t in study.get_trials(deepcopy=False):
        rid = t.user_attrs.get("ray_trial_id")
        if rid in ray_ids:
            numbers[rid] = t.number
        elif t.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "failure", "lost with the driver")
            study.tell(t.number, state=TrialState.FAIL)
    return numbers


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
