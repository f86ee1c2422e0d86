"""What tile-shared selection costs in accuracy and buys in speed: one ablation on one GPU.

The gpu.yaml model (d_model 512, 4 layers, 8 query / 2 KV heads, MQAR mixed into a quarter of
every batch) trained at sequence length 4096 with `select_tile` 1, 16 and 64 and with dense
attention, two seeds each, the same steps and data. Reports val_loss, mqar_acc, tokens_per_s
(training length, exclusive benchmark) and tokens_per_s@32768, and writes select_tile.json
and select_tile.md to --out (default: $OUT or bench/); the table is printed last.

    python bench/select_tile.py [--steps 300] [--seeds 0 1] [--tiles 1 16 64] [--out DIR]
    python bench/select_tile.py --tiny      # CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from automla.trainers import TrainConfig  # noqa: E402
from automla.trainers.config import build  # noqa: E402
from automla.trainers.trainer import train  # noqa: E402


def run_config(attention: str, select_tile: int, seed: int, steps: int, tiny: bool) -> TrainConfig:
    seq = 128 if tiny else 4096
    model = {
        "vocab_size": 384,
        "d_model": 64 if tiny else 512,
        "n_layers": 2 if tiny else 4,
        "n_heads": 8,
        "n_kv_heads": 2,
        "max_seq_len": seq,
        "attention": attention,
        "cuda_graphs": torch.cuda.is_available(),
        # window 128, 128 pooled tokens (stride 64 at 4k), 4 selected blocks of 64
        "mla": {
            "budget": 64 if tiny else 512,
            "ratios": [0.25, 0.25, 0.5],
            "block_size": 16 if tiny else 64,
            "select_tile": select_tile,
        },
    }
    data = {
        "source": "stdlib",
        "max_bytes": 200_000 if tiny else 4_000_000,
        "mqar_mix": 0.25,
        "mqar_pairs": 8,
        "mqar_vocab": 128,
    }
    contexts = [] if tiny else [32768]
    return build(
        TrainConfig,
        {
            "model": model,
            "data": data,
            "steps": steps,
            "batch_size": 2 if tiny else 8,
            "seq_len": seq,
            "lr": 1.5e-3,
            "warmup_steps": max(1, steps // 10),
            "eval_every": steps,
            "eval_batches": 2 if tiny else 8,
            "throughput_warmup": min(10, steps // 2),
            "seed": seed,
            "dtype": "bfloat16",
            "benchmark": {
                "enabled": torch.cuda.is_available(),
                "steps": 5,
                "warmup": 2,
                "contexts": contexts,
            },
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tiny", action="store_true", help="a small CPU run: checks the script")
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    args = ap.parse_args()
    steps = 4 if args.tiny else args.steps
    variants = [("mla", bq) for bq in args.tiles] + [("dense", 0)]
    rows = []
    for attention, bq in variants:
        for seed in args.seeds:
            cfg = run_config(attention, max(bq, 1), seed, steps, args.tiny)
            t0 = time.perf_counter()
            metrics = train(cfg)
            row = {
                "attention": attention,
                "select_tile": bq,
                "seed": seed,
                "wall_s": time.perf_counter() - t0,
            }
            for key in ("val_loss", "mqar_acc", "tokens_per_s", "tokens_per_s@32768"):
                row[key] = metrics.get(key)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "command": "python bench/select_tile.py " + " ".join(sys.argv[1:]),
        "steps": steps,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select_tile.json").write_text(json.dumps(result, indent=1))
    table = markdown(result, variants)
    (out / "select_tile.md").write_text(table)
    print(table)


def markdown(result: dict, variants: list[tuple[str, int]]) -> str:
    """Means over the seeds (and each seed's value) per variant."""

    def cell(values: list, fmt: str) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        each = ", ".join(format(v, fmt) for v in values)
        return f"{format(statistics.mean(values), fmt)} ({each})"

    lines = [
        f"{result['device']}, {result['date']}, {result['steps']} steps per run",
        "",
        "| attention | select_tile | val_loss | mqar_acc | tokens/s (train length) "
        "| tokens/s@32768 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for attention, bq in variants:
        rows = [r for r in result["rows"] if (r["attention"], r["select_tile"]) == (attention, bq)]
        lines.append(
            f"| {attention} | {bq or '—'} | {cell([r['val_loss'] for r in rows], '.4f')} "
            f"| {cell([r['mqar_acc'] for r in rows], '.3f')} "
            f"| {cell([r['tokens_per_s'] for r in rows], '.3g')} "
            f"| {cell([r['tokens_per_s@32768'] for r in rows], '.3g')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
