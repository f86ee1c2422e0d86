"""The dense reference on CPU: a small real search over MLA and dense attention trains the
dense reference once beside the trials; it is in pareto.json, on the plot and in the table,
dense trials carry no MLA settings, and a resumed search does not train it again."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import search_space

from automla import report, schema
from automla.runner import resume_search, run_search

pytestmark = pytest.mark.slow

SPACE = search_space(
    sampler={"name": "random", "seed": 1},
    train={
        "steps": 4,
        "eval_every": 2,
        "eval_batches": 1,
        "batch_size": 2,
        "seq_len": 64,
        "warmup_steps": 1,
        "throughput_warmup": 1,
    },
    space={
        "model.attention": {"choice": ["mla", "dense"]},
        "model.mla.budget": {"choice": [16, 32]},
        "model.mla.ratios": {"simplex": {"min_share": 0.1}},
        "lr": {"loguniform": [1e-3, 1e-2]},
    },
    reference="dense",
)


def logged_train(config, *, out_dir=None, report=None, log="", **kwargs):
    """The real trainer, leaving one line per run in `log`: its attention."""
    from automla.trainers import train

    with open(log, "a") as f:
        f.write(f"{config.model.attention}\n")
    return train(config, out_dir=out_dir, report=report, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    import functools

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    tmp = tmp_path_factory.mktemp("reference")
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE))
    log = tmp / "trainer.log"
    train_fn = functools.partial(logged_train, log=str(log))
    run_dir = run_search(schema.load(tmp / "space.yaml"), tmp / "runs", "ref", train_fn=train_fn)
    return run_dir, log


def test_reference_is_recorded_and_reported(run):
    run_dir, _ = run
    ref = json.loads((run_dir / "reference.json").read_text())
    assert ref["state"] == "completed", ref["reason"]
    assert ref["config"]["model"]["attention"] == "dense"
    assert ref["config"]["pruning"]["enabled"] is False
    assert ref["config"]["lr"] == pytest.approx((1e-3 * 1e-2) ** 0.5)  # the domain's middle
    assert [h["step"] for h in ref["history"]] == [2, 4]
    summary = json.loads((run_dir / "pareto.json").read_text())
    assert summary["reference"]["metrics"]["val_loss"] == ref["metrics"]["val_loss"]
    assert summary["hypervolume_stable"]
    assert summary["hypervolume_reference"]["source"] == "the dense reference"
    for entry in summary["front"]:
        assert set(entry["vs_reference"]) == {"val_loss", "tokens_per_s"}
        assert "x tokens_per_s" in entry["vs_reference_text"]
    table = report.front_table(summary, "ref").renderables[0]  # the settings follow it
    assert [c.header for c in table.columns][-1] == "vs dense reference"
    assert list(table.columns[0].cells)[-1] == "dense reference"
    page = (run_dir / "report.html").read_text()
    assert "dense reference" in page and "How to read the hypervolume" in page


def test_what_the_attention_learned(run):
    run_dir, _ = run
    ref = json.loads((run_dir / "reference.json").read_text())
    assert all(len(h["attn_heads"]) == 1 and "attn_gate" not in h for h in ref["history"])
    summary = json.loads((run_dir / "pareto.json").read_text())
    knee = next(
        r
        for r in json.loads((run_dir / "trials.json").read_text())
        if r["trial_id"] == summary["knee"]
    )
    rows = [r for r in report.curves(knee, run_dir) if "attn_heads" in r]
    assert [r["step"] for r in rows] == [2, 4]  # every evaluation, through Ray's results
    if knee["label"] != "dense":
        assert set(rows[-1]["attn_gate"][0]) <= {"local", "global", "sparse"}
    assert (run_dir / "attention.png").is_file()
    page = (run_dir / "report.html").read_text()
    assert "what the attention learned" in page and f"knee {knee['trial_id']}" in page


def test_reference_on_the_plot(run, monkeypatch):
    run_dir, _ = run
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.annotate

    def annotate(self, text, *args, **kwargs):
        drawn.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", annotate)
    config, trials = report.load_run(run_dir)
    summary = report.write_outputs(run_dir, config, trials)
    assert "dense reference" in drawn
    assert summary["reference"]["state"] == "completed"


def test_dense_trials_carry_no_mla_settings(run):
    run_dir, _ = run
    records = json.loads((run_dir / "trials.json").read_text())
    dense = [r for r in records if r["config"]["model"]["attention"] == "dense"]
    mla = [r for r in records if r["config"]["model"]["attention"] == "mla"]
    assert dense and mla, "the seed should give both kinds"
    assert all(r["label"] == "dense" for r in dense)
    assert all(not any(k.startswith("model.mla.") for k in r["params"]) for r in dense)
    assert all("model.mla.budget" in r["params"] for r in mla)
    rows = list(csv.DictReader(open(run_dir / "trials.csv")))
    for row in rows:
        if row["ratios"] == "dense":
            assert row["model.mla.budget"] == "" and row["model.mla.ratios.local"] == ""


def test_resume_does_not_train_the_reference_again(run):
    import functools

    run_dir, log = run
    runs = log.read_text().split()
    assert runs.count("dense") == 1 + sum(
        r["config"]["model"]["attention"] == "dense"
        for r in json.loads((run_dir / "trials.json").read_text())
    )
    before = (run_dir / "reference.json").read_text()
    resume_search(run_dir, train_fn=functools.partial(logged_train, log=str(log)))
    assert log.read_text().split() == runs
    assert (run_dir / "reference.json").read_text() == before
