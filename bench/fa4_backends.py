"""Would FlashAttention 4's CuTe kernels beat ours on MLA's local and sparse branches?

Each branch alone, forward and backward, through FlashAttention 4's Hopper kernels (the
`flash-attn-4` package, CuTe DSL: a causal sliding window for the local branch; block sparsity
fed MLA's own tile selection for the sparse branch) beside MLA's Triton kernels for the same
work, the whole MLA op and cuDNN's dense attention, all in one run. With `select_tile` = Bq =
block size, every block a tile selects lies wholly before the tile's first query (DESIGN §1),
so the sparse branch is block-sparse attention over full blocks: no mask inside a block.

Each FlashAttention 4 branch is first checked against the float32 naive reference of that
branch (output and q, k, v gradients) at a short length. Times: the profiler's kernel time per
fwd+bwd (the GPU's work, no host) and the event-timed median of back-to-back calls. MLA's
branch rows are the kernels of the whole NSA op that do that branch's work alone (the window
kernels also do the global branch's, so the local row is a local-only plan).

    python bench/fa4_backends.py [--shapes 12/4/64 64/4/128] [--lengths 8192 32768]

Needs the `flash-attn-4` package and its CUTLASS DSL (not in the device image: carried).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

try:
    from automla.kernels import AttentionConfig, mla_attention
    from automla.kernels.naive import naive_local, naive_sparse
    from automla.kernels.selection import select_tiles
except ImportError:  # not installed: import the folder directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import AttentionConfig, mla_attention
    from kernels.naive import naive_local, naive_sparse
    from kernels.selection import select_tiles

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, budgets.py, tile_shapes.py
from budgets import budget_config  # noqa: E402
from tile_shapes import inputs, rel_err, sdpa  # noqa: E402
from timing import device_ms, kernel_ms  # noqa: E402

# The NSA op's kernels that do the sparse branch's work alone (selection not included), and
# those that pool the keys and select the blocks.
SPARSE_KERNELS = (
    "_sparse_tile_fwd",
    "_sparse_tile_dq",
    "_sparse_tile_dkv",
    "_invert",
    "_scan",
    "_chunk",
)
SELECTION_KERNELS = ("_pool_kernel", "_tile_score", "_topk")


def block_lists(idx: torch.Tensor, hq: int, T: int, bs: int):
    """MLA's tile selection `idx` [B, NT, HKV, n] (-1: empty slot) as FlashAttention 4's
    block lists, one row per query head (a group's heads share it): forward (count [B, HQ, NT]
    and key blocks [B, HQ, NT, n] per query tile, ascending) and backward (count [B, HQ, NBK]
    and query tiles [B, HQ, NBK, width] per key block, ascending)."""
    B, NT, HKV, n = idx.shape
    G = hq // HKV
    nbk = -(-T // bs)
    sel = idx.permute(0, 2, 1, 3)  # [B, HKV, NT, n]
    valid = sel >= 0
    fwd_cnt = valid.sum(-1, dtype=torch.int32)
    fwd_idx = torch.where(valid, sel, nbk).sort(-1).values
    fwd_idx = torch.where(fwd_idx == nbk, 0, fwd_idx).int()
    dense = torch.zeros(B, HKV, NT, nbk + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, sel, nbk), True)
    by_key = dense[..., :nbk].transpose(-1, -2)  # [B, HKV, NBK, NT]
    bwd_cnt = by_key.sum(-1, dtype=torch.int32)
    width = max(int(bwd_cnt.max()), 1)
    bwd_idx = (~by_key).to(torch.int8).argsort(dim=-1, stable=True)[..., :width].int()

    def heads(x):
        return x.repeat_interleave(G, 1).contiguous()

    return (heads(fwd_cnt), heads(fwd_idx)), (heads(bwd_cnt), heads(bwd_idx))


def fa4_block_sparse(lists, bq: int, bs: int):
    """Block lists (count, index) as FlashAttention 4's tensors: full blocks only."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    cnt, ix = lists
    zero = torch.zeros_like(cnt)
    return BlockSparseTensorsTorch(
        mask_block_cnt=zero,
        mask_block_idx=zero[..., None],
        full_block_cnt=cnt,
        full_block_idx=ix,
        block_size=(bq, bs),
    )


def small_bwd_tiles() -> None:
    """FlashAttention 4's Hopper backward takes 128-row tiles at head dim 64 and 128-key tiles
    at 128, which 64-query, 64-key sparse blocks do not divide; give it 64 x 64 tiles (the
    shape it already uses for block-sparse head dim 256) when block sparsity is on."""
    from flash_attn.cute import interface as fa4

    base = fa4._tile_size_bwd_sm90

    def tiles(head_dim, head_dim_v, causal, local, sparse_block_size_q=None):
        if sparse_block_size_q is None:
            return base(head_dim, head_dim_v, causal, local)
        return fa4.BwdConfig(
            m_block_size=64, n_block_size=64,
            num_stages_Q=2, num_stages_dO=2, num_stages_PdS=2,
            SdP_swapAB=False, dKV_swapAB=False, dQ_swapAB=False,
            AtomLayoutMSdP=1, AtomLayoutNdKV=1, AtomLayoutMdQ=1,
        )  # fmt: skip

    fa4._tile_size_bwd_sm90 = tiles


