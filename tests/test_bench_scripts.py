"""Every bench script with a command line still imports and parses it (`--help`): they run
only on the GPU machine or by hand, so an import they lost would otherwise surface there."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import cpus

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "argparse" in p.read_text())


def _help(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def helps():
    """Each script's `--help`, a fresh process each, run a few at a time in the background
    (each is mostly one core importing torch); the tests take them in order."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(cpus(), 4)))
    try:
        yield {script: pool.submit(_help, script) for script in SCRIPTS}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_script_parses_its_command_line(helps, script: Path):
    out = helps[script].result()
    if out.returncode != 0 and not torch.cuda.is_available():
        assert "needs a CUDA GPU" in out.stderr, out.stderr[-2000:]  # says so, nothing else
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout


def _bench(name: str):
    """The bench script `name`, imported as a module."""
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_tree_ab_workers_parse_their_command_line():
    # tree_ab runs each tree in a process of its own, through the same parser as its main
    tree_ab = _bench("tree_ab")
    args = tree_ab.parser().parse_args(tree_ab.worker_args("/a", "/b", 7, ["12/4/64:2048:nsa:64"]))
    assert (args.worker, args.save, args.rep) == ("/a", "/b", 7)
    assert args.points == ["12/4/64:2048:nsa:64"] and args.trees == []


def test_tree_ab_kernel_table_sums_matching_kernels_per_round():
    tree_ab = _bench("tree_ab")
    p = "12/4/64:8192:nsa:64"
    rounds = [{"_global_bwd_dkv": 0.05, "_local_bwd_dkv": 0.1}, {"_global_bwd_dkv": 0.07}]
    rows = {("a", p): [{"per": per} for per in rounds]}
    lines = tree_ab.kernel_table(rows, ["a"], [p], ["global_bwd", "bwd_dkv"])
    assert lines[0] == "| tree | point | global_bwd µs | bwd_dkv µs |"
    # medians over the two rounds: (50 + 70) / 2 and (150 + 70) / 2
    assert lines[2] == f"| a | {p} | 60.0 | 110.0 |"


def test_train_throughput_compares_each_row_with_dense_of_the_same_settings(capsys):
    tt = _bench("train_throughput")

    def row(attention, bq, graphs, fused, ms, **change):
        v = tt.Variant(attention, bq, graphs=graphs, fused=fused, **change)
        return {**dataclasses.asdict(v), "attention": v.name, "kind": attention, "T": 2048,
                "d_model": 512, "step_ms": ms, "tokens_per_s": 1.0, "peak_mem_gb": 1.0}  # fmt: skip

    rows = [
        row("dense", 1, "off", False, 10.0),
        row("dense", 1, "step", False, 8.0),
        row("dense", 1, "step", True, 6.0),
        row("mla", 64, "step", True, 7.5),
        row("mla", 64, "op", True, 12.0),
        row("dense", 1, "step", True, 9.0, loss="liger"),
        row("mla", 64, "step", True, 4.5, loss="liger"),
    ]
    tt.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    cells = [line.split(" | ") for line in lines if "| mla" in line]
    # fused + step graphs against dense fused + step graphs (6.0 / 7.5), not plain dense
    # with step graphs (8.0 / 7.5); against plain dense eager 10.0 / 7.5
    assert cells[0][-2:] == ["1.33x", "0.80x |"]
    # per-op graphs: the dense peer runs without graphs, fused (no such row here)
    assert cells[1][-1] == " |"
    # another loss: against dense with that loss (9.0 / 4.5)
    assert "liger loss" in cells[2][2] and cells[2][-1] == "2.00x |"


def test_memory_peak_names_what_was_alive_at_the_peak(capsys):
    mp = _bench("memory_peak")

    def frames(path: str | None) -> list[dict]:
        # innermost first, as the allocator records them; torch's own frames are skipped
        ours = [{"filename": f"{mp.ROOT}/{path}", "line": 7, "name": "f"}] if path else []
        return [{"filename": "/lib/torch/nn/functional.py", "line": 1, "name": "g"}, *ours]

    def alloc(addr, size, path=None):
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames(path)}

    def free(addr, size):
        return {"action": "free_requested", "addr": addr, "size": size, "frames": []}

    model, op = "trainers/model.py", "kernels/parallel/autograd.py"
    trace = [
        free(99, 40),  # allocated before the trace: the running total goes below the base
        alloc(1, 100, model), alloc(2, 50, op), free(1, 100), alloc(3, 300), alloc(4, 20, op),
        {"action": "free_completed", "addr": 1, "size": 100},  # not what the allocated count uses
        free(3, 300), free(2, 50), alloc(5, 360, "bench/train_throughput.py"),
    ]  # fmt: skip
    peak = mp.peak_of(trace, base=1000)
    # totals -40, 60, 110, 10, 310, 330 (event 5), 330, 30, -20, 340 (event 9, the peak)
    assert (peak.peak, peak.event, peak.events) == (1340, 9, 10)
    early = mp.peak_of(trace[:-1], base=1000)
    assert (early.peak, early.event) == (1330, 5)
    assert early.sites == [
        (f"{mp.NO_FRAME}, blocks of 0.00 MiB", 300, 1), (f"{op}:7 f", 70, 2)
    ]  # fmt: skip
    # the bench's own frame where no library frame is on the stack
    assert peak.sites[0][0] == "bench/train_throughput.py:7 f"
    assert mp.Peak.from_json(early.to_json()) == early

    tt = _bench("train_throughput")

    def row(kind, peak):
        v = tt.Variant(kind, 64 if kind == "mla" else 1, graphs="step", fused=True)
        return {**dataclasses.asdict(v), "attention": v.name, "kind": kind, "T": 2048,
                "memory_peak": peak.to_json()}  # fmt: skip

    # the MLA row with 3 MiB more allocated before its trace (what an earlier row left)
    later = mp.peak_of(trace[:-1], base=1000 + 3 * 2**20)
    tt.print_memory([row("dense", peak), row("mla", later)])
    out = capsys.readouterr().out
    assert "Memory, mla Bq=64 +step graphs T=2048: peak 0.003 GB at event 5 of 9" in out
    # MLA against dense: 3 MiB more at the peak, 10 bytes less of its own; by site -360
    # (bench), +300, +50 (op)
    assert "against dense: +3.0 MiB at the peak, -0.0 MiB of it allocated in the traces" in out
    assert out.index("-0.0 MiB  bench/train_throughput.py:7 f") < out.index(f"+0.0 MiB  {op}:7 f")


