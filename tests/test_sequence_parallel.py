"""Sequence parallelism on gloo: P processes match one process, layer by layer and in training."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from helpers import cpu_train_config

from automla.kernels import AttentionConfig
from automla.trainers import ModelConfig, TrainConfig, train
from automla.trainers.config import ConfigError
from automla.trainers.model import Attention, rotary_table
from automla.trainers.sequence_parallel import setup, split_groups, split_heads

T_ODD = 23  # not a multiple of 2 or 4: the last shard is padded
MLA = AttentionConfig(budget=12, ratios=(0.5, 0.25, 0.25), block_size=4)

# name -> (attention, query heads, KV heads, heads pruned); "pruned" empties group 1 and
# leaves group 2 half full: 3 kept groups, uneven over 2 ranks, one idle rank of 4
LAYERS = {
    "mla": ("mla", 8, 4, []),
    "mla-pruned": ("mla", 8, 4, [2, 3, 5]),
    "mla-mha": ("mla", 4, 4, []),
    "dense": ("dense", 8, 4, []),
    "dense-gqa-replicated": ("dense", 8, 2, [6]),
}


def _layer(name: str, seq_len: int) -> tuple[Attention, ModelConfig]:
    attention, hq, hkv, pruned = LAYERS[name]
    cfg = ModelConfig(
        d_model=32, n_layers=1, n_heads=hq, n_kv_heads=hkv, head_dim=8, max_seq_len=seq_len,
        attention=attention, mla=MLA, attn_backend="reference",
    )  # fmt: skip
    torch.manual_seed(0)
    attn = Attention(cfg)
    for p in attn.parameters():  # the default gate init is near zero: make gradients large
        torch.nn.init.normal_(p, std=0.3)
    if pruned:
        mask = torch.ones(hq, dtype=torch.bool)
        mask[pruned] = False
        attn.set_head_mask(mask)
    return attn, cfg


def _run_layer(name: str, sp=None) -> dict[str, torch.Tensor]:
    """Output and every gradient of one layer on a fixed input; with `sp`, this rank's share:
    its tokens of the output and of dL/dx, its part of each weight gradient."""
    attn, cfg = _layer(name, T_ODD)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T_ODD, cfg.d_model, generator=g)
    w = torch.randn(2, T_ODD, cfg.d_model, generator=g)
    rot = rotary_table(T_ODD, cfg.head_dim, cfg.rope_base)
    if sp is not None:
        attn.sequence_parallel = sp
        sp.seq_len = T_ODD
        x, w = sp.tokens(x), sp.tokens(w)
        rot = sp.rotary(rot, x.shape[1])
    x.requires_grad_(True)
    y = attn(x, rot)
    (y * w).sum().backward()
    out = {"y": y.detach(), "dx": x.grad}
    out.update({n: p.grad for n, p in attn.named_parameters()})
    return out


def _layer_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        sp = setup(world)
        results = {}
        for name in LAYERS:
            got = _run_layer(name, sp)
            for key, value in got.items():
                if key not in ("y", "dx"):
                    tdist.all_reduce(value)  # weight gradients: the sum of the ranks' parts
                    got[key] = value
            results[name] = got
        torch.save(results, os.path.join(folder, f"layer{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def layer_runs(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    folder = str(tmp_path_factory.mktemp(f"sp{world}"))
    mp.spawn(_layer_worker, args=(world, folder), nprocs=world, join=True)
    return world, [torch.load(os.path.join(folder, f"layer{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_one_process(layer_runs, name):
    world, ranks = layer_runs
    want = _run_layer(name)
    for key in ("y", "dx"):
        got = torch.cat([r[name][key] for r in ranks], dim=1)[:, :T_ODD]
        torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-5, msg=f"{key}")
    for key, grad in want.items():
        if key in ("y", "dx"):
            continue
        for r in ranks:
            torch.testing.assert_close(r[name][key], grad, rtol=1e-5, atol=1e-5, msg=key)


def test_head_splits():
    # MLA: whole groups, the first ranks take the extra one; none for the fifth rank
    assert split_groups(3, 2, 2).q == [(0, 4), (4, 6)]
    assert split_groups(3, 2, 4).kv == [(0, 1), (1, 2), (2, 3), (3, 3)]
    # dense: query heads evenly; a KV head spanning two ranks goes to both
    split = split_heads([0, 0, 0, 0, 1, 1, 1, 1], 4, 4)
    assert split.q == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split.kv == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert split.kv_index[0].tolist() == [0, 0]
    assert split_heads([0, 0, 1, 1], 2, 2).kv_index == [None, None]


def test_config_rules():
    model = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="never split"):
        TrainConfig(model=model, seq_len=32, sequence_parallel=4)
    dense = ModelConfig(d_model=32, n_heads=4, n_kv_heads=1, attention="dense", max_seq_len=32)
    TrainConfig(model=dense, seq_len=32, sequence_parallel=4)  # KV heads replicated
    with pytest.raises(ConfigError, match="sequence_parallel"):
        TrainConfig(model=model, seq_len=32, sequence_parallel=0)


def tiny(**overrides) -> TrainConfig:
    model = ModelConfig(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=31,
        mla=AttentionConfig(budget=16, ratios=(0.5, 0.25, 0.25), block_size=4),
    )  # fmt: skip
    fields = dict(
        model=model, steps=6, batch_size=4, seq_len=31, warmup_steps=2, eval_every=3,
        throughput_warmup=2, eval_batches=2,
    )  # fmt: skip
    fields.update(overrides)
    return cpu_train_config(max_bytes=100_000, **fields)


def _train_worker(rank: int, world: int, folder: str, sp: int) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        reports: list[dict] = []
        train(tiny(sequence_parallel=sp), report=lambda m, _c: reports.append(m))
        if rank == 0:
            with open(os.path.join(folder, "reports.json"), "w") as f:
                json.dump(reports, f)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize(
    "world,sp", [(2, 2), (4, 2)], ids=["2-ranks-P2", "4-ranks-P2-DP2"]
)
def test_training_matches_one_process(tmp_path, world, sp):
    mp.spawn(_train_worker, args=(world, str(tmp_path), sp), nprocs=world, join=True)
    with open(tmp_path / "reports.json") as f:
        got = json.load(f)
    want: list[dict] = []
    train(tiny(), report=lambda m, _c: want.append(m))
    for key in ("step", "train_loss", "val_loss"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-4), key
