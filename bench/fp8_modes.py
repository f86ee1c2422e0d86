"""float8 against bf16 on train_throughput.py's wide stack (8 layers, heads of 128, dense
attention, one sequence of 8192) four ways: plain ops, fused ops (liger), each block
torch.compiled (plain ops, so that Inductor could fuse the float8 casts with the norms and
SwiGLU), and only each block's feed-forward half (norm, MLP) compiled. Median of 8 training
steps after 4.

    python bench/fp8_modes.py [--width 4096] [--modes plain fused blocks mlp] [--profile]

`--profile` also prints each variant's kernels over one step, largest first, and their time by
kind (matmuls, attention, the float8 casts, the rest).
"""

import argparse
import functools
import statistics
import time

import torch
import train_throughput as tt
from timing import kernel_ms, print_kernels

from automla.trainers import DataConfig, TrainConfig
from automla.trainers.trainer import build_state, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096, help="d_model of the stack")
    ap.add_argument("--modes", nargs="+", default=["plain", "fused", "blocks", "mlp"])
    ap.add_argument("--profile", action="store_true", help="each variant's kernels in one step")
    args = ap.parse_args()
    width = args.width
    T = 8192
    dev = torch.device("cuda")
    rows = []
    for mode in args.modes:
        for prec in ("bf16", "fp8"):
            v = tt.Variant("dense", fused=mode == "fused", precision=prec, width=width)
            try:
                cfg = TrainConfig(
                    model=tt.model_config(v, T, False, (0, 0, 0)),
                    data=DataConfig(),
                    steps=10,
                    batch_size=1,
                    seq_len=T,
                    dtype="bfloat16",
                    device="cuda",
                )
                st = build_state(cfg, dev)
                if mode == "blocks":
                    torch._dynamo.config.recompile_limit = 64
                    for b in st.raw_model.blocks:
                        b.compile(dynamic=False)
                if mode == "mlp":
                    torch._dynamo.config.recompile_limit = 64
                    for b in st.raw_model.blocks:
                        b._feed_forward = torch.compile(b._feed_forward, dynamic=False)
                g = torch.Generator().manual_seed(0)
                x = torch.randint(0, 50304, (1, T), generator=g).to(dev)
                y = torch.randint(0, 50304, (1, T), generator=g).to(dev)
                for _ in range(4):
                    train_step(st, x, y, 1e-4)
                torch.cuda.synchronize()
                ts = []
                for _ in range(8):
                    t0 = time.perf_counter()
                    loss = train_step(st, x, y, 1e-4)
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                rows.append((mode, prec, statistics.median(ts) * 1e3, float(loss)))
                if args.profile:
                    per = kernel_ms(functools.partial(train_step, st, x, y, 1e-4), runs=2, width=90)
                    print_kernels(f"{mode} {prec}", per, top=15)
                    print("  by kind:", by_kind(per), flush=True)
                del st
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append((mode, prec, float("nan"), repr(e)[:200]))
            print(rows[-1], flush=True)
    best_bf16 = min(r[2] for r in rows if r[1] == "bf16" and r[2] == r[2])
    for mode, prec, ms, loss in rows:
        print(
            f"| {width} | {mode} | {prec} | {ms:.1f} | {loss} | vs best bf16 {best_bf16 / ms:.2f}x |"
        )


def by_kind(per: dict[str, float]) -> dict[str, float]:
    """Kernel milliseconds summed by kind, from the kernels' names: cuBLAS's matmuls (nvjet,
    both precisions), cuDNN's attention, Inductor's kernels (the float8 casts), the rest."""
    kinds = {"matmuls": 0.0, "attention": 0.0, "fp8 casts": 0.0, "rest": 0.0}
    for name, ms in per.items():
        low = name.lower()
        if "gemm" in low or "nvjet" in low or "cutlass" in low:
            kind = "matmuls"
        elif "flash" in low or "fmha" in low or "cudnn" in low:
            kind = "attention"
        elif low.startswith("triton_"):
            kind = "fp8 casts"
        else:
            kind = "rest"
        kinds[kind] += ms
    return {k: round(v, 2) for k, v in kinds.items()}


if __name__ == "__main__":
    main()
