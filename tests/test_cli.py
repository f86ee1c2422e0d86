"""The command line's own parsing: options named by the command that rejects them, no option
taken by its prefix, and `train`'s run folder never overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest

from automla import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.run(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"automla {__version__}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["search", "--spaces", "f.yaml"], "unrecognized arguments: --spaces f.yaml"),
        (["search", "--space", "f.yaml", "--foo"], "unrecognized arguments: --foo"),
        (["search", "--space", "f.yaml", "--trial", "4"], "unrecognized arguments: --trial 4"),
        (["search"], "one of the arguments --space --resume is required"),
    ],
)
def test_bad_options_are_named_with_the_commands_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        cli.run(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "usage: automla search" in err and message in err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\n")
    return path


def test_train_keeps_an_earlier_run(config: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 2000}\n')
    assert cli.run(["train", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a training run already" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 2000}\n'


def test_train_resume_needs_a_checkpoint(config: Path, tmp_path: Path, capsys):
    argv = ["train", "--config", str(config), "--out", str(tmp_path), "--resume"]
    assert cli.run(argv) == 2
    assert "no checkpoint/ to resume from" in capsys.readouterr().err


def test_train_names_a_search_space_given_as_its_config(capsys):
    space = Path(__file__).parents[1] / "search_spaces" / "default.yaml"
    assert cli.run(["train", "--config", str(space)]) == 2
    assert "a search-space file, not a trainer config" in capsys.readouterr().err


def test_ctrl_c_before_any_saved_state_leaves_no_folder(tmp_path: Path, monkeypatch):
    # interrupted while Ray starts: nothing can be resumed, so nothing is kept that would stop
    # the same search from starting again under its name
    from helpers import search_space

    from automla import runner, schema

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_execute", interrupted)
    monkeypatch.setattr(runner, "_checked_address", lambda address: None)
    config = schema.parse(search_space(), "s.yaml")
    with pytest.raises(KeyboardInterrupt):
        runner.run_search(config, tmp_path, "early")
    assert not (tmp_path / "early").exists()


def test_train_config_reads_exponent_numbers(tmp_path: Path, capsys):
    # `lr: 3e-3` is a string to YAML 1.1; the config is read as YAML 1.2 reads it (the run
    # then stops at the missing checkpoint, after the config was accepted)
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nlr: 3e-3\n")
    argv = ["train", "--config", str(config), "--out", str(tmp_path), "--resume"]
    assert cli.run(argv) == 2
    assert "no checkpoint/ to resume from" in capsys.readouterr().err