def backends(T: int, hq: int, bq: int = 64) -> dict:
    """The rows of one point; the sparse ones (and the NSA op) at select_tile `bq`."""
    from flash_attn.cute import flash_attn_func

    cfg = budget_config(T, "nsa", bq)
    plan = cfg.plan(T)
    local_only = AttentionConfig(budget=plan.window, ratios=(1.0, 0.0, 0.0), block_size=64)
    global_only = AttentionConfig(budget=T // plan.stride, ratios=(0.0, 1.0, 0.0), block_size=64)
    cache = {}

    def fa4_local(q, k, v, gate):
        return flash_attn_func(q, k, v, causal=True, window_size=(plan.window - 1, 0))[0]

    def fa4_sparse(q, k, v, gate):
        if "blocks" not in cache:  # selection is not part of the branch's time
            idx = select_tiles(q.detach(), k.detach(), plan)
            lists = block_lists(idx, hq, T, plan.block_size)
            cache["blocks"] = [fa4_block_sparse(x, bq, plan.block_size) for x in lists]
        fwd, bwd = cache["blocks"]
        return flash_attn_func(q, k, v, block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd)[0]

    return {
        "fa4 local": fa4_local,
        "mla local": lambda q, k, v, g: mla_attention(q, k, v, g, local_only),
        "mla global": lambda q, k, v, g: mla_attention(q, k, v, g, global_only),
        f"fa4 sparse Bq {bq}": fa4_sparse,
        f"mla nsa Bq {bq}": lambda q, k, v, g: mla_attention(q, k, v, g, cfg),
        "cudnn dense": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def check(name: str, hq: int, hkv: int, d: int, bq: int, T: int = 2048) -> str:
    """Relative errors of a FlashAttention 4 branch's o, dq, dk, dv against the float32 naive
    branch (`naive_local` / `naive_sparse` of the NSA plan at select_tile `bq`)."""
    if not name.startswith("fa4"):
        return "-"
    plan = budget_config(T, "nsa", bq).plan(T)
    q, k, v, gate, do = inputs(T, hq, hkv, d, seed=1)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    naive = naive_local if name.endswith("local") else naive_sparse
    ref = naive(qr, kr, vr, plan).transpose(1, 2)  # [B, T, HQ, D]
    ref.backward(do.float())
    out = backends(T, hq, bq)[name](q, k, v, gate)
    out.backward(do)
    pairs = ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad))
    return "/".join(f"{rel_err(a, b):.1e}" for a, b in pairs)  # inf: not finite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["12/4/64", "64/4/128"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument(
        "--tiles", nargs="+", type=int, default=[64], help="select_tile of the sparse rows"
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", nargs="+", help="rows whose names start with these (default: all)")
    args = ap.parse_args()
    small_bwd_tiles()
    rows = []
    for shape in args.shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for bq in args.tiles:
            names = [n for n in backends(2048, hq, bq) if "Bq" in n or bq == args.tiles[0]]
            names = [n for n in names if not args.only or n.startswith(tuple(args.only))]
            errs = {}
            for name in names:
                try:
                    errs[name] = check(name, hq, hkv, d, bq)
                except Exception as e:  # a backend that cannot run this shape says why, once
                    print(f"{shape} {name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            for T in args.lengths:
                q, k, v, gate, do = inputs(T, hq, hkv, d)
                for name, fn in backends(T, hq, bq).items():
                    if name in errs:
                        rows += timed(
                            shape, T, name, errs[name], fn, (q, k, v, gate, do), args.runs
                        )
    print(
        "\n| heads | T | backend | rel. err o/dq/dk/dv (T 2048) | kernels ms fwd+bwd | events ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, T, name, err, kern, ev in rows:
        print(f"| {shape} | {T} | {name} | {err} | {kern:.3f} | {ev:.3f} |")


def timed(shape, T, name, err, fn, args, runs) -> list:
    """Rows of one backend at one point: its kernels' time and the events' (and, for the NSA
    op, its sparse kernels' sum)."""
    q, k, v, gate, do = args

    def fwd_bwd():
        fn(q, k, v, gate).backward(do)
        q.grad = k.grad = v.grad = gate.grad = None

    try:
        kern = kernel_ms(fwd_bwd, runs=runs, width=90)
        ev = device_ms(fwd_bwd, repeats=20)
    except Exception as e:
        print(f"{shape} {T} {name}: {type(e).__name__}: {str(e)[:600]}", flush=True)
        return []
    total = sum(kern.values())
    top = ", ".join(f"{n[:40]} {ms * 1e3:.0f}" for n, ms in list(kern.items())[:6])
    print(
        f"{shape} {T:>6} {name:<16} err {err}  kernels {total:8.3f} ms  events {ev:8.3f} ms  [{top} µs]",
        flush=True,
    )
    rows = [(shape, T, name, err, total, ev)]
    if name.startswith("mla nsa"):
        sparse = sum(ms for n, ms in kern.items() if any(s in n for s in SPARSE_KERNELS))
        rows.append((shape, T, name.replace("nsa", "sparse kernels of"), "-", sparse, float("nan")))
        select = sum(ms for n, ms in kern.items() if any(s in n for s in SELECTION_KERNELS))
        rows.append(
            (shape, T, name.replace("nsa", "selection kernels of"), "-", select, float("nan"))
        )
    return rows


if __name__ == "__main__":
    main()
