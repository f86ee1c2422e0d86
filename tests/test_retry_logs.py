"""A retried trial's logs: its synced train/metrics.jsonl and train/pruning.jsonl hold every step
once, those before the failure included.

Two-trial searches with the real trainer (pruning on, so that both logs are written), one trial
at a time. The second trial fails once, after its step-3 evaluation, a step without a checkpoint
(they come every 2 steps): Tune retries it from the step-2 checkpoint, so step 3 runs twice.

- retry: in Ray 2.60 the first attempt runs in the actor the first trial leaves (`reuse_actors`)
  and the retry in a new one, whose Tune trial folder is another (see
  `compat.trial_working_dir`).
- empty-folder: besides, the retry finds the trial's staging folder empty, as on another node
  or in a resumed search (emulated by the first attempt deleting it before it fails).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import local_ray, search_space

from automla import schema
from automla.runner import run_search

pytestmark = pytest.mark.slow

TRIALS = 2
STEPS = 4
FAIL_AFTER = 3


def fails_once(config, *, out_dir=None, report=None, resume=None, folder="", empty=False):
    """`automla.trainers.train`, except that the last trial to start raises on its first attempt
    after reporting step FAIL_AFTER (leaving `folder`/failed), first deleting its run folder
    when `empty`."""
    from automla.trainers import train

    root = Path(folder)
    last = False
    if resume is None:  # a trial's first attempt: the trials start one at a time
        started = len(list(root.glob("start-*")))
        (root / f"start-{started}").touch()
        last = started == TRIALS - 1

    def report_then_fail(metrics, checkpoint_dir):
        report(metrics, checkpoint_dir)
        if last and metrics["step"] == FAIL_AFTER:
            (root / "failed").touch()
            if empty:
                shutil.rmtree(out_dir)
            raise RuntimeError("injected failure")

    return train(config, out_dir=out_dir, report=report_then_fail, resume=resume)


@pytest.fixture(scope="module")
def shared_ray():
    # the test module is not importable in Ray's workers: ship fails_once by value
    with local_ray(sys.modules[__name__], num_cpus=1):
        yield


@pytest.mark.parametrize("case", ["retry", "empty-folder"])
def test_a_retried_trial_keeps_its_logs(shared_ray, tmp_path: Path, case: str):
    train = {
        "steps": STEPS, "eval_every": 1, "checkpoint_every": 2, "seq_len": 64, "batch_size": 4,
        "pruning": {"enabled": True, "fraction": 0.5, "warmup_steps": 1, "interval": 1},
    }  # fmt: skip
    data = search_space(trials=TRIALS, concurrency=1, max_failures=1, train=train)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data))
    fn = functools.partial(fails_once, folder=str(tmp_path), empty=case == "empty-folder")
    run_dir = run_search(schema.load(tmp_path / "space.yaml"), tmp_path / "runs", "r", train_fn=fn)

    assert (tmp_path / "failed").exists(), "no trial failed: the test injected nothing"
    records = json.loads((run_dir / "trials.json").read_text())
    assert sorted(r["retries"] for r in records) == [0] * (TRIALS - 1) + [1], records
    for record in records:
        assert record["state"] == "completed", record
        synced = run_dir / "ray" / f"trial_{record['trial_id']}" / "train"
        for name in ("metrics.jsonl", "pruning.jsonl"):
            lines = (synced / name).read_text().splitlines()
            steps = [json.loads(line)["step"] for line in lines]
            assert steps == list(range(1, STEPS + 1)), (record["retries"], name, steps)
        # a step run twice is logged as its last run reported it to Tune (its own clock)
        results = [json.loads(r) for r in (synced.parent / "result.json").read_text().splitlines()]
        logged = [json.loads(line) for line in (synced / "metrics.jsonl").read_text().splitlines()]
        for line in logged:
            last = [r for r in results if r.get("step") == line["step"]][-1]
            assert line["elapsed_s"] == last["elapsed_s"], line["step"]
