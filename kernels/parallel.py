"""Triton MLA: gated local + global + sparse causal attention, forward and backward (DESIGN §1).

Layout as in the reference: q [B, T, HQ, D], k/v [B, T, HKV, D], gate [B, T, HQ, 3].

Forward: block scores and their top-k for the sparse selection, the local and global branches
fused per query tile of one head, then the sparse branch per token and KV group (the group's
[G, D] queries share each selected key block), which also applies its gate and finishes the
output. Each branch keeps its log-sum-exp and, when gradients are wanted, its own output (the
gate's gradient is <do, o_branch>); the selected block indices are kept too.

Backward: dq per query tile (local + global) and per token (sparse), each kernel first taking
its branches' dgate and softmax delta (read by the dk/dv kernels after it); dk/dv per key tile
for the local branch, per compressed tile for the global one (its gradient spread back over
the pooled keys), and for the sparse one per chunk of the tokens that chose a key block (the
selection inverted on the device by a count, a scan and an atomic fill), added atomically.
The forward is deterministic; the sparse dk/dv sums are not bitwise (atomic order).

Scores run in log2 units (exp2); a row with no key stores lse = +inf so that its probabilities
in the backward are exactly zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .common import check_inputs
from .config import AttentionConfig, Plan

LOG2E = 1.4426950408889634
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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
def _dot_kmean(b_q, b_k, SPLIT: tl.constexpr, PREC: tl.constexpr):
    # q . mean(K)^T with the means in float32: their hi + lo halves in q's dtype keep ~16 bits,
    # so the scores (and the selection) match the float32 reference.
    if SPLIT:
        b_hi = b_k.to(b_q.dtype)
        b_lo = (b_k - b_hi.to(tl.float32)).to(b_q.dtype)
        b_s = tl.dot(b_q, tl.trans(b_hi)) + tl.dot(b_q, tl.trans(b_lo))
    else:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    return b_s


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
    # [BN, D]
    b_k = tl.load(
        km + (o_n * (HKV * D))[:, None] + o_d[None, :], mask=(o_n < NB)[:, None], other=0.0
    )
    # [rows, BN]
    b_s = _dot_kmean(b_q, b_k, SPLIT, PREC) * scale2
    return tl.where(o_n[None, :] < n_vis[:, None], b_s, float("-inf"))


@triton.jit
def _load_block(k, v, p_idx, o_k, o_d, BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    # The selected key block at *p_idx (-1: none, all masked): mask [BSP], k and v [BSP, D].
    i_n = tl.load(p_idx)
    # broadcast before comparing: the interpreter mis-types a scalar mask in `&`
    m_k = (o_k < BS) & (i_n + tl.zeros_like(o_k) >= 0)
    o_kv = ((i_n * BS + o_k) * (HKV * D))[:, None] + o_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_k[:, None], other=0.0)
    b_v = tl.load(v + o_kv, mask=m_k[:, None], other=0.0)
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
def _score_kernel(
    q,
    km,
    active,
    groups,
    score,
    T,
    NB,
    NA,
    window,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BTOK: tl.constexpr,
    BN: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    SPLIT: tl.constexpr,
    PREC: tl.constexpr,
):
    # Rows are (token, head) pairs of one KV group: BTOK tokens x GP (padded) heads.
    i_t, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    # 64-bit offsets only in the scalar bases: 64-bit index tiles cost registers
    q += (i_b * T * HQ).to(tl.int64) * D
    km += (i_b * NB * HKV + i_hk).to(tl.int64) * D
    score += (i_b * T * HKV + i_hk).to(tl.int64) * NB
    o_r = tl.arange(0, BTOK * GP)
    o_tok = i_t * BTOK + o_r // GP
    o_g = o_r % GP
    o_h = i_hk * G + o_g
    o_d = tl.arange(0, D)
    m_r = (o_tok < T) & (o_g < G)
    m_r = m_r & (tl.load(active + o_h, mask=m_r, other=0) != 0)
    # [BTOK * GP, D]
    b_q = tl.load(
        q + ((o_tok * HQ + o_h) * D)[:, None] + o_d[None, :], mask=m_r[:, None], other=0.0
    )
    n_vis = (o_tok + 1) // BS
    hi = tl.minimum(((i_t + 1) * BTOK) // BS, NB)

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
    # padded and pruned heads get lse = +inf: they add nothing to the group's score
    b_lse = tl.where(m_r & (b_l > 0), b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf"))

    o_tk = i_t * BTOK + tl.arange(0, BTOK)
    n_vis_t = (o_tk + 1) // BS
    p_out = score + (o_tk * (HKV * NB))[:, None]
    for i_n in range(0, hi, BN):
        o_n = i_n + tl.arange(0, BN)
        b_s = _kmean_scores(km, b_q, o_n, o_d, n_vis, NB, scale2, HKV, D, SPLIT, PREC)
        # [BTOK, BN]: probabilities summed over the group's heads
        b_p = tl.sum(tl.reshape(tl.exp2(b_s - b_lse[:, None]), (BTOK, GP, BN)), 1)
        m_c = o_n[None, :] < n_vis_t[:, None]
        if HAS_LOCAL:
            m_c = m_c & (o_n[None, :] * BS < (o_tk - window + 1)[:, None])
        b_p = tl.where(m_c, b_p, float("-inf"))
        m_o = (o_tk < T)[:, None] & (o_n < NB)[None, :]
        tl.store(p_out + o_n[None, :], b_p, mask=m_o)
    for i_n in range(tl.cdiv(hi, BN) * BN, NB, BN):
        o_n = i_n + tl.arange(0, BN)
        m_o = (o_tk < T)[:, None] & (o_n < NB)[None, :]
        tl.store(p_out + o_n[None, :], tl.full([BTOK, BN], float("-inf"), tl.float32), mask=m_o)


@triton.jit
def _topk_kernel(
    score,
    idx,
    groups,
    R,
    NA,
    NB,
    HKV: tl.constexpr,
    NSEL: tl.constexpr,
    NBP: tl.constexpr,
    BR: tl.constexpr,
):
    # The NSEL best blocks of BR rows, best first; -1 once a row has no candidate left. Rows
    # are (batch * T + token) * NA + active group: pruned groups are neither read nor written.
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_n = tl.arange(0, NBP)
    m_r = o_r < R
    o_row = (o_r // NA) * HKV + tl.load(groups + o_r % NA, mask=m_r, other=0)
    # [BR, NBP]
    p_s = score + o_row[:, None].to(tl.int64) * NB + o_n[None, :]
    b_s = tl.load(p_s, mask=m_r[:, None] & (o_n < NB)[None, :], other=float("-inf"))
    for i in range(NSEL):
        b_max = tl.max(b_s, 1)
        b_arg = tl.min(tl.where(b_s == b_max[:, None], o_n[None, :], NBP), 1)
        b_sel = tl.where(b_max == float("-inf"), -1, b_arg)
        tl.store(idx + o_row.to(tl.int64) * NSEL + i, b_sel, mask=m_r)
        b_s = tl.where(o_n[None, :] == b_arg[:, None], float("-inf"), b_s)


@triton.jit
def _pool_kernel(
    k,
    v,
    out_k,
    out_v,
    out_k32,
    T,
    N,
    S,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BR: tl.constexpr,
    POOL_V: tl.constexpr,
    OUT_K: tl.constexpr,
    OUT_K32: tl.constexpr,
):
    # Pooled row n of one (batch, KV head): the float32 mean of keys (and values) n*S..n*S+S-1,
    # stored in the outputs' dtypes (the global branch's kc/vc, the selection's float32 means).
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    o_in = (i_b * T * HKV + i_hk).to(tl.int64) * D
    o_out = ((i_b * N + i_n) * HKV + i_hk).to(tl.int64) * D
    o_d = tl.arange(0, D)
    b_k = tl.zeros([D], dtype=tl.float32)
    b_v = tl.zeros([D], dtype=tl.float32)
    for i_s in range(0, S, BR):
        o_s = i_s + tl.arange(0, BR)
        o_x = o_in + ((i_n * S + o_s) * (HKV * D))[:, None] + o_d[None, :]
        m_s = (o_s < S)[:, None]
        b_k += tl.sum(tl.load(k + o_x, mask=m_s, other=0.0).to(tl.float32), 0)
        if POOL_V:
            b_v += tl.sum(tl.load(v + o_x, mask=m_s, other=0.0).to(tl.float32), 0)
    if OUT_K:
        tl.store(out_k + o_out + o_d, (b_k / S).to(out_k.dtype.element_ty))
    if OUT_K32:
        tl.store(out_k32 + o_out + o_d, b_k / S)
    if POOL_V:
        tl.store(out_v + o_out + o_d, (b_v / S).to(out_v.dtype.element_ty))


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


@triton.jit
def _window_fwd_kernel(
    q,
    k,
    v,
    kc,
    vc,
    gate,
    packs,
    o,
    o_l,
    o_g,
    lse_l,
    lse_g,
    T,
    NC,
    NP,
    window,
    stride,
    scale2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
    HP: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    STORE: tl.constexpr,
    PREC: tl.constexpr,
):
    # One query tile of HP heads of one group (their rows share each key tile): the local
    # window, then the compressed prefix.
    i_b, i_hk, o_t, o_row, m_t = _pack_rows(packs, T, NP, HQ, G, BT, HP)
    i_t = tl.program_id(0)
    o_bq = (i_b * T * HQ).to(tl.int64)
    o_d = tl.arange(0, D)
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    # [HP * BT, D]
    b_q = tl.load(q + o_x, mask=m_t[:, None], other=0.0)

    if HAS_LOCAL:
        k += (i_b * T * HKV + i_hk).to(tl.int64) * D
        v += (i_b * T * HKV + i_hk).to(tl.int64) * D
        b_m = tl.full([HP * BT], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([HP * BT], dtype=tl.float32)
        b_acc = tl.zeros([HP * BT, D], dtype=tl.float32)
        lo = tl.maximum(i_t * BT - window + 1, 0) // BK * BK
        hi = tl.minimum((i_t + 1) * BT, T)
        for i_s in range(lo, hi, BK):
            o_s = i_s + tl.arange(0, BK)
            o_kv = (o_s * (HKV * D))[:, None] + o_d[None, :]
            # [BK, D]
            b_k = tl.load(k + o_kv, mask=(o_s < T)[:, None], other=0.0)
            b_v = tl.load(v + o_kv, mask=(o_s < T)[:, None], other=0.0)
            # [HP * BT, BK]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
            m_s = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - window)
            b_s = tl.where(m_s, b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
        b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
        tl.store(lse_l + o_bq + o_row, b_lse, mask=m_t)
        if STORE:
            tl.store(o_l + o_x, b_ob.to(o_l.dtype.element_ty), mask=m_t[:, None])
        b_g = tl.load(gate + (o_bq + o_row) * 3, mask=m_t, other=0.0).to(tl.float32)
        # held in q's dtype while the global branch runs, to save registers
        b_o = (b_g[:, None] * b_ob).to(b_q.dtype)

    if HAS_GLOBAL:
        kc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        vc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        b_m = tl.full([HP * BT], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([HP * BT], dtype=tl.float32)
        b_acc = tl.zeros([HP * BT, D], dtype=tl.float32)
        n_vis = (o_t + 1) // stride
        hi = tl.minimum(((i_t + 1) * BT) // stride, NC)
        for i_c in range(0, hi, BC):
            o_c = i_c + tl.arange(0, BC)
            o_kv = (o_c * (HKV * D))[:, None] + o_d[None, :]
            # [BC, D]
            b_k = tl.load(kc + o_kv, mask=(o_c < NC)[:, None], other=0.0)
            b_v = tl.load(vc + o_kv, mask=(o_c < NC)[:, None], other=0.0)
            # [HP * BT, BC]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
            b_s = tl.where(o_c[None, :] < n_vis[:, None], b_s, float("-inf"))
            b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
        b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
        tl.store(lse_g + o_bq + o_row, b_lse, mask=m_t)
        if STORE:
            tl.store(o_g + o_x, b_ob.to(o_g.dtype.element_ty), mask=m_t[:, None])
        b_g = tl.load(gate + (o_bq + o_row) * 3 + 1, mask=m_t, other=0.0).to(tl.float32)
        if HAS_LOCAL:
            b_o = b_o.to(tl.float32) + b_g[:, None] * b_ob
        else:
            b_o = b_g[:, None] * b_ob

    tl.store(o + o_x, b_o.to(o.dtype.element_ty), mask=m_t[:, None])


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
    o_s,
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
    STORE: tl.constexpr,
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
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, BS, HKV, D)
        # [GP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)
    b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
    tl.store(lse_s + o_tq + o_h, b_lse, mask=m_g)
    if STORE:
        tl.store(o_s + o_tq * D + o_x, b_ob.to(o_s.dtype.element_ty), mask=m_g[:, None])
    b_g = tl.load(gate + (o_tq + o_h) * 3 + 2, mask=m_g, other=0.0).to(tl.float32)
    b_o = b_g[:, None] * b_ob
    if ACCUMULATE:
        b_o += tl.load(o + o_tq * D + o_x, mask=m_g[:, None], other=0.0).to(tl.float32)
    tl.store(o + o_tq * D + o_x, b_o.to(o.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _window_bwd_dq_kernel(
    q,
    k,
    v,
    kc,
    vc,
    gate,
    packs,
    do,
    o_l,
    o_g,
    lse_l,
    lse_g,
    dgate,
    delta_l,
    delta_g,
    dq,
    T,
    NC,
    NP,
    window,
    stride,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BC: tl.constexpr,
    HP: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    PREC: tl.constexpr,
):
    # dq of one query tile of HP heads of one group: local, then global; each branch's dgate
    # and softmax delta first (the dk/dv kernels, launched after, read the deltas).
    i_b, i_hk, o_t, o_row, m_t = _pack_rows(packs, T, NP, HQ, G, BT, HP)
    i_t = tl.program_id(0)
    o_bq = (i_b * T * HQ).to(tl.int64)
    o_d = tl.arange(0, D)
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    o_r = o_bq + o_row
    # [HP * BT, D]
    b_q = tl.load(q + o_x, mask=m_t[:, None], other=0.0)
    b_do = tl.load(do + o_x, mask=m_t[:, None], other=0.0)
    b_dq = tl.zeros([HP * BT, D], dtype=tl.float32)

    if HAS_LOCAL:
        k += (i_b * T * HKV + i_hk).to(tl.int64) * D
        v += (i_b * T * HKV + i_hk).to(tl.int64) * D
        b_g = tl.load(gate + o_r * 3, mask=m_t, other=0.0).to(tl.float32)
        b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
        b_lse = tl.load(lse_l + o_r, mask=m_t, other=float("inf"))
        b_delta = _gate_grad(b_do, o_l + o_x, b_g, dgate + o_r * 3, delta_l + o_r, m_t)
        lo = tl.maximum(i_t * BT - window + 1, 0) // BK * BK
        hi = tl.minimum((i_t + 1) * BT, T)
        for i_s in range(lo, hi, BK):
            o_s = i_s + tl.arange(0, BK)
            o_kv = (o_s * (HKV * D))[:, None] + o_d[None, :]
            # [BK, D]
            b_k = tl.load(k + o_kv, mask=(o_s < T)[:, None], other=0.0)
            b_v = tl.load(v + o_kv, mask=(o_s < T)[:, None], other=0.0)
            # [HP * BT, BK]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
            m_s = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - window)
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_dp = tl.dot(b_dob, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)

    if HAS_GLOBAL:
        kc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        vc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        b_g = tl.load(gate + o_r * 3 + 1, mask=m_t, other=0.0).to(tl.float32)
        b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
        b_lse = tl.load(lse_g + o_r, mask=m_t, other=float("inf"))
        b_delta = _gate_grad(b_do, o_g + o_x, b_g, dgate + o_r * 3 + 1, delta_g + o_r, m_t)
        n_vis = (o_t + 1) // stride
        hi = tl.minimum(((i_t + 1) * BT) // stride, NC)
        for i_c in range(0, hi, BC):
            o_c = i_c + tl.arange(0, BC)
            o_kv = (o_c * (HKV * D))[:, None] + o_d[None, :]
            # [BC, D]
            b_k = tl.load(kc + o_kv, mask=(o_c < NC)[:, None], other=0.0)
            b_v = tl.load(vc + o_kv, mask=(o_c < NC)[:, None], other=0.0)
            # [HP * BT, BC]
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
            b_p = tl.where(o_c[None, :] < n_vis[:, None], tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_dp = tl.dot(b_dob, tl.trans(b_v), input_precision=PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)

    tl.store(dq + o_x, (b_dq * scale).to(dq.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _local_bwd_dkv_kernel(
    q,
    k,
    v,
    gate,
    active,
    groups,
    do,
    lse_l,
    delta_l,
    dk,
    dv,
    T,
    NA,
    window,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    # One key tile of one KV head; the queries that see it are the next `window` tokens of
    # each active head of the group. dk/dv are float32 buffers that every branch adds to.
    i_s, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    o_kh = (i_b * T * HKV + i_hk).to(tl.int64) * D
    o_s = i_s * BK + tl.arange(0, BK)
    o_d = tl.arange(0, D)
    m_s = o_s < T
    o_kv = o_kh + (o_s * (HKV * D))[:, None] + o_d[None, :]
    # [BK, D]
    b_k = tl.load(k + o_kv, mask=m_s[:, None], other=0.0)
    b_v = tl.load(v + o_kv, mask=m_s[:, None], other=0.0)
    b_dk = tl.zeros([BK, D], dtype=tl.float32)
    b_dv = tl.zeros([BK, D], dtype=tl.float32)
    lo = (i_s * BK) // BT * BT
    hi = tl.minimum(i_s * BK + BK - 1 + window, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        if tl.load(active + i_h) != 0:
            o_qh = (i_b * T * HQ + i_h).to(tl.int64)
            for i_t in range(lo, hi, BT):
                o_t = i_t + tl.arange(0, BT)
                m_t = o_t < T
                o_x = o_qh * D + (o_t * (HQ * D))[:, None] + o_d[None, :]
                o_r = o_qh + o_t * HQ
                # [BT, D]
                b_q = tl.load(q + o_x, mask=m_t[:, None], other=0.0)
                b_do = tl.load(do + o_x, mask=m_t[:, None], other=0.0)
                b_g = tl.load(gate + o_r * 3, mask=m_t, other=0.0).to(tl.float32)
                b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
                b_lse = tl.load(lse_l + o_r, mask=m_t, other=float("inf"))
                b_delta = tl.load(delta_l + o_r, mask=m_t, other=0.0)
                # [BK, BT]
                b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale2
                m_st = (
                    (o_t[None, :] >= o_s[:, None])
                    & (o_t[None, :] < o_s[:, None] + window)
                    & m_t[None, :]
                )
                b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
                b_dv += tl.dot(b_pt.to(b_dob.dtype), b_dob, input_precision=PREC)
                b_dpt = tl.dot(b_v, tl.trans(b_dob), input_precision=PREC)
                b_dst = b_pt * (b_dpt - b_delta[None, :])
                b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(
        dk + o_kv,
        tl.load(dk + o_kv, mask=m_s[:, None], other=0.0) + b_dk * scale,
        mask=m_s[:, None],
    )
    tl.store(dv + o_kv, tl.load(dv + o_kv, mask=m_s[:, None], other=0.0) + b_dv, mask=m_s[:, None])


@triton.jit
def _global_bwd_dkv_kernel(
    q,
    kc,
    vc,
    gate,
    active,
    groups,
    do,
    lse_g,
    delta_g,
    dkc,
    dvc,
    T,
    NC,
    NA,
    stride,
    chunk,
    scale2,
    scale,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    PREC: tl.constexpr,
):
    # One tile of compressed keys of one KV head, over one chunk of the queries after it;
    # each chunk writes its own partial gradient [NSPLIT, B, NC, HKV, D] (`_spread_kernel`
    # sums them).
    i_c, i_bg, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    B = tl.num_programs(1) // NA
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    o_kh = (i_b * NC * HKV + i_hk).to(tl.int64) * D
    o_c = i_c * BC + tl.arange(0, BC)
    o_d = tl.arange(0, D)
    m_c = o_c < NC
    o_kv = (o_c * (HKV * D))[:, None] + o_d[None, :]
    # [BC, D]
    b_k = tl.load(kc + o_kh + o_kv, mask=m_c[:, None], other=0.0)
    b_v = tl.load(vc + o_kh + o_kv, mask=m_c[:, None], other=0.0)
    b_dk = tl.zeros([BC, D], dtype=tl.float32)
    b_dv = tl.zeros([BC, D], dtype=tl.float32)
    lo = ((i_c * BC + 1) * stride - 1) // BT * BT + i_p * chunk
    hi = tl.minimum(lo + chunk, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        if tl.load(active + i_h) != 0:
            o_qh = (i_b * T * HQ + i_h).to(tl.int64)
            for i_t in range(lo, hi, BT):
                o_t = i_t + tl.arange(0, BT)
                m_t = o_t < T
                o_x = o_qh * D + (o_t * (HQ * D))[:, None] + o_d[None, :]
                o_r = o_qh + o_t * HQ
                # [BT, D]
                b_q = tl.load(q + o_x, mask=m_t[:, None], other=0.0)
                b_do = tl.load(do + o_x, mask=m_t[:, None], other=0.0)
                b_g = tl.load(gate + o_r * 3 + 1, mask=m_t, other=0.0).to(tl.float32)
                b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
                b_lse = tl.load(lse_g + o_r, mask=m_t, other=float("inf"))
                b_delta = tl.load(delta_g + o_r, mask=m_t, other=0.0)
                # [BC, BT]
                b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale2
                m_st = (o_c[:, None] < ((o_t + 1) // stride)[None, :]) & m_t[None, :]
                b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
                b_dv += tl.dot(b_pt.to(b_dob.dtype), b_dob, input_precision=PREC)
                b_dpt = tl.dot(b_v, tl.trans(b_dob), input_precision=PREC)
                b_dst = b_pt * (b_dpt - b_delta[None, :])
                b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    o_out = (i_p * B * NC * HKV).to(tl.int64) * D + o_kh
    tl.store(dkc + o_out + o_kv, b_dk * scale, mask=m_c[:, None])
    tl.store(dvc + o_out + o_kv, b_dv, mask=m_c[:, None])


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
    o_s,
    lse_s,
    dgate,
    delta_s,
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
    PREC: tl.constexpr,
):
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
    # the branch's dgate and delta, stored for the sparse dk/dv kernel launched after
    o_r = o_tq + o_h
    b_delta = _gate_grad(b_do, o_s + o_x, b_g, dgate + o_r * 3 + 2, delta_s + o_r, m_g)
    b_dq = tl.zeros([GP, D], dtype=tl.float32)
    for i in range(_n_selected(idx, NSEL)):
        # [BSP], [BSP, D]
        m_k, b_k, b_v = _load_block(k, v, idx + i, o_k, o_d, BS, HKV, D)
        # [GP, BSP]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2
        b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_dob, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq = b_dq * scale
    if ACCUMULATE:
        b_dq += tl.load(dq + o_x, mask=m_g[:, None], other=0.0).to(tl.float32)
    tl.store(dq + o_x, b_dq.to(dq.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def _sparse_bwd_dkv_kernel(
    q,
    k,
    v,
    gate,
    active,
    chunks,
    tokens,
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
    PREC: tl.constexpr,
):
    # One chunk of the tokens that selected one key block of one KV head: chunks[pid] =
    # (segment, first, end) with segment = (b * HKV + hkv) * NB + block and tokens[first:end].
    # Early blocks are chosen by many more tokens than late ones; fixed-size chunks keep the
    # programs even, and each adds its partial dk/dv atomically. Rows from *used on are unset.
    i_c = tl.program_id(0)
    if i_c < tl.load(used):
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
        # [BSP, D]
        b_k = tl.load(k + o_kv, mask=m_k[:, None], other=0.0)
        b_v = tl.load(v + o_kv, mask=m_k[:, None], other=0.0)
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
            o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
            # [BQ * GP, D]
            b_q = tl.load(q + o_x, mask=m_r[:, None], other=0.0)
            b_do = tl.load(do + o_x, mask=m_r[:, None], other=0.0)
            b_g = tl.load(gate + (o_bq + o_row) * 3 + 2, mask=m_r, other=0.0).to(tl.float32)
            b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
            b_lse = tl.load(lse_s + o_bq + o_row, mask=m_r, other=float("inf"))
            b_delta = tl.load(delta_s + o_bq + o_row, mask=m_r, other=0.0)
            # [BSP, BQ * GP]
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale2
            b_pt = tl.where(m_k[:, None] & m_r[None, :], tl.exp2(b_st - b_lse[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_dob.dtype), b_dob, input_precision=PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_dob), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
        # relaxed: only the sums matter, read by later launches (the default acq_rel orders
        # every add)
        tl.atomic_add(dk + o_kv, b_dk * scale, mask=m_k[:, None], sem="relaxed")
        tl.atomic_add(dv + o_kv, b_dv, mask=m_k[:, None], sem="relaxed")


@triton.jit
def _spread_kernel(
    dkc,
    dvc,
    groups,
    dk,
    dv,
    T,
    NC,
    NA,
    stride,
    NSPLIT,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
):
    # One compressed token of one batch and active group: its gradient, summed over the query
    # splits of the global dk/dv kernel, goes 1/stride to each of the keys it pooled.
    i_c, i_bg = tl.program_id(0), tl.program_id(1)
    B = tl.num_programs(1) // NA
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    o_d = tl.arange(0, D)
    o_c = ((i_b * NC + i_c) * HKV + i_hk).to(tl.int64) * D + o_d
    b_dk = tl.zeros([D], dtype=tl.float32)
    b_dv = tl.zeros([D], dtype=tl.float32)
    for i_p in range(NSPLIT):
        o_p = (i_p * B * NC * HKV).to(tl.int64) * D
        b_dk += tl.load(dkc + o_p + o_c)
        b_dv += tl.load(dvc + o_p + o_c)
    b_dk = b_dk / stride
    b_dv = b_dv / stride
    o_kh = (i_b * T * HKV + i_hk).to(tl.int64) * D
    for i_s in range(0, stride, BK):
        o_s = i_c * stride + i_s + tl.arange(0, BK)
        m_s = (i_s + tl.arange(0, BK) < stride)[:, None]
        o_kv = o_kh + (o_s * (HKV * D))[:, None] + o_d[None, :]
        tl.store(dk + o_kv, tl.load(dk + o_kv, mask=m_s, other=0.0) + b_dk[None, :], mask=m_s)
        tl.store(dv + o_kv, tl.load(dv + o_kv, mask=m_s, other=0.0) + b_dv[None, :], mask=m_s)


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


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tiles per kernel for the H200 (head dim 128, bf16): candidates that compile with little
# spill on Triton 3.6, timed at 32k by `bench/attention.py --sweep` (see bench/NOTES.md).
_GPU_TILES = {
    "score": {"BN": 32, "num_warps": 4},
    "window_fwd": {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4, "num_stages": 3},
    "sparse_fwd": {"num_warps": 2},
    "window_dq": {"BT": 32, "BK": 64, "BC": 64, "HP": 4, "num_warps": 8},
    "local_dkv": {"BT": 64, "BK": 64, "num_warps": 4},
    "global_dkv": {"BT": 64, "BC": 64, "num_warps": 4},
    "sparse_dq": {"num_warps": 2},
    "sparse_dkv": {"ROWS": 64, "CH": 256, "num_warps": 4},
    # tile-shared selection (select_tile > 1): rows are tokens x the padded group
    "tile_score": {"ROWS": 64, "BN": 32, "num_warps": 4},
    "sparse_tile_fwd": {"ROWS": 64, "num_warps": 4},
    "sparse_tile_dq": {"ROWS": 64, "num_warps": 4},
    "sparse_tile_dkv": {"ROWS": 64, "CH": 256, "num_warps": 4},
}
# Small tiles under the interpreter, so that every loop runs more than once in the tests.
_CPU_TILES = {
    "BT": 32, "BK": 16, "BC": 16, "BN": 16, "ROWS": 32, "CH": 8, "HP": 2, "num_warps": 4
}  # fmt: skip


# The window kernels' tiles where the group size is not a multiple of their HP (packs of HP
# heads would run empty rows, e.g. a quarter of them at G = 3 with HP = 4).
_GPU_TILES_ONE_HEAD = {"BT": 64, "BK": 64, "BC": 64, "HP": 1, "num_warps": 4}


def _gpu_tiles(kernel: str, G: int | None = None) -> dict:
    """The GPU launch tiles of `kernel`; G (window kernels): the group size."""
    tiles = _GPU_TILES[kernel]
    if G is not None and G % tiles.get("HP", 1):
        tiles = _GPU_TILES_ONE_HEAD
    return {"num_stages": 2, **tiles}


def _tiles(kernel: str, G: int | None = None) -> dict:
    if _interpret():
        return dict(_CPU_TILES, num_stages=1)
    return _gpu_tiles(kernel, G)


def _options(tiles: dict) -> dict:
    """The launch options (warps, stages) of a `_tiles` entry."""
    return {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}


@dataclass(frozen=True)
class _HeadLists:
    A: int
    NA: int
    active: torch.Tensor  # [HQ] int32 on the device, 1 where a head is active
    groups: torch.Tensor  # [NA] int32, the KV heads of the groups with an active head
    group_heads: list[list[int]]  # on the host: the active heads of each group in `groups`
    _packs: dict = field(default_factory=dict)

    def packs(self, HP: int) -> torch.Tensor:
        """[NP, HP] int32 on the device: the active heads of each group in packs of HP (the
        window kernels' programs), -1 where a group's last pack is short. Built from host
        lists (no device read), once per HP."""
        if HP not in self._packs:
            rows = [
                (heads[i : i + HP] + [-1] * HP)[:HP]
                for heads in self.group_heads
                for i in range(0, len(heads), HP)
            ]
            rows = rows or [[-1] * HP]
            self._packs[HP] = torch.tensor(rows, dtype=torch.int32).to(self.active.device)
        return self._packs[HP]


_HEAD_LISTS: dict[tuple, _HeadLists] = {}


def _head_lists(
    head_mask: torch.Tensor | None, HQ: int, HKV: int, device: torch.device
) -> _HeadLists:
    """The device's head and group lists for a host mask, built once per mask: no copy to the
    device per call (nor any while a CUDA graph is being captured)."""
    key = (None if head_mask is None else tuple(head_mask.tolist()), HQ, HKV, str(device))
    lists = _HEAD_LISTS.get(key)
    if lists is None:
        host = torch.ones(HQ, dtype=torch.bool) if head_mask is None else head_mask
        G = HQ // HKV
        by_group = host.view(HKV, G)
        groups = by_group.any(1).nonzero().flatten().to(torch.int32)
        lists = _HeadLists(
            A=int(host.sum()),
            NA=groups.numel(),
            active=host.to(torch.int32).to(device),
            groups=groups.to(device),
            group_heads=[
                [g * G + j for j in by_group[g].nonzero().flatten().tolist()]
                for g in groups.tolist()
            ],
        )
        # the packs the window kernels will launch with, now: none is then copied to the
        # device while a CUDA graph is being captured
        for kernel in ("window_fwd", "window_dq"):
            lists.packs(_tiles(kernel, G)["HP"])
        if len(_HEAD_LISTS) > 1024:  # masks change only at pruning decisions
            _HEAD_LISTS.clear()
        _HEAD_LISTS[key] = lists
    return lists


class _Layout:
    """Sizes, effective branches and active heads of one call."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, plan: Plan, head_mask: torch.Tensor | None
    ):
        self.B, self.T, self.HQ, self.D = q.shape
        self.HKV = k.shape[2]
        self.G = self.HQ // self.HKV
        self.plan = plan
        self.scale = self.D**-0.5
        self.scale2 = self.scale * LOG2E
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        # a branch with nothing to read (no complete block yet) is dropped: its output is 0
        self.NC = self.T // plan.stride if plan.has_global else 0
        self.NB = self.T // plan.block_size
        self.NT = -(-self.T // plan.select_tile)  # selection tiles
        self.has_local = plan.has_local
        self.has_global = self.NC > 0
        self.has_sparse = plan.has_sparse and self.NB > 0
        heads = _head_lists(head_mask, self.HQ, self.HKV, q.device)
        self.partial = head_mask is not None
        self.A, self.NA = heads.A, heads.NA
        self.active, self.groups = heads.active, heads.groups
        self.packs = heads.packs
        self.has_window = self.has_local or self.has_global  # the window kernels run
        self.any = self.A > 0 and (self.has_window or self.has_sparse)
        # padded group sizes: tl.dot needs 16 rows; the score and dk/dv kernels stack tokens
        self.GP = triton.next_power_of_2(self.G)
        self.GP16 = max(16, self.GP)
        self.stride = max(plan.stride, 1)  # 1 stands in when the global branch is absent
        self.BSP = max(16, plan.block_size)  # key block padded to tl.dot's 16 rows
        # arguments that every attention kernel takes
        self.args = dict(
            scale2=self.scale2, HQ=self.HQ, HKV=self.HKV, G=self.G, D=self.D, PREC=self.prec
        )


def _pool(k: torch.Tensor, v: torch.Tensor | None, S: int, N: int, kc_dtype, km: bool):
    """Means over S consecutive keys (and values) of the first N * S: (kc, vc, km) with kc, vc
    in kc_dtype ([B, N, HKV, D], None when kc_dtype or v is None) and km in float32 (None
    unless asked). One launch for all of them."""
    B, T, HKV, D = k.shape
    kc = vc = k32 = None
    if kc_dtype is not None:
        kc = torch.empty(B, N, HKV, D, dtype=kc_dtype, device=k.device)
        vc = torch.empty_like(kc)
    if km:
        k32 = torch.empty(B, N, HKV, D, dtype=torch.float32, device=k.device)
    _pool_kernel[(N, B * HKV)](
        k=k, v=v, out_k=kc, out_v=vc, out_k32=k32, T=T, N=N, S=S, HKV=HKV, D=D,
        BR=min(64, triton.next_power_of_2(S)), POOL_V=vc is not None, OUT_K=kc is not None,
        OUT_K32=km,
    )  # fmt: skip
    return kc, vc, k32


def _select(
    q: torch.Tensor, k: torch.Tensor, lay: _Layout, km: torch.Tensor | None = None
) -> torch.Tensor:
    """Block indices [B, T, HKV, n_select] int32, as `selection.select_blocks` (-1: no block).
    km: the float32 block means of k [B, NB, HKV, D] when the caller has them already."""
    B, T, HKV, NB = lay.B, lay.T, lay.HKV, lay.NB
    bs, nsel = lay.plan.block_size, lay.plan.n_select
    t = _tiles("score")
    if km is None:
        km = _pool(k, None, bs, NB, None, km=True)[2]
    score = torch.empty(B, T, HKV, NB, dtype=torch.float32, device=q.device)
    BTOK = max(1, 64 // lay.GP)
    _score_kernel[(triton.cdiv(T, BTOK), B * lay.NA)](
        q=q,
        km=km,
        active=lay.active,
        groups=lay.groups,
        score=score,
        T=T,
        NB=NB,
        NA=lay.NA,
        window=lay.plan.window,
        **lay.args,
        GP=lay.GP,
        BS=bs,
        BTOK=BTOK,
        BN=t["BN"],
        HAS_LOCAL=lay.has_local,
        SPLIT=q.dtype != torch.float32,
        **_options(t),
    )
    idx = torch.empty(B, T, HKV, nsel, dtype=torch.int32, device=q.device)
    if lay.NA < HKV:
        idx.fill_(-1)  # fully pruned groups are neither scored nor ranked: they select nothing
    R, BR = B * T * lay.NA, 4
    _topk_kernel[(triton.cdiv(R, BR),)](
        score=score,
        idx=idx,
        groups=lay.groups,
        R=R,
        NA=lay.NA,
        NB=NB,
        HKV=HKV,
        NSEL=nsel,
        NBP=triton.next_power_of_2(NB),
        BR=BR,
    )
    return idx


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
    _invert_pass_kernel[grid](**bufs, **sizes, FILL=False)
    _scan_kernel[(1,)](counts=counts, ends=ends, cends=cends, NSEG=nseg, CH=CH, BLOCK=1024)
    _invert_pass_kernel[grid](**bufs, **sizes, FILL=True)
    _chunk_kernel[(nseg,)](counts=counts, ends=ends, cends=cends, chunks=chunks, CH=CH)
    return chunks, tokens, cends[-1:]


def mla_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    lay: _Layout,
    store: bool,
) -> tuple[torch.Tensor, dict]:
    """Forward launches; returns o and what the backward needs."""
    B, T, HQ, D = lay.B, lay.T, lay.HQ, lay.D
    dev = q.device
    if lay.partial or not lay.any:
        o = torch.zeros_like(q)
    else:
        o = torch.empty(B, T, HQ, D, dtype=q.dtype, device=dev)
    if not lay.any:
        return o, {}

    def branch_buffers(present: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not present:
            return o, o
        lse = torch.empty(B, T, HQ, dtype=torch.float32, device=dev)
        ob = torch.empty(B, T, HQ, D, dtype=q.dtype, device=dev) if store else lse
        return ob, lse

    o_l, lse_l = branch_buffers(lay.has_local)
    o_g, lse_g = branch_buffers(lay.has_global)
    o_s, lse_s = branch_buffers(lay.has_sparse)
    kc = vc = k
    km = None
    if lay.has_global:
        # with stride == block_size the selection's float32 block means come from the same pass
        shared = lay.has_sparse and lay.plan.stride == lay.plan.block_size
        kc, vc, km = _pool(k, v, lay.plan.stride, lay.NC, q.dtype, km=shared)
    if lay.has_window:
        t = _tiles("window_fwd", lay.G)
        packs = lay.packs(t["HP"])
        _window_fwd_kernel[(triton.cdiv(T, t["BT"]), B * packs.shape[0])](
            q=q,
            k=k,
            v=v,
            kc=kc,
            vc=vc,
            gate=gate,
            packs=packs,
            o=o,
            o_l=o_l,
            o_g=o_g,
            lse_l=lse_l,
            lse_g=lse_g,
            T=T,
            NC=lay.NC,
            NP=packs.shape[0],
            window=lay.plan.window,
            stride=lay.stride,
            **lay.args,
            BT=t["BT"],
            BK=t["BK"],
            BC=t["BC"],
            HP=t["HP"],
            HAS_LOCAL=lay.has_local,
            HAS_GLOBAL=lay.has_global,
            STORE=store,
            **_options(t),
        )
    idx = lse_l
    if lay.has_sparse and lay.plan.select_tile > 1:
        from . import sparse_tile

        idx = sparse_tile.select(q, k, lay, km)
        sparse_tile.forward(q, k, v, gate, idx, lay, o, o_s, lse_s, store)
    elif lay.has_sparse:
        idx = _select(q, k, lay, km)
        t = _tiles("sparse_fwd")
        _sparse_fwd_kernel[(T, B * lay.NA)](
            q=q,
            k=k,
            v=v,
            gate=gate,
            idx=idx,
            active=lay.active,
            groups=lay.groups,
            o=o,
            o_s=o_s,
            lse_s=lse_s,
            T=T,
            NA=lay.NA,
            **lay.args,
            GP=lay.GP16,
            NSEL=lay.plan.n_select,
            BS=lay.plan.block_size,
            BSP=lay.BSP,
            ACCUMULATE=lay.has_window,
            STORE=store,
            **_options(t),
        )
    saved = {"o_l": o_l, "o_g": o_g, "o_s": o_s, "lse_l": lse_l, "lse_g": lse_g}
    saved.update({"lse_s": lse_s, "kc": kc, "vc": vc, "idx": idx})
    return o, saved


def mla_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    lay: _Layout,
    saved: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches: dq, dk, dv and dgate (all zero on pruned heads)."""
    B, T, HQ, HKV, D = lay.B, lay.T, lay.HQ, lay.HKV, lay.D
    dev = q.device
    do = do.contiguous()
    # the dq kernels write every (active head, present branch) entry of dgate
    full = not lay.partial and lay.has_local and lay.has_global and lay.has_sparse
    dgate = (torch.empty if full else torch.zeros)(B, T, HQ, 3, dtype=gate.dtype, device=dev)
    # float32: the branches add into them (the sparse one atomically); one buffer, one cast
    dkv = torch.zeros(2, B, T, HKV, D, dtype=torch.float32, device=dev)
    dk, dv = dkv
    if lay.partial or not lay.any:
        dq = torch.zeros_like(q)
    else:
        dq = torch.empty(B, T, HQ, D, dtype=q.dtype, device=dev)
    if not lay.any:
        dkv = dkv.to(k.dtype)
        return dq, dkv[0], dkv[1], dgate

    def delta_buffer(present: bool) -> torch.Tensor:
        return torch.empty(B, T, HQ, dtype=torch.float32, device=dev) if present else dgate

    delta_l = delta_buffer(lay.has_local)
    delta_g = delta_buffer(lay.has_global)
    delta_s = delta_buffer(lay.has_sparse)
    if lay.has_window:
        t = _tiles("window_dq", lay.G)
        packs = lay.packs(t["HP"])
        _window_bwd_dq_kernel[(triton.cdiv(T, t["BT"]), B * packs.shape[0])](
            q=q,
            k=k,
            v=v,
            kc=saved["kc"],
            vc=saved["vc"],
            gate=gate,
            packs=packs,
            do=do,
            o_l=saved["o_l"],
            o_g=saved["o_g"],
            lse_l=saved["lse_l"],
            lse_g=saved["lse_g"],
            dgate=dgate,
            delta_l=delta_l,
            delta_g=delta_g,
            dq=dq,
            T=T,
            NC=lay.NC,
            NP=packs.shape[0],
            window=lay.plan.window,
            stride=lay.stride,
            **lay.args,
            scale=lay.scale,
            BT=t["BT"],
            BK=t["BK"],
            BC=t["BC"],
            HP=t["HP"],
            HAS_LOCAL=lay.has_local,
            HAS_GLOBAL=lay.has_global,
            **_options(t),
        )
    if lay.has_local:
        t = _tiles("local_dkv")
        _local_bwd_dkv_kernel[(triton.cdiv(T, t["BK"]), B * lay.NA)](
            q=q,
            k=k,
            v=v,
            gate=gate,
            active=lay.active,
            groups=lay.groups,
            do=do,
            lse_l=saved["lse_l"],
            delta_l=delta_l,
            dk=dk,
            dv=dv,
            T=T,
            NA=lay.NA,
            window=lay.plan.window,
            **lay.args,
            scale=lay.scale,
            BT=t["BT"],
            BK=t["BK"],
            **_options(t),
        )
    if lay.has_global:
        t = _tiles("global_dkv")
        NC = lay.NC
        n_tiles = triton.cdiv(NC, t["BC"])
        # split the queries after each tile so that the launch fills the GPU
        nsplit = max(1, min(triton.cdiv(T, t["BT"]), triton.cdiv(1024, n_tiles * B * lay.NA)))
        chunk = triton.cdiv(triton.cdiv(T, nsplit), t["BT"]) * t["BT"]
        # fully pruned groups' rows stay unset: the spread below skips them too
        dkc, dvc = torch.empty(2, nsplit, B, NC, HKV, D, dtype=torch.float32, device=dev)
        _global_bwd_dkv_kernel[(n_tiles, B * lay.NA, nsplit)](
            q=q,
            kc=saved["kc"],
            vc=saved["vc"],
            gate=gate,
            active=lay.active,
            groups=lay.groups,
            do=do,
            lse_g=saved["lse_g"],
            delta_g=delta_g,
            dkc=dkc,
            dvc=dvc,
            T=T,
            NC=NC,
            NA=lay.NA,
            stride=lay.stride,
            chunk=chunk,
            **lay.args,
            scale=lay.scale,
            BT=t["BT"],
            BC=t["BC"],
            **_options(t),
        )
        BK = min(64, triton.next_power_of_2(lay.stride))
        _spread_kernel[(NC, B * lay.NA)](
            dkc=dkc, dvc=dvc, groups=lay.groups, dk=dk, dv=dv, T=T, NC=NC, NA=lay.NA,
            stride=lay.stride, NSPLIT=nsplit, HKV=HKV, D=D, BK=BK,
        )  # fmt: skip
    if lay.has_sparse and lay.plan.select_tile > 1:
        from . import sparse_tile

        sparse_tile.backward(
            q, k, v, gate, do, saved["idx"], lay, saved, dgate, delta_s, dq, dk, dv
        )
    elif lay.has_sparse:
        idx = saved["idx"]
        t = _tiles("sparse_dq")
        _sparse_bwd_dq_kernel[(T, B * lay.NA)](
            q=q,
            k=k,
            v=v,
            gate=gate,
            idx=idx,
            active=lay.active,
            groups=lay.groups,
            do=do,
            o_s=saved["o_s"],
            lse_s=saved["lse_s"],
            dgate=dgate,
            delta_s=delta_s,
            dq=dq,
            T=T,
            NA=lay.NA,
            **lay.args,
            scale=lay.scale,
            GP=lay.GP16,
            NSEL=lay.plan.n_select,
            BS=lay.plan.block_size,
            BSP=lay.BSP,
            ACCUMULATE=lay.has_window,
            **_options(t),
        )
        t = _tiles("sparse_dkv")
        chunks, tokens, used = _invert(idx, lay.NB, t["CH"])
        _sparse_bwd_dkv_kernel[(chunks.shape[0],)](
            q=q,
            k=k,
            v=v,
            gate=gate,
            active=lay.active,
            chunks=chunks,
            tokens=tokens,
            used=used,
            do=do,
            lse_s=saved["lse_s"],
            delta_s=delta_s,
            dk=dk,
            dv=dv,
            T=T,
            NB=lay.NB,
            **lay.args,
            scale=lay.scale,
            GP=lay.GP,
            BS=lay.plan.block_size,
            BSP=lay.BSP,
            BQ=max(1, t["ROWS"] // lay.GP),
            **_options(t),
        )
    dkv = dkv.to(k.dtype)
    return dq, dkv[0], dkv[1], dgate


class MLATritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, plan, head_mask):
        q, k, v, gate = (x.contiguous() for x in (q, k, v, gate))
        lay = _Layout(q, k, plan, head_mask)
        store = any(ctx.needs_input_grad[:4])
        o, saved = mla_fwd(q, k, v, gate, lay, store)
        names = sorted(saved)
        ctx.save_for_backward(q, k, v, gate, *(saved[n] for n in names))
        ctx.names = names
        ctx.lay = lay
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, gate, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.names, rest))
        dq, dk, dv, dgate = mla_bwd(do, q, k, v, gate, ctx.lay, saved)
        return dq, dk, dv, dgate, None, None


def mla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    config: AttentionConfig,
    *,
    t_max: int | None = None,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-Level Attention on Triton kernels; the contract of `mla_reference`.

    Args:
        q: [B, T, HQ, D] queries, bfloat16 / float16 (float32 too, for the interpreter).
        k, v: [B, T, HKV, D] in q's dtype; HKV divides HQ.
        gate: [B, T, HQ, 3] branch weights (local, global, sparse), any float dtype.
        config: the layer's budget, ratios and block size.
        t_max: the longest sequence the layer is built for (fixes the global stride).
        head_mask: [HQ] bool, the active query heads; pruned heads are not computed.

    Returns:
        [B, T, HQ, D] in q's dtype; differentiable in q, k, v and gate.

    Raises:
        ValueError: inputs the kernels cannot take (device, dtype, shape, head dim).
    """
    _check(q, k, v, gate, config, t_max, head_mask)
    T = q.shape[1]
    plan = config.plan(t_max or T)
    if head_mask is not None:
        head_mask = head_mask.cpu()  # once: _Layout reads it on the host too
        if bool(head_mask.all()):
            head_mask = None
    return MLATritonFunction.apply(q, k, v, gate.to(q.dtype), plan, head_mask)


def unsupported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: AttentionConfig, t_max: int | None
) -> str | None:
    """Why the kernels cannot take inputs of this kind (None: they can). Shared by the checks
    of `mla_triton` and by the "auto" backend, which falls back to torch instead."""
    B, T, HQ, D = q.shape
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (
            f"q, k, v must all be bfloat16, float16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if HQ // k.shape[2] > 64:
        return f"the kernels take at most 64 query heads per KV head, got {HQ // k.shape[2]}"
    if D not in (16, 32, 64, 128):
        return f"the kernels take head dims 16, 32, 64 or 128, got {D}"
    sparse = config.plan(t_max or T).has_sparse
    # offsets inside one batch row are 32-bit
    if T * HQ * D >= 2**31 or (sparse and T * k.shape[2] * (T // config.block_size) >= 2**31):
        return f"sequence too long for the kernels' 32-bit offsets: T={T}, HQ={HQ}, D={D}"
    if sparse and config.block_size > 128:
        return f"the sparse kernels take block_size <= 128, got {config.block_size}"
    return None


def _check(q, k, v, gate, config, t_max, head_mask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("gate", gate)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret()):
            raise ValueError(
                f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                f"{name} is on {x.device}"
            )
    check_inputs(q, k, v, gate, head_mask, t_max)
    if not gate.is_floating_point():
        raise ValueError(f"gate must be floating point, got {gate.dtype}")
    reason = unsupported(q, k, v, config, t_max)
    if reason is not None:
        raise ValueError(reason)
    if head_mask is not None and head_mask.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"head_mask must be on {q.device} or the CPU, got {head_mask.device}")
