"""`@triton.jit` helpers shared by the MLA kernels, and the constants they use.

Scores run in log2 units (exp2); a row with no key stores lse = +inf so that its probabilities
in the backward are exactly zero.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC: tl.constexpr):
    # One online-softmax step; a row whose keys are all masked so far keeps m = -inf, l = 0.
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_p = tl.exp2(b_s - b_mu[:, None])
    b_a = tl.exp2(b_m - b_mu)
    b_l = b_l * b_a + tl.sum(b_p, 1)
    b_acc = b_acc * b_a[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
    return b_mn, b_l, b_acc


@triton.jit
def _softmax_finish(b_m, b_l, b_acc):
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf"))
    return b_o, b_lse


@triton.jit
def _kmean_parts(b_k, dtype, SPLIT: tl.constexpr):
    # Float32 block means as MMA operands: their hi + lo halves in the queries' dtype keep ~16
    # bits, so the scores (and the selection) match the float32 reference; unsplit, as is.
    if SPLIT:
        b_hi = b_k.to(dtype)
        b_lo = (b_k - b_hi.to(tl.float32)).to(dtype)
    else:
        b_hi = b_k
        b_lo = b_k
    return b_hi, b_lo


@triton.jit
def _dot_parts(b_q, b_hi, b_lo, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # q . mean(K)^T from `_kmean_parts`' operands.
    if SPLIT:
        b_s = tl.dot(b_q, tl.trans(b_hi)) + tl.dot(b_q, tl.trans(b_lo))
    else:
        b_s = tl.dot(b_q, tl.trans(b_hi), input_precision=PREC)
    return b_s


@triton.jit
def _kmean_block(km, o_n, o_d, NB, HKV: tl.constexpr, D: tl.constexpr):
    # The float32 block means o_n [BN, D] of the group km points at (zero past NB).
    return tl.load(
        km + (o_n * (HKV * D))[:, None] + o_d[None, :], mask=(o_n < NB)[:, None], other=0.0
    )


@triton.jit
def _kmean_scores(
    km,
    b_q,
    o_n,
    o_d,
    n_vis,
    NB,
    scale2,
    HKV: tl.constexpr,
    D: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    # Scores [rows, BN] of the rows against the block means o_n; blocks not yet complete: -inf.
    b_hi, b_lo = _kmean_parts(_kmean_block(km, o_n, o_d, NB, HKV, D), b_q.dtype, SPLIT)
    # [rows, BN]
    b_s = _dot_parts(b_q, b_hi, b_lo, SPLIT, PREC) * scale2
    return tl.where(o_n[None, :] < n_vis[:, None], b_s, float("-inf"))


@triton.jit
def _kmean_lse(
    km,
    b_q,
    o_d,
    n_vis,
    m_r,
    hi,
    NB,
    scale2,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BN: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    # Each row's log2 normaliser [ROWS] of its softmax over the block means complete at it
    # (n_vis of them; the blocks below hi, BN at a time); +inf for rows outside m_r or with no
    # block yet, so that they add nothing to a score.
    b_m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([ROWS], dtype=tl.float32)
    for i_n in range(0, hi, BN):
        o_n = i_n + tl.arange(0, BN)
        # [ROWS, BN]
        b_s = _kmean_scores(km, b_q, o_n, o_d, n_vis, NB, scale2, HKV, D, SPLIT, PREC)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp2(b_m - b_mu) + tl.sum(tl.exp2(b_s - b_mu[:, None]), 1)
        b_m = b_mn
    return tl.where(m_r & (b_l > 0), b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf"))


@triton.jit
def _load_pair(x, y, row, col, o_xy, m_row, TMA: tl.constexpr):
    # The same tile of two tensors (k and v; q and dO). TMA: x and y are TMA descriptors
    # (`launch.tiles_of`) and the tile starts at [row, col] of their 2-D view; rows past the
    # valid ones come as stored, so the caller's masks must exclude them. Else pointers at
    # offsets o_xy, rows outside m_row zero.
    if TMA:
        b_x = x.load([row, col])
        b_y = y.load([row, col])
    else:
        b_x = tl.load(x + o_xy, mask=m_row[:, None], other=0.0)
        b_y = tl.load(y + o_xy, mask=m_row[:, None], other=0.0)
    return b_x, b_y


@triton.jit
def _load_block(
    k,
    v,
    p_idx,
    o_k,
    o_d,
    row0,
    col,
    BS: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    TMA: tl.constexpr,
):
    # The selected key block at *p_idx (-1: none, all masked): mask [BSP], k and v [BSP, D].
    # TMA: k and v are descriptors, the sequence's first row at row0 and the head at col;
    # the rows past BS (BSP > BS) are the next block's, masked by m_k.
    i_n = tl.load(p_idx)
    # broadcast before comparing: the interpreter mis-types a scalar mask in `&`
    m_k = (o_k < BS) & (i_n + tl.zeros_like(o_k) >= 0)
    o_kv = ((i_n * BS + o_k) * (HKV * D))[:, None] + o_d[None, :]
    b_k, b_v = _load_pair(k, v, row0 + i_n * BS, col, o_kv, m_k, TMA)
    return m_k, b_k, b_v


@triton.jit
def _n_selected(idx, NSEL: tl.constexpr):
    # Selections are best first with -1 only after the last block (top-k writes -1 once a row
    # has no candidate left), so the loops stop there: early tokens have few candidates.
    n = 0
    for i in tl.static_range(NSEL):
        n += (tl.load(idx + i) >= 0).to(tl.int32)
    return n


@triton.jit
def _group_rows(
    k,
    v,
    idx,
    active,
    groups,
    T,
    NA,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    NSEL: tl.constexpr,
):
    # The program's token and KV group: k, v and idx moved to them, the token's row offset
    # o_tq, the group's GP (padded) query heads o_h and m_g, which of them are active.
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    o_tq = (i_b * T + i_t).to(tl.int64) * HQ
    k += (i_b * T * HKV + i_hk).to(tl.int64) * D
    v += (i_b * T * HKV + i_hk).to(tl.int64) * D
    idx += ((i_b * T + i_t) * HKV + i_hk).to(tl.int64) * NSEL
    o_g = tl.arange(0, GP)
    o_h = i_hk * G + o_g
    m_g = o_g < G
    m_g = m_g & (tl.load(active + o_h, mask=m_g, other=0) != 0)
    return k, v, idx, o_tq, o_h, m_g


@triton.jit
def _gate_grad(b_do, p_o, b_g, p_dgate, p_delta, m_t):
    # One branch's dgate = <do, o_b> over a tile of rows, and its softmax delta g_b * dgate
    # (the branch's dO is g_b * do), stored for the dk/dv kernels and returned.
    b_o = tl.load(p_o, mask=m_t[:, None], other=0.0).to(tl.float32)
    b_dg = tl.sum(b_do.to(tl.float32) * b_o, 1)
    b_delta = b_g * b_dg
    tl.store(p_dgate, b_dg, mask=m_t)
    tl.store(p_delta, b_delta, mask=m_t)
    return b_delta


@triton.jit
def _sparse_delta(
    b_do,
    p_o,
    p_delta_l,
    p_delta_g,
    p_delta_s,
    m_t,
    HAS_LOCAL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
):
    # The sparse branch's softmax delta g_s * <do, o_s> over a tile of rows, without o_s (not
    # kept): the branches' deltas sum to <do, o>, o the op's output, and the window dq kernel
    # (run before) stored the local and global ones. Stored for the dk/dv kernel and returned.
    b_o = tl.load(p_o, mask=m_t[:, None], other=0.0).to(tl.float32)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o, 1)
    if HAS_LOCAL:
        b_delta -= tl.load(p_delta_l, mask=m_t, other=0.0)
    if HAS_GLOBAL:
        b_delta -= tl.load(p_delta_g, mask=m_t, other=0.0)
    tl.store(p_delta_s, b_delta, mask=m_t)
    return b_delta


@triton.jit
def _pack_rows(packs, T, NP, HQ: tl.constexpr, G: tl.constexpr, BT: tl.constexpr, HP: tl.constexpr):
    # The program's rows: BT tokens of each of the HP heads of one pack (heads of one KV group,
    # -1 where the pack is short). Returns the batch, the KV head, each row's token o_t, its
    # offset o_row = t * HQ + h inside the batch and m_t, whether it is a real row.
    i_t, i_p = tl.program_id(0), tl.program_id(1)
    i_b = i_p // NP
    p_pack = packs + (i_p % NP) * HP
    o_r = tl.arange(0, HP * BT)
    o_t = i_t * BT + o_r % BT
    o_h = tl.load(p_pack + o_r // BT)
    m_t = (o_t < T) & (o_h >= 0)
    o_row = o_t * HQ + tl.maximum(o_h, 0)
    return i_b, tl.load(p_pack) // G, o_t, o_row, m_t


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _chunk_block(
    chunks,
    k,
    v,
    i_c,
    T,
    NB,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
):
    # The sparse dk/dv kernels' chunk i_c = (segment, first, end), segment = (b * HKV + hkv) *
    # NB + block: its range [p_lo, p_hi), KV head, the batch's row offset o_bq, and the key
    # block's offsets o_kv (with o_d, m_k) and contents b_k, b_v [BSP, D].
    seg = tl.load(chunks + i_c * 3)
    p_lo = tl.load(chunks + i_c * 3 + 1)
    p_hi = tl.load(chunks + i_c * 3 + 2)
    i_n = seg % NB
    i_hk = (seg // NB) % HKV
    i_b = seg // (NB * HKV)
    o_bq = (i_b * T * HQ).to(tl.int64)
    o_k = tl.arange(0, BSP)
    o_d = tl.arange(0, D)
    m_k = o_k < BS
    o_kv = (i_b * T * HKV + i_hk).to(tl.int64) * D
    o_kv = o_kv + ((i_n * BS + o_k) * (HKV * D))[:, None] + o_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_k[:, None], other=0.0)
    b_v = tl.load(v + o_kv, mask=m_k[:, None], other=0.0)
    return p_lo, p_hi, i_hk, o_bq, o_d, o_kv, m_k, b_k, b_v


@triton.jit
def _sparse_dkv_rows(
    q,
    dob,
    lse_s,
    delta_s,
    o_bq,
    o_row,
    o_d,
    m_r,
    m_k,
    b_k,
    b_v,
    b_dk,
    b_dv,
    scale2,
    D: tl.constexpr,
    PREC: tl.constexpr,
):
    # One step of the sparse dk/dv kernels: the rows o_row (where m_r) that read the key
    # block b_k, b_v add their share to its dk, dv ([BSP, D], float32, unscaled dk). dob: the
    # branch's dO (g_s * do), stored by its dq kernel.
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    # [rows, D]
    b_q = tl.load(q + o_x, mask=m_r[:, None], other=0.0)
    b_dob = tl.load(dob + o_x, mask=m_r[:, None], other=0.0)
    b_lse = tl.load(lse_s + o_bq + o_row, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta_s + o_bq + o_row, mask=m_r, other=0.0)
    # [BSP, rows]
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale2
    b_pt = tl.where(m_k[:, None] & m_r[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)
    b_dv += tl.dot(b_pt.to(b_dob.dtype), b_dob, input_precision=PREC)
    b_dpt = tl.dot(b_v, tl.trans(b_dob), input_precision=PREC)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    return b_dk, b_dv
