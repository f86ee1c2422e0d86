"""The trainer: learning, run folder, report contract, exact resume, divergence, schedule."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from helpers import cpu_train_config

from automla.kernels import AttentionConfig
from automla.trainers import DataConfig, ModelConfig, TrainConfig, build, load_checkpoint, train
from automla.trainers.trainer import build_state, lr_at

CONTRACT_KEYS = {
    "step", "tokens", "train_loss", "val_loss", "val_ppl", "tokens_per_s", "peak_mem_gb",
    "attn_flops", "active_heads", "active_heads_per_layer", "elapsed_s",
}  # fmt: skip


def small(attention="mla", **overrides) -> TrainConfig:
    model = ModelConfig(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, attention=attention,
        mla=AttentionConfig(budget=32, ratios=(0.5, 0.25, 0.25), block_size=8),
    )  # fmt: skip
    fields = dict(
        model=model, steps=30, batch_size=8, seq_len=64, warmup_steps=5, eval_every=10,
        throughput_warmup=2,
    )  # fmt: skip
    fields.update(overrides)
    return cpu_train_config(max_bytes=300_000, **fields)


def test_run_learns_and_writes_its_folder(tmp_path):
    config = small()
    reports = []
    final = train(config, out_dir=tmp_path, report=lambda m, c: reports.append((m, c)))

    assert [m["step"] for m, _ in reports] == [10, 20, 30]
    for metrics, ckpt in reports:
        assert CONTRACT_KEYS <= set(metrics)
        assert ckpt == tmp_path / "checkpoint" and (ckpt / "checkpoint.pt").is_file()
        json.dumps(metrics)  # plain values only
    assert final == reports[-1][0]
    assert final["tokens"] == 30 * 8 * 64
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert final["active_heads"] == 8 and final["active_heads_per_layer"] == [4, 4]
    assert final["tokens_per_s"] > 0 and final["peak_mem_gb"] > 0
    assert final["peak_mem_kind"] == "cpu_peak_rss"
    # the timeline: cumulative, and the parts before an evaluation fit in its elapsed time
    timeline = ("setup_s", "warmup_s", "steady_s", "val_s", "stats_s", "benchmark_s")
    for (m, _), (later, _) in zip(reports, reports[1:]):
        assert all(0 <= m[k] <= later[k] for k in timeline)
        assert m["setup_s"] + m["warmup_s"] + m["steady_s"] <= m["elapsed_s"]
    assert reports[-1][0]["val_s"] > reports[0][0]["val_s"] > 0
    # bytes start near ln(256) = 5.5; 30 steps must get well below it
    losses = [m["val_loss"] for m, _ in reports]
    assert losses[-1] < losses[0] and losses[-1] < math.log(256) - 1.5

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [m for m, _ in reports]
    assert build(TrainConfig, yaml.safe_load((tmp_path / "config.yaml").read_text())) == config

    model, loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded == config
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    state = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 30
    assert torch.equal(model.state_dict()["embed.weight"], state["model"]["embed.weight"])
    assert model(x)[0].isfinite().all()


@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_resume_continues_exactly(tmp_path, attention):
    config = small(attention, steps=20, eval_every=5)
    saved = tmp_path / "at10"

    def keep_step_10(metrics, ckpt):
        if metrics["step"] == 10:
            shutil.copytree(ckpt, saved)

    straight = train(config, out_dir=tmp_path / "a", report=keep_step_10)
    resumed_reports = []
    resumed = train(
        config,
        out_dir=tmp_path / "b",
        resume=saved,
        report=lambda m, c: resumed_reports.append(m),
    )
    assert [m["step"] for m in resumed_reports] == [15, 20]
    for key in ("step", "tokens", "train_loss", "val_loss"):
        assert resumed[key] == straight[key], key


def test_resume_continues_the_metrics_log(tmp_path):
    """A run fails after an evaluation that its last checkpoint (step 10) does not hold, and is
    resumed from that checkpoint: into a new folder (a retried Tune trial whose staging folder
    is empty, on another node or in a resumed search), into its own, or into its own from a
    checkpoint without a copy of the log (as written before they were kept). Each time the
    folder's metrics.jsonl holds every evaluation once: those up to the checkpoint, then the
    rerun's."""
    config = small("dense", steps=20, eval_every=5, checkpoint_every=10)
    first = []

    def fail_after_15(metrics, ckpt):
        first.append(metrics)
        if metrics["step"] == 15:
            raise RuntimeError("the trial fails after step 15's evaluation")

    with pytest.raises(RuntimeError, match="step 15"):
        train(config, out_dir=tmp_path / "a", report=fail_after_15)
    shutil.copytree(tmp_path / "a" / "checkpoint", tmp_path / "at10")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "checkpoint" / "metrics.jsonl").unlink()

    def resume(folder, checkpoint):
        reports = []
        train(config, out_dir=folder, resume=checkpoint, report=lambda m, c: reports.append(m))
        return reports

    for name, checkpoint in (("b", "at10"), ("a", "a/checkpoint"), ("c", "c/checkpoint")):
        folder = tmp_path / name
        reports = resume(folder, tmp_path / checkpoint)
        assert [m["step"] for m in reports] == [15, 20]
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == first[:2] + reports, name


def test_diverging_run_raises_naming_the_step():
    config = small("dense", lr=1e9, warmup_steps=1, grad_clip=0.0, steps=10)
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train(config)


def test_mqar_run_reports_accuracy():
    data = DataConfig(source="mqar", mqar_pairs=4, mqar_vocab=64, mqar_examples=256)
    config = small(data=data, steps=4, eval_every=4)
    reports = []
    final = train(config, report=lambda m, c: reports.append((m, c)))
    assert reports[0][1] is None  # no out_dir: no checkpoint
    assert 0.0 <= final["mqar_acc"] <= 1.0


def test_lr_schedule():
    config = small(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(1, config) == pytest.approx(0.1)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, config) == pytest.approx(0.1)


def test_weight_decay_skips_norms_and_embeddings():
    state = build_state(small(), torch.device("cpu"))
    decay, no_decay = state.optimizer.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    model = state.raw_model
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in skipped
    assert all(n in skipped for n in names.values() if "norm" in n or n.endswith(".bias"))
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight"}


def test_checkpoint_every_is_independent_of_evaluation(tmp_path):
    config = small("dense", steps=8, eval_every=4, checkpoint_every=3)
    seen = []

    def record(metrics, ckpt):
        on_disk = torch.load(tmp_path / "checkpoint" / "checkpoint.pt", weights_only=True)
        seen.append((metrics["step"], ckpt, on_disk["step"]))

    train(config, out_dir=tmp_path, report=record, progress=True)
    # step 4: the newest checkpoint is step 3's, and none is handed over; the last step has one
    assert seen == [(4, None, 3), (8, tmp_path / "checkpoint", 8)]


def test_evaluations_record_what_the_attention_learned():
    config = cpu_train_config(
        max_bytes=100_000,
        steps=4,
        eval_every=2,
        seq_len=64,
        batch_size=2,
        model=ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            max_seq_len=64,
            mla=AttentionConfig(budget=32, ratios=(0.5, 0.0, 0.5), block_size=8),
        ),  # fmt: skip
    )
    seen = []
    train(config, report=lambda m, _: seen.append(m))
    for m in seen:
        assert m["attn_heads"] == [[0, 1], [0, 1]]
        assert all(set(g) == {"local", "sparse"} and 0 < g["local"] < 1 for g in m["attn_gate"])
        # a query reaches back past its 16-key window to complete blocks only
        assert all(16 <= r["mean"] <= r["max"] < 64 for r in m["attn_reach"])
