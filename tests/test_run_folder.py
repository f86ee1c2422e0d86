"""A run folder is the user's artefact: moved, it reports, exports and its study reopens where it
now lies; a damaged trials.json is named with the way out, and `report` rebuilds it from the
study and Ray's results. Hand-made folders, no Ray."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import search_space

from automla import cli, report, run_folder, schema
from automla.space import apply
from automla.trainers.config import to_dict

# (trial id, objectives); None: the trial failed
TRIALS = [("a", (3.0, 100.0)), ("b", (2.0, 50.0)), ("f", None)]


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    """A finished run: space.yaml, study.db, each trial's Ray result.json, and trials.json with
    trial folders relative to the run folder. A fresh copy for each test, which may damage or
    move it."""
    return Path(shutil.copytree(made_run, tmp_path / made_run.name))


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    """The run `run` copies, made once (an Optuna study in SQLite: a fifth of a second)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = tmp_path_factory.mktemp("template") / "made-here"
    run.mkdir()
    config = schema.parse(search_space(), "s.yaml")
    (run / "space.yaml").write_text(yaml.safe_dump(schema.to_yaml_dict(config)))
    study = optuna.create_study(
        study_name="made-here",
        storage=run_folder.study_url(run),
        directions=["minimize", "maximize"],
    )
    records = []
    for n, (tid, values) in enumerate(TRIALS):
        trial = study.ask()
        budget = trial.suggest_categorical("model.mla.budget", [16, 32])
        lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
        trial.set_user_attr("ray_trial_id", tid)
        if values:
            study.tell(trial, list(values))
        else:
            trial.set_user_attr("failure", "exception")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        folder = run / "ray" / f"trial_{tid}"
        folder.mkdir(parents=True)
        lines = [{"step": s, "val_loss": 5.0 - s, "tokens_per_s": 10.0 * s} for s in (1, 2)]
        if values:
            lines[-1].update(val_loss=values[0], tokens_per_s=values[1])
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
        records.append(
            {
                "trial_id": tid,
                "optuna_trial": n,
                "state": "completed" if values else "failed",
                "reason": "" if values else "RuntimeError: boom",
                "params": {"model.mla.budget": budget, "lr": lr},
                "metrics": dict(zip(["val_loss", "tokens_per_s"], values or ())),
                "config": to_dict(apply(config.fixed, {"model.mla.budget": budget, "lr": lr})),
                "path": f"ray/trial_{tid}",
            }
        )
    (run / "trials.json").write_text(json.dumps(records))
    return run


DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "mapping": lambda text: json.dumps({"trials": json.loads(text)}),
    "strings": lambda text: json.dumps(["a", "b"]),
    "no-ids": lambda text: json.dumps([{"state": "completed"}]),
    "not-utf8": lambda text: "\udcff",
}


