"""CPU attention time: the budget-cost PyTorch MLA path against dense SDPA and the naive oracle.

    python bench/cpu_attention.py [--T 4096] [--budgets 256 1024] [--json out.json]

Prints a markdown table of forward and forward+backward medians.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from timing import median_ms

from automla.kernels import AttentionConfig, mla_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--ratios", type=float, nargs=3, default=[0.5, 0.25, 0.25])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, HQ, HKV, D = args.T, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, T, HQ, D, requires_grad=True)
    k = torch.randn(1, T, HKV, D, requires_grad=True)
    v = torch.randn(1, T, HKV, D, requires_grad=True)
    gate = torch.rand(1, T, HQ, 3, requires_grad=True)
    dout = torch.randn(1, T, HQ, D)

    def dense():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)

    variants = {"dense SDPA (causal)": (dense, T * (T + 1) / 2 / T)}
    for budget in args.budgets:
        cfg = AttentionConfig(budget=budget, ratios=tuple(args.ratios), block_size=args.block_size)
        plan = cfg.plan(T)
        keys = sum(plan.keys_per_query(t) for t in range(T)) / T
        variants[f"MLA torch, budget {budget}"] = (
            lambda cfg=cfg: mla_attention(q, k, v, gate, cfg, backend="torch"),
            keys,
        )

    rows = []
    for name, (fn, keys) in variants.items():
        with torch.no_grad():
            fwd = median_ms(fn, args.repeats)
        fb = median_ms(lambda fn=fn: fn().backward(dout), args.repeats)
        rows.append({"impl": name, "keys_per_query": keys, "fwd_ms": fwd, "fwd_bwd_ms": fb})
    base = rows[0]
    print(
        f"\nCPU, {torch.get_num_threads()} threads, B=1 T={T} HQ={HQ} HKV={HKV} D={D}, "
        f"ratios {tuple(args.ratios)}, block {args.block_size}, float32\n"
    )
    print("| implementation | keys/query | fwd ms | fwd+bwd ms | fwd+bwd vs dense |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        speedup = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        print(
            f"| {r['impl']} | {r['keys_per_query']:.0f} | {r['fwd_ms']:.1f} | "
            f"{r['fwd_bwd_ms']:.1f} | {speedup:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
