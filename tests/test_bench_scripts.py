"""Every bench script with a command line still imports and parses it (`--help`): they run
only on the GPU machine or by hand, so an import they lost would otherwise surface there."""

from __future__ import annotations

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


def _tree_ab():
    sys.path.insert(0, str(BENCH))
    try:
        import tree_ab
    finally:
        sys.path.pop(0)
    return tree_ab


def test_tree_ab_workers_parse_their_command_line():
    # tree_ab runs each tree in a process of its own, through the same parser as its main
    tree_ab = _tree_ab()
    args = tree_ab.parser().parse_args(tree_ab.worker_args("/a", "/b", 7, ["12/4/64:2048:nsa:64"]))
    assert (args.worker, args.save, args.rep) == ("/a", "/b", 7)
    assert args.points == ["12/4/64:2048:nsa:64"] and args.trees == []


def test_tree_ab_kernel_table_sums_matching_kernels_per_round():
    tree_ab = _tree_ab()
    p = "12/4/64:8192:nsa:64"
    rounds = [{"_global_bwd_dkv": 0.05, "_local_bwd_dkv": 0.1}, {"_global_bwd_dkv": 0.07}]
    rows = {("a", p): [{"per": per} for per in rounds]}
    lines = tree_ab.kernel_table(rows, ["a"], [p], ["global_bwd", "bwd_dkv"])
    assert lines[0] == "| tree | point | global_bwd µs | bwd_dkv µs |"
    # medians over the two rounds: (50 + 70) / 2 and (150 + 70) / 2
    assert lines[2] == f"| a | {p} | 60.0 | 110.0 |"
