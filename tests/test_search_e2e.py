"""End to end on CPU: a tiny real search (Ray Tune + Optuna + the trainer), then report twice,
export the knee and train from it. One trial is made to fail to check that failures are
recorded, not dropped. Starts Ray once; about a minute on two cores."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml
from helpers import search_space, study_of

from automla import cli, schema
from automla.runner import run_search
from automla.trainers.config import TrainConfig, build

pytestmark = pytest.mark.slow

SPACE = search_space(
    sampler={"name": "tpe", "seed": 0},
    data={"source": "stdlib", "max_bytes": 300_000},
    train={
        "steps": 12,
        "eval_every": 6,
        "eval_batches": 2,
        "batch_size": 2,
        "seq_len": 64,
        "warmup_steps": 2,
        "throughput_warmup": 2,
    },
    space={
        "model.mla.ratios": {"simplex": {"min_share": 0.1}},
        "model.mla.budget": {"choice": [16, 32]},
        "model.mla.block_size": {"choice": [8, 16]},
        "model.mla.gate.hidden": {"choice": [[], [8]]},
        "model.mla.gate.activation": {"choice": ["silu", "tanh"]},
    },
)


def fail_once(marker: str):
    """A trainer whose first call (across Ray's worker processes) reports a NaN loss."""

    def train_fn(config, *, out_dir=None, report=None, **kwargs):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            from automla.trainers import train

            return train(config, out_dir=out_dir, report=report, **kwargs)
        nan = float("nan")
        report({"step": 1, "train_loss": nan, "val_loss": nan, "tokens_per_s": 1.0}, None)
        raise AssertionError("the wrapper must have raised on the NaN")

    return train_fn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from ray import cloudpickle

    # the test module is not importable in Ray's workers: ship fail_once by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = tmp_path_factory.mktemp("search")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    config = schema.load(path)
    return run_search(
        config, tmp / "runs", "tiny", trials=4, train_fn=fail_once(str(tmp / "failed-once"))
    )


def test_run_folder_is_complete(run_dir: Path):
    for name in (
        "space.yaml",
        "trials.csv",
        "trials.json",
        "pareto.json",
        "pareto.png",
        "hypervolume.csv",
        "hypervolume.png",
        "study.db",
        "search.log",
    ):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    # the resolved space reads back as the same search
    resolved = schema.load(run_dir / "space.yaml")
    assert resolved.trials == 4 and resolved.space == schema.parse(SPACE).space

    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    assert len(rows) == 4
    states = sorted(r["state"] for r in rows)
    assert states == ["completed", "completed", "completed", "failed"]
    failed = next(r for r in rows if r["state"] == "failed")
    assert failed["reason"].startswith("FloatingPointError: train_loss is nan")
    for r in rows:
        assert r["model.mla.budget"] in ("16", "32")
        shares = [float(r[f"model.mla.ratios.{b}"]) for b in ("local", "global", "sparse")]
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-5)
        if r["state"] == "completed":
            assert float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0
            assert r["step"] == "12"

    # Ray's results and each trial's trainer output and checkpoint live under the run folder
    for record in json.loads((run_dir / "trials.json").read_text()):
        trial = run_dir / "ray" / f"trial_{record['trial_id']}"
        assert trial.is_dir()
        if record["state"] == "completed":
            assert (trial / "train" / "metrics.jsonl").is_file()
            assert list(trial.glob("checkpoint_*/checkpoint.pt"))
            assert build(TrainConfig, record["config"]).steps == 12


def test_study_records_every_trial(run_dir: Path):
    study = study_of(run_dir)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    assert all("ray_trial_id" in t.user_attrs for t in study.trials)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]


