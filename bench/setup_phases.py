"""What a trial's set-up (`setup_s`, before its first step) is made of: the same calls in a fresh
process, each timed on the wall clock (no profiler, whose overhead inflates imports).

    python bench/setup_phases.py [--variants mla mla-fp8 dense]

One process per variant, in order: import torch; the CUDA context; import the trainer; load the
data; build the model on the GPU; `prepare_model` (liger-kernel's import, float8 conversion);
the fused AdamW's constructor; the first training step (kernel compiles or cache loads, the
warm-up's start). Figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PHASES = """
import json, sys, time
marks = [("start", time.perf_counter())]
def mark(name):
    marks.append((name, time.perf_counter()))
import torch
mark("import torch")
torch.zeros(1, device="cuda")
mark("CUDA context")
from automla.trainers.config import TrainConfig, build
from automla.trainers.data import load_data
from automla.trainers.fast_ops import prepare_model
from automla.trainers.model import build_model
from automla.trainers.trainer import build_state, train_step
mark("import trainer")
cfg = build(TrainConfig, json.loads(sys.argv[1]))
train, _ = load_data(cfg.data, cfg.seq_len, vocab_size=cfg.model.vocab_size)
mark("load data")
model = build_model(cfg.model).to("cuda")
mark("build model")
prepare_model(model, torch.device("cuda"))
mark("prepare_model")
torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
mark("AdamW")
state = build_state(cfg, torch.device("cuda"))
mark("build_state again")
x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device="cuda")
train_step(state, x[:, :-1], x[:, 1:], 1e-3)
torch.cuda.synchronize()
mark("first step")
print(json.dumps({b[0]: round(b[1] - a[1], 3) for a, b in zip(marks, marks[1:])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["mla", "mla-fp8", "dense"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from trial_timeline import config

    rows = []
    for variant in args.variants:
        cfg = config(variant, steps=10)
        cfg["model"]["cuda_graphs"] = False  # the first step as eager work, not a capture
        proc = subprocess.run(
            [sys.executable, "-c", _PHASES, json.dumps(cfg)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(variant, "failed:", proc.stderr[-1500:], flush=True)
            continue
        rows.append((variant, json.loads(proc.stdout.strip().splitlines()[-1])))
        print(variant, rows[-1][1], flush=True)
    if rows:
        phases = list(rows[0][1])
        print("\n| variant | " + " | ".join(phases) + " |\n|" + " --- |" * (len(phases) + 1))
        for variant, r in rows:
            print(f"| {variant} | " + " | ".join(f"{r.get(p, 0):.2f}" for p in phases) + " |")


if __name__ == "__main__":
    main()
