"""What compiling the MLA kernels costs a trial's first step, and what `compile_ahead` saves:
one layer of the gpu.yaml model (8 q / 2 KV heads of 64, batch 8 x 2048, budget 256, Bq 64),
each mode in a fresh process with empty Triton caches. "first call" compiles the kernels one
at a time inside the first forward, backward and evaluation forward, as before; "ahead N"
compiles them with `compile_ahead` in N threads first, then makes the same calls.

    python bench/compile_ahead.py [--threads 1 2 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch, triton
from automla.kernels import AttentionConfig
from automla.kernels.parallel import compile_ahead, mla_triton

threads = int(sys.argv[1])
compiled = []
triton.knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(1)
cfg = AttentionConfig(budget=256, ratios=(0.4, 0.3, 0.3), block_size=64, select_tile=64)
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(8, 2048, h, 64, device="cuda", generator=g, dtype=torch.bfloat16)
           for h in (8, 2, 2))
gate = torch.rand(8, 2048, 8, 3, device="cuda", generator=g, dtype=torch.bfloat16)
torch.cuda.synchronize()
t0 = time.perf_counter()
if threads:
    compile_ahead(q, k, v, gate, cfg, t_max=2048, threads=threads)
t1 = time.perf_counter()
ahead = len(compiled)
leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
mla_triton(*leaves, cfg, t_max=2048).float().sum().backward()
with torch.no_grad():
    mla_triton(q, k, v, gate, cfg, t_max=2048)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"ahead_s": t1 - t0, "first_call_s": t2 - t1, "compiled_ahead": ahead,
                  "compiled_in_call": len(compiled) - ahead}))
"""


def run(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ,
            "TRITON_CACHE_DIR": cache,
            "PYTHONPATH": f"{ROOT}:" + os.environ.get("PYTHONPATH", ""),
        }
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads)], env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("compile_ahead.py needs CUDA")
    rows = [("first call", run(0))] + [(f"ahead, {n} threads", run(n)) for n in args.threads]
    print("\n| mode | kernels compiled ahead | in the calls | compile ahead s | first fwd+bwd+eval s "
          "| sum s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in rows:
        print(f"| {mode} | {r['compiled_ahead']} | {r['compiled_in_call']} | {r['ahead_s']:.2f} | "
              f"{r['first_call_s']:.2f} | {r['ahead_s'] + r['first_call_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
