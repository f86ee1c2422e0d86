"""Training throughput of the LM with MLA against the same LM with dense SDPA attention.

    python bench/train_throughput.py [--seq 8192 32768] [--steps 8] [--json out.json]
    python bench/train_throughput.py --tiny            # a CPU smoke run of the script itself

One full training step (forward, backward, clipping, AdamW) on one sequence of each length, bf16
autocast on CUDA; the median step time after warm-up gives tokens/s; peak memory is
torch.cuda.max_memory_allocated over the timed steps. Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from timing import kernel_ms, print_kernels

from automla.kernels import AttentionConfig
from automla.trainers import DataConfig, ModelConfig, TrainConfig
from automla.trainers.trainer import build_state, train_step


def nsa_sized(T: int, select_tile: int = 1) -> AttentionConfig:
    """Window 512, 16 selected blocks of 64, global stride 64 at length T (as bench/attention.py)."""
    for g in (T // 64, T // 64 + 1):  # + 1 when rounding pushes the stride up
        budget = 512 + g + 1024
        cfg = AttentionConfig(
            budget=budget,
            ratios=(512 / budget, g / budget, 1024 / budget),
            block_size=64,
            select_tile=select_tile,
        )
        if cfg.plan(T).stride == 64:
            break
    return cfg


def model_config(
    attention: str, T: int, tiny: bool, heads: tuple[int, int, int], select_tile: int = 1
) -> ModelConfig:
    if tiny:
        size = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    else:
        # GPT-2 small sized: ~124M parameters with a 50k vocabulary
        n_heads, n_kv_heads, head_dim = heads
        size = dict(
            vocab_size=50304,
            d_model=768,
            n_layers=12,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
        )
    if tiny:
        mla = AttentionConfig(budget=64, block_size=16, select_tile=select_tile)
    else:
        mla = nsa_sized(T, select_tile)
    graphs = attention == "mla+graphs"
    return ModelConfig(
        **size, max_seq_len=T, attention="mla" if graphs else attention, mla=mla, cuda_graphs=graphs
    )


def measure(attention, T, steps, warmup, tiny, device, heads, profile=False, select_tile=1):
    cfg = TrainConfig(
        model=model_config(attention, T, tiny, heads, select_tile),
        data=DataConfig(),
        steps=steps,
        batch_size=1,
        seq_len=T,
        dtype="bfloat16",
        device=str(device),
    )
    state = build_state(cfg, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    vocab = cfg.model.vocab_size
    x = torch.randint(0, vocab, (1, T), generator=gen).to(device)
    y = torch.randint(0, vocab, (1, T), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        train_step(state, x, y, 1e-4)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step(state, x, y, 1e-4)
        sync()
        times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{attention} at T={T}: loss {loss.item()}")
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if profile and device.type == "cuda":  # after the peak: the profiler's steps are extra
        print_kernels(
            f"{attention} T={T} step", kernel_ms(lambda s=state: train_step(s, x, y, 1e-4))
        )
    params = sum(p.numel() for p in state.raw_model.parameters())
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "attention": attention if attention == "dense" else f"{attention} Bq={select_tile}",
        "T": T,
        "params": params,
        "step_ms": step_s * 1e3,
        "tokens_per_s": T / step_s,
        "peak_mem_gb": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small model on CPU: checks the script")
    ap.add_argument(
        "--heads",
        type=int,
        nargs=3,
        default=[12, 4, 64],
        metavar=("Q", "KV", "DIM"),
        help="query heads, KV heads, head dim (the sparse branch is cheapest per query at G=16)",
    )
    ap.add_argument("--profile", action="store_true", help="CUDA: print each step's kernels")
    ap.add_argument(
        "--cuda-graphs", action="store_true", help="also MLA with the op replayed from CUDA graphs"
    )
    ap.add_argument(
        "--select-tile", type=int, nargs="+", default=[1], help="MLA's select_tile values to run"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    seqs = [128, 256] if args.tiny else args.seq
    variants = [("dense", 1)]
    for bq in args.select_tile:
        variants += [("mla", bq)] + ([("mla+graphs", bq)] if args.cuda_graphs else [])
    rows = []
    for T in seqs:
        for attention, bq in variants:
            rows.append(
                measure(
                    attention,
                    T,
                    args.steps,
                    args.warmup,
                    args.tiny,
                    device,
                    tuple(args.heads),
                    args.profile,
                    bq,
                )  # fmt: skip
            )
            r = rows[-1]
            print(
                f"{r['attention']:18s} T={T:6d} {r['step_ms']:9.1f} ms/step "
                f"{r['tokens_per_s']:10.0f} tok/s",
                flush=True,
            )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"\n{name}, torch {torch.__version__}, params {rows[0]['params'] / 1e6:.1f}M, "
        f"heads {args.heads[0]} q / {args.heads[1]} KV of {args.heads[2]}, batch 1\n"
    )
    print("| T | attention | step ms | tokens/s | peak GB | tokens/s vs dense | memory vs dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    dense = {r["T"]: r for r in rows if r["attention"] == "dense"}
    for r in rows:
        d = dense[r["T"]]
        ratio = " | "
        if r is not d:
            ratio = (
                f"{r['tokens_per_s'] / d['tokens_per_s']:.2f}x | "
                f"{r['peak_mem_gb'] / d['peak_mem_gb']:.2f}x"
            )
        print(
            f"| {r['T']} | {r['attention']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_mem_gb']:.2f} | {ratio} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