def test_pareto_json_holds_the_front(run_dir: Path):
    summary = json.loads((run_dir / "pareto.json").read_text())
    assert summary["completed"] == 3 and summary["failed"] == 1
    assert 1 <= len(summary["front"]) <= 3
    assert sum(e["knee"] for e in summary["front"]) == 1
    for entry in summary["front"]:
        build(TrainConfig, entry["config"])  # the full trainer config
        assert set(entry["metrics"]) >= {"val_loss", "tokens_per_s"}
    # one entry per trial, in proposal order; the failed one adds nothing
    history = summary["hypervolume_history"]
    assert [h["trial"] for h in history] == [1, 2, 3, 4]
    assert all(a["hypervolume"] <= b["hypervolume"] for a, b in zip(history, history[1:]))
    failed = next(h for h in history if h["state"] == "failed")
    before = history[failed["trial"] - 2]["hypervolume"] if failed["trial"] > 1 else 0.0
    assert failed["hypervolume"] == before
    ref = summary["hypervolume_reference"]
    for m, mode in (("val_loss", "min"), ("tokens_per_s", "max")):
        worse = (
            ref["reference"][m] > ref["nadir"][m]
            if mode == "min"
            else (ref["reference"][m] < ref["nadir"][m])
        )
        assert worse, m
    assert 0 < summary["hypervolume"] <= 1.1**2


def test_report_twice(run_dir: Path, capsys):
    first = (run_dir / "pareto.json").read_text()
    assert cli.run(["report", str(run_dir)]) == 0
    assert "Pareto front" in capsys.readouterr().out
    assert cli.run(["report", str(run_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(first)
    assert (run_dir / "pareto.json").read_text() == first


def test_export_then_train(run_dir: Path, tmp_path: Path, capsys):
    best = tmp_path / "best.yaml"
    assert cli.run(["export", str(run_dir), "--pick", "knee", "-o", str(best)]) == 0
    knee = next(e for e in json.loads((run_dir / "pareto.json").read_text())["front"] if e["knee"])
    exported = build(TrainConfig, yaml.safe_load(best.read_text()))
    assert exported == build(TrainConfig, knee["config"])

    out = tmp_path / "train-run"
    assert cli.run(["train", "--config", str(best), "--steps", "4", "--out", str(out)]) == 0
    assert (out / "checkpoint" / "checkpoint.pt").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    # the same folder again only with --resume, which continues the run and its log
    assert cli.run(["train", "--config", str(best), "--steps", "6", "--out", str(out)]) == 2
    resume = ["train", "--config", str(best), "--steps", "6", "--out", str(out), "--resume"]
    assert cli.run(resume) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[: len(lines)] == [json.loads(x)["step"] for x in lines] and steps[-1] == 6


def test_export_picks_and_filters(run_dir: Path, tmp_path: Path, capsys):
    trials = [
        t for t in json.loads((run_dir / "trials.json").read_text()) if t["state"] == "completed"
    ]
    fastest = max(trials, key=lambda t: t["metrics"]["tokens_per_s"])
    out = tmp_path / "fast.yaml"
    assert cli.run(["export", str(run_dir), "--pick", "max:tokens_per_s", "-o", str(out)]) == 0
    assert build(TrainConfig, yaml.safe_load(out.read_text())) == build(
        TrainConfig, fastest["config"]
    )
    capsys.readouterr()
    assert cli.run(["export", str(run_dir), "--where", "val_loss~3", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "expected NAME OP NUMBER" in err and "Traceback" not in err
    assert cli.run(["export", str(run_dir), "--where", "val_loss<<3", "-o", str(out)]) == 2
    assert "'<3' is not a number" in capsys.readouterr().err
    assert cli.run(["export", str(run_dir), "--pick", "best", "-o", str(out)]) == 2
    assert "expected knee, min:METRIC or max:METRIC" in capsys.readouterr().err
    assert cli.run(["export", str(run_dir), "--where", "loss<=3", "-o", str(out)]) == 2
    assert "unknown name 'loss'" in capsys.readouterr().err
    assert cli.run(["export", str(run_dir), "--where", "val_loss<0", "-o", str(out)]) == 2
    assert "no completed trial satisfies val_loss<0" in capsys.readouterr().err
