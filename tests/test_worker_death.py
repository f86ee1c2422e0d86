"""A worker of a multi-worker trial dies hard: the trial is retried or recorded failed, never lost.

A real small search (Ray Tune trials, each starting a Ray Train TorchTrainer with two gloo
workers on CPU, the real trainer) in which rank 1 of one trial calls os._exit partway through
training, the first time only. With max_failures: 1 that trial is retried from its last
checkpoint and completes; with max_failures: 0 it is recorded failed as a dead worker. Either
way every trial of the search is in trials.json and the search finishes."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import local_ray, search_space, study_of

from automla import schema
from automla.runner import run_search

pytestmark = pytest.mark.slow

STEPS = 4
DIE_AT = 3  # rank 1 dies entering this training step, after the step-2 evaluation


def dies_once(config, *, out_dir=None, report=None, resume=None, marker="", die_at=DIE_AT):
    """`automla.trainers.train`, except that rank 1 of the first trial to get there exits hard
    at step `die_at`, leaving `marker` (holding that trial's lr) so that no one dies again.

    Rank 1 never calls `report` (the trainer drops it off rank 0), so the death is hooked into
    the trainer's per-step function, in this worker process only and only for this call."""
    from automla.trainers import distributed as dist
    from automla.trainers import train
    from automla.trainers import trainer as trainer_mod

    if dist.rank() != 1:
        return train(config, out_dir=out_dir, report=report, resume=resume)
    step_fn = trainer_mod.train_step
    calls = 0

    def dying_step(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == die_at:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, repr(config.lr).encode())
                os.close(fd)
                os._exit(1)  # no cleanup, no exception: the process is simply gone
        return step_fn(*args, **kwargs)

    trainer_mod.train_step = dying_step
    try:
        return train(config, out_dir=out_dir, report=report, resume=resume)
    finally:
        trainer_mod.train_step = step_fn


@pytest.fixture(scope="module")
def ray_for_two_workers():
    # the test module is not importable in Ray's workers: ship dies_once by value; logical
    # CPUs: a trial takes 2 workers x 1 CPU plus its driver's token share; 5 lets both trials of
    # a search run at once (most of a trial's time is starting its workers)
    with local_ray(sys.modules[__name__], num_cpus=5):
        yield


def search(tmp: Path, name: str, max_failures: int) -> tuple[list[dict], Path, str]:
    """Run a two-trial, two-worker search where one worker dies once; return its records, run
    folder and the lr of the trial whose worker died."""
    data = search_space(
        trials=2,
        max_failures=max_failures,
        resources={"cpus": 1, "workers": 2},
        train={"steps": STEPS, "eval_every": 1, "seq_len": 64, "batch_size": 4},
    )
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(data))
    config = schema.load(tmp / f"{name}.yaml")
    marker = tmp / f"{name}-died"
    fn = functools.partial(dies_once, marker=str(marker))
    run_dir = run_search(config, tmp / "runs", name, train_fn=fn)
    assert marker.exists(), "no worker died: the test injected nothing"
    records = json.loads((run_dir / "trials.json").read_text())
    # none lost: every trial of the search is recorded, and Optuna knows each one
    assert len(records) == 2, records
    assert len(study_of(run_dir).trials) == 2
    return records, run_dir, marker.read_text()


def split(records: list[dict], lr: str) -> tuple[dict, dict]:
    died = [r for r in records if repr(r["config"]["lr"]) == lr]
    assert len(died) == 1, (lr, [r["config"]["lr"] for r in records])
    other = next(r for r in records if r is not died[0])
    return died[0], other


def test_a_dead_worker_is_retried(ray_for_two_workers, tmp_path: Path):
    records, run_dir, lr = search(tmp_path, "retry", max_failures=1)
    died, other = split(records, lr)
    assert (died["state"], died["failure"], died["reason"]) == ("completed", "", ""), died
    assert died["retries"] >= 1, died
    assert died["metrics"]["step"] == STEPS
    # rank 0's log, synced home, holds each evaluation once, those before the death included
    log = run_dir / "ray" / f"trial_{died['trial_id']}" / "train" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), steps
    assert (other["state"], other["retries"]) == ("completed", 0), other
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study_of(run_dir).trials}
    assert states == {r["trial_id"]: "COMPLETE" for r in records}


def test_a_dead_worker_without_retries_is_recorded_failed(ray_for_two_workers, tmp_path: Path):
    records, run_dir, lr = search(tmp_path, "noretry", max_failures=0)
    died, other = split(records, lr)
    assert (died["state"], died["failure"], died["retries"]) == ("failed", "worker_died", 0), died
    assert died["reason"].startswith("WorkerDiedError: worker rank 1 of 2 died"), died
    assert other["state"] == "completed", other
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study_of(run_dir).trials}
    assert states == {died["trial_id"]: "FAIL", other["trial_id"]: "COMPLETE"}
