"""Where a search trial's wall time goes: one gpu.yaml-sized training run per variant, each in
a fresh process, first with empty compile caches (Triton's and Inductor's, as the first wave
of a search finds them) and then again with the caches it left (the later waves).

    python bench/trial_timeline.py [--steps 300] [--variants mla mla-fp8 dense] [--warm-runs 1]

Prints, per run, the process's wall time and the trainer's timeline at its last evaluation
(cumulative seconds: setup before the first step, the warm-up steps with their compiles and
graph captures, the steady steps, validation, the attention statistics, the exclusive
benchmark); figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("setup_s", "warmup_s", "steady_s", "val_s", "stats_s", "benchmark_s")


def config(variant: str, steps: int) -> dict:
    """gpu.yaml's fixed settings with one point of its space."""
    space = yaml.safe_load((ROOT / "search_spaces" / "gpu.yaml").read_text())
    model = dict(space["model"])
    model["mla"] = {**model["mla"], "budget": 256, "ratios": [0.4, 0.3, 0.3], "select_tile": 64}
    if variant == "dense":
        model = {k: v for k, v in model.items() if k != "mla"} | {"attention": "dense"}
    model["precision"] = "fp8" if variant.endswith("fp8") else "bf16"
    train = {**space["train"], "steps": steps}
    return {"model": model, "data": space["data"], **train, "lr": 2e-3}


def run(variant: str, steps: int, caches: Path, work: Path) -> dict:
    cfg_file = work / f"{variant}.yaml"
    cfg_file.write_text(yaml.safe_dump(config(variant, steps)))
    out = work / f"{variant}-{time.monotonic_ns()}"
    env = {**os.environ, "TRITON_CACHE_DIR": str(caches / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor")}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "automla.cli", "train", "--config", str(cfg_file), "--out", str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-2000:], flush=True)
        return {"wall_s": wall, "failed": True}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {"wall_s": wall, **{k: last.get(k) for k in FIELDS},
            "evals": len(rows), "tokens_per_s": last.get("tokens_per_s")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variants", nargs="+", default=["mla", "mla-fp8", "dense"])
    ap.add_argument("--warm-runs", type=int, default=1, help="runs with warm caches per variant")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            caches = Path(tmp) / f"caches-{variant}"
            for label in ("cold", *["warm"] * args.warm_runs):
                r = run(variant, args.steps, caches, Path(tmp))
                rows.append({"variant": variant, "caches": label, **r})
                print(rows[-1], flush=True)
    head = ("variant", "caches", "wall_s", *FIELDS)
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        cells = [r[k] if isinstance(r.get(k), str) else f"{r.get(k) or 0:.1f}" for k in head]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
