"""The sparse branch with tile-shared selection (`select_tile` = Bq > 1): block-sparse
FlashAttention.

Every query of a tile of Bq consecutive positions attends to the same selected key blocks,
each complete at the tile's first position, so no key is masked: a program of RU rows
(tokens x heads of one KV group) reads each selected block once for all its rows. Selection
scores a whole tile in one pass (`_tile_score_kernel`); the backward inverts the selection per
tile, so each dk/dv program runs over the tiles that chose its key block.

Rows are (token, head) pairs of one KV group, token-major, GR rows per token: row r is token
r // GR, head r % GR of the group. GR is the group size G itself where a selection tile's Bq x G
rows split into programs of 16 or more (a power of two); otherwise G padded to a power of two
(`tile_rows`), whose extra rows are masked. So G = 3 (the 125M model) runs no empty rows. A
program's RU rows never straddle two selection tiles (RU divides Bq x GR).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    _chunk_block,
    _dot_parts,
    _kmean_block,
    _kmean_lse,
    _kmean_parts,
    _kmean_scores,
    _load_block,
    _n_selected,
    _softmax_finish,
    _softmax_step,
    _sparse_delta,
    _sparse_dkv_rows,
)
from .launch import launch, tiles_of
from .layout import _options
from .selection import _rank
from .sparse import _invert


@triton.jit
def _split_rows(start, o_r, GR: tl.constexpr, RU: tl.constexpr):
    # Token offsets and group heads of rows start + o_r (GR rows per token). Whole tokens per
    # program (RU a multiple of GR, so start is one too) keep the scalar part apart, which the
    # compiler tracks best; packed rows start anywhere in a token.
    if RU % GR == 0:
        return start // GR + o_r // GR, o_r % GR
    return (start + o_r) // GR, (start + o_r) % GR


@triton.jit
def _chunk_rows(
    q,
    active,
    i_r,
    o_r,
    o_d,
    m_h,
    t0,
    t_end,
    i_hk,
    HQ: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    RU: tl.constexpr,
    D: tl.constexpr,
):
    # The score kernel's chunk of RU rows from row i_r of the tile at t0: queries [RP, D] (zero
    # where masked), tokens, heads and mask (real, active rows before t_end). m_h: the rows'
    # head mask where every chunk has the same heads (RU a multiple of GR).
    o_tok, o_g = _split_rows(i_r, o_r, GR, RU)
    o_tok += t0
    o_h = i_hk * G + o_g
    if RU % GR == 0:
        m_r = m_h & (o_tok < t_end)
    else:  # packed rows: each chunk starts at another head
        m_r = (o_r < RU) & (o_tok < t_end)
        m_r = m_r & (tl.load(active + o_h, mask=m_r, other=0) != 0)
    b_q = tl.load(
        q + ((o_tok * HQ + o_h) * D)[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0
    )
    return b_q, o_tok, o_h, m_r


@triton.jit
def _tile_score_kernel(
    q,
    km,
    active,
    groups,
    score,
    lse_g,
    T,
    NB,
    NT,
    NA,
    window,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BQ: tl.constexpr,
    RU: tl.constexpr,
    RP: tl.constexpr,
    BN: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    LSE: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    # One tile of BQ queries of one KV group: each candidate block's score, the group-summed
    # probability of every query (its softmax over the blocks complete at it) summed over the
    # tile; -inf for the other blocks. Candidates are the blocks complete at the tile's first
    # position t0, less those wholly inside t0's window. The program owns its score row (its
    # sums run in a fixed order: deterministic).
    # LSE: the softmax's log-normaliser is the global branch's (lse_g [B, T, HQ], log2; its
    # stride is the block size, so it normalises over the same blocks), read instead of a
    # first pass over the blocks; the scores themselves still take the float32 means.
    i_tile, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    lse_g += (i_b * T * HQ).to(tl.int64)
    q += (i_b * T * HQ).to(tl.int64) * D
    km += (i_b * NB * HKV + i_hk).to(tl.int64) * D
    score += ((i_b * NT + i_tile) * HKV + i_hk).to(tl.int64) * NB
    t0 = i_tile * BQ
    t_end = tl.minimum(t0 + BQ, T)
    n_cand = tl.minimum((t0 + 1) // BS, NB)
    if HAS_LOCAL:
        n_cand = tl.minimum(n_cand, (tl.maximum(t0 - window + 1, 0) + BS - 1) // BS)
    o_r = tl.arange(0, RP)
    o_d = tl.arange(0, D)
    # whole tokens per chunk (RU a multiple of GR): every chunk's rows have the same heads
    o_g = o_r % GR
    o_h = i_hk * G + o_g
    m_h = (o_r < RU) & (o_g < G)
    m_h = m_h & (tl.load(active + o_h, mask=m_h, other=0) != 0)
    if n_cand > 0 and LSE:
        # blocks outside the row chunks: each block's means loaded (and split) once a tile,
        # its probabilities summed in registers over every row, then stored once
        for i_n in range(0, n_cand, BN):
            o_n = i_n + tl.arange(0, BN)
            b_k = _kmean_block(km, o_n, o_d, NB, HKV, D)
            b_hi, b_lo = _kmean_parts(b_k, q.dtype.element_ty, SPLIT)
            b_acc = tl.zeros([RP, BN], dtype=tl.float32)
            for i_r in range(0, (t_end - t0) * GR, RU):
                b_q, o_tok, o_h, m_r = _chunk_rows(
                    q, active, i_r, o_r, o_d, m_h, t0, t_end, i_hk, HQ, G, GR, RU, D
                )
                # +inf where masked or no block is complete yet: such rows add nothing
                b_lse = tl.load(lse_g + o_tok * HQ + o_h, mask=m_r, other=float("inf"))
                b_s = _dot_parts(b_q, b_hi, b_lo, SPLIT, PREC) * scale2
                b_s = tl.where(o_n[None, :] < ((o_tok + 1) // BS)[:, None], b_s, float("-inf"))
                b_acc += tl.exp2(b_s - b_lse[:, None])
            tl.store(score + o_n, tl.sum(b_acc, 0), mask=o_n < n_cand)
    elif n_cand > 0:
        # each chunk's normalisers need a pass over the blocks first: chunks outside
        for i_r in range(0, (t_end - t0) * GR, RU):
            # [RP, D]
            b_q, o_tok, o_h, m_r = _chunk_rows(
                q, active, i_r, o_r, o_d, m_h, t0, t_end, i_hk, HQ, G, GR, RU, D
            )
            n_vis = (o_tok + 1) // BS
            # the blocks complete at the chunk's last token
            hi = tl.minimum((tl.minimum(t0 + (i_r + RU - 1) // GR, t_end - 1) + 1) // BS, NB)
            # rows that are padding, pruned or past T get lse = +inf: they add nothing
            b_lse = _kmean_lse(
                km, b_q, o_d, n_vis, m_r, hi, NB, scale2, HKV, D, BN, RP, SPLIT, PREC
            )
            for i_n in range(0, n_cand, BN):
                o_n = i_n + tl.arange(0, BN)
                b_s = _kmean_scores(km, b_q, o_n, o_d, n_vis, NB, scale2, HKV, D, SPLIT, PREC)
                # [BN]: this chunk's probabilities summed over its rows
                b_p = tl.sum(tl.exp2(b_s - b_lse[:, None]), 0)
                m_o = o_n < n_cand
                b_p += tl.load(score + o_n, mask=m_o & (tl.zeros_like(o_n) + i_r > 0), other=0.0)
                tl.store(score + o_n, b_p, mask=m_o)
    for i_n in range(n_cand // BN * BN, NB, BN):
        o_n = i_n + tl.arange(0, BN)
        m_o = (o_n >= n_cand) & (o_n < NB)
        tl.store(score + o_n, tl.full([BN], float("-inf"), tl.float32), mask=m_o)


@triton.jit
def _tile_rows(
    k,
    v,
    idx,
    active,
    groups,
    T,
    NT,
    NA,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BQ: tl.constexpr,
    RU: tl.constexpr,
    RP: tl.constexpr,
    TMA: tl.constexpr,
):
    # The program's RU rows of one KV group (RP in all, padding past RU): k, v (pointers) and
    # idx moved to the group and the tile, the batch's row offset o_bq, each row's offset
    # o_row = t * HQ + h and m_r, whether it is a real, active row; the sequence's first key
    # row and the group's column in the [B * T, HKV * D] view, for TMA descriptors.
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    if not TMA:
        k += (i_b * T * HKV + i_hk).to(tl.int64) * D
        v += (i_b * T * HKV + i_hk).to(tl.int64) * D
    idx += ((i_b * NT + (i_t * RU) // (BQ * GR)) * HKV + i_hk).to(tl.int64) * NSEL
    o_r = tl.arange(0, RP)
    o_tok, o_g = _split_rows(i_t * RU, o_r, GR, RU)
    o_h = i_hk * G + o_g
    m_r = (o_r < RU) & (o_g < G) & (o_tok < T)
    m_r = m_r & (tl.load(active + o_h, mask=m_r, other=0) != 0)
    o_bq = (i_b * T * HQ).to(tl.int64)
    return k, v, idx, o_bq, o_tok * HQ + o_h, m_r, i_b * T, i_hk * D


@triton.jit
def _sparse_tile_fwd_kernel(
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
    NT,
    NA,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BQ: tl.constexpr,
    RU: tl.constexpr,
    RP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    k, v, idx, o_bq, o_row, m_r, row0, col = _tile_rows(
        k, v, idx, active, groups, T, NT, NA, HQ, HKV, G, GR, D, NSEL, BQ, RU, RP, TMA
    )
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, BSP)
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    # [RP, D]
    b_q = tl.load(q + o_x, mask=m_r[:, None], other=0.0)
    b_m = tl.full([RP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([RP], dtype=tl.float32)
    b_acc = tl.zeros([RP, D], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        # [BSP], [BSP, D]: the whole block is visible to every query of the tile
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, row0, col, BS, HKV, D, TMA)
        # [RP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
    b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
    tl.store(lse_s + o_bq + o_row, b_lse, mask=m_r)
    b_g = tl.load(gate + (o_bq + o_row) * 3 + 2, mask=m_r, other=0.0).to(tl.float32)
    b_o = b_g[:, None] * b_ob
    if ACCUMULATE:
        b_o += tl.load(o + o_x, mask=m_r[:, None], other=0.0).to(tl.float32)
    tl.store(o + o_x, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _sparse_tile_dq_kernel(
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
    NT,
    NA,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GR: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BQ: tl.constexpr,
    RU: tl.constexpr,
    RP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    # dq of the program's rows over their tile's blocks; first the branch's softmax delta and
    # dO (g_s * do), stored for the dk/dv kernel launched after: its steps then load the rows'
    # dO as they are, with no gate to load and no product to stage per step. The branch's
    # dgate, <do, o_s>, is summed in the loop.
    k, v, idx, o_bq, o_row, m_r, row0, col = _tile_rows(
        k, v, idx, active, groups, T, NT, NA, HQ, HKV, G, GR, D, NSEL, BQ, RU, RP, TMA
    )
    o_d = tl.arange(0, D)
    o_k = tl.arange(0, BSP)
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    o_r = o_bq + o_row
    # [RP, D]
    b_q = tl.load(q + o_x, mask=m_r[:, None], other=0.0)
    b_do = tl.load(do + o_x, mask=m_r[:, None], other=0.0)
    b_g = tl.load(gate + o_r * 3 + 2, mask=m_r, other=0.0).to(tl.float32)
    b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
    tl.store(dob_s + o_x, b_dob, mask=m_r[:, None])
    b_lse = tl.load(lse_s + o_r, mask=m_r, other=float("inf"))
    b_delta = _sparse_delta(
        b_do, o + o_x, delta_l + o_r, delta_g + o_r, delta_s + o_r, m_r, HAS_LOCAL, HAS_GLOBAL
    )
    b_dq = tl.zeros([RP, D], dtype=tl.float32)
    b_dg = tl.zeros([RP], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, row0, col, BS, HKV, D, TMA)
        # [RP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        # dP with the ungated do: sum_j P dP = <do, o_s>, the gate's gradient
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dg += tl.sum(b_p * b_dp, 1)
        b_ds = b_p * (b_g[:, None] * b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dgate + o_r * 3 + 2, b_dg, mask=m_r)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + o_x, mask=m_r[:, None], other=0.0).to(tl.float32)
    tl.store(dq + o_x, b_dq.to(dq.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _sparse_tile_dkv_kernel(
    q,
    k,
    v,
    bits,
    chunks,
    tiles,
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
    GR: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    BQ: tl.constexpr,
    RU: tl.constexpr,
    RP: tl.constexpr,
    PREC: tl.constexpr,
):
    # One chunk of the tiles that selected one key block of one KV head: chunks[pid] =
    # (segment, first, end), segment = (b * HKV + hkv) * NB + block, tiles[first:end]. The
    # block is loaded once; the tiles' query rows stream past it RU at a time.
    # Partial sums are added atomically (a block chosen by many tiles spans several chunks).
    i_c = tl.program_id(0)
    if i_c < tl.load(used):
        p_lo, p_hi, i_hk, o_bq, o_d, o_kv, m_k, b_k, b_v = _chunk_block(
            chunks, k, v, i_c, T, NB, HQ, HKV, D, BS, BSP
        )
        b_dk = tl.zeros([BSP, D], dtype=tl.float32)
        b_dv = tl.zeros([BSP, D], dtype=tl.float32)
        o_r = tl.arange(0, RP)
        # the group's active heads as bits: a row's test is arithmetic, not a load per step
        b_bits = tl.load(bits + i_hk)
        # whole tokens per step (RU a multiple of GR): each step's rows have the same heads
        o_g = o_r % GR
        m_h = (o_r < RU) & (o_g < G) & (((b_bits >> o_g.to(tl.int64)) & 1) != 0)
        # row positions over the chunk's tiles (BQ x GR rows each), RU per step, inside one tile
        for i_p in range(p_lo * (BQ * GR), p_hi * (BQ * GR), RU):
            i_tile = tl.load(tiles + i_p // (BQ * GR))
            o_tok, o_g = _split_rows(i_p % (BQ * GR), o_r, GR, RU)
            o_tok += i_tile * BQ
            if RU % GR == 0:
                m_r = m_h & (o_tok < T)
            else:  # packed rows: each step starts at another head
                m_r = (o_r < RU) & (((b_bits >> o_g.to(tl.int64)) & 1) != 0) & (o_tok < T)
            o_row = o_tok * HQ + i_hk * G + o_g
            b_dk, b_dv = _sparse_dkv_rows(
                q, dob, lse_s, delta_s, o_bq, o_row, o_d, m_r, m_k, b_k, b_v, b_dk, b_dv,
                scale2, D, PREC,
            )  # fmt: skip
        tl.atomic_add(dk + o_kv, b_dk * scale, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(dv + o_kv, b_dv, mask=m_k[:, None], sem="relaxed")


# chunks the dk/dv launch aims for at least, where its tiles' CH allows (1: CH alone decides)
DKV_PROGRAMS = 2048


def tile_rows(G: int, select_tile: int, rows: int) -> tuple[int, int, int]:
    """(GR, RU, RP): rows per token, the rows a program uses and those padded to tl.dot's 16.

    Padded: GR is G rounded up to a power of two, RU whole tokens of GR rows, about `rows`.
    Packed, where G is not a power of two: GR = G and RU the largest power of two that divides
    a selection tile's select_tile x G rows, at most `rows`, so no row is padding. Taken when
    its programs are as large as the padded ones or a full 64 rows (one warpgroup's MMA)."""
    GP = triton.next_power_of_2(G)
    padded = min(select_tile, max(1, rows // GP)) * GP
    tile = select_tile * G
    packed = min(tile & -tile, rows)  # the largest power of two dividing the tile's rows
    if GP != G and packed >= max(16, min(padded, 64)):
        return G, packed, packed
    return GP, padded, max(16, padded)


def _row_options(t: dict, GR: int, RU: int) -> dict:
    """Launch options for programs of RU rows: the tile's own, or where packing (GR not a power
    of two) gave fewer rows than it was tuned for, its warps scaled down with them (at least 4)."""
    if RU >= t["ROWS"] or not GR & (GR - 1):
        return _options(t)
    return {"num_warps": max(4, t["num_warps"] * RU // t["ROWS"]), "num_stages": 2}


def select(q, k, lay, km, lse_g=None) -> torch.Tensor:
    """Block indices [B, NT, HKV, n_select] int32 of each tile of Bq queries, best first (-1:
    no block), as `selection.select_tiles`. km: the float32 block means [B, NB, HKV, D], or
    None (pooled here). lse_g: the global branch's lse [B, T, HQ] where its stride is the
    block size (its softmax is then the scores' own): one pass over the blocks instead of two."""
    t = lay.tiles("tile_score" if lse_g is None else "tile_score_lse")
    bq = lay.plan.select_tile
    GR, RU, RP = tile_rows(lay.G, bq, t["ROWS"])
    t = {**t, **_row_options(t, GR, RU)}
    return _rank(
        _tile_score_kernel, lay.NT, lay.NT, q, k, lay, km, t, NT=lay.NT, BQ=bq, GR=GR, RU=RU,
        RP=RP, lse_g=q if lse_g is None else lse_g, LSE=lse_g is not None,
    )  # fmt: skip


def forward(q, k, v, gate, idx, lay, o, lse_s) -> None:
    """The sparse branch's output, gated and added to o (written when no window branch ran),
    and its lse; the backward needs no output of the branch's own."""
    t = lay.tiles("sparse_tile_fwd")
    GR, RU, RP = tile_rows(lay.G, lay.plan.select_tile, t["ROWS"])
    launch(
        _sparse_tile_fwd_kernel, (triton.cdiv(lay.T * GR, RU), lay.B * lay.NA),
        q=q, **tiles_of(lay.BSP, t["TMA"], k=k, v=v), gate=gate, idx=idx, active=lay.active,
        groups=lay.groups, o=o, lse_s=lse_s, T=lay.T, NT=lay.NT, NA=lay.NA, **lay.args,
        GR=GR, NSEL=lay.plan.n_select, BS=lay.plan.block_size, BSP=lay.BSP,
        BQ=lay.plan.select_tile, RU=RU, RP=RP, ACCUMULATE=lay.has_window, TMA=t["TMA"],
        **_row_options(t, GR, RU),
    )  # fmt: skip


def backward(q, k, v, gate, do, idx, lay, saved, dgate, deltas, dq, dk, dv, ready=None) -> None:
    """As `sparse.backward`: dq (added to the window branches'), dgate's sparse column, and
    dk/dv added atomically; deltas: the local, global (dummies where absent) and sparse softmax
    deltas. `ready()`, if given, runs before the dq launch, which adds to dq and reads the
    local and global deltas: the window dq kernel must have written them by then."""
    delta_l, delta_g, delta_s = deltas
    t = lay.tiles("sparse_tile_dkv")
    GR, RU, RP = tile_rows(lay.G, lay.plan.select_tile, t["ROWS"])
    # chunks of about CH queries (CH // Bq tiles), fewer where the (tile, block) pairs would
    # give less than about DKV_PROGRAMS chunks: short sequences would run a few long programs
    pairs = lay.B * lay.NA * lay.NT * lay.plan.n_select
    per_chunk = max(1, min(t["CH"] // lay.plan.select_tile, pairs // DKV_PROGRAMS))
    chunks, tiles, used = _invert(idx, lay.NB, per_chunk)
    dob = torch.empty_like(do)  # the branch's dO, g_s * do: written by dq, read by dk/dv
    if ready is not None:
        ready()
    tq = lay.tiles("sparse_tile_dq")
    GRq, RUq, RPq = tile_rows(lay.G, lay.plan.select_tile, tq["ROWS"])
    launch(
        _sparse_tile_dq_kernel, (triton.cdiv(lay.T * GRq, RUq), lay.B * lay.NA),
        q=q, **tiles_of(lay.BSP, tq["TMA"], k=k, v=v), gate=gate, idx=idx, active=lay.active,
        groups=lay.groups, do=do, o=saved["o"], lse_s=saved["lse_s"], dgate=dgate,
        delta_l=delta_l, delta_g=delta_g, delta_s=delta_s, dob_s=dob, dq=dq,
        T=lay.T, NT=lay.NT, NA=lay.NA, **lay.args, scale=lay.scale, GR=GRq, NSEL=lay.plan.n_select,
        BS=lay.plan.block_size, BSP=lay.BSP, BQ=lay.plan.select_tile, RU=RUq, RP=RPq,
        ACCUMULATE=lay.has_window, HAS_LOCAL=lay.has_local, HAS_GLOBAL=lay.has_global,
        TMA=tq["TMA"], **_row_options(tq, GRq, RUq),
    )  # fmt: skip
    launch(
        _sparse_tile_dkv_kernel, (chunks.shape[0],),
        q=q, k=k, v=v, bits=lay.bits, chunks=chunks, tiles=tiles, used=used,
        dob=dob, lse_s=saved["lse_s"], delta_s=delta_s, dk=dk, dv=dv, T=lay.T, NB=lay.NB,
        **lay.args, scale=lay.scale, GR=GR, BS=lay.plan.block_size, BSP=lay.BSP,
        BQ=lay.plan.select_tile, RU=RU, RP=RP, **_row_options(t, GR, RU),
    )  # fmt: skip
