"""MLA (Triton) against dense and sliding-window attention on one GPU: time, memory, TFLOP/s.

B=1, 64 query heads, 4 KV heads, D=128, bf16, causal, T = 8k, 32k, 64k. Peers: SDPA with the
flash backend, SDPA with the cuDNN backend, FlexAttention with a 512-token sliding window. MLA
runs at the NSA-sized budget: window 512, 16 selected blocks of 64, global stride 64 (the
budget grows with T so that the stride stays 64: budget = 512 + 1024 + T / 64).

Before timing, MLA is checked against the naive reference at T=4096 (bf16 inputs, float32
reference). Writes attention.json and attention.md to --out (default: $OUT or bench/), and
prints the table last.

    python bench/attention.py [--lengths 8192 32768 65536] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from automla.kernels import attention_flops, mla_reference, select_blocks
    from automla.kernels.parallel import mla_triton, select_blocks_triton
    from automla.kernels.parallel.layout import _GPU_TILES, _tiles
except ImportError:  # not installed: import the folder directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import attention_flops, mla_reference, select_blocks
    from kernels.parallel import mla_triton, select_blocks_triton
    from kernels.parallel.layout import _GPU_TILES, _tiles

import triton
from budgets import budget_config
from timing import kernel_ms
from triton.testing import do_bench

HQ, HKV, D = 64, 4, 128
DTYPE = torch.bfloat16
WINDOW = 512  # the sliding-window peer (FlexAttention), as the NSA budget's window


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


def inputs(T: int, hq: int, hkv: int, seed: int = 0, grad: bool = True):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=g)

    q, k, v = randn(1, T, hq, D), randn(1, T, hkv, D), randn(1, T, hkv, D)
    gate = torch.rand(1, T, hq, 3, device="cuda", generator=g).to(DTYPE)
    do = randn(1, T, hq, D)
    if grad:
        for x in (q, k, v, gate):
            x.requires_grad_()
    return q, k, v, gate, do


def ceilings() -> dict:
    """The measured matrix rate and copy bandwidth (METHOD.md: count the floor first)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    x = torch.empty(1 << 30, device="cuda", dtype=torch.uint8).random_()
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return {"matmul_tflops": 2 * 8192**3 / ms / 1e9, "copy_tbs": 2 * x.numel() / ms_copy / 1e9}


def check_correctness() -> dict:
    """MLA vs the float32 reference at T=4096 (one KV group of 16 heads, to bound memory)."""
    T, hq, hkv = 4096, 16, 1
    cfg = budget_config(T)
    q, k, v, gate, do = inputs(T, hq, hkv, seed=1)
    o = mla_triton(q, k, v, gate, cfg)
    o.backward(do)
    got = [o.detach()] + [x.grad for x in (q, k, v, gate)]
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v, gate)]
    o_ref = mla_reference(*ref_in, cfg)
    o_ref.backward(do.float())
    want = [o_ref.detach()] + [x.grad for x in ref_in]
    errs = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dgate"), got, want)}
    plan = cfg.plan(T)
    qd, kd = q.detach(), k.detach()
    sel = select_blocks_triton(qd, kd, plan).long().sort(-1).values
    sel_ref = select_blocks(qd, kd, plan).sort(-1).values
    errs["selection_mismatch"] = (sel != sel_ref).float().mean().item()
    first = mla_triton(qd, kd, v.detach(), gate.detach(), cfg)
    errs["deterministic"] = bool(
        torch.equal(first, mla_triton(qd, kd, v.detach(), gate.detach(), cfg))
    )
    return errs


def timed(fn_fwd, fn_bwd_args, rep: int) -> tuple[float, float, float]:
    """Median fwd ms, median fwd+bwd ms, peak GB of one fwd+bwd."""
    q, k, v, gate, do = fn_bwd_args

    # detached inputs: the forward alone, as at inference (MLA then stores nothing for backward)
    qd, kd, vd, gd = (x.detach() for x in (q, k, v, gate))

    def fwd():
        return fn_fwd(qd, kd, vd, gd)

    def fwd_bwd():
        o = fn_fwd(q, k, v, gate)
        o.backward(do)

    ms_f = do_bench(fwd, warmup=100, rep=rep, return_mode="median")
    for x in (q, k, v, gate):
        x.grad = None
    ms_fb = do_bench(
        fwd_bwd, warmup=100, rep=rep, return_mode="median", grad_to_none=[q, k, v, gate]
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return ms_f, ms_fb, peak


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    gqa = [True]

    def run(q, k, v, gate):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with sdpa_kernel(backend):
            if gqa[0]:
                try:
                    return F.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=True, enable_gqa=True
                    ).transpose(1, 2)
                except RuntimeError:
                    gqa[0] = (
                        False  # this backend wants equal head counts: expand K/V (<1% of its time)
                    )
            G = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)

    return run


