"""Which Triton kernels a cold gpu.yaml trial compiles, and when: one `automla train` run of a
trial_timeline.py config in this process, with empty Triton and Inductor caches, logging every
compile (seconds since the script started, ahead of the first step or at a first launch, the
kernel's package and name), then the trainer's timeline at its last evaluation.

    python bench/trial_compiles.py [--steps 30] [--variant mla]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

import trial_timeline
import triton
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variant", default="mla", choices=["mla", "mla-fp8", "dense"])
    args = ap.parse_args()
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp())
    os.environ["TRITON_CACHE_DIR"] = str(tmp / "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor")
    cfg = tmp / "trial.yaml"
    cfg.write_text(yaml.safe_dump(trial_timeline.config(args.variant, args.steps)))
    events = []

    def compiled(*_, fn=None, is_manual_warmup=False, **__) -> bool:
        name = f"{getattr(fn, 'module', '?').split('.')[0]}:{getattr(fn, 'name', fn)}"
        events.append((time.perf_counter() - start, is_manual_warmup, name))
        return False

    triton.knobs.runtime.jit_post_compile_hook = compiled
    sys.argv = ["automla", "train", "--config", str(cfg), "--out", str(tmp / "out")]
    try:
        runpy.run_module("automla.cli", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    wall = time.perf_counter() - start
    last = json.loads((tmp / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    timeline = {k: round(last.get(k) or 0.0, 2) for k in trial_timeline.FIELDS}
    print(f"wall {wall:.1f} s, trainer timeline {timeline}")
    for t, ahead, name in events:
        print(f"compiled at {t:6.2f} s  {'ahead' if ahead else 'first launch'}  {name}")


if __name__ == "__main__":
    main()
