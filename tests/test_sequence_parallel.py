"""Sequence parallelism on gloo: P processes match one process, layer by layer and in training."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import yaml
from helpers import cpu_train_config, local_ray, search_space, spawn_workers

from automla import schema
from automla.kernels import AttentionConfig
from automla.schema import SpaceError
from automla.trainers import DataConfig, ModelConfig, PruningConfig, TrainConfig, train
from automla.trainers.config import ConfigError, to_dict
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
        runs = [(name, name, True) for name in LAYERS] + [("mla-no-overlap", "mla", False)]
        for key_name, name, overlap in runs:
            sp.overlap = overlap
            got = _run_layer(name, sp)
            for key, value in got.items():
                if key not in ("y", "dx"):
                    tdist.all_reduce(value)  # weight gradients: the sum of the ranks' parts
                    got[key] = value
            results[key_name] = got
        sp.overlap = False
        _, work = sp.exchange(torch.ones(world), [1] * world, [1] * world)
        results["no-overlap-waited"] = work.is_completed()
        torch.save(results, os.path.join(folder, f"layer{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def layer_runs(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    _, folder = spawn_workers(
        _layer_worker, world, lambda: (world, str(tmp_path_factory.mktemp(f"sp{world}")))
    )
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


def test_overlap_off_waits_and_gives_the_same_results(layer_runs):
    _, ranks = layer_runs
    for r in ranks:
        assert r["no-overlap-waited"]  # overlap=False: the exchange is done when it returns
        for key, value in r["mla"].items():
            torch.testing.assert_close(r["mla-no-overlap"][key], value, rtol=0, atol=0, msg=key)


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
    model = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32, mla=MLA)
    with pytest.raises(ConfigError, match="never split"):
        TrainConfig(model=model, seq_len=32, sequence_parallel=4)
    dense = ModelConfig(d_model=32, n_heads=4, n_kv_heads=1, attention="dense", max_seq_len=32)
    TrainConfig(model=dense, seq_len=32, sequence_parallel=4)  # KV heads replicated
    with pytest.raises(ConfigError, match="4 ranks .* 2 query heads .* needs at least one"):
        TrainConfig(model=dataclasses.replace(dense, n_heads=2), seq_len=32, sequence_parallel=4)
    with pytest.raises(ConfigError, match="sequence_parallel"):
        TrainConfig(model=model, seq_len=32, sequence_parallel=0)
    # one process cannot share its sequences: a clean config error, not a hang
    with pytest.raises(ConfigError, match="must divide the number of training processes"):
        train(tiny(sequence_parallel=2))


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


# MQAR: the ignored targets fall unevenly on the shards; pruning: importance summed over them
TRAIN_CONFIGS = {
    "mla": tiny(),
    "dense": tiny(model=dataclasses.replace(tiny().model, attention="dense")),
    "mqar": tiny(
        model=dataclasses.replace(tiny().model, vocab_size=64),
        data=DataConfig(source="mqar", mqar_pairs=4, mqar_vocab=64, mqar_examples=64),
    ),
    "pruning": tiny(
        steps=8,
        pruning=PruningConfig(
            enabled=True, fraction=0.25, warmup_steps=2, interval=2, ramp_steps=2
        ),
    ),
}
KEYS = ("step", "train_loss", "val_loss", "mqar_acc", "active_heads_per_layer")


def _train_worker(rank: int, world: int, folder: str, sp: int, names: list[str]) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        out = {}
        for name in names:
            reports: list[dict] = []
            config = dataclasses.replace(TRAIN_CONFIGS[name], sequence_parallel=sp)
            train(config, report=lambda m, _c, got=reports: got.append(m))
            out[name] = reports
        if rank == 0:
            with open(os.path.join(folder, "reports.json"), "w") as f:
                json.dump(out, f)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize(
    "world,sp,names",
    [(2, 2, list(TRAIN_CONFIGS)), (4, 2, ["mla"])],
    ids=["2-ranks-P2", "4-ranks-P2-DP2"],
)
def test_training_matches_one_process(tmp_path, world, sp, names):
    folder = spawn_workers(
        _train_worker, world, lambda: (world, tempfile.mkdtemp(dir=tmp_path), sp, names)
    )[1]
    with open(os.path.join(folder, "reports.json")) as f:
        runs = json.load(f)
    for name in names:
        want: list[dict] = []
        train(TRAIN_CONFIGS[name], report=lambda m, _c, got=want: got.append(m))
        got = runs[name]
        for key in (k for k in KEYS if k in want[0]):
            expected = [m[key] for m in want]
            if key != "active_heads_per_layer":
                expected = pytest.approx(expected, rel=1e-4)
            assert [m[key] for m in got] == expected, (name, key)


def _space(**changes) -> dict:
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "max_seq_len": 31}
    base = {
        "model": {**model, "mla": {"block_size": 4}},  # sizes that fit 31 tokens
        "resources": {"cpus": 1, "workers": 2, "sequence_parallel": 2},
        "train": {"steps": 2, "eval_every": 1, "seq_len": 31, "batch_size": 2},
        "space": {"model.mla.budget": {"choice": [8, 16]}, "lr": {"loguniform": [1e-3, 1e-2]}},
    }
    return search_space(**{**base, **changes})


@pytest.mark.parametrize(
    "change,path,expected",
    [
        ({"resources": {"workers": 3, "sequence_parallel": 2}}, "resources", "must divide"),
        ({"resources": {"gpus": 4, "sequence_parallel": 3}}, "resources", "4 worker(s) (gpus: 4"),
        (
            {"resources": {"workers": 4, "sequence_parallel": 4}},
            "resources.sequence_parallel",
            "never split",
        ),
        (
            {"train": {"seq_len": 31, "sequence_parallel": 4}},
            "train.sequence_parallel",
            "resources.sequence_parallel",
        ),
    ],
    ids=["cpu-workers", "gpus", "kv-groups", "train-section"],
)
def test_space_file_rules(change, path, expected):
    with pytest.raises(SpaceError) as info:
        schema.parse(_space(**change), "space.yaml")
    assert info.value.path.startswith(path), info.value
    assert expected in str(info.value)


def test_space_file_sets_the_trainer_and_reads_back():
    config = schema.parse(_space(), "space.yaml")
    assert config.fixed["sequence_parallel"] == 2
    again = schema.parse(schema.to_yaml_dict(config), "space.yaml")  # the resolved file
    assert again.fixed == config.fixed and again.resources == config.resources
    searched = _space()
    searched["space"]["sequence_parallel"] = {"choice": [1, 2]}
    with pytest.raises(SpaceError, match="not searched"):
        schema.parse(searched, "space.yaml")


@pytest.mark.slow
def test_search_with_a_sequence_parallel_trial(tmp_path):
    from automla.runner import run_search  # Ray: not imported by the spawned workers above

    (tmp_path / "sp.yaml").write_text(yaml.safe_dump(_space(trials=1, concurrency=1)))
    config = schema.load(tmp_path / "sp.yaml")
    with local_ray(num_cpus=3):
        run_dir = run_search(config, tmp_path / "runs", "sp")
    (record,) = json.loads((run_dir / "trials.json").read_text())
    assert record["state"] == "completed", record
    assert record["config"]["sequence_parallel"] == 2
    assert record["metrics"]["step"] == 2 and record["metrics"]["tokens_per_s"] > 0
    (results,) = (run_dir / "ray").glob("trial_*/result.json")
    last = json.loads(results.read_text().splitlines()[-1])
    assert last["world_size"] == 2  # two Ray Train workers shared each sequence


def test_bench_counts_the_exchanged_bytes():
    # bench/sequence_parallel.py reads the volume off the real exchanges: it must equal the
    # shapes' arithmetic (bf16, one sequence; rank 0 keeps its own chunk)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from sequence_parallel import config, layer_volume
    finally:
        sys.path.pop(0)
    cfg = config(255, tiny=True)  # 4 query heads of 16, 2 KV heads: one group per rank
    T, P, tl, d = 255, 2, 128, cfg.head_dim
    kv = 1 * 2 * d * tl  # the other rank's group: k and v of this rank's tokens
    qg = 2 * (d + 3) * tl  # its two query heads and their gate weights
    out = 2 * d * (T + 1 - tl)  # this rank's two heads at the other rank's (padded) tokens
    want = (kv + qg + out) * 2 / 2**20
    got = layer_volume(cfg, T, P)
    assert got["forward"] == pytest.approx(want) and got["backward"] == pytest.approx(want)


def _cli_worker(rank: int, world: int, port: int, folder: str) -> None:
    # the environment torchrun gives each process; `automla train` joins the group from it
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    from contextlib import redirect_stdout

    from automla import cli

    with open(os.path.join(folder, f"stdout{rank}.txt"), "w") as out, redirect_stdout(out):
        status = cli.run(["train", "--config", os.path.join(folder, "sp.yaml"), "--out", folder])
    with open(os.path.join(folder, f"status{rank}"), "w") as f:
        f.write(str(status))
    assert not tdist.is_initialized()  # the command leaves the group it joined


def test_cli_train_under_torchrun_environment(tmp_path):
    import socket

    config = dataclasses.replace(TRAIN_CONFIGS["mla"], sequence_parallel=2)

    def args() -> tuple:
        folder = tempfile.mkdtemp(dir=tmp_path)
        (Path(folder) / "sp.yaml").write_text(yaml.safe_dump(to_dict(config)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return 2, port, folder

    run = Path(spawn_workers(_cli_worker, 2, args)[2])
    assert [(run / f"status{r}").read_text() for r in range(2)] == ["0", "0"]
    assert "final metrics" in (run / "stdout0.txt").read_text()
    assert (run / "stdout1.txt").read_text() == ""  # rank 0 alone prints and writes
    lines = (run / "metrics.jsonl").read_text().splitlines()
    want: list[dict] = []
    train(TRAIN_CONFIGS["mla"], report=lambda m, _c: want.append(m))
    got = [json.loads(line) for line in lines]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert [m["val_loss"] for m in got] == pytest.approx([m["val_loss"] for m in want], rel=1e-4)


def test_overlap_bench_runs_and_replays_the_real_exchanges():
    # bench/sequence_parallel_overlap.py on 2 gloo processes at a small T: the six exchanges it
    # records (and replays for "compute only") are the layer's, by the shapes' arithmetic
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from sequence_parallel_overlap import run, table

        row = run(2, 256, reps=2, warmup=0)  # the spawned workers import the script too
    finally:
        sys.path.pop(0)
    tl, d, hq, hkv = 128, 64, 8, 4
    kv = (hkv // 2) * 2 * d * tl  # the other rank's KV groups: k and v of this rank's tokens
    qg = (hq // 2) * (d + 3) * tl  # its query heads and their gate weights
    out = (hq // 2) * d * tl  # this rank's heads at the other rank's tokens
    assert row["exchanges"] == 6
    assert row["sent_mib_per_rank"] == pytest.approx(2 * (kv + qg + out) * 4 / 2**20)
    assert row["overlap on ms"] > 0 and row["compute only ms"] > 0
    assert table([row]).count("\n") == 2
