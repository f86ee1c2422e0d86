"""Every bench script with a command line still imports and parses it (`--help`): they run
only on the GPU machine or by hand, so an import they lost would otherwise surface there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "argparse" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_bench_script_parses_its_command_line(script: Path):
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0 and not torch.cuda.is_available():
        assert "needs a CUDA GPU" in out.stderr, out.stderr[-2000:]  # says so, nothing else
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