def flex_window(T: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < WINDOW)

    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    flex = torch.compile(flex_attention)

    def run(q, k, v, gate):
        o = flex(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=mask,
            enable_gqa=True,
        )
        return o.transpose(1, 2)

    return run


def dense_flops(T: int, window: int | None = None) -> int:
    keys = sum(min(t + 1, window or t + 1) for t in range(T))
    return 4 * D * keys * HQ


def kernel_times(T: int, runs: int = 3, hkv: int = HKV) -> dict[str, float]:
    """Device ms per kernel of one MLA fwd+bwd (mean of `runs`), from the profiler."""
    cfg = budget_config(T)
    q, k, v, gate, do = inputs(T, HQ, hkv)
    return kernel_ms(lambda: mla_triton(q, k, v, gate, cfg).backward(do), runs=runs)


# Tile candidates per kernel for --sweep, the current default first (earlier rounds in
# bench/NOTES.md: 4 and 8 warps, 16 to 128 rows, 1 to 3 stages).
SWEEP = {
    # HP heads of one group per program share each key tile: HP x BT rows
    "window_fwd": [
        {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4, "num_stages": 3},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 2, "num_warps": 8, "num_stages": 3},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 2, "num_warps": 8, "num_stages": 2},
        {"BT": 32, "BK": 64, "BC": 64, "HP": 4, "num_warps": 8, "num_stages": 3},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 2, "num_warps": 4, "num_stages": 2},
    ],
    "window_dq": [
        {"BT": 32, "BK": 64, "BC": 64, "HP": 4, "num_warps": 8},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 2, "num_warps": 8},
        {"BT": 64, "BK": 64, "BC": 64, "HP": 2, "num_warps": 8, "num_stages": 3},
        {"BT": 32, "BK": 64, "BC": 64, "HP": 4, "num_warps": 8},
    ],
    "local_dkv": [
        {"BT": 64, "BK": 64, "num_warps": 4},
        {"BT": 32, "BK": 64, "num_warps": 4, "num_stages": 3},
        {"BT": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
        {"BT": 128, "BK": 64, "num_warps": 8},
        {"BT": 32, "BK": 128, "num_warps": 8},
        {"BT": 32, "BK": 64, "num_warps": 4},
    ],
    "global_dkv": [
        {"BT": 64, "BC": 64, "num_warps": 4},
        {"BT": 64, "BC": 64, "num_warps": 4, "num_stages": 3},
        {"BT": 64, "BC": 32, "num_warps": 4},
        {"BT": 128, "BC": 64, "num_warps": 8},
        {"BT": 32, "BC": 64, "num_warps": 4},
    ],
    "sparse_fwd": [
        {"num_warps": 2},
        {"num_warps": 2, "num_stages": 3},
        {"num_warps": 2, "num_stages": 4},
        {"num_warps": 4, "num_stages": 3},
    ],
    "sparse_dq": [
        {"num_warps": 2},
        {"num_warps": 2, "num_stages": 3},
        {"num_warps": 2, "num_stages": 4},
        {"num_warps": 4, "num_stages": 3},
    ],
    "sparse_dkv": [
        {"ROWS": 64, "CH": 256, "num_warps": 4},
        {"ROWS": 128, "CH": 256, "num_warps": 8},
        {"ROWS": 128, "CH": 256, "num_warps": 4},
        {"ROWS": 64, "CH": 128, "num_warps": 4},
    ],
    "score": [{"BN": 32, "num_warps": 4}, {"BN": 64, "num_warps": 4}],
}
KERNEL_OF = {
    "score": "_score_kernel",
    "window_fwd": "_window_fwd_kernel",
    "sparse_fwd": "_sparse_fwd_kernel",
    "window_dq": "_window_bwd_dq_kernel",
    "local_dkv": "_local_bwd_dkv_kernel",
    "global_dkv": "_global_bwd_dkv_kernel",
    "sparse_dq": "_sparse_bwd_dq_kernel",
    "sparse_dkv": "_sparse_bwd_dkv_kernel",
}


