"""How a trial ended is decided by one rule (`outcomes.classify`), which the records, the
searcher and the live display share; the records describe a trial by the config it built
itself. No Ray: results are stand-ins with the fields Ray's `Result` has."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from helpers import search_space
from rich.console import Console

from automla import schema
from automla.display import Progress
from automla.outcomes import Outcome, classify, trial_records
from automla.run_folder import study_url
from automla.searcher import StudyOptunaSearch
from automla.space import apply, decode, define_by_run, trial_label
from automla.trial import BUILT, FAILURE, FINAL, built_description

METRICS = ["val_loss", "tokens_per_s"]
GOOD = {"val_loss": 2.0, "tokens_per_s": 10.0, "step": 4, FINAL: True}


@pytest.mark.parametrize(
    "last, kwargs, expected",
    [
        pytest.param(GOOD, {}, Outcome("completed"), id="completed"),
        pytest.param(
            {**GOOD, "step": 2, FINAL: False, "done": True},
            {"steps": 4},
            Outcome("pruned", reason="early-stopped at step 2 of 4"),
            id="early-stopped",
        ),
        pytest.param(
            {**GOOD, "step": 2, FINAL: False},
            {"steps": 4},
            Outcome("stopped", reason="interrupted at step 2 of 4"),
            id="interrupted",
        ),
        pytest.param(
            {**GOOD, "step": 2, FINAL: False},
            {"ended": True},
            Outcome("pruned", reason="early-stopped at step 2"),
            id="ended-by-tune",
        ),
        pytest.param({}, {"steps": 4}, Outcome("stopped", reason="interrupted at step 0 of 4")),
        pytest.param(
            {**GOOD, "val_loss": float("nan")},
            {},
            Outcome("failed", "no_result", "no finite val_loss reported"),
            id="nan-objective",
        ),
        pytest.param(
            {FAILURE: "diverged", "reason": "FloatingPointError: x"},
            {"ended": True},
            Outcome("failed", "diverged", "FloatingPointError: x"),
            id="trial-failure",
        ),
        pytest.param(
            GOOD,
            {"error": MemoryError("no room")},
            Outcome("failed", "out_of_memory", "MemoryError: no room"),
            id="error",
        ),
        pytest.param(GOOD, {"error": True}, Outcome("failed", "exception"), id="error-unseen"),
    ],
)
def test_classify(last: dict, kwargs: dict, expected: Outcome):
    assert classify(last, METRICS, **kwargs) == expected


@dataclass
class FakeResult:
    """What `trial_records` reads of a Ray `Result`."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    path: str
    error: BaseException | None = None


class FakeGrid(list):
    def __init__(self, results: list[FakeResult]):
        super().__init__(results)
        trials = [SimpleNamespace(trial_id=r.metrics["trial_id"], num_failures=0) for r in results]
        self._experiment_analysis = SimpleNamespace(trials=trials)


def _config():
    return schema.parse(search_space(), "space.yaml")


def _params(budget: int) -> dict[str, Any]:
    return {"model.mla.budget": budget, "lr": 2e-3}


def test_records_describe_a_trial_by_the_config_it_reported(tmp_path: Path):
    """A trial that reported its build is recorded with it (here one the driver could not
    derive from the parameters); one that reported nothing is described from them."""
    config = _config()
    built = apply(config.fixed, decode(config.space, _params(16), config.fixed))
    built.seed = 12345  # not what the parameters give: only the trial's word has it
    reported = tmp_path / "trial_a"
    reported.mkdir()
    lines = [{**GOOD, "step": 2, BUILT: json.dumps(built_description(built, config.space))}, GOOD]
    (reported / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    silent = tmp_path / "trial_b"
    silent.mkdir()
    grid = FakeGrid(
        [
            FakeResult(_params(16), {**GOOD, "trial_id": "a"}, str(reported)),
            FakeResult(_params(32), {"trial_id": "b"}, str(silent)),
        ]
    )
    a, b = trial_records(grid, config, {"a": 0, "b": 1}, tmp_path)
    assert a["config"]["seed"] == 12345 and a["state"] == "completed"
    assert a["label"] == trial_label(built)
    assert a["params"]["model.mla.budget"] == 16
    assert b["config"]["model"]["mla"]["budget"] == 32 and b["params"]["lr"] == 2e-3
    assert b["state"] == "stopped" and b["reason"] == "interrupted at step 0 of 2"


def test_searcher_and_display_agree_with_the_records(tmp_path: Path):
    """The searcher tells the study, and the display shows, what `classify` decides."""
    config = _config()
    searcher = StudyOptunaSearch(
        space=define_by_run(config.space, config.fixed),
        metric=config.metrics,
        mode=config.modes,
        study_name="s",
        storage=optuna.storages.RDBStorage(study_url(tmp_path)),
    )
    progress = Progress(Console(file=open(tmp_path / "out", "w")), config, "s", 0.0, _log())
    built = apply(config.fixed, decode(config.space, _params(16), config.fixed))
    lasts = {
        "done": {**GOOD, BUILT: json.dumps(built_description(built, config.space))},
        "nan": {**GOOD, "tokens_per_s": float("nan")},
        "early": {**GOOD, FINAL: False},
        "diverged": {FAILURE: "diverged", "reason": "FloatingPointError: x"},
    }
    for tid, last in lasts.items():
        searcher.suggest(tid)
        trial = SimpleNamespace(trial_id=tid, config={"lr": 0.001})
        progress.on_trial_start(0, [], trial)
        progress.on_trial_result(0, [], trial, last)
        progress.on_trial_complete(0, [], trial)
        searcher.on_trial_complete(tid, last)
    study = optuna.load_study(study_name="s", storage=study_url(tmp_path))
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials}
    assert states == {"done": "COMPLETE", "nan": "FAIL", "early": "PRUNED", "diverged": "FAIL"}
    shown = {tid: row["state"] for tid, row in progress.rows.items()}
    assert shown == {"done": "done", "nan": "failed", "early": "pruned", "diverged": "failed"}
    assert progress.rows["nan"]["reason"] == "no finite tokens_per_s reported"
    # the row shows the config the trial reported: its label, then its searched values
    assert progress.rows["done"]["desc"].startswith(f"{trial_label(built)} ")
    assert "budget=16" in progress.rows["done"]["desc"]


def _log() -> logging.Logger:
    log = logging.getLogger("automla.test_outcomes")
    log.handlers = [logging.NullHandler()]
    log.propagate = False
    return log


def test_the_display_names_a_trial_when_it_starts():
    from automla.display import _proposed

    # the ratios' raw simplex coordinates are not their shares: left to the built label
    text = _proposed({"model.mla.budget": 128, "model.mla.ratios.local": 0.5, "lr": 0.00123456})
    assert text == "budget=128 lr=0.00123"