def test_kernel_ab_sets_every_changed_setting_on_every_side(capsys):
    ab = _bench("kernel_ab")
    own_local = ab.launch.LOCAL_DKV_PROGRAMS
    own_sparse = ab.kernels.parallel.sparse_tile.DKV_PROGRAMS
    earlier = {"_window_bwd_dq_kernel": "earlier kernel"}
    variants = [
        {"LOCAL_DKV_PROGRAMS": 1},
        {"LOCAL_DKV_PROGRAMS": 1, "sparse_tile.DKV_PROGRAMS": 1},
    ]
    sides = dict(ab.sides_of(earlier, {"sparse_tile.DKV_PROGRAMS": 0}, variants))
    assert list(sides) == ["before", "after1", "after2"]
    assert sides["before"] == {
        "_window_bwd_dq_kernel": "earlier kernel", "LOCAL_DKV_PROGRAMS": own_local,
        "sparse_tile.DKV_PROGRAMS": 0,
    }  # fmt: skip
    current = ab.launch._window_bwd_dq_kernel
    assert sides["after1"] == {
        "_window_bwd_dq_kernel": current,
        "LOCAL_DKV_PROGRAMS": 1,
        "sparse_tile.DKV_PROGRAMS": own_sparse,
    }
    assert sides["after2"]["sparse_tile.DKV_PROGRAMS"] == 1
    # one --set: its side is "after"
    assert [lb for lb, _ in ab.sides_of({}, {}, [{"LOCAL_DKV_PROGRAMS": 1}])] == [
        "before",
        "after",
    ]

    def row(ms: dict) -> dict:
        r = {"point": "p", "cudnn": 2.0, "cudnn_graph": 1.0, "diff": 1e-3}
        for lb, t in ms.items():
            r |= {lb: t, lb + "_graph": t / 2, lb + "_per": {"k": t / 4}, lb + "_kernels": t / 4}
        return r

    ab.table([row({"before": 1.0, "after1": 0.5, "after2": 0.8})], list(sides.items()))
    lines = capsys.readouterr().out.splitlines()
    cells = next(x for x in lines if x.startswith("| p | 1.000")).split(" | ")
    assert cells[1:6] == ["1.000 (0.500)", "0.500 (0.250)", "0.800 (0.400)", "0.500 (0.500)",
                          "0.800 (0.800)"]  # fmt: skip
    assert cells[7] == "4.00× (4.00×)"  # cuDNN against the fastest side
    assert "| p | k | 0.250 | 0.125 | 0.200 |" in lines
    assert "geomean after2/before: 0.800" in lines


def test_fa4_block_lists_are_the_selection_and_its_transpose():
    # FlashAttention 4 is fed MLA's tile selection as per-tile key blocks (forward) and
    # per-key-block query tiles (backward); both must say exactly which blocks each tile reads
    fa4 = _bench("fa4_backends")
    g = torch.Generator().manual_seed(0)
    B, NT, HKV, n, G, nbk = 2, 9, 2, 4, 3, 9
    idx = torch.stack([torch.randperm(nbk, generator=g)[:n] for _ in range(B * NT * HKV)])
    idx = idx.view(B, NT, HKV, n)
    idx[:, :2] = -1  # early tiles with no candidate
    idx[:, 2, :, 1:] = -1  # one block only
    (fc, fi), (bc, bi) = fa4.block_lists(idx, HKV * G, nbk * 64, 64)
    assert fc.shape == (B, HKV * G, NT) and bc.shape == (B, HKV * G, nbk)
    reads = torch.zeros(B, HKV * G, NT, nbk, dtype=torch.bool)
    for b in range(B):
        for h in range(HKV * G):
            for t in range(NT):
                got = fi[b, h, t, : fc[b, h, t]].tolist()
                want = idx[b, t, h // G]
                assert got == sorted(want[want >= 0].tolist())
                reads[b, h, t, got] = True
            for j in range(nbk):
                tiles = bi[b, h, j, : bc[b, h, j]].tolist()
                assert tiles == sorted(tiles) == reads[b, h, :, j].nonzero().flatten().tolist()
