"""`automla report` on a hand-made run folder (no Ray): the hypervolume after every trial
against hand-computed values, the reference point, pruned and failed trials kept off the front,
the plots, the self-contained HTML page and --json."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import objectives

from automla import cli, schema

SPACE = {
    "objectives": objectives(),
    "train": {"steps": 4, "seq_len": 128},
    "model": {"d_model": 32, "max_seq_len": 128},
    "space": {"model.mla.budget": {"choice": [16, 32]}, "lr": {"loguniform": [1e-3, 1e-2]}},
}

# proposal order: A, a failure, B, C, then a pruned trial that looks best but ran 2 of 4 steps
TRIALS = [
    ("a", "completed", (3.0, 100.0)),
    ("f", "failed", None),
    ("b", "completed", (2.0, 50.0)),
    ("c", "completed", (2.5, 120.0)),
    ("p", "pruned", (1.0, 500.0)),
]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "hand"
    run.mkdir()
    config = schema.parse(SPACE, "hand.yaml")
    (run / "space.yaml").write_text(yaml.safe_dump(schema.to_yaml_dict(config)))
    study = optuna.create_study(
        study_name="hand",
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["minimize", "maximize"],
    )
    records = []
    for n, (tid, state, values) in enumerate(TRIALS):
        lr, budget = 1e-3 * (n + 1), 16 if n % 2 else 32
        trial = study.ask()
        trial.suggest_float("lr", 1e-3, 1e-2, log=True)
        trial.suggest_categorical("model.mla.budget", [16, 32])
        trial.set_user_attr("ray_trial_id", tid)
        if state == "completed":
            study.tell(trial, list(values))
        else:
            study.tell(
                trial, state=optuna.trial.TrialState[{"failed": "FAIL"}.get(state, "PRUNED")]
            )
        path = run / "ray" / f"trial_{tid}"
        path.mkdir(parents=True)
        steps = {"completed": 4, "pruned": 2, "failed": 1}[state]
        metrics = {}
        with open(path / "result.json", "w") as f:
            for step in range(1, steps + 1):
                loss = (values or (9.0, 1.0))[0] + 1.0 / step
                metrics = {"step": step, "val_loss": loss, "tokens_per_s": (values or (0, 1))[1]}
                f.write(json.dumps(metrics) + "\n")
        if values:
            metrics = {**metrics, "val_loss": values[0]}
        records.append(
            {
                "trial_id": tid,
                "optuna_trial": n,
                "state": state,
                "reason": "RuntimeError: boom" if state == "failed" else "",
                "failure": "exception" if state == "failed" else "",
                "retries": 0,
                "label": "L100",
                "params": {"model.mla.budget": budget, "lr": lr},
                "metrics": metrics if values else {},
                "config": None,
                "finished": n,
                "path": str(path),
            }
        )
    (run / "trials.json").write_text(json.dumps(records))
    return run


def test_hypervolume_after_every_trial_by_hand(run_dir: Path, capsys):
    assert cli.run(["report", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # normalised (0 best): A = (1, 20/70), B = (0, 1), C = (0.5, 0); reference 1.1; C
    # dominates A
    a = 0.1 * (1.1 - 20 / 70)
    ab = 1.1 * 0.1 + 0.1 * (1 - 20 / 70)
    abc = 1.1 * 0.1 + 0.6 * 1.0
    expected = [a, a, ab, abc, abc]
    got = [h["hypervolume"] for h in summary["hypervolume_history"]]
    assert got == pytest.approx(expected, abs=1e-12)
    assert [h["trial_id"] for h in summary["hypervolume_history"]] == ["a", "f", "b", "c", "p"]
    assert summary["hypervolume"] == pytest.approx(0.71)
    ref = summary["hypervolume_reference"]
    assert ref["reference"] == pytest.approx({"val_loss": 3.1, "tokens_per_s": 43.0})
    assert ref["ideal"] == {"val_loss": 2.0, "tokens_per_s": 120.0}
    # the pruned trial's better-looking partial metrics are not on the front
    assert [e["trial_id"] for e in summary["front"]] == ["b", "c"]
    assert (summary["completed"], summary["pruned"], summary["failed"]) == (3, 1, 1)
    csv_lines = (run_dir / "hypervolume.csv").read_text().splitlines()
    assert csv_lines[0] == "trial,trial_id,state,hypervolume"
    assert math.isclose(float(csv_lines[-1].split(",")[-1]), 0.71, abs_tol=1e-6)


def test_report_writes_plots_and_one_page(run_dir: Path, capsys):
    assert cli.run(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "report.html" in out
    pngs = ("pareto.png", "hypervolume.png", "learning_curves.png", "importances.png")
    for name in pngs:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (run_dir / "report.html").read_text()
    assert "<table>" in page and ">b (knee)</td>" in page and ">c</td>" in page
    assert ">p</td>" not in page
    # self-contained: every plot embedded byte for byte, nothing fetched
    for name in pngs:
        data = base64.b64encode((run_dir / name).read_bytes()).decode()
        assert f"data:image/png;base64,{data}" in page
    assert page.count("<img ") == len(pngs) and 'src="http' not in page and "<link" not in page
    # importances were fitted on the study's three completed trials, for each objective
    scores = json.loads(page.split("<pre>")[1].split("</pre>")[0].replace("&quot;", '"'))
    assert set(scores) == {"val_loss", "tokens_per_s"}
    for per in scores.values():
        assert set(per) == {"lr", "model.mla.budget"}
        assert sum(per.values()) == pytest.approx(1.0)