def sweep(T: int, only: list[str] | None = None) -> dict:
    """Time each kernel's tile candidates at length T (those in `only`, default all); keep
    the fastest of each."""
    chosen, log = {}, []
    for name, candidates in SWEEP.items():
        if only and name not in only:
            continue
        best = None
        for cand in candidates:
            _GPU_TILES[name] = cand
            try:
                ms = kernel_times(T, runs=2)[KERNEL_OF[name]]
            except Exception as e:
                print(f"sweep {name} {cand}: {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            log.append((name, cand, ms))
            print(f"sweep {name:11s} {ms:7.2f} ms  {cand}", flush=True)
            if best is None or ms < best[1]:
                best = (cand, ms)
        if best is not None:
            _GPU_TILES[name] = chosen[name] = best[0]
    print("chosen tiles:", json.dumps(chosen), flush=True)
    return {"chosen": chosen, "log": log}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time (ms)")
    ap.add_argument("--peers", default="flash,cudnn,flex", help="comma list; '' for none")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="tune tiles at 32k first, then measure")
    ap.add_argument("--sweep-only", default="", help="comma list of SWEEP kernels (default all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": "python bench/attention.py " + " ".join(sys.argv[1:]),
    }
    result["ceilings"] = ceilings()
    print("ceilings", result["ceilings"], flush=True)
    if args.sweep:
        result["sweep_32k"] = sweep(32768, [x for x in args.sweep_only.split(",") if x])
    result["tiles"] = {k: _tiles(k) for k in _GPU_TILES}
    if not args.skip_check:
        result["check_T4096"] = check_correctness()
        print("check T=4096", result["check_T4096"], flush=True)

    from torch.nn.attention import SDPBackend

    peers = {
        "flash": lambda T: sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": lambda T: sdpa(SDPBackend.CUDNN_ATTENTION),
        "flex": flex_window,
    }
    rows = []
    for T in args.lengths:
        cfg = budget_config(T)
        plan = cfg.plan(T)
        fl_mla = attention_flops(plan, T, D, HQ)
        entries = [
            ("mla", lambda T, cfg=cfg: lambda q, k, v, g: mla_triton(q, k, v, g, cfg), HKV, fl_mla)
        ]
        for name in filter(None, args.peers.split(",")):
            fl = dense_flops(T, WINDOW if name == "flex" else None)
            entries.append((name, peers[name], HKV, fl))
        if T == 32768:
            entries.append(
                (
                    "mla_G1",
                    lambda T, cfg=cfg: lambda q, k, v, g: mla_triton(q, k, v, g, cfg),
                    HQ,
                    fl_mla,
                )
            )
        for name, make, hkv, flops in entries:
            row = {"T": T, "impl": name, "flops_fwd": flops}
            try:
                fn = make(T)
                ms_f, ms_fb, peak = timed(fn, inputs(T, HQ, hkv), args.rep)
                row.update(fwd_ms=ms_f, fwd_bwd_ms=ms_fb, peak_gb=peak)
                row["tflops_fwd"] = flops / ms_f / 1e9
                row["tflops_fwd_bwd"] = 3.5 * flops / ms_fb / 1e9
            except Exception as e:  # a peer that cannot run at this size is recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(row, flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    result["rows"] = rows
    if 32768 in args.lengths:
        result["kernels_32k"] = kernel_times(32768)
        for name, ms in list(result["kernels_32k"].items())[:16]:
            print(f"  {ms:8.2f} ms  {name}")
    (out / "attention.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "attention.md").write_text(table)
    print(table)


def markdown(result: dict) -> str:
    rows = result["rows"]
    by = {(r["T"], r["impl"]): r for r in rows}
    lines = [
        f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['date']}; "
        f"bf16 matmul {result['ceilings']['matmul_tflops']:.0f} TFLOP/s, "
        f"copy {result['ceilings']['copy_tbs']:.2f} TB/s",
        "",
        "| T | impl | fwd ms | fwd+bwd ms | peak GB | TFLOP/s fwd | TFLOP/s fwd+bwd "
        "| impl / MLA time, fwd / fwd+bwd |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['impl']} | — | — | — | — | — | {r['error'][:60]} |")
            continue
        mla = by.get((r["T"], "mla"))
        ratio = ""
        if mla and "fwd_ms" in mla and r["impl"] != "mla":
            ratio = (
                f"{r['fwd_ms'] / mla['fwd_ms']:.2f}x / {r['fwd_bwd_ms'] / mla['fwd_bwd_ms']:.2f}x"
            )
        lines.append(
            f"| {r['T']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} "
            f"| {r['peak_gb']:.2f} | {r['tflops_fwd']:.0f} | {r['tflops_fwd_bwd']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    main()
