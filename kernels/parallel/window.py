"""The local and global branches: forward per query tile (both fused), dq per query tile,
dk/dv per key tile (local) and per compressed tile (global, its gradient spread back over the
pooled keys).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _gate_grad, _load_pair, _pack_rows, _softmax_finish, _softmax_step


@triton.jit
def _interior(i_t, lo, hi, window, BT: tl.constexpr, BK: tl.constexpr):
    """Of the key tiles [lo, hi) of query tile i_t's window (starts BK apart), those whose
    every key each of the tile's rows sees: [u_lo, u_hi), past the window's lower edge and
    before the tile's first row. Masks are needed only outside it."""
    first = (tl.maximum((i_t + 1) * BT - window, 0) + BK - 1) // BK * BK
    u_lo = tl.minimum(tl.maximum(lo, first), hi)
    u_hi = tl.maximum(tl.minimum((i_t * BT + 1) // BK * BK, hi), u_lo)
    return u_lo, u_hi


@triton.jit
def _crosses_band(t0, s0, window, T, BT: tl.constexpr, BK: tl.constexpr):
    """Whether some row of the query tile at t0 misses some key of the key tile at s0 in its
    local window: a row at or before the tile's last key, or past the window's end or T."""
    return (t0 < s0 + BK - 1) | (t0 + BT > tl.minimum(s0 + window, T))


@triton.jit
def _band_mask(o_s, o_t, m_t, window):
    # [keys, queries]: which of the rows o_t see which keys o_s in their local windows
    return (o_t[None, :] >= o_s[:, None]) & (o_t[None, :] < o_s[:, None] + window) & m_t[None, :]


@triton.jit
def _scores(
    b_q, k, v, row, i_hk, o_s, n, o_d, scale2,
    HKV: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # The keys and values o_s (row: the first one's row in the 2-D view of TMA descriptors;
    # those past n are zero, or with TMA come as stored) and the scores [HP * BT, len(o_s)].
    o_kv = (o_s * (HKV * D))[:, None] + o_d[None, :]
    b_k, b_v = _load_pair(k, v, row, i_hk * D, o_kv, o_s < n, TMA)
    return b_k, b_v, tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale2


@triton.jit
def _local_tile(
    b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2,
    HKV: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    # Key tile i_s of the local window, its scores, and which of them each row sees (the
    # callers drop the mask on interior tiles; unused, its compares compile away). Keys past T
    # are masked, as o_s <= o_t < T.
    o_s = i_s + tl.arange(0, BK)
    b_k, b_v, b_s = _scores(b_q, k, v, i_b * T + i_s, i_hk, o_s, T, o_d, scale2, HKV, D, PREC, TMA)
    m_s = (o_s[None, :] <= o_t[:, None]) & (o_s[None, :] > o_t[:, None] - window)
    return b_k, b_v, b_s, m_s


@triton.jit
def _global_tile(
    b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2,
    HKV: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    # Tile i_c of compressed keys, as _local_tile; those past NC are masked, as n_vis <= NC.
    o_c = i_c + tl.arange(0, BC)
    b_k, b_v, b_s = _scores(
        b_q, kc, vc, i_b * NC + i_c, i_hk, o_c, NC, o_d, scale2, HKV, D, PREC, TMA
    )
    return b_k, b_v, b_s, o_c[None, :] < n_vis[:, None]


@triton.jit
def _local_fwd_step(
    b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_m, b_l, b_acc,
    HKV: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # One key tile of the local window; MASK: the tile may hold keys that a row does not see.
    b_k, b_v, b_s, m_s = _local_tile(
        b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, HKV, D, BK, PREC, TMA
    )
    if MASK:
        b_s = tl.where(m_s, b_s, float("-inf"))
    return _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)


@triton.jit
def _global_fwd_step(
    b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_m, b_l, b_acc,
    HKV: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # One tile of compressed keys; MASK: the tile may hold keys past a row's visible prefix.
    b_k, b_v, b_s, m_s = _global_tile(
        b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, HKV, D, BC, PREC, TMA
    )
    if MASK:
        b_s = tl.where(m_s, b_s, float("-inf"))
    return _softmax_step(b_s, b_v, b_m, b_l, b_acc, PREC)


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
    EDGE: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    # One query tile of HP heads of one group (their rows share each key tile): the local
    # window, then the compressed prefix. EDGE: masks on the tiles at the band's edges only.
    i_b, i_hk, o_t, o_row, m_t = _pack_rows(packs, T, NP, HQ, G, BT, HP)
    i_t = tl.program_id(0)
    o_bq = (i_b * T * HQ).to(tl.int64)
    o_d = tl.arange(0, D)
    o_x = o_bq * D + (o_row * D)[:, None] + o_d[None, :]
    # [HP * BT, D]
    b_q = tl.load(q + o_x, mask=m_t[:, None], other=0.0)

    if HAS_LOCAL:
        if not TMA:
            k += (i_b * T * HKV + i_hk).to(tl.int64) * D
            v += (i_b * T * HKV + i_hk).to(tl.int64) * D
        b_m = tl.full([HP * BT], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([HP * BT], dtype=tl.float32)
        b_acc = tl.zeros([HP * BT, D], dtype=tl.float32)
        lo = tl.maximum(i_t * BT - window + 1, 0) // BK * BK
        hi = tl.minimum((i_t + 1) * BT, T)
        if EDGE:
            u_lo, u_hi = _interior(i_t, lo, hi, window, BT, BK)
            for i_s in range(lo, u_lo, BK):
                b_m, b_l, b_acc = _local_fwd_step(
                    b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_m, b_l, b_acc,
                    HKV, D, BK, True, PREC, TMA,
                )  # fmt: skip
            for i_s in range(u_lo, u_hi, BK):
                b_m, b_l, b_acc = _local_fwd_step(
                    b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_m, b_l, b_acc,
                    HKV, D, BK, False, PREC, TMA,
                )  # fmt: skip
            lo = u_hi  # the loop below: the masked tail
        for i_s in range(lo, hi, BK):
            b_m, b_l, b_acc = _local_fwd_step(
                b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_m, b_l, b_acc,
                HKV, D, BK, True, PREC, TMA,
            )  # fmt: skip
        b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
        tl.store(lse_l + o_bq + o_row, b_lse, mask=m_t)
        if STORE:
            tl.store(o_l + o_x, b_ob.to(o_l.dtype.element_ty), mask=m_t[:, None])
        b_g = tl.load(gate + (o_bq + o_row) * 3, mask=m_t, other=0.0).to(tl.float32)
        # held in q's dtype while the global branch runs, to save registers
        b_o = (b_g[:, None] * b_ob).to(b_q.dtype)

    if HAS_GLOBAL:
        if not TMA:
            kc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
            vc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        b_m = tl.full([HP * BT], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([HP * BT], dtype=tl.float32)
        b_acc = tl.zeros([HP * BT, D], dtype=tl.float32)
        n_vis = (o_t + 1) // stride
        hi = tl.minimum(((i_t + 1) * BT) // stride, NC)
        lo = 0
        if EDGE:
            # tiles that end within every row's visible prefix: no mask
            u_hi = tl.minimum((i_t * BT + 1) // stride // BC * BC, hi)
            for i_c in range(0, u_hi, BC):
                b_m, b_l, b_acc = _global_fwd_step(
                    b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_m, b_l, b_acc,
                    HKV, D, BC, False, PREC, TMA,
                )  # fmt: skip
            lo = u_hi  # the loop below: the masked tail
        for i_c in range(lo, hi, BC):
            b_m, b_l, b_acc = _global_fwd_step(
                b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_m, b_l, b_acc,
                HKV, D, BC, True, PREC, TMA,
            )  # fmt: skip
        b_ob, b_lse = _softmax_finish(b_m, b_l, b_acc)
        tl.store(lse_g + o_bq + o_row, b_lse, mask=m_t)
        b_g = tl.load(gate + (o_bq + o_row) * 3 + 1, mask=m_t, other=0.0).to(tl.float32)
        if HAS_LOCAL:
            b_o = b_o.to(tl.float32) + b_g[:, None] * b_ob
        else:
            b_o = b_g[:, None] * b_ob

    tl.store(o + o_x, b_o.to(o.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _local_dq_step(
    b_q, b_dob, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_lse, b_delta, b_dq,
    HKV: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # One key tile of the local window's dq; MASK as in _local_fwd_step.
    b_k, b_v, b_s, m_s = _local_tile(
        b_q, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, HKV, D, BK, PREC, TMA
    )
    if MASK:
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    else:
        b_p = tl.exp2(b_s - b_lse[:, None])
    b_dp = tl.dot(b_dob, tl.trans(b_v), input_precision=PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)


@triton.jit
def _global_dq_step(
    b_q, b_do, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_lse, b_g, b_dg, b_c, b_pk,
    b_dq, HKV: tl.constexpr, D: tl.constexpr, BC: tl.constexpr, MASK: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # One tile of compressed keys of the global dq (the kernel's comment says how it sums);
    # MASK as in _global_fwd_step.
    b_k, b_v, b_s, m_s = _global_tile(
        b_q, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, HKV, D, BC, PREC, TMA
    )
    if MASK:
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    else:
        b_p = tl.exp2(b_s - b_lse[:, None])
    b_pdp = b_p * tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
    b_sdp = tl.sum(b_pdp, 1)
    b_dg += b_sdp
    if i_c == 0:
        b_sp = tl.sum(b_p, 1)
        b_c = b_g * b_sdp / tl.where(b_sp > 0, b_sp, 1.0)  # 0 where no key is seen
    b_ds = b_pdp * b_g[:, None] - b_p * b_c[:, None]
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_pk = tl.dot(b_p.to(b_k.dtype), b_k, b_pk, input_precision=PREC)
    return b_dg, b_c, b_pk, b_dq


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
    lse_l,
    lse_g,
    dgate,
    delta_l,
    delta_g,
    dq,
    zero,
    NZ,
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
    EDGE: tl.constexpr,
    PREC: tl.constexpr,
    ZB: tl.constexpr,
    TMA: tl.constexpr,
):
    # dq of one query tile of HP heads of one group: local, then global; each branch's dgate
    # and softmax delta (the dk/dv kernels, launched after, read the deltas): the local one's
    # from its kept output before its loop, the global one's summed in its loop. EDGE: masks
    # on the tiles at the band's edges only.
    # First, the programs zero the float32 buffer `zero` (NZ values) that every branch's dk/dv
    # adds into, ZB values at a time in turn: the kernels that add to it all run after this
    # one, and a fill launch of its own sat at the head of both streams' chains.
    i_p = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    n_p = tl.num_programs(0) * tl.num_programs(1)
    for i_z in range(i_p * ZB, NZ, n_p * ZB):
        o_z = i_z + tl.arange(0, ZB)
        tl.store(zero + o_z, tl.zeros([ZB], dtype=tl.float32), mask=o_z < NZ)
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
        if not TMA:
            k += (i_b * T * HKV + i_hk).to(tl.int64) * D
            v += (i_b * T * HKV + i_hk).to(tl.int64) * D
        b_g = tl.load(gate + o_r * 3, mask=m_t, other=0.0).to(tl.float32)
        b_dob = (b_do.to(tl.float32) * b_g[:, None]).to(b_q.dtype)
        b_lse = tl.load(lse_l + o_r, mask=m_t, other=float("inf"))
        b_delta = _gate_grad(b_do, o_l + o_x, b_g, dgate + o_r * 3, delta_l + o_r, m_t)
        lo = tl.maximum(i_t * BT - window + 1, 0) // BK * BK
        hi = tl.minimum((i_t + 1) * BT, T)
        if EDGE:
            u_lo, u_hi = _interior(i_t, lo, hi, window, BT, BK)
            for i_s in range(lo, u_lo, BK):
                b_dq = _local_dq_step(
                    b_q, b_dob, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_lse,
                    b_delta, b_dq, HKV, D, BK, True, PREC, TMA,
                )  # fmt: skip
            for i_s in range(u_lo, u_hi, BK):
                b_dq = _local_dq_step(
                    b_q, b_dob, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_lse,
                    b_delta, b_dq, HKV, D, BK, False, PREC, TMA,
                )  # fmt: skip
            lo = u_hi  # the loop below: the masked tail
        for i_s in range(lo, hi, BK):
            b_dq = _local_dq_step(
                b_q, b_dob, k, v, i_b, i_s, i_hk, o_t, o_d, T, window, scale2, b_lse, b_delta,
                b_dq, HKV, D, BK, True, PREC, TMA,
            )  # fmt: skip

    if HAS_GLOBAL:
        # The global branch's output is not kept, so its delta g <do, o_g> is not known before
        # the loop. With dP from the ungated do, dgate_g = sum_j P dP, and for any per-row c,
        # dq_g = sum_j P (g dP - delta) k = sum_j P (g dP - c) k - (delta - c) sum_j P k: the
        # last sum in an accumulator of its own, subtracted once delta is known. c, the first
        # tile's mean of g dP, keeps the bf16 products from cancelling where dP has a common
        # offset (pooled values near their mean): without it dq_g lost ~7% at an offset of 4.
        if not TMA:
            kc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
            vc += (i_b * NC * HKV + i_hk).to(tl.int64) * D
        b_g = tl.load(gate + o_r * 3 + 1, mask=m_t, other=0.0).to(tl.float32)
        b_lse = tl.load(lse_g + o_r, mask=m_t, other=float("inf"))
        b_dg = tl.zeros([HP * BT], dtype=tl.float32)
        b_c = tl.zeros([HP * BT], dtype=tl.float32)
        b_pk = tl.zeros([HP * BT, D], dtype=tl.float32)
        n_vis = (o_t + 1) // stride
        hi = tl.minimum(((i_t + 1) * BT) // stride, NC)
        lo = 0
        if EDGE:
            u_hi = tl.minimum((i_t * BT + 1) // stride // BC * BC, hi)
            for i_c in range(0, u_hi, BC):
                b_dg, b_c, b_pk, b_dq = _global_dq_step(
                    b_q, b_do, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_lse, b_g,
                    b_dg, b_c, b_pk, b_dq, HKV, D, BC, False, PREC, TMA,
                )  # fmt: skip
            lo = u_hi  # the loop below: the masked tail
        for i_c in range(lo, hi, BC):
            b_dg, b_c, b_pk, b_dq = _global_dq_step(
                b_q, b_do, kc, vc, i_b, i_c, i_hk, n_vis, o_d, NC, scale2, b_lse, b_g, b_dg,
                b_c, b_pk, b_dq, HKV, D, BC, True, PREC, TMA,
            )  # fmt: skip
        b_delta = b_g * b_dg
        tl.store(dgate + o_r * 3 + 1, b_dg, mask=m_t)
        tl.store(delta_g + o_r, b_delta, mask=m_t)
        b_dq -= (b_delta - b_c)[:, None] * b_pk

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
    dkc,
    dvc,
    T,
    NC,
    NA,
    NSPLIT,
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
    SPREAD: tl.constexpr,
    PREC: tl.constexpr,
    EDGE: tl.constexpr,
):
    # One key tile of one KV head, one of NSPLIT programs: the queries that see the tile are
    # the next `window` tokens of each active head of the group, G x nq (head, query tile)
    # items, of which this program takes every NSPLIT-th. Splitting keeps short sequences from
    # running a few long programs. dk/dv are float32 buffers that every branch adds to.
    # SPREAD: the first program also adds the global branch's gradient of the compressed
    # token that pooled each key (dkc/dvc [B, NC, HKV, D], complete), 1/stride of it.
    i_s, i_bg, i_sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    nq = tl.cdiv(hi - lo, BT)
    for i_it in range(i_sp, G * nq, NSPLIT):
        i_h = i_hk * G + i_it // nq
        if tl.load(active + i_h) != 0:
            o_qh = (i_b * T * HQ + i_h).to(tl.int64)
            o_t = lo + (i_it % nq) * BT + tl.arange(0, BT)
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
            if EDGE:  # a query tile that sees every key of this tile whole skips the mask
                b_pt = tl.exp2(b_st - b_lse[None, :])
                if _crosses_band(lo + (i_it % nq) * BT, i_s * BK, window, T, BT, BK):
                    b_pt = tl.where(_band_mask(o_s, o_t, m_t, window), b_pt, 0.0)
            else:  # the code before the switch, op for op (the same PTX)
                m_st = _band_mask(o_s, o_t, m_t, window)
                b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
            b_dv += tl.dot(b_pt.to(b_dob.dtype), b_dob, input_precision=PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_dob), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    b_dk = b_dk * scale
    if SPREAD:
        o_c = o_s // stride
        m_c = (m_s & (o_c < tl.where(i_sp == 0, NC, 0)))[:, None]  # the first program only
        o_ckv = (i_b * NC * HKV + i_hk).to(tl.int64) * D + (o_c * (HKV * D))[:, None] + o_d[None, :]
        b_dk += tl.load(dkc + o_ckv, mask=m_c, other=0.0) / stride
        b_dv += tl.load(dvc + o_ckv, mask=m_c, other=0.0) / stride
    if i_sp < G * nq:  # the split programs of one key tile add up (relaxed: only sums matter)
        tl.atomic_add(dk + o_kv, b_dk, mask=m_s[:, None], sem="relaxed")
        tl.atomic_add(dv + o_kv, b_dv, mask=m_s[:, None], sem="relaxed")


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
    TMA: tl.constexpr,
):
    # One tile of compressed keys of one KV head, over the queries of one chunk (absolute
    # positions [i_p * chunk, (i_p + 1) * chunk)) that see it. The programs of one chunk and
    # every tile run side by side (tiles vary fastest) and read the same q and dO rows, once
    # from memory. The chunks add their partial gradients into dkc/dvc [B, NC, HKV, D]
    # (float32, zeroed), which the local dk/dv kernel or `_spread_kernel` spreads back over
    # the pooled keys.
    i_c, i_bg, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
    # the first query tile that sees the tile's first compressed key (chunk is BT-aligned)
    lo = tl.maximum(((i_c * BC + 1) * stride - 1) // BT * BT, i_p * chunk)
    hi = tl.minimum((i_p + 1) * chunk, T)
    for i_g in range(G):
        i_h = i_hk * G + i_g
        if tl.load(active + i_h) != 0:
            o_qh = (i_b * T * HQ + i_h).to(tl.int64)
            for i_t in range(lo, hi, BT):
                o_t = i_t + tl.arange(0, BT)
                m_t = o_t < T
                o_x = o_qh * D + (o_t * (HQ * D))[:, None] + o_d[None, :]
                o_r = o_qh + o_t * HQ
                # [BT, D]; with TMA, rows past T come as stored: out of m_st, and gate 0
                b_q, b_do = _load_pair(q, do, i_b * T + i_t, i_h * D, o_x, m_t, TMA)
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
    if lo < hi:  # a chunk before the tile read nothing (relaxed: only the sums matter)
        tl.atomic_add(dkc + o_kh + o_kv, b_dk * scale, mask=m_c[:, None], sem="relaxed")
        tl.atomic_add(dvc + o_kh + o_kv, b_dv, mask=m_c[:, None], sem="relaxed")


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
    HKV: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
):
    # One compressed token of one batch and active group (without a local branch, which
    # otherwise does this): its gradient goes 1/stride to each of the keys it pooled.
    i_c, i_bg = tl.program_id(0), tl.program_id(1)
    i_b = i_bg // NA
    i_hk = tl.load(groups + i_bg % NA)
    o_d = tl.arange(0, D)
    o_c = ((i_b * NC + i_c) * HKV + i_hk).to(tl.int64) * D + o_d
    b_dk = tl.load(dkc + o_c) / stride
    b_dv = tl.load(dvc + o_c) / stride
    o_kh = (i_b * T * HKV + i_hk).to(tl.int64) * D
    for i_s in range(0, stride, BK):
        o_s = i_c * stride + i_s + tl.arange(0, BK)
        m_s = (i_s + tl.arange(0, BK) < stride)[:, None]
        o_kv = o_kh + (o_s * (HKV * D))[:, None] + o_d[None, :]
        # atomic: the sparse branch's dk/dv may be adding to the same rows from another stream
        b_zk = tl.zeros([BK, D], dtype=tl.float32)
        tl.atomic_add(dk + o_kv, b_zk + b_dk[None, :], mask=m_s, sem="relaxed")
        tl.atomic_add(dv + o_kv, b_zk + b_dv[None, :], mask=m_s, sem="relaxed")
