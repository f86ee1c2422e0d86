"""The sparse branch with tile-shared selection (`select_tile` = Bq > 1): block-sparse
FlashAttention.

Every query of a tile of Bq consecutive positions attends to the same selected key blocks,
each complete at the tile's first position, so no key is masked: a program of BT tokens x GP
(padded) heads of one KV group reads each selected block once for all its rows. Selection
scores a whole tile in one pass (`_tile_score_kernel`); the backward inverts the selection per
tile, so each dk/dv program runs over the tiles that chose its key block.

Rows are (token, head) pairs, token-major: row r is token t0 + r // GP, head r % GP of the
group. A program's BT tokens never straddle two selection tiles (BT divides Bq).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    _chunk_block,
    _gate_grad,
    _kmean_scores,
    _load_block,
    _n_selected,
    _softmax_finish,
    _softmax_step,
    _sparse_dkv_rows,
)
from .launch import launch
from .layout import _options, _tiles
from .selection import _rank
from .sparse import _invert


@triton.jit
def _tile_score_kernel(
    q,
    km,
    active,
    groups,
    score,
    T,
    NB,
    NT,
    NA,
    window,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BQ: tl.constexpr,
    BTOK: tl.constexpr,
    BN: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    # One tile of BQ queries of one KV group: each candidate block's score, the group-summed
    # probability of every query (its softmax over the blocks complete at it) summed over the
    # tile; -inf for the other blocks. Candidates are the blocks complete at the tile's first
    # position t0, less those wholly inside t0's window. The program owns its score row, so it
    # adds each chunk of BTOK tokens to it in place (in a fixed order: deterministic).
    i_tile, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    q += (i_b * T * HQ).to(tl.int64) * D
    km += (i_b * NB * HKV + i_hk).to(tl.int64) * D
    score += ((i_b * NT + i_tile) * HKV + i_hk).to(tl.int64) * NB
    t0 = i_tile * BQ
    t_end = tl.minimum(t0 + BQ, T)
    n_cand = tl.minimum((t0 + 1) // BS, NB)
    if HAS_LOCAL:
        n_cand = tl.minimum(n_cand, (tl.maximum(t0 - window + 1, 0) + BS - 1) // BS)
    o_r = tl.arange(0, BTOK * GP)
    o_g = o_r % GP
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, D)
    m_h = o_g < G
    m_h = m_h & (tl.load(active + o_h, mask=m_h, other=0) != 0)
    if n_cand > 0:
        for i_tk in range(t0, t_end, BTOK):
            o_tok = i_tk + o_r // GP
            m_r = m_h & (o_tok < t_end)
            # [BTOK * GP, D]
            b_q = tl.load(
                q + ((o_tok * HQ + o_h) * D)[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0
            )
            n_vis = (o_tok + 1) // BS
            hi = tl.minimum(tl.minimum(i_tk + BTOK, t_end) // BS, NB)
            b_m = tl.full([BTOK * GP], float("-inf"), dtype=tl.float32)
            b_l = tl.zeros([BTOK * GP], dtype=tl.float32)
            for i_n in range(0, hi, BN):
                o_n = i_n + tl.arange(0, BN)
                # [BTOK * GP, BN]
                b_s = _kmean_scores(km, b_q, o_n, o_d, n_vis, NB, scale2, HKV, D, SPLIT, PREC)
                b_mn = tl.maximum(b_m, tl.max(b_s, 1))
                b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
                b_l = b_l * tl.exp2(b_m - b_mu) + tl.sum(tl.exp2(b_s - b_mu[:, None]), 1)
                b_m = b_mn
            # rows that are padding, pruned or past T get lse = +inf: they add nothing
            b_lse = tl.where(
                m_r & (b_l > 0), b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf")
            )
            for i_n in range(0, n_cand, BN):
                o_n = i_n + tl.arange(0, BN)
                b_s = _kmean_scores(km, b_q, o_n, o_d, n_vis, NB, scale2, HKV, D, SPLIT, PREC)
                # [BN]: this chunk's probabilities summed over its rows
                b_p = tl.sum(tl.exp2(b_s - b_lse[:, None]), 0)
                m_o = o_n < n_cand
                b_p += tl.load(score + o_n, mask=m_o & (tl.zeros_like(o_n) + i_tk > t0), other=0.0)
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
    GP: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
    BQ: tl.constexpr,
    BT: tl.constexpr,
    RP: tl.constexpr,
):
    # The program's BT tokens x GP heads of one KV group (RP rows, padding past BT * GP): k, v
    # and idx moved to the group and the tile, the batch's row offset o_bq, each row's offset
    # o_row = t * HQ + h and m_r, whether it is a real, active row.
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    k += (i_b * T * HKV + i_hk).to(tl.int64) * D
    v += (i_b * T * HKV + i_hk).to(tl.int64) * D
    idx += ((i_b * NT + (i_t * BT) // BQ) * HKV + i_hk).to(tl.int64) * NSEL
    o_r = tl.arange(0, RP)
    o_tok = i_t * BT + o_r // GP
    o_g = o_r % GP
    o_h = i_hk * G + o_g
    m_r = (o_r < BT * GP) & (o_g < G) & (o_tok < T)
    m_r = m_r & (tl.load(active + o_h, mask=m_r, other=0) != 0)
    o_bq = (i_b * T * HQ).to(tl.int64)
    return k, v, idx, o_bq, o_tok * HQ + o_h, m_r


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
    o_s,
    lse_s,
    T,
    NT,
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
    BQ: tl.constexpr,
    BT: tl.constexpr,
    RP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    STORE: tl.constexpr,
    PREC: tl.constexpr,
):
    k, v, idx, o_bq, o_row, m_r = _tile_rows(
        k, v, idx, active, groups, T, NT, NA, HQ, HKV, G, GP, D, NSEL, BQ, BT, RP
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
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, BS, HKV, D)
        # [RP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
    b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
    tl.store(lse_s + o_bq + o_row, b_lse, mask=m_r)
    if STORE:
        tl.store(o_s + o_x, b_ob.to(o_s.dtype.element_ty), mask=m_r[:, None])
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
    o_s,
    lse_s,
    dgate,
    delta_s,
    dq,
    T,
    NT,
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
    BQ: tl.constexpr,
    BT: tl.constexpr,
    RP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr,
):
    # dq of the program's rows over their tile's blocks; first the branch's dgate and softmax
    # delta, stored for the dk/dv kernel launched after.
    k, v, idx, o_bq, o_row, m_r = _tile_rows(
        k, v, idx, active, groups, T, NT, NA, HQ, HKV, G, GP, D, NSEL, BQ, BT, RP
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
    b_lse = tl.load(lse_s + o_r, mask=m_r, other=float("inf"))
    b_delta = _gate_grad(b_do, o_s + o_x, b_g, dgate + o_r * 3 + 2, delta_s + o_r, m_r)
    b_dq = tl.zeros([RP, D], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, BS, HKV, D)
        # [RP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_dob, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + o_x, mask=m_r[:, None], other=0.0).to(tl.float32)
    tl.store(dq + o_x, b_dq.to(dq.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _sparse_tile_dkv_kernel(
    q,
    k,
    v,
    gate,
    active,
    chunks,
    tiles,
    used,
    do,
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
    BT: tl.constexpr,
    RP: tl.constexpr,
    PREC: tl.constexpr,
):
    # One chunk of the tiles that selected one key block of one KV head: chunks[pid] =
    # (segment, first, end), segment = (b * HKV + hkv) * NB + block, tiles[first:end]. The
    # block is loaded once; the tiles' queries stream past it BT tokens x GP heads at a time.
    # Partial sums are added atomically (a block chosen by many tiles spans several chunks).
    i_c = tl.program_id(0)
    if i_c < tl.load(used):
        p_lo, p_hi, i_hk, o_bq, o_d, o_kv, m_k, b_k, b_v = _chunk_block(
            chunks, k, v, i_c, T, NB, HQ, HKV, D, BS, BSP
        )
        b_dk = tl.zeros([BSP, D], dtype=tl.float32)
        b_dv = tl.zeros([BSP, D], dtype=tl.float32)
        o_r = tl.arange(0, RP)
        o_g = o_r % GP
        o_h = i_hk * G + o_g
        m_h = (o_r < BT * GP) & (o_g < G)
        m_h = m_h & (tl.load(active + o_h, mask=m_h, other=0) != 0)
        # positions over the chunk's tiles' queries: BT of them per step, inside one tile
        for i_p in range(p_lo * BQ, p_hi * BQ, BT):
            i_tile = tl.load(tiles + i_p // BQ)
            o_tok = i_tile * BQ + i_p % BQ + o_r // GP
            m_r = m_h & (o_tok < T)
            o_row = o_tok * HQ + o_h
            b_dk, b_dv = _sparse_dkv_rows(
                q, do, gate, lse_s, delta_s, o_bq, o_row, o_d, m_r, m_k, b_k, b_v, b_dk, b_dv,
                scale2, D, PREC,
            )  # fmt: skip
        tl.atomic_add(dk + o_kv, b_dk * scale, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(dv + o_kv, b_dv, mask=m_k[:, None], sem="relaxed")


def tile_rows(G: int, select_tile: int, rows: int) -> tuple[int, int, int]:
    """(GP, BT, RP): the group padded to a power of two, the tokens per program (a divisor of
    the selection tile, about `rows` rows in all) and the rows padded to tl.dot's 16."""
    GP = triton.next_power_of_2(G)
    BT = min(select_tile, max(1, rows // GP))
    return GP, BT, max(16, BT * GP)


def select(q, k, lay, km) -> torch.Tensor:
    """Block indices [B, NT, HKV, n_select] int32 of each tile of Bq queries, best first (-1:
    no block), as `selection.select_tiles`. km: the float32 block means [B, NB, HKV, D], or
    None (pooled here)."""
    t = _tiles("tile_score")
    bq = lay.plan.select_tile
    BTOK = tile_rows(lay.G, bq, t["ROWS"])[1]
    return _rank(_tile_score_kernel, lay.NT, lay.NT, q, k, lay, km, t, NT=lay.NT, BQ=bq, BTOK=BTOK)


def forward(q, k, v, gate, idx, lay, o, o_s, lse_s, store: bool) -> None:
    """The sparse branch's output, gated and added to o (written when no window branch ran)."""
    t = _tiles("sparse_tile_fwd")
    GP, BT, RP = tile_rows(lay.G, lay.plan.select_tile, t["ROWS"])
    launch(
        _sparse_tile_fwd_kernel, (triton.cdiv(lay.T, BT), lay.B * lay.NA),
        q=q, k=k, v=v, gate=gate, idx=idx, active=lay.active, groups=lay.groups, o=o, o_s=o_s,
        lse_s=lse_s, T=lay.T, NT=lay.NT, NA=lay.NA, **lay.args, GP=GP,
        NSEL=lay.plan.n_select, BS=lay.plan.block_size, BSP=lay.BSP, BQ=lay.plan.select_tile,
        BT=BT, RP=RP, ACCUMULATE=lay.has_window, STORE=store, **_options(t),
    )  # fmt: skip


def backward(q, k, v, gate, do, idx, lay, saved, dgate, delta_s, dq, dk, dv) -> None:
    """dq (added to the window branches'), dgate's sparse column, and dk/dv added atomically."""
    t = _tiles("sparse_tile_dq")
    GP, BT, RP = tile_rows(lay.G, lay.plan.select_tile, t["ROWS"])
    launch(
        _sparse_tile_dq_kernel, (triton.cdiv(lay.T, BT), lay.B * lay.NA),
        q=q, k=k, v=v, gate=gate, idx=idx, active=lay.active, groups=lay.groups, do=do,
        o_s=saved["o_s"], lse_s=saved["lse_s"], dgate=dgate, delta_s=delta_s, dq=dq, T=lay.T,
        NT=lay.NT, NA=lay.NA, **lay.args, scale=lay.scale, GP=GP, NSEL=lay.plan.n_select,
        BS=lay.plan.block_size, BSP=lay.BSP, BQ=lay.plan.select_tile, BT=BT, RP=RP,
        ACCUMULATE=lay.has_window, **_options(t),
    )  # fmt: skip
    t = _tiles("sparse_tile_dkv")
    GP, BT, RP = tile_rows(lay.G, lay.plan.select_tile, t["ROWS"])
    # chunks of about CH queries: CH // Bq tiles
    chunks, tiles, used = _invert(idx, lay.NB, max(1, t["CH"] // lay.plan.select_tile))
    launch(
        _sparse_tile_dkv_kernel, (chunks.shape[0],),
        q=q, k=k, v=v, gate=gate, active=lay.active, chunks=chunks, tiles=tiles, used=used,
        do=do, lse_s=saved["lse_s"], delta_s=delta_s, dk=dk, dv=dv, T=lay.T, NB=lay.NB,
        **lay.args, scale=lay.scale, GP=GP, BS=lay.plan.block_size, BSP=lay.BSP,
        BQ=lay.plan.select_tile, BT=BT, RP=RP, **_options(t),
    )  # fmt: skip
