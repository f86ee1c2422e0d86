"""The sparse branch's selection on the device: block scores, their top-k, and the pooling
of keys (and values) into block means that the scores and the global branch read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import Plan
from .common import _kmean_lse, _kmean_scores
from .launch import launch
from .layout import _Layout, _options


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
    # padded and pruned heads get lse = +inf: they add nothing to the group's score
    b_lse = _kmean_lse(km, b_q, o_d, n_vis, m_r, hi, NB, scale2, HKV, D, BN, BTOK * GP, SPLIT, PREC)

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
    launch(
        _pool_kernel, (N, B * HKV),
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
    t = lay.tiles("score")
    BTOK = max(1, 64 // lay.GP)
    return _rank(
        _score_kernel, lay.T, triton.cdiv(lay.T, BTOK), q, k, lay, km, t, GP=lay.GP, BTOK=BTOK
    )


def _rank(kernel, rows: int, programs: int, q, k, lay: _Layout, km, t: dict, **extra):
    """Score every candidate block for `rows` rows (tokens, or selection tiles) with `kernel`,
    launched on `programs` x the active KV groups, and keep each row's n_select best."""
    if km is None:
        km = _pool(k, None, lay.plan.block_size, lay.NB, None, km=True)[2]
    score = torch.empty(lay.B, rows, lay.HKV, lay.NB, dtype=torch.float32, device=q.device)
    launch(
        kernel, (programs, lay.B * lay.NA),
        q=q, km=km, active=lay.active, groups=lay.groups, score=score, T=lay.T, NB=lay.NB,
        NA=lay.NA, window=lay.plan.window, **lay.args, BS=lay.plan.block_size,
        BN=t["BN"], HAS_LOCAL=lay.has_local, SPLIT=q.dtype != torch.float32, **extra,
        **_options(t),
    )  # fmt: skip
    return _topk(score, lay)


def _topk(score: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """The n_select best blocks [B, R, HKV, n_select] int32 of each row of score [B, R, HKV,
    NB] (rows: tokens, or selection tiles), best first; -1 once a row has no candidate left."""
    B, R, HKV, NB = score.shape
    idx = torch.empty(B, R, HKV, lay.plan.n_select, dtype=torch.int32, device=score.device)
    if lay.NA < HKV:
        idx.fill_(-1)  # fully pruned groups are neither scored nor ranked: they select nothing
    rows, BR = B * R * lay.NA, 4
    launch(
        _topk_kernel,
        (triton.cdiv(rows, BR),),
        score=score,
        idx=idx,
        groups=lay.groups,
        R=rows,
        NA=lay.NA,
        NB=NB,
        HKV=HKV,
        NSEL=lay.plan.n_select,
        NBP=triton.next_power_of_2(NB),
        BR=BR,
    )
    return idx


def select_blocks_triton(
    q: torch.Tensor, k: torch.Tensor, plan: Plan, head_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`select_blocks` on the kernels: indices [B, T, HKV, n_select] int32, best first, -1 where
    no block is left. head_mask: [HQ] bool on the host (None: every head active)."""
    return _select(q, k, _Layout(q, k, plan, head_mask))
