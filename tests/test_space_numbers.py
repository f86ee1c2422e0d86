"""Space files read exponent numbers without a dot (`3e-3`, `1E+2`) as floats, as YAML 1.2
does; PyYAML alone (YAML 1.1) reads them as strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from automla import schema
from automla.domains import Choice, LogUniform
from automla.schema import SpaceError

SPACE = """\
objectives: [{metric: val_loss, mode: min}, {metric: tokens_per_s, mode: max}]
trials: 4
data: {source: stdlib, max_bytes: 100000}
train: {steps: 10, seq_len: 128, TRAIN}
model: {d_model: 32, max_seq_len: 128, mla: {budget: 64}}
space:
  model.mla.ratios: {simplex: {min_share: 0.1}}
"""


def space_file(tmp_path: Path, train: str = "lr: 3e-3", domains: str = "") -> Path:
    """A space file with extra `train` settings and extra `space` lines."""
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.replace("TRAIN", train) + domains)
    return path


def test_fixed_exponent_number_is_a_float(tmp_path: Path):
    config = schema.load(space_file(tmp_path, "lr: 3e-3, weight_decay: 1E-1"))
    assert config.fixed["lr"] == pytest.approx(3e-3)
    assert isinstance(config.fixed["lr"], float)
    assert config.fixed["weight_decay"] == pytest.approx(0.1)


def test_loguniform_bounds_without_a_dot(tmp_path: Path):
    domains = "  min_lr_ratio: {loguniform: [1e-4, 3e-3]}\n"
    config = schema.load(space_file(tmp_path, domains=domains))
    assert config.space["min_lr_ratio"] == LogUniform(lo=1e-4, hi=3e-3)


def test_choice_of_exponent_numbers(tmp_path: Path):
    domains = "  lr: {choice: [1e-4, 3e-4, 1.0e-3]}\n"
    config = schema.load(space_file(tmp_path, "warmup_steps: 2", domains))
    assert config.space["lr"] == Choice(values=(1e-4, 3e-4, 1e-3))
    assert all(isinstance(v, float) for v in config.space["lr"].values)


def test_text_choice_stays_text(tmp_path: Path):
    config = schema.load(
        space_file(tmp_path, "warmup_steps: 2", "  dtype: {choice: [float32, bfloat16]}\n")
    )
    assert config.space["dtype"] == Choice(values=("float32", "bfloat16"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-4", 1e-4),
        ("3E+2", 300.0),
        ("-2e5", -200000.0),
        ("+1.5e3", 1500.0),
        (".5e-1", 0.05),
        ("1.0e-3", 1e-3),  # already a float in YAML 1.1
        ("12", 12),  # integers stay integers
    ],
)
def test_read_yaml_numbers(text: str, value: float):
    got = schema.read_yaml(f"x: {text}")["x"]
    assert got == pytest.approx(value) and type(got) is type(value)


@pytest.mark.parametrize("text", ["'3e-3'", '"1e5"', "e5", "1e", "1e-", "3e-3x", "1_0e3", "silu"])
def test_read_yaml_keeps_text(text: str):
    assert isinstance(schema.read_yaml(f"x: {text}")["x"], str)


def test_unquoted_number_in_a_text_setting_is_rejected(tmp_path: Path):
    """An unquoted `1e5` is a number everywhere; a text setting asks for it quoted."""
    path = space_file(tmp_path, "warmup_steps: 2")
    path.write_text(path.read_text().replace("source: stdlib,", "source: text, path: 1e5,"))
    with pytest.raises(SpaceError, match="expected a string"):
        schema.load(path)
