"""The sparse branch: forward and dq per token and KV group (the group's queries share each
selected key block), dk/dv per chunk of the tokens that chose a key block, with the selection
inverted on the device (a count, a scan and an atomic fill); `select`, `forward` and
`backward` launch them (the tile-mode branch, `sparse_tile`, has the same three).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    _chunk_block,
    _group_rows,
    _load_block,
    _n_selected,
    _softmax_finish,
    _softmax_step,
    _sparse_delta,
    _sparse_dkv_rows,
)
from .launch import launch
from .layout import _options
from .selection import _select


@triton.jit
def _sparse_fwd_kernel(
    q,
    k,
    v,
    gate,
    idx,
    active,
    groups,
    o,
    lse_s,
    T,
    NA,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr,
):
    # One token and one KV group: the group's GP (padded) query heads share each key block.
    k, v, idx, o_tq, o_h, m_g = _group_rows(
        k, v, idx, active, groups, T, NA, HQ, HKV, G, GP, D, NSEL
    )
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, BSP)
    o_x = (o_h * D)[:, None] + o_d[None, :]
    # [GP, D]
    b_q = tl.load(q + o_tq * D + o_x, mask=m_g[:, None], other=0.0)

    b_m = tl.full([GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, D], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        # [BSP], [BSP, D]
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, 0, 0, BS, HKV, D, False)
        # [GP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
    b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
    tl.store(lse_s + o_tq + o_h, b_lse, mask=m_g)
    b_g = tl.load(gate + (o_tq + o_h) * 3 + 2, mask=m_g, other=0.0).to(tl.float32)
    b_o = b_g[:, None] * b_ob
    if ACCUMULATE:
        b_o += tl.load(o + o_tq * D + o_x, mask=m_g[:, None], other=0.0).to(tl.float32)
    tl.store(o + o_tq * D + o_x, b_o.to(o.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _sparse_bwd_dq_kernel(
    q,
    k,
    v,
    gate,
    idx,
    active,
    groups,
    do,
    o,
    lse_s,
    dgate,
    delta_l,
    delta_g,
    delta_s,
    dob_s,
    dq,
    T,
    NA,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    PREC: tl.constexpr,
):
    # dq of one token's group rows; first the branch's softmax delta and dO (g_s * do), stored
    # for the dk/dv kernel launched after. Its dgate, <do, o_s>, is summed in the loop.
    k, v, idx, o_tq, o_h, m_g = _group_rows(
        k, v, idx, active, groups, T, NA, HQ, HKV, G, GP, D, NSEL
    )
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, BSP)
    o_x = o_tq * D + (o_h * D)[:, None] + o_d[None, :]
    # [GP, D]
    b_q = tl.load(q + o_x, mask=m_g[:, None], other=0.0)
    b_do = tl.load(do + o_x, mask=m_g[:, None], other=0.0)
    b_g = tl.load(gate + (o_tq + o_h) * 3 + 2, mask=m_g, other=0.0).to(tl.float32)
    b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
    b_lse = tl.load(lse_s + o_tq + o_h, mask=m_g, other=float("inf"))
    tl.store(dob_s + o_x, b_dob, mask=m_g[:, None])
    o_r = o_tq + o_h
    b_delta = _sparse_delta(
        b_do, o + o_x, delta_l + o_r, delta_g + o_r, delta_s + o_r, m_g, HAS_LOCAL, HAS_GLOBAL
    )
    b_dq = tl.zeros([GP, D], dtype=tl.float32)
    b_dg = tl.zeros([GP], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        # [BSP], [BSP, D]
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, 0, 0, BS, HKV, D, False)
        # [GP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        # dP with the ungated do: sum_j P dP = <do, o_s>, the gate's gradient
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dg += tl.sum(b_p * b_dp, 1)
        b_ds = b_p * (b_g[:, None] * b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dgate + o_r * 3 + 2, b_dg, mask=m_g)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + o_x, mask=m_g[:, None], other=0.0).to(tl.float32)
    tl.store(dq + o_x, b_dq.to(dq.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _sparse_bwd_dkv_kernel(
    q,
    k,
    v,
    active,
    chunks,
    tokens,
    used,
    dob,
    lse_s,
    delta_s,
    dk,
    dv,
    T,
    NB,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BQ: tl.constexpr,
    PREC: tl.constexpr,
):
    # One chunk of the tokens that selected one key block of one KV head: chunks[pid] =
    # (segment, first, end) with segment = (b * HKV + hkv) * NB + block and tokens[first:end].
    # Early blocks are chosen by many more tokens than late ones; fixed-size chunks keep the
    # programs even, and each adds its partial dk/dv atomically. Rows from *used on are unset.
    i_c = tl.program_id(0)
    if i_c < tl.load(used):
        p_lo, p_hi, i_hk, o_bq, o_d, o_kv, m_k, b_k, b_v = _chunk_block(
            chunks, k, v, i_c, T, NB, HQ, HKV, D, BS, BSP
        )
        b_dk = tl.zeros([BSP, D], dtype=tl.float32)
        b_dv = tl.zeros([BSP, D], dtype=tl.float32)
        o_r = tl.arange(0, BQ * GP)
        o_q = o_r // GP
        o_g = o_r % GP
        o_h = i_hk * G + o_g
        m_h = o_g < G
        m_h = m_h & (tl.load(active + o_h, mask=m_h, other=0) != 0)
        for i_p in range(p_lo, p_hi, BQ):
            m_r = m_h & (i_p + o_q < p_hi)
            b_tok = tl.load(tokens + i_p + o_q, mask=m_r, other=0)
            o_row = b_tok * HQ + o_h
            b_dk, b_dv = _sparse_dkv_rows(
                q, dob, lse_s, delta_s, o_bq, o_row, o_d, m_r, m_k, b_k, b_v, b_dk, b_dv,
                scale2, D, PREC,
            )  # fmt: skip
        # relaxed: only the sums matter, read by later launches (the default acq_rel orders
        # every add)
        tl.atomic_add(dk + o_kv, b_dk * scale, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(dv + o_kv, b_dv, mask=m_k[:, None], sem="relaxed")


@triton.jit
def _invert_pass_kernel(
    idx,
    counts,
    cursor,
    ends,
    tokens,
    R,
    T,
    NB,
    HKV: tl.constexpr,
    NSEL: tl.constexpr,
    NSP: tl.constexpr,
    BR: tl.constexpr,
    FILL: tl.constexpr,
):
    # BR selection rows (b * T + t) * HKV + hkv. Each selected block belongs to the segment
    # (b * HKV + hkv) * NB + block. First pass: count each segment's tokens. Second (FILL):
    # write each token at its segment's start (ends - counts) plus a slot taken atomically.
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_j = tl.arange(0, NSP)
    m = (o_r < R)[:, None] & (o_j < NSEL)[None, :]
    # [BR, NSP]
    b_i = tl.load(idx + o_r[:, None].to(tl.int64) * NSEL + o_j[None, :], mask=m, other=-1)
    m = m & (b_i >= 0)
    o_bt = o_r // HKV
    seg = ((o_bt // T) * HKV + o_r % HKV)[:, None] * NB + b_i
    if FILL:
        # relaxed: each token needs a distinct slot, not an order
        b_pos = tl.atomic_add(cursor + seg, 1, mask=m, sem="relaxed")
        b_start = tl.load(ends + seg, mask=m, other=0) - tl.load(counts + seg, mask=m, other=0)
        b_tok = (o_bt % T)[:, None] + tl.zeros([BR, NSP], dtype=tl.int32)
        tl.store(tokens + b_start + b_pos, b_tok, mask=m)
    else:
        tl.atomic_add(counts + seg, 1, mask=m, sem="relaxed")


@triton.jit
def _scan_kernel(counts, ends, cends, NSEG, CH, BLOCK: tl.constexpr):
    # One program: inclusive prefix sums of the segments' token counts (ends) and of their
    # chunk counts, ceil(count / CH) (cends).
    b_carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    b_ccarry = b_carry
    for i in range(0, NSEG, BLOCK):
        o = i + tl.arange(0, BLOCK)
        m = o < NSEG
        b_c = tl.load(counts + o, mask=m, other=0)
        b_nc = (b_c + CH - 1) // CH
        tl.store(ends + o, tl.cumsum(b_c, 0) + b_carry, mask=m)
        tl.store(cends + o, tl.cumsum(b_nc, 0) + b_ccarry, mask=m)
        b_carry += tl.sum(b_c, 0)
        b_ccarry += tl.sum(b_nc, 0)


@triton.jit
def _chunk_kernel(counts, ends, cends, chunks, CH):
    # One segment's rows of the chunk table: (segment, first, end) per CH of its tokens.
    seg = tl.program_id(0)
    n = tl.load(counts + seg)
    end = tl.load(ends + seg)
    nc = (n + CH - 1) // CH
    row = tl.load(cends + seg) - nc
    for j in range(nc):
        first = end - n + j * CH
        tl.store(chunks + (row + j) * 3, seg)
        tl.store(chunks + (row + j) * 3 + 1, first)
        tl.store(chunks + (row + j) * 3 + 2, tl.minimum(first + CH, end))


def _invert(idx: torch.Tensor, NB: int, CH: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection inverted, as chunks of at most CH tokens per selected block.

    Returns chunks [n, 3] int32 rows (segment, first, end), segment = (b * HKV + hkv) * NB +
    block, indexing tokens [entries] int32 (grouped by segment; the order inside a segment is
    the order of the atomic slots); and the number of chunk rows used, a 1-element device
    tensor: n is an upper bound known without a device sync. Five launches, no sort.
    """
    B, T, HKV, nsel = idx.shape
    dev = idx.device
    nseg = B * HKV * NB
    R = B * T * HKV
    counts, cursor = torch.zeros(2, nseg, dtype=torch.int32, device=dev)
    ends = torch.empty(nseg, dtype=torch.int32, device=dev)
    cends = torch.empty(nseg, dtype=torch.int32, device=dev)
    tokens = torch.empty(idx.numel(), dtype=torch.int32, device=dev)
    n = nseg + triton.cdiv(idx.numel(), CH)
    chunks = torch.empty(n, 3, dtype=torch.int32, device=dev)
    BR = max(1, 256 // triton.next_power_of_2(nsel))
    grid = (triton.cdiv(R, BR),)
    bufs = dict(idx=idx, counts=counts, cursor=cursor, ends=ends, tokens=tokens)
    sizes = dict(R=R, T=T, NB=NB, HKV=HKV, NSEL=nsel, NSP=triton.next_power_of_2(nsel), BR=BR)
    launch(_invert_pass_kernel, grid, **bufs, **sizes, FILL=False)
    launch(_scan_kernel, (1,), counts=counts, ends=ends, cends=cends, NSEG=nseg, CH=CH, BLOCK=1024)
    launch(_invert_pass_kernel, grid, **bufs, **sizes, FILL=True)
    launch(_chunk_kernel, (nseg,), counts=counts, ends=ends, cends=cends, chunks=chunks, CH=CH)
    return chunks, tokens, cends[-1:]


select = _select
"""The per-query selection, [B, T, HKV, n_select] block indices (`sparse_tile.select` for tiles)."""


def forward(q, k, v, gate, idx, lay, o, lse_s) -> None:
    """The sparse branch's output, gated and added to o (written when no window branch ran),
    and its lse; the backward needs no output of the branch's own."""
    launch(
        _sparse_fwd_kernel, (lay.T, lay.B * lay.NA),
        q=q, k=k, v=v, gate=gate, idx=idx, active=lay.active, groups=lay.groups, o=o,
        lse_s=lse_s, T=lay.T, NA=lay.NA, **lay.args, GP=lay.GP16, NSEL=lay.plan.n_select,
        BS=lay.plan.block_size, BSP=lay.BSP, ACCUMULATE=lay.has_window,
        **_options(lay.tiles("sparse_fwd")),
    )  # fmt: skip


def backward(q, k, v, gate, do, idx, lay, saved, dgate, deltas, dq, dk, dv, ready=None) -> None:
    """dq (added to the window branches'), dgate's sparse column, and dk/dv added atomically.
    deltas: the local, global (dummies where absent) and sparse softmax deltas. The selection
    is inverted first; `ready()`, if given, runs before the dq launch (which adds to dq and
    reads the local and global deltas: the window dq kernel must have written them by then)."""
    delta_l, delta_g, delta_s = deltas
    t = lay.tiles("sparse_dkv")
    chunks, tokens, used = _invert(idx, lay.NB, t["CH"])
    dob = torch.empty_like(do)  # the branch's dO, g_s * do: written by dq, read by dk/dv
    if ready is not None:
        ready()
    launch(
        _sparse_bwd_dq_kernel, (lay.T, lay.B * lay.NA),
        q=q, k=k, v=v, gate=gate, idx=idx, active=lay.active, groups=lay.groups, do=do,
        o=saved["o"], lse_s=saved["lse_s"], dgate=dgate, delta_l=delta_l, delta_g=delta_g,
        delta_s=delta_s, dob_s=dob, dq=dq, T=lay.T, NA=lay.NA, **lay.args, scale=lay.scale,
        GP=lay.GP16, NSEL=lay.plan.n_select, BS=lay.plan.block_size, BSP=lay.BSP,
        ACCUMULATE=lay.has_window, HAS_LOCAL=lay.has_local, HAS_GLOBAL=lay.has_global,
        **_options(lay.tiles("sparse_dq")),
    )  # fmt: skip
    launch(
        _sparse_bwd_dkv_kernel, (chunks.shape[0],),
        q=q, k=k, v=v, active=lay.active, chunks=chunks, tokens=tokens, used=used,
        dob=dob, lse_s=saved["lse_s"], delta_s=delta_s, dk=dk, dv=dv, T=lay.T, NB=lay.NB,
        **lay.args, scale=lay.scale, GP=lay.GP, BS=lay.plan.block_size, BSP=lay.BSP,
        BQ=max(1, t["ROWS"] // lay.GP), **_options(t),
    )  # fmt: skip