def damage(run: Path, kind: str) -> None:
    path = run / "trials.json"
    broken = DAMAGE[kind](path.read_text())
    path.write_bytes(broken.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_export_names_the_damaged_file_and_the_way_out(run: Path, kind: str, capsys, tmp_path):
    damage(run, kind)
    assert cli.run(["export", str(run), "-o", str(tmp_path / "best.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{run / 'trials.json'}: " in err and f"`automla report {run}` rebuilds it" in err


@pytest.mark.parametrize("kind", ["truncated", "mapping", "not-utf8"])
def test_report_rebuilds_trials_from_the_study(run: Path, kind: str, capsys, tmp_path):
    original = json.loads((run / "trials.json").read_text())
    damage(run, kind)
    assert cli.run(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "rebuilt 3 trials from study.db" in err and err.count("\n") == 1
    assert (run / "trials.json.damaged").is_file()
    rebuilt = json.loads((run / "trials.json").read_text())
    assert [(r["trial_id"], r["state"]) for r in rebuilt] == [
        (r["trial_id"], r["state"]) for r in original
    ]
    for old, new in zip(original, rebuilt):
        if old["state"] == "completed":  # a failed one gains its last reported metrics
            assert new["metrics"]["val_loss"] == old["metrics"]["val_loss"]
        assert new["params"] == pytest.approx(old["params"])
        assert new["path"] == old["path"] and new["optuna_trial"] == old["optuna_trial"]
    assert rebuilt[2]["reason"] == "exception"
    assert (
        rebuilt[0]["config"]["model"]["mla"]["budget"] == original[0]["params"]["model.mla.budget"]
    )
    # and the run exports again
    assert (
        cli.run(["export", str(run), "-o", str(tmp_path / "best.yaml"), "--pick", "min:val_loss"])
        == 0
    )


def test_report_without_a_study_to_rebuild_from(run: Path, capsys):
    damage(run, "truncated")
    (run / "study.db").unlink()
    assert cli.run(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "there is no study.db to rebuild it from" in err


def test_report_when_the_study_is_damaged_too(run: Path, capsys):
    damage(run, "empty")
    (run / "study.db").write_bytes(b"this is not SQLite " * 20)
    assert cli.run(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'study.db'} cannot be read either" in err


def test_a_moved_run_reports_and_finds_its_trials(run: Path, tmp_path: Path, capsys):
    # written before trial folders were recorded relative: absolute paths of the old place
    records = json.loads((run / "trials.json").read_text())
    for r in records:
        r["path"] = str(run / r["path"])
    (run / "trials.json").write_text(json.dumps(records))
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(run, moved)
    assert cli.run(["report", str(moved)]) == 0
    assert [len(report.curves(r, moved)) for r in records] == [2, 2, 2]
    assert cli.run(["export", str(moved), "-o", str(tmp_path / "best.yaml")]) == 0
    assert run_folder.study_name(moved) == "made-here"  # the folder's old name, found in the file


def test_relative_trial_paths(tmp_path: Path):
    run = tmp_path / "r"
    assert run_folder.relative_trial_path(run, run / "ray" / "trial_x") == "ray/trial_x"
    assert run_folder.relative_trial_path(run, tmp_path / "other") == str(tmp_path / "other")
    assert run_folder.trial_dir(run, {"path": "ray/trial_x"}) == run / "ray" / "trial_x"
    assert run_folder.trial_dir(run, {"path": "/gone/away/ray/trial_x"}) == run / "ray" / "trial_x"
    assert run_folder.trial_dir(run, {"path": None}) is None


def test_the_study_url_is_absolute_from_anywhere(run: Path, monkeypatch):
    monkeypatch.chdir(run.parent)
    url = run_folder.study_url(run.name)
    assert url == f"sqlite:///{run.resolve() / 'study.db'}" and url.startswith("sqlite:////")


def test_dashboard_serves_the_runs_study(run: Path, monkeypatch, capsys, tmp_path):
    import optuna_dashboard

    served = {}
    monkeypatch.setattr(
        optuna_dashboard, "run_server", lambda url, host, port: served.update(url=url, port=port)
    )
    assert cli.run(["dashboard", str(run), "--port", "8099"]) == 0
    assert served == {"url": run_folder.study_url(run), "port": 8099}
    assert "http://127.0.0.1:8099" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert cli.run(["dashboard", str(tmp_path / "empty")]) == 2
    assert "no study.db" in capsys.readouterr().err


def test_a_saved_searcher_reopens_the_study_where_the_folder_lies(run: Path, tmp_path: Path):
    from automla.searcher import StudyOptunaSearch
    from automla.space import define_by_run

    config = schema.load(run / "space.yaml")
    searcher = StudyOptunaSearch(
        space=define_by_run(config.space),
        metric=config.metrics,
        mode=config.modes,
        study_name="made-here",
        storage=optuna.storages.RDBStorage(run_folder.study_url(run)),
    )
    searcher.suggest("new")
    state_file = run / "searcher.pkl"
    searcher.save(str(state_file))
    assert str(run) not in state_file.read_bytes().decode("latin-1")  # no path of the folder
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    restored = pickle.loads(pickle.dumps(searcher))  # what Tune's tuner.pkl holds
    with StudyOptunaSearch.study_in(moved):
        restored.restore(str(moved / "searcher.pkl"))
        restored.on_trial_complete(
            "new", {"val_loss": 1.0, "tokens_per_s": 9.0, "automla_final": True}
        )
    study = optuna.load_study(study_name="made-here", storage=run_folder.study_url(moved))
    assert study.trials[-1].state.name == "COMPLETE" and study.trials[-1].values == [1.0, 9.0]


def test_search_prints_commands_that_work_from_anywhere(tmp_path: Path, monkeypatch):
    from rich.console import Console

    from automla.ray_setup import print_banner

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "elsewhere" / "r"
    console = Console(record=True, width=400)
    print_banner(console, run, None, None)
    text = console.export_text()
    assert f"optuna-dashboard sqlite:///{run}/study.db" in text
    assert "automla dashboard elsewhere/r" in text


@pytest.mark.parametrize("content", ["[1, 2]", '{"state": "compl', ""])
def test_a_damaged_reference_is_left_out_of_the_report(run: Path, content: str):
    (run / "reference.json").write_text(content)
    assert cli.run(["report", str(run)]) == 0


def test_the_search_log_leaves_out_tensorboards_complaint_about_attention_stats(tmp_path: Path):
    """Tune's TensorBoard logger cannot log the per-layer attention statistics (lists of
    dicts, for the report) and says so; the search log keeps its other lines."""
    import logging

    from automla.ray_setup import ray_output_to

    log = logging.getLogger("automla.search.test-tbx")
    log.handlers = [logging.FileHandler(tmp_path / "search.log")]
    tbx = logging.getLogger("ray.tune.logger.tensorboardx")
    with ray_output_to(log):
        tbx.warning("You are trying to log an invalid value (ray/tune/attn_gate=[{}]) via X!")
        tbx.warning("You are trying to log an invalid value (ray/tune/other=[[]]) via X!")
    for h in log.handlers:
        h.close()
    text = (tmp_path / "search.log").read_text()
    assert "attn_gate" not in text and "ray/tune/other" in text


def test_export_keeps_an_existing_file_unless_forced(run: Path, tmp_path: Path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text("# edited by hand\n")
    assert cli.run(["export", str(run), "-o", str(best)]) == 2
    err = capsys.readouterr().err
    assert f"{best} exists; --force replaces it" in err and err.count("\n") == 1
    assert best.read_text() == "# edited by hand\n"
    assert cli.run(["export", str(run), "-o", str(best), "--force"]) == 0
    assert best.read_text().startswith("# AutoMLA export: trial")


def test_resume_of_a_finished_search_runs_nothing(run: Path, capsys, monkeypatch):
    space = yaml.safe_load((run / "space.yaml").read_text())
    (run / "space.yaml").write_text(yaml.safe_dump({**space, "trials": len(TRIALS)}))
    before = (run / "trials.json").read_text()
    monkeypatch.setattr("automla.runner._checked_address", pytest.fail)  # no Ray is started
    assert cli.run(["search", "--resume", str(run)]) == 0
    assert "the search finished (3 trials); nothing to resume" in capsys.readouterr().out
    assert (run / "trials.json").read_text() == before


def test_resume_and_dashboard_name_a_missing_folder(tmp_path: Path, capsys):
    for command in (["search", "--resume"], ["dashboard"]):
        assert cli.run([*command, str(tmp_path / "nope")]) == 2
        assert "nope: no such run folder" in capsys.readouterr().err


def test_dashboard_names_a_port_in_use(run: Path, capsys):
    import socket

    pytest.importorskip("optuna_dashboard")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert cli.run(["dashboard", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_dashboard_names_a_port_out_of_range(run: Path, capsys):
    pytest.importorskip("optuna_dashboard")
    assert cli.run(["dashboard", str(run), "--port", "99999"]) == 2
    assert "--port 99999: expected a port from 1 to 65535" in capsys.readouterr().err


def test_export_tells_how_to_train_a_sequence_parallel_config(run: Path, tmp_path, capsys):
    records = json.loads((run / "trials.json").read_text())
    for r in records:  # two KV groups: one a rank
        r["config"]["sequence_parallel"] = 2
        r["config"]["model"]["n_kv_heads"] = 2
    (run / "trials.json").write_text(json.dumps(records))
    best = tmp_path / "sp.yaml"
    assert cli.run(["export", str(run), "-o", str(best), "--pick", "min:val_loss"]) == 0
    assert f"torchrun --nproc-per-node 2 -m automla.cli train --config {best}" in (
        capsys.readouterr().out
    )
