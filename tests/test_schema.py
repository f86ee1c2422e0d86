"""Search-space files: every kind of bad input stops with the file, the key path and the
expectation; the CLI turns that into one line and exit code 2."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import objectives

from automla import cli, schema
from automla.domains import Choice, IntRange, LogUniform, Simplex, Uniform
from automla.schema import SpaceError

GOOD = {
    "objectives": objectives(),
    "sampler": {"name": "tpe", "seed": 3},
    "trials": 6,
    "concurrency": 2,
    "resources": {"cpus": 1, "gpus": 0.5},
    "data": {"source": "stdlib", "max_bytes": 100_000},
    "train": {"steps": 10, "seq_len": 128},
    "model": {"d_model": 32, "max_seq_len": 128},
    "space": {
        "model.mla.ratios": {"simplex": {"min_share": 0.1}},
        "model.mla.budget": {"int": [16, 64], "step": 16},
        "model.mla.block_size": {"choice": [16, 32]},
        "model.mla.gate.hidden": {"choice": [[], [16]]},
        "lr": {"loguniform": [1e-3, 1e-2]},
        "warmup_steps": {"int": [1, 8], "log": True},
        "weight_decay": {"uniform": [0.0, 0.2]},
    },
}


def bad(mutate, file: str = "space.yaml") -> SpaceError:
    data = copy.deepcopy(GOOD)
    mutate(data)
    with pytest.raises(SpaceError) as info:
        schema.parse(data, file)
    return info.value


def test_good_file_is_typed(tmp_path: Path):
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    config = schema.load(path)
    assert config.metrics == ["val_loss", "tokens_per_s"]
    assert config.modes == ["min", "max"]
    assert (config.sampler.name, config.sampler.seed) == ("tpe", 3)
    assert (config.trials, config.concurrency) == (6, 2)
    assert (config.resources.cpus, config.resources.gpus) == (1.0, 0.5)
    assert config.space == {
        "model.mla.ratios": Simplex(min_share=0.1),
        "model.mla.budget": IntRange(lo=16, hi=64, step=16),
        "model.mla.block_size": Choice(values=(16, 32)),
        "model.mla.gate.hidden": Choice(values=((), (16,))),
        "lr": LogUniform(lo=1e-3, hi=1e-2),
        "warmup_steps": IntRange(lo=1, hi=8, log=True),
        "weight_decay": Uniform(lo=0.0, hi=0.2),
    }
    # fixed settings are spelled out with defaults; searched paths are left out
    assert config.fixed["seq_len"] == 128 and config.fixed["model"]["d_model"] == 32
    assert config.fixed["model"]["head_dim"] is None  # derived, so it follows d_model
    assert "budget" not in config.fixed["model"]["mla"] and "lr" not in config.fixed


def test_resolved_file_reads_back_the_same():
    config = schema.parse(GOOD, "a.yaml")
    again = schema.parse(yaml.safe_load(yaml.safe_dump(schema.to_yaml_dict(config))), "b.yaml")
    assert again.fixed == config.fixed
    assert again.space == config.space
    assert again.objectives == config.objectives
    assert (again.trials, again.sampler, again.resources) == (
        config.trials,
        config.sampler,
        config.resources,
    )
    assert (again.max_failures, again.scheduler) == (0, None)


def test_faults_and_scheduler_are_typed():
    data = copy.deepcopy(GOOD)
    data["max_failures"] = 2
    data["scheduler"] = {
        "name": "asha",
        "metric": "val_loss",
        "mode": "min",
        "grace_period": 2,
        "reduction_factor": 2,
        "max_t": 8,
    }
    config = schema.parse(data)
    assert config.max_failures == 2
    assert config.scheduler == schema.Scheduler(
        name="asha", metric="val_loss", mode="min", grace_period=2, reduction_factor=2.0, max_t=8
    )
    again = schema.parse(yaml.safe_load(yaml.safe_dump(schema.to_yaml_dict(config))))
    assert (again.max_failures, again.scheduler) == (2, config.scheduler)


@pytest.mark.parametrize(
    "mutate, path, expected",
    [
        pytest.param(
            lambda d: d.update(max_failures=-1),
            "max_failures",
            "expected an integer >= 0, got -1",
            id="max-failures-negative",
        ),
        pytest.param(
            lambda d: d.update(max_failures="2"),
            "max_failures",
            "expected an integer >= 0",
            id="max-failures-str",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"name": "hyperband"}),
            "scheduler.name",
            "asha",
            id="scheduler-name",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"metric": "loss"}),
            "scheduler.metric",
            "unknown metric 'loss'",
            id="scheduler-metric",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"mode": "up"}),
            "scheduler.mode",
            "min",
            id="scheduler-mode",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"grace_period": 0}),
            "scheduler.grace_period",
            "must be >= 1",
            id="scheduler-grace",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"reduction_factor": 1}),
            "scheduler.reduction_factor",
            "must be > 1",
            id="scheduler-rf",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"grace_period": 4, "max_t": 2}),
            "scheduler.max_t",
            "must be >= grace_period (4)",
            id="scheduler-max-t",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"max_t": 11}),
            "scheduler.max_t",
            "must be <= train.steps (10)",
            id="scheduler-max-t-steps",
        ),
        pytest.param(
            lambda d: d.update(scheduler={"patience": 3}),
            "scheduler.patience",
            "unknown key",
            id="scheduler-unknown",
        ),
    ],
)
def test_bad_faults_and_scheduler(mutate, path, expected):
    e = bad(mutate)
    assert e.path == path
    assert expected in e.message


@pytest.mark.parametrize(
    "mutate, path, expected",
    [
        pytest.param(lambda d: d.update(budget=1), "budget", "unknown key", id="unknown-top"),
        pytest.param(
            lambda d: d["sampler"].update(sed=1), "sampler.sed", "unknown key", id="unknown-sampler"
        ),
        pytest.param(
            lambda d: d["model"].update(width=3),
            "model.width",
            "unknown key; ModelConfig takes",
            id="unknown-model",
        ),
        pytest.param(
            lambda d: d["train"].update(step=3), "train.step", "unknown key", id="unknown-train"
        ),
        pytest.param(
            lambda d: d["space"]["lr"].update(step=2),
            "space.lr.step",
            "unknown key for a loguniform domain",
            id="unknown-domain-key",
        ),
        pytest.param(lambda d: d.pop("space"), "space", "missing", id="missing-space"),
    ],
)
def test_unknown_keys(mutate, path, expected):
    e = bad(mutate)
    assert (e.file, e.path) == ("space.yaml", path)
    assert expected in e.message


@pytest.mark.parametrize(
    "mutate, path, expected",
    [
        pytest.param(
            lambda d: d.update(trials="ten"), "trials", "expected an integer", id="trials-str"
        ),
        pytest.param(
            lambda d: d.update(concurrency=1.5),
            "concurrency",
            "expected an integer",
            id="concurrency-float",
        ),
        pytest.param(
            lambda d: d["resources"].update(cpus="two"),
            "resources.cpus",
            "expected a number",
            id="cpus-str",
        ),
        pytest.param(
            lambda d: d["objectives"][1].update(mode="up"),
            "objectives[1].mode",
            "expected one of ['min', 'max']",
            id="mode",
        ),
        pytest.param(
            lambda d: d["objectives"][0].update(metric="loss"),
            "objectives[0].metric",
            "unknown metric 'loss'",
            id="metric",
        ),
        pytest.param(
            lambda d: d.update(objectives=d["objectives"][:1]),
            "objectives",
            "two or more",
            id="one-objective",
        ),
        pytest.param(
            lambda d: d["sampler"].update(name="cmaes"),
            "sampler.name",
            "expected one of ['tpe', 'nsga2', 'gp', 'random']",
            id="sampler",
        ),
        pytest.param(
            lambda d: d["train"].update(steps="many"),
            "train.steps",
            "expected an integer",
            id="train-steps",
        ),
        pytest.param(
            lambda d: d["model"].update(d_model=[64]),
            "model.d_model",
            "expected an integer",
            id="model-type",
        ),
        pytest.param(
            lambda d: d["space"].update(lr=0.1),
            "space.lr",
            "expected a domain mapping",
            id="domain-not-mapping",
        ),
        pytest.param(
            lambda d: d["space"].update(lr={"uniform": [0.1, "x"]}),
            "space.lr.uniform[1]",
            "expected a number",
            id="bound-type",
        ),
        pytest.param(
            lambda d: d["space"].update(batch_size={"uniform": [2, 8]}),
            "space.batch_size",
            "uniform needs a float setting",
            id="uniform-on-int",
        ),
        pytest.param(
            lambda d: d["space"].update(lr={"simplex": {}}),
            "space.lr",
            "simplex needs a tuple of shares",
            id="simplex-on-float",
        ),
        pytest.param(
            lambda d: d["space"].update(lr={"uniform": [0.1, 0.2], "choice": [1]}),
            "space.lr",
            "exactly one domain kind",
            id="two-kinds",
        ),
    ],
)
def test_wrong_types(mutate, path, expected):
    e = bad(mutate)
    assert e.path == path
    assert expected in e.message


@pytest.mark.parametrize(
    "domain, path, expected",
    [
        pytest.param({"uniform": [0.2, 0.1]}, "space.lr", "lo < hi", id="uniform-lo>hi"),
        pytest.param({"uniform": [0.1, 0.1]}, "space.lr", "lo < hi", id="uniform-lo=hi"),
        pytest.param({"loguniform": [0.0, 0.1]}, "space.lr", "0 < lo < hi", id="loguniform-0"),
        pytest.param({"loguniform": [-1.0, 0.1]}, "space.lr", "0 < lo < hi", id="loguniform-neg"),
        pytest.param({"choice": []}, "space.lr", "non-empty list", id="choice-empty"),
        pytest.param({"choice": [0.1, 0.1]}, "space.lr.choice[1]", "listed twice", id="choice-dup"),
        pytest.param(
            {"uniform": [0.0, 0.1]},
            "space.lr",
            "value 0.0 is invalid: must be > 0",
            id="uniform-reaches-invalid",
        ),
    ],
)
def test_impossible_ranges(domain, path, expected):
    e = bad(lambda d: d["space"].update(lr=domain))
    assert e.path == path
    assert expected in e.message


@pytest.mark.parametrize(
    "domain, path, expected",
    [
        pytest.param({"int": [8, 4]}, "space.batch_size", "lo < hi", id="int-lo>hi"),
        pytest.param(
            {"int": [2, 9], "step": 2}, "space.batch_size.step", "multiple of step", id="int-step"
        ),
        pytest.param(
            {"int": [2, 8], "step": 0}, "space.batch_size.step", "integer >= 1", id="int-step-0"
        ),
        pytest.param({"int": [0, 8], "log": True}, "space.batch_size", "lo >= 1", id="int-log-0"),
        pytest.param(
            {"int": [0, 4]},
            "space.batch_size",
            "value 0 is invalid: must be >= 1",
            id="int-reaches-invalid",
        ),
        pytest.param(
            {"int": [2.5, 8]},
            "space.batch_size.int[0]",
            "expected an integer",
            id="int-float-bound",
        ),
    ],
)
def test_impossible_int_ranges(domain, path, expected):
    e = bad(lambda d: d["space"].update(batch_size=domain))
    assert e.path == path
    assert expected in e.message


def test_bad_choice_values_are_named():
    e = bad(lambda d: d["space"].update({"model.mla.block_size": {"choice": [16, 24]}}))
    assert e.path == "space.model.mla.block_size"
    assert "value 24 is invalid" in e.message and "power of two" in e.message
    e = bad(lambda d: d["space"].update({"model.mla.gate.activation": {"choice": ["swish"]}}))
    assert e.path == "space.model.mla.gate.activation"
    assert "'swish'" in e.message
    e = bad(lambda d: d["space"].update({"model.mla.ratios": {"simplex": {"min_share": 0.4}}}))
    assert e.path == "space.model.mla.ratios.simplex.min_share"
    assert "[0, 1/3)" in e.message


@pytest.mark.parametrize(
    "key, expected",
    [
        pytest.param("model.mla.budgt", "AttentionConfig has no field 'budgt'", id="typo"),
        pytest.param("model.mla", "is a section, not a setting", id="section"),
        pytest.param("lr.max", "'lr' is a setting, not a section", id="below-leaf"),
        pytest.param("optimizer.lr", "TrainConfig has no field 'optimizer'", id="unknown-root"),
        pytest.param("train.lr", "write 'lr', not 'train.lr'", id="train-prefix"),
    ],
)
def test_bad_paths(key, expected):
    e = bad(lambda d: d["space"].update({key: {"choice": [1, 2]}}))
    assert e.path == f"space.{key}"
    assert expected in e.message


def test_fixed_and_searched_at_once():
    e = bad(lambda d: d["model"].update(mla={"budget": 32}))
    assert e.path == "space.model.mla.budget"
    assert "also fixed in 'model.mla.budget'" in e.message


@pytest.mark.parametrize(
    "mutate, path, expected",
    [
        pytest.param(
            lambda d: d["train"].update(seq_len=256),
            "train.seq_len",
            "every trial would be invalid: 256 exceeds model.max_seq_len 128",
            id="seq-len",
        ),
        pytest.param(
            lambda d: d["model"].update(n_heads=3),
            "model.n_kv_heads",
            "every trial would be invalid: must divide n_heads (3)",
            id="heads",
        ),
        pytest.param(
            lambda d: d["data"].update(source="text"),
            "data.path",
            "every trial would be invalid: source 'text' needs a file path",
            id="text-without-path",
        ),
    ],
)
def test_fixed_setting_that_breaks_every_trial(mutate, path, expected):
    e = bad(mutate)
    assert e.path == path
    assert expected in e.message


def test_value_invalid_beside_every_other_setting():
    # n_kv_heads defaults to 2, which divides 4 but never 3
    e = bad(lambda d: d["space"].update({"model.n_heads": {"choice": [3, 4]}}))
    assert e.path == "space.model.n_heads"
    assert "value 3 is invalid: model.n_kv_heads: must divide n_heads (3)" in e.message


def test_file_problems(tmp_path: Path):
    with pytest.raises(SpaceError, match="cannot read the file"):
        schema.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("objectives: [\n  - metric: val_loss\nspace: {\n")
    with pytest.raises(SpaceError, match=r"broken.yaml: not valid YAML at line \d+"):
        schema.load(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="expected a mapping"):
        schema.load(listy)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    data = copy.deepcopy(GOOD)
    data["space"]["lr"] = {"loguniform": [0, 1]}
    path.write_text(yaml.safe_dump(data))
    assert cli.run(["search", "--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"automla search: error: {path}: space.lr: loguniform needs 0 < lo < hi, got [0, 1]"
    )


def test_cli_process_has_no_traceback(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    data = copy.deepcopy(GOOD)
    data["sampler"]["name"] = "grid"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "automla.cli", "search", "--space", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"automla search: error: {path}: sampler.name: expected one of "
        "['tpe', 'nsga2', 'gp', 'random'], got 'grid'"
    ]


@pytest.mark.parametrize("command", ["search", "report", "export", "train"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.run([command, "--help"])
    assert info.value.code == 0
    assert f"usage: automla {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "resources,expected",
    [
        ({"cpus": 1, "gpus": 2, "workers": 3}, "one per GPU"),
        ({"cpus": 1, "gpus": 0.5, "workers": 2}, "sharing a GPU"),
        ({"cpus": 1, "workers": 0}, "must be >= 1"),
        ({"cpus": 1, "gpus": 1.5}, "whole number"),
    ],
)
def test_bad_worker_resources(resources, expected):
    err = bad(lambda d: d.update(resources=resources))
    assert err.path.startswith("resources")
    assert expected in str(err)


def test_workers_follow_whole_gpus():
    good = copy.deepcopy(GOOD)
    good["resources"] = {"cpus": 2, "gpus": 4}
    res = schema.parse(good, "space.yaml").resources
    assert (res.n_workers, res.gpus_per_worker) == (4, 1.0)
    good["resources"] = {"cpus": 1, "gpus": 0.25}
    res = schema.parse(good, "space.yaml").resources
    assert (res.n_workers, res.gpus_per_worker) == (1, 0.25)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("search_spaces/*.yaml")))
def test_shipped_space_files_load(path: Path):
    config = schema.load(path)
    assert config.trials >= 16 and len(config.objectives) >= 2
