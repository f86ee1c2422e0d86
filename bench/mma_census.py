"""Where each kernel's matrix products read their operands, counted offline (no GPU).

    python bench/mma_census.py [12/4/64:1024:nsa:64 ...] [--set layout.TMA_MIN_D=64]

Per point (q heads/KV heads/head dim : T : budget : select_tile[:batch]) the op's forward and
backward run once under the Triton interpreter with the GPU's tiles, recording every launch; each
distinct kernel is then compiled for sm_90 (in this process, without the interpreter) and its
PTX read: how many warpgroup MMAs (`wgmma`) it has, how many take their A operand from
registers rather than shared memory (taking A from registers was measured no faster in
these kernels: bench/RESULTS.md, eighteenth session), their shapes, any Ampere `mma.sync`, its
shared memory, and what ptxas reports of registers and spills. The kernels and tiles depend on
the head dim, the group size and the compressed keys (from 64 the selection's one-pass score,
from 256 the global dk/dv's wide tiles), not on T otherwise: a T with as many compressed keys
stands for a long one, or `--set autograd.SELECT_AFTER_NC=0` takes the one-pass score at any
T. `--triton DIR` compiles with the Triton installed in DIR (e.g. the device's version, `pip
install --target DIR --no-deps triton==3.6.0`); the recording runs this environment's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' launch recorder and compile helper
from helpers import compile_launch  # noqa: E402  (it imports triton when called: after --triton)

# run in a process of its own under the interpreter: argv point, settings; prints JSON
RECORD = r"""
import importlib, json, sys
import pytest, torch
sys.path[:0] = [sys.argv[3], sys.argv[4]]
import test_triton_compile as tc
from budgets import budget_config
import automla.kernels.parallel as parallel

mp = pytest.MonkeyPatch()
for name, value in json.loads(sys.argv[2]).items():
    module, _, attr = name.rpartition(".")
    mp.setattr(importlib.import_module("automla.kernels.parallel." + (module or "autograd")),
               attr, value)
launches = []
tc.recording(mp, launches)
shape, T, budget, bq, *batch = sys.argv[1].split(":")
hq, hkv, d = (int(x) for x in shape.split("/"))
B, T = int(batch[0]) if batch else 1, int(T)
cfg = budget_config(T, budget, int(bq))
# on the CPU in bf16, as the GPU runs it: only the launches matter, not the values
q, k, v = (torch.randn(B, T, h, d).to(torch.bfloat16).requires_grad_() for h in (hq, hkv, hkv))
gate = torch.rand(B, T, hq, 3).to(torch.bfloat16).requires_grad_()
parallel.mla_triton(q, k, v, gate, cfg).float().sum().backward()
print(json.dumps(list({r["kernel"]: r for r in launches}.values())))
"""


def record(point: str, settings: dict) -> list[dict]:
    """The distinct kernels that the op launches at `point` (their first launch each)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [point, json.dumps(settings), str(ROOT / "tests"), str(ROOT / "bench")]
    out = subprocess.run(
        [sys.executable, "-c", RECORD, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ptxas() -> str | None:
    """A ptxas that takes this Triton's PTX for sm_90."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    # Triton 3.9's own ptxas is older than the PTX it writes; its ptxas-blackwell takes it
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return None


def census(rec: dict, ptxas: str | None) -> dict:
    """One recorded launch compiled for sm_90 and its PTX counted."""
    kernel = compile_launch(rec)
    ptx = kernel.asm["ptx"]
    mmas = re.findall(r"wgmma\.mma_async[^;]*;", ptx, re.S)
    row = {
        "kernel": rec["kernel"],
        "options": " ".join(f"{k}={v}" for k, v in rec["options"].items()),
        "wgmma": len(mmas),
        # an A operand from registers is a brace-enclosed register list after the accumulator's
        "A in registers": sum(1 for m in mmas if re.search(r"\}\s*,\s*\{", m)),
        "shapes": ",".join(sorted(set(re.findall(r"aligned\.(m\d+n\d+k\d+)", ptx)))),
        "mma.sync": len(re.findall(r"\bmma\.sync", ptx)),
        "shared KB": round(kernel.metadata.shared / 1024, 1),
        "registers": "?",
        "spill B": "?",
    }
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.ptx"
            path.write_text(ptx)
            cmd = [ptxas, "-arch=sm_90a", "-v", str(path), "-o", str(path.with_suffix(".o"))]
            report = subprocess.run(cmd, capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores", report)
        row["registers"] = regs.group(1) if regs else "?"
        row["spill B"] = spills.group(1) if spills else "?"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points", nargs="*", default=["12/4/64:1024:nsa:64"])
    ap.add_argument(
        "--set", nargs="+", default=[], metavar="NAME=VALUE",
        help="settings of the Triton package (integers; MODULE.NAME, autograd's by default)",
    )  # fmt: skip
    ap.add_argument("--triton", default=None, help="a folder holding the Triton to compile with")
    args = ap.parse_args()
    if args.triton:  # before anything imports triton in this process
        sys.path.insert(0, args.triton)
    settings = {k: int(v) for k, v in (kv.split("=") for kv in args.set)}
    ptxas = _ptxas()
    for point in args.points:
        rows = [census(rec, ptxas) for rec in record(point, settings)]
        print(f"\n{point} {settings or ''}\n")
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + " --- |" * len(rows[0]))
        for row in rows:
            print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
