"""`automla report` on a hand-made run folder (no Ray): the hypervolume after every trial
against hand-computed values, the reference point, pruned and failed trials kept off the front,
the plots, the self-contained HTML page and --json."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import objectives
from rich.console import Console

from automla import cli, report, schema

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
    # importances were fitted on the study's three completed trials, for each objective, and
    # shown as a table rounded to 2 decimals (not a JSON dump of 16-digit floats)
    section = page.split("<h2>parameter importances</h2>")[1].split("</table>")[0]
    assert "<pre>" not in page and not re.search(r"\d\.\d{3,}", section)
    assert "<th>val_loss</th><th>tokens_per_s</th>" in section
    rows = re.findall(r"<tr><td[^>]*>([^<]+)</td>(.*?)</tr>", section)
    assert {name for name, _ in rows} == {"lr", "budget"}
    columns = zip(*(re.findall(r'<td class="bar">(\d\.\d\d) ', cells) for _, cells in rows))
    for column in columns:  # one per objective
        assert sum(map(float, column)) == pytest.approx(1.0, abs=0.011)


# the front of a real run (its first and knee trials), with its unrounded values
GATE = {"model.mla.gate.hidden": "[32, 32]", "model.mla.gate.activation": "tanh"}
PRUNING = {"pruning.threshold": None, "pruning.warmup_steps": 29, "pruning.regrow": False}
FRONT = {
    "objectives": [
        {"metric": "val_loss", "mode": "min"},
        {"metric": "tokens_per_s", "mode": "max"},
    ],
    "front": [
        {
            "trial_id": "dca2da6a",
            "knee": False,
            "label": "L28 G28 S43",
            "params": {
                "model.d_model": 96,
                "model.mla.ratios.local": 0.281711,
                "model.mla.budget": 128,
                **GATE,
                "pruning.fraction": 0.13865206088892373,
                **PRUNING,
                "pruning.granularity": "group",
            },
            "metrics": {"val_loss": 1.9717278480529785, "tokens_per_s": 21329.741937316736},
            "vs_reference_text": "-0.16 val_loss, 0.54x tokens_per_s",
        },
        {
            "trial_id": "c7be06f6",
            "knee": True,
            "label": "L47 G53",
            "params": {
                "model.d_model": 64,
                "model.mla.budget": 16,
                **GATE,
                "pruning.fraction": 0.2317765864354,
                **PRUNING,
                "pruning.granularity": "head",
            },
            "metrics": {"val_loss": 1.9842081069946289, "tokens_per_s": 43519.44018173218},
            "vs_reference_text": "-0.15 val_loss, 1.1x tokens_per_s",
        },
    ],
    "reference": {
        "state": "completed",
        "metrics": {"val_loss": 2.1366660594940186, "tokens_per_s": 39254.448387174474},
    },
}
SHOWN = ["1.972", "21,330", "1.984", "43,519", "2.137", "39,254", "c7be06f6 (knee)"]
SETTINGS = [
    "d_model=96",
    "budget=128",
    "gate.hidden=[32, 32]",
    "gate.activation=tanh",
    "pruning.fraction=0.139",
    "pruning.fraction=0.232",
    "pruning.threshold=None",
    "pruning.warmup_steps=29",
    "pruning.regrow=False",
    "pruning.granularity=group",
    "pruning.granularity=head",
]


def _render(renderable, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_front_table_keeps_numbers_and_settings_whole(width: int):
    """80: a terminal (the settings column used to squeeze the losses to `1.9…`); 120: a log
    file (values used to break mid-word, `pruning.threshold=Non` / `e`)."""
    text = _render(report.front_table(FRONT, "demo"), width)
    assert "…" not in text and max(map(len, text.splitlines())) <= width
    for shown in SHOWN + SETTINGS:  # each whole on one line
        assert shown in text, shown
    assert "0.1386" not in text and "ratios.local" not in text
    # comparisons break after a comma, if at all
    assert "-0.16 val_loss," in text and "0.54x tokens_per_s" in text


def test_numbers_share_one_format():
    assert report.format_value(43519.44) == report.format_value(43519) == "43,519"
    assert report.format_value(1.9717278480529785) == "1.972"
    assert report.format_value(128) == "128" and report.format_value(float("nan")) == "nan"
    assert report.setting_text(0.13865206088892373) == "0.139"
    assert report.setting_text(None) == "None" and report.setting_text(16) == "16"


def test_importances_table_without_scores():
    assert "too few completed trials" in report._importances_html({"val_loss": {}})
    page = report._importances_html({"val_loss": {"lr": 0.87654321, "model.mla.budget": 0.1234}})
    assert page.index(">lr<") < page.index(">budget<") and "0.88" in page and "0.12" in page


def test_live_table_keeps_numbers_and_settings_whole():
    from automla.display import Progress, _describe

    built = {"label": "L28 G28 S43", "params": {**FRONT["front"][0]["params"]}}
    progress = Progress(
        Console(file=io.StringIO()),
        schema.parse(SPACE, "hand.yaml"),
        "demo",
        time.time(),
        logging.getLogger("automla.test_search_report"),
    )
    progress.rows["dca2da6a"] = {
        "desc": _describe(built),
        "state": "done",
        "last": {"step": 200, **FRONT["front"][0]["metrics"]},
    }
    text = _render(progress._render(), 80)
    assert "…" not in text and "1.972" in text and "21,330" in text
    for shown in ["L28 G28 S43", *SETTINGS[:5], *SETTINGS[6:9]]:
        assert shown in text, shown
