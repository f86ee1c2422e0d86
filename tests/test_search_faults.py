"""Faults and early stopping, on one shared Ray with stand-in trainers that take milliseconds.

Each fault kind is injected into one trial (an exception, a NaN loss, an out-of-memory error, a
killed worker): the trial is recorded with its state, failure kind and reason, retried only
when that makes sense, and told to Optuna as FAIL; the search goes on. A search in which every
trial fails raises (and the CLI exits 1) with the reasons. ASHA-stopped trials are PRUNED in
the study and never on the front."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import local_ray, search_space, study_of

from automla import cli, schema
from automla.runner import SearchFailed, run_search

pytestmark = pytest.mark.slow

SPACE = search_space(trials=6, max_failures=1, train={"steps": 4, "eval_every": 1, "seq_len": 64})


def claim(folder: str, behaviours: list[str]) -> tuple[int, str, int]:
    """(index, behaviour, attempt) of the calling trial: trials claim behaviours in the order
    they first start; a retry of the same trial keeps its behaviour and counts an attempt."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    root = Path(folder)
    for i in range(len(behaviours)):
        slot = root / str(i)
        try:
            slot.mkdir(parents=True)
            (slot / "owner").write_text(trial_id)
        except FileExistsError:
            while not (slot / "owner").exists():
                time.sleep(0.01)
            if (slot / "owner").read_text() != trial_id:
                continue
        attempts = len(list(slot.glob("attempt-*")))
        (slot / f"attempt-{attempts}").touch()
        return i, behaviours[i], attempts
    raise AssertionError("more trials than behaviours")


def stand_in(config, *, out_dir=None, report=None, resume=None, folder="", behaviours=()):
    """A trainer that takes no time: val_loss and tokens_per_s follow the claim index (later
    trials are worse on val_loss and better on tokens_per_s), unless a fault is injected."""
    index, behaviour, attempt = claim(folder, list(behaviours))
    start = 0
    if resume is not None:
        start = json.loads((Path(resume) / "state.json").read_text())["step"]
    if behaviour == "raise":
        raise RuntimeError("the data loader lost its file")
    if behaviour == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for step in range(start + 1, config.steps + 1):
        loss = float("nan") if behaviour == "nan" and step == 2 else 1.0 + index + 1.0 / step
        ckpt = Path(out_dir) / f"ckpt-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
        metrics = {"step": step, "train_loss": loss, "val_loss": loss}
        report({**metrics, "tokens_per_s": 100.0 * (index + 1)}, ckpt)
        if (
            behaviour in ("kill", "kill_once")
            and step == 2
            and (behaviour == "kill" or not attempt)
        ):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-trial
    return {}


@pytest.fixture(scope="module")
def shared_ray():
    # the test module is not importable in Ray's workers: ship the stand-ins by value
    with local_ray(sys.modules[__name__], num_cpus=2):
        yield


def search(tmp: Path, name: str, behaviours: list[str], **changes) -> Path:
    data = {**SPACE, "trials": len(behaviours), **changes}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(data))
    config = schema.load(tmp / f"{name}.yaml")
    fn = functools.partial(stand_in, folder=str(tmp / f"{name}-claims"), behaviours=behaviours)
    return run_search(config, tmp / "runs", name, train_fn=fn)


def rows_by_behaviour(run_dir: Path, tmp: Path, name: str, behaviours: list[str]) -> dict:
    owners = {
        (tmp / f"{name}-claims" / str(i) / "owner").read_text(): b for i, b in enumerate(behaviours)
    }
    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    assert len(rows) == len(behaviours)
    return {owners[r["trial_id"]]: r for r in rows}


