"""Interrupt and resume: a search driver is stopped mid-search by Ctrl-C, or SIGKILLed with its
whole process group, Ray included (as in a machine restart); then `automla search --resume`
finishes it. Finished
trials are kept and not rerun, unfinished ones continue from their last checkpoint, the budget
counts what was done, and no result is lost or counted twice."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import search_space, study_of

from automla import cli, schema

pytestmark = pytest.mark.slow

TRIALS = 6
STEPS = 8

SPACE = search_space(
    sampler={"name": "tpe", "seed": 0, "startup_trials": 2},
    trials=TRIALS,
    train={"steps": STEPS, "eval_every": 1, "seq_len": 64},
)


def slow_trainer(config, *, out_dir=None, report=None, resume=None, log=""):
    """Reports every step (with a checkpoint) and takes a while; appends 'start <trial> <step>'
    and 'end <trial>' lines to `log` so the test can see what ran and from where."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    start = 0 if resume is None else json.loads((Path(resume) / "state.json").read_text())["step"]
    with open(log, "a") as f:
        f.write(f"start {trial_id} {start}\n")
    for step in range(start + 1, config.steps + 1):
        time.sleep(0.4)
        ckpt = Path(out_dir) / f"ckpt-{step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
        loss = 1.0 + config.lr * 100 + 1.0 / step
        speed = 1000.0 / config.model.mla.budget
        report({"step": step, "train_loss": loss, "val_loss": loss, "tokens_per_s": speed}, ckpt)
        with open(log, "a") as f:
            f.write(f"step {trial_id} {step}\n")
    with open(log, "a") as f:
        f.write(f"end {trial_id}\n")
    return {}


DRIVER = """
import functools, sys
from ray import cloudpickle
sys.path.insert(0, {tests!r})
import test_search_resume as m
cloudpickle.register_pickle_by_value(m)
from automla import schema
from automla.runner import SearchInterrupted, run_search
config = schema.load({space!r})
try:
    run_search(config, {out!r}, "r", train_fn=functools.partial(m.slow_trainer, log={log!r}))
except SearchInterrupted as e:  # what `automla search` does with it
    print(e)
    sys.exit(130)
"""


def lines(log: Path, kind: str) -> list[list[str]]:
    if not log.exists():
        return []
    return [ln.split() for ln in log.read_text().splitlines() if ln.startswith(kind)]


def _start_driver(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A search driver in its own process group (with the Ray it starts); its trainer log and
    run folder."""
    space, log, out = tmp_path / "space.yaml", tmp_path / "trainer.log", tmp_path / "runs"
    space.write_text(yaml.safe_dump(SPACE))
    script = DRIVER.format(
        tests=str(Path(__file__).parent), space=str(space), out=str(out), log=str(log)
    )
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        start_new_session=True,  # the driver and the Ray it starts: one group to signal
        stdout=open(tmp_path / "driver.out", "w"),
        stderr=subprocess.STDOUT,
    )
    return driver, log, out / "r"


def _wait_until_midway(driver: subprocess.Popen, log: Path) -> None:
    """Until two trials have finished and another is a couple of checkpoints in."""
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        ended = {e[1] for e in lines(log, "end")}
        midway = {s[1] for s in lines(log, "step") if int(s[2]) >= 2} - ended
        if len(ended) >= 2 and midway:
            time.sleep(1.2)  # past Ray's next experiment checkpoint, still mid-trial
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the search finished before it could be interrupted"


def _resume(run_dir: Path, log: Path) -> list[dict]:
    """Finish the search; check every trial completed once, from its checkpoint where it had
    one; return the records."""
    import functools

    from ray import cloudpickle

    from automla.runner import resume_search

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    resume_search(run_dir, train_fn=functools.partial(slow_trainer, log=str(log)))
    records = json.loads((run_dir / "trials.json").read_text())
    ids = [r["trial_id"] for r in records]
    assert len(records) == TRIALS and len(set(ids)) == TRIALS
    assert all(r["state"] == "completed" for r in records), [r["state"] for r in records]
    assert all(r["metrics"]["step"] == STEPS for r in records)
    # each trial started from scratch once; after the interruption, a trial Ray had not
    # recorded as finished starts once more, from its last checkpoint Ray recorded
    starts = lines(log, "start")
    assert {s[1] for s in starts if s[2] == "0"} == set(ids)
    assert all(sum(s[1] == i for s in starts) <= 2 for i in ids)
    assert {e[1] for e in lines(log, "end")} == set(ids)
    assert any(0 < int(s[2]) < STEPS for s in starts), "no trial continued from a checkpoint"
    # and the progress says so, naming the step
    assert re.search(
        r"resume \w+  from its checkpoint at step \d", (run_dir / "search.log").read_text()
    )
    # all checkpoints are kept while the search may still be resumed; then only the newest
    kept = [len(list(d.glob("checkpoint_*"))) for d in (run_dir / "ray").glob("trial_*")]
    assert len(kept) == TRIALS and max(kept) == 1, kept
    return records


def test_ctrl_c_then_resume(tmp_path: Path):
    driver, log, run_dir = _start_driver(tmp_path)
    try:
        _wait_until_midway(driver, log)
        os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    printed = (tmp_path / "driver.out").read_text()
    assert driver.returncode == 130, printed[-2000:]  # stopped early is not success
    assert "automla search --resume" in printed  # the way on is told
    before = json.loads((run_dir / "trials.json").read_text())
    done = {r["trial_id"] for r in before if r["state"] == "completed"}
    assert len(done) >= 2 and len(done) < TRIALS
    records = _resume(run_dir, log)
    # what had completed is kept as it was, not rerun
    assert [s[1] for s in lines(log, "start")].count(next(iter(done))) == 1
    assert done <= {r["trial_id"] for r in records}


def test_kill_the_driver_then_resume_the_folder_moved(tmp_path: Path):
    driver, log, run_dir = _start_driver(tmp_path)
    try:
        _wait_until_midway(driver, log)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    ended_before = {e[1] for e in lines(log, "end")}
    assert 2 <= len(ended_before) < TRIALS
    assert not (run_dir / "trials.json").exists()  # the driver never got to write results
    # the run folder is the user's: moved and renamed, it resumes where it now lies
    moved = tmp_path / "elsewhere" / "r-moved"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    run_dir = moved
    records = _resume(run_dir, log)
    assert all(not Path(r["path"]).is_absolute() for r in records)  # recorded in the folder
    ids = [r["trial_id"] for r in records]
    study = study_of(run_dir)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["ray_trial_id"] for t in complete) == sorted(ids)
    # anything else was proposed after Ray's last checkpoint and is marked lost, not rerun
    others = [t for t in study.trials if t.state.name != "COMPLETE"]
    assert all(
        t.state.name == "FAIL" and t.user_attrs.get("failure") == "lost with the driver"
        for t in others
    )
    # the numbers in the records are the study's, each once
    assert sorted(r["optuna_trial"] for r in records) == sorted(t.number for t in complete)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path, capsys):
    assert cli.run(["search", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert cli.run(["search", "--resume", str(tmp_path)]) == 2
    assert "not a run folder (space.yaml is missing)" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "space.yaml").write_text(
        yaml.safe_dump(schema.to_yaml_dict(schema.parse(SPACE)))
    )
    assert cli.run(["search", "--resume", str(tmp_path / "r")]) == 2
    assert "no experiment state" in capsys.readouterr().err