def test_each_fault_is_recorded_and_the_search_goes_on(shared_ray, tmp_path: Path):
    behaviours = ["ok", "raise", "nan", "oom", "kill_once"]
    run_dir = search(tmp_path, "faults", behaviours)
    rows = rows_by_behaviour(run_dir, tmp_path, "faults", behaviours)
    expected = {  # behaviour: (state, failure kind, retries, reason starts with)
        "ok": ("completed", "", "0", ""),
        "raise": ("failed", "exception", "1", "RuntimeError: the data loader lost its file"),
        "nan": ("failed", "diverged", "0", "FloatingPointError: train_loss is nan at step 2"),
        "oom": ("failed", "out_of_memory", "0", "OutOfMemoryError: CUDA out of memory"),
        "kill_once": ("completed", "", "1", ""),
    }
    for b, (state, kind, retries, reason) in expected.items():
        r = rows[b]
        assert (r["state"], r["failure"], r["retries"]) == (state, kind, retries), (b, r)
        assert r["reason"].startswith(reason), (b, r["reason"])
        if state == "failed":
            assert r["reason"], b
    # the killed-once trial continued from its step-2 checkpoint: its last step is the 4th
    assert rows["kill_once"]["step"] == "4" and rows["kill_once"]["node_id"]

    study = study_of(run_dir)
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for b, r in rows.items():
        want = "COMPLETE" if r["state"] == "completed" else "FAIL"
        assert by_ray_id[r["trial_id"]].state.name == want, b
    assert len(study.trials) == len(behaviours)
    summary = json.loads((run_dir / "pareto.json").read_text())
    assert summary["completed"] == 2 and summary["failed"] == 3
    assert {e["trial_id"] for e in summary["front"]} <= {
        rows["ok"]["trial_id"],
        rows["kill_once"]["trial_id"],
    }


def test_every_trial_failing_raises_with_the_reasons(shared_ray, tmp_path: Path):
    behaviours = ["raise", "kill"]
    with pytest.raises(SearchFailed) as info:
        search(tmp_path, "allfail", behaviours, max_failures=0)
    text = str(info.value)
    assert "every trial failed" in text
    assert "RuntimeError: the data loader lost its file" in text
    rows = rows_by_behaviour(info.value.run_dir, tmp_path, "allfail", behaviours)
    assert (rows["kill"]["state"], rows["kill"]["failure"]) == ("failed", "worker_died")
    assert rows["kill"]["retries"] == "0" and rows["kill"]["reason"] in text
    study = study_of(info.value.run_dir)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]


def test_cli_exits_1_when_every_trial_failed(monkeypatch, tmp_path: Path, capsys):
    import automla.runner

    def fail(*args, **kwargs):
        raise SearchFailed(tmp_path, ["abc: RuntimeError: boom"])

    monkeypatch.setattr(automla.runner, "run_search", fail)
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    assert cli.run(["search", "--space", str(space)]) == 1
    err = capsys.readouterr().err
    assert "every trial failed" in err and "abc: RuntimeError: boom" in err


def test_asha_prunes_weak_trials(shared_ray, tmp_path: Path):
    behaviours = ["ok"] * 6
    scheduler = {
        "name": "asha",
        "metric": "val_loss",
        "mode": "min",
        "grace_period": 1,
        "reduction_factor": 2,
    }
    run_dir = search(
        tmp_path,
        "asha",
        behaviours,
        scheduler=scheduler,
        concurrency=1,
        train={"steps": 8, "eval_every": 1, "seq_len": 64},
    )
    records = json.loads((run_dir / "trials.json").read_text())
    states = [r["state"] for r in records]
    # trials start one at a time and each is worse than the last on val_loss: the first runs
    # to the end, and at least the last ones are stopped at a rung
    assert states.count("completed") >= 1 and states.count("pruned") >= 2, states
    assert set(states) <= {"completed", "pruned"}
    first_id = (tmp_path / "asha-claims" / "0" / "owner").read_text()
    assert next(r for r in records if r["trial_id"] == first_id)["state"] == "completed"
    assert len(records) == 6
    for r in records:
        if r["state"] == "pruned":
            assert r["metrics"]["step"] < 8 and r["reason"].startswith("early-stopped at step")
    study = study_of(run_dir)
    by_ray_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    for r in records:
        want = {"completed": "COMPLETE", "pruned": "PRUNED"}[r["state"]]
        assert by_ray_id[r["trial_id"]].state.name == want
    summary = json.loads((run_dir / "pareto.json").read_text())
    pruned = {r["trial_id"] for r in records if r["state"] == "pruned"}
    assert summary["pruned"] == len(pruned)
    assert not pruned & {e["trial_id"] for e in summary["front"]}
    assert len(summary["hypervolume_history"]) == 6
