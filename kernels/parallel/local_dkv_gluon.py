"""The local branch's dk/dv (as `window._local_bwd_dkv_kernel`) written in Gluon for Hopper, in
FlashAttention 3's backward shape: a program owns a tile of BK = 128 keys of one KV head, K and
V resident in shared memory, and two consumer warpgroups of 64 keys each run over the (head,
query tile) items that see the tile while a producer warp streams each item's Q and dO tiles
into a ring with TMA. Both warpgroups read every Q and dO tile once for 128 keys.

The gate is applied as a column scale of P and dP (dV += (P g) dO, dS = P (g dP - delta)), so
dO is read raw and no gated copy is built.

Correct (its gradients are as close to the reference as the `tl.dot` kernel's, a little closer
for dk and dv) but not yet faster: 3-25% slower than the `tl.dot` kernel (12/4/64: 143 against
115 µs at 8k, 531 against 490 at 32k; 64/4/128 32k: 4.02 against 3.90 ms; bench/RESULTS.md,
seventeenth session). Each consumer still runs an item's four MMAs and its softmax one after
another, and loads the item's lse, delta and gate from memory on the way. Off unless
MLA_GLUON_DKV=1; GPU only, as `window_gluon` (the CPU tests compile it for sm_90).
"""

from __future__ import annotations

import os

import torch

from . import window_gluon as wg
from .launch import launch

if wg._GLUON:
    from .window_gluon import (
        _tma_load,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

BK = 128  # keys per program: two warpgroups of BKW
BKW = 64
STAGES = 2
CONSUMER_REGS = 232
MAX_REGS = 168

# MLA_GLUON_DKV=1: the Gluon local dk/dv wherever it runs; off by default, being slower
ENABLED = int(os.environ.get("MLA_GLUON_DKV", "0"))


def query_rows(D: int) -> int:
    """Query rows per item: 64, or 32 at head dim 128 so that the two [BKW, D] float32
    accumulators and the [BKW, rows] scores fit a warpgroup's registers."""
    return 64 if D <= 64 else 32


def available(q: torch.Tensor) -> bool:
    """Whether the Gluon local dk/dv takes these queries: switched on, a Hopper GPU, head dim 64
    or 128, 16-bit floats, and a Triton with Gluon's Hopper dialect."""
    return ENABLED == 1 and q.shape[-1] in (64, 128) and wg.hopper_ok(q)


if wg._GLUON:

    @gluon.jit
    def _items(i_s, T, window, BT: gl.constexpr, BK: gl.constexpr):
        """The query tiles that see key tile i_s: the first one's start and their count."""
        lo = i_s * BK
        hi = gl.minimum(i_s * BK + BK - 1 + window, T)
        return lo, gl.cdiv(hi - lo, BT)

    @gluon.jit
    def _consume(args, WG: gl.constexpr, HQ: gl.constexpr, G: gl.constexpr):
        """Consumer warpgroup WG: keys WG * BKW .. of the program's tile against every active
        item's Q and dO, dK and dV held in registers, added atomically at the end."""
        (descs, smem, bars, ptrs, sizes) = args
        k_smem, v_smem, q_smem, do_smem = smem
        kv_ready, ready, empty = bars
        gate, active, groups, lse_l, delta_l, dk, dv, dkc, dvc = ptrs
        T, NC, NA, NSPLIT, window, stride, scale2, scale, spread = sizes
        STAGES: gl.constexpr = q_smem.type.shape[0]
        BT: gl.constexpr = q_smem.type.shape[1]
        D: gl.constexpr = q_smem.type.shape[2]
        BKW: gl.constexpr = k_smem.type.shape[1]
        HKV: gl.constexpr = HQ // G
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BT, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
        )
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        i_s, i_bg, i_sp = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        i_b = i_bg // NA
        i_hk = gl.load(groups + i_bg % NA)
        key0 = i_s * (2 * BKW) + WG * BKW
        o_s = key0 + gl.arange(0, BKW, layout=gl.SliceLayout(1, s_layout))
        k_w = k_smem.index(WG)
        v_w = v_smem.index(WG)
        zero_s = gl.zeros([BKW, BT], gl.float32, layout=s_layout)
        b_dk = gl.zeros([BKW, D], gl.float32, layout=o_layout)
        b_dv = gl.zeros([BKW, D], gl.float32, layout=o_layout)
        lo, nq = _items(i_s, T, window, BT, 2 * BKW)
        n_items = G * nq
        mbarrier.wait(kv_ready, 0)
        c = 0
        for i_it in range(i_sp, n_items, NSPLIT):
            i_h = i_hk * G + i_it // nq
            if gl.load(active + i_h) != 0:
                st = c % STAGES
                o_t = lo + (i_it % nq) * BT + gl.arange(0, BT, layout=gl.SliceLayout(0, s_layout))
                m_t = o_t < T
                o_r = (i_b * T + o_t).to(gl.int64) * HQ + i_h
                b_lse = gl.load(lse_l + o_r, mask=m_t, other=float("inf"))
                b_delta = gl.load(delta_l + o_r, mask=m_t, other=0.0)
                b_g = gl.load(gate + o_r * 3, mask=m_t, other=0.0).to(gl.float32)
                mbarrier.wait(ready.index(st), (c // STAGES) & 1)
                q_b = q_smem.index(st)
                do_b = do_smem.index(st)
                # [BKW, BT]: the scores and dP, transposed (keys as M)
                b_s = warpgroup_mma(k_w, q_b.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                b_dp = warpgroup_mma(
                    v_w, do_b.permute((1, 0)), zero_s, use_acc=False, is_async=True
                )
                b_s = warpgroup_mma_wait(1, deps=(b_s,))
                keep = (o_t[None, :] >= o_s[:, None]) & (o_t[None, :] < o_s[:, None] + window)
                keep = keep & m_t[None, :]
                b_p = gl.where(keep, gl.exp2(b_s * scale2 - b_lse[None, :]), 0.0)
                b_pg = gl.convert_layout((b_p * b_g[None, :]).to(q_b.dtype), a_layout)
                b_dv = warpgroup_mma(b_pg, do_b, b_dv, is_async=True)
                b_dp = warpgroup_mma_wait(1, deps=(b_dp,))
                b_ds = b_p * (b_dp * b_g[None, :] - b_delta[None, :])
                b_ds = gl.convert_layout(b_ds.to(q_b.dtype), a_layout)
                b_dk = warpgroup_mma(b_ds, q_b, b_dk, is_async=True)
                b_dv, b_dk = warpgroup_mma_wait(0, deps=(b_dv, b_dk))
                mbarrier.arrive(empty.index(st), count=1)
                c += 1
        b_dk = b_dk * scale
        o_so = key0 + gl.arange(0, BKW, layout=gl.SliceLayout(1, o_layout))
        o_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        m_s = (o_so < T)[:, None]
        # spread: the first split also adds the global branch's gradient of the compressed
        # token that pooled each key, 1/stride of it (dkc/dvc [B, NC, HKV, D], complete)
        o_c = o_so // stride
        m_c = m_s & ((o_c < NC) & (spread != 0) & (i_sp == 0))[:, None]
        o_ckv = ((i_b * NC + o_c) * HKV + i_hk).to(gl.int64) * D
        o_ckv = o_ckv[:, None] + o_d[None, :]
        b_dk += gl.load(dkc + o_ckv, mask=m_c, other=0.0) / stride
        b_dv += gl.load(dvc + o_ckv, mask=m_c, other=0.0) / stride
        o_kv = ((i_b * T + o_so) * HKV + i_hk).to(gl.int64) * D
        o_kv = o_kv[:, None] + o_d[None, :]
        if i_sp < n_items:  # the split programs of one key tile add up
            gl.atomic_add(dk + o_kv, b_dk, mask=m_s, sem="relaxed")
            gl.atomic_add(dv + o_kv, b_dv, mask=m_s, sem="relaxed")

    @gluon.jit
    def _consume0(args, HQ: gl.constexpr, G: gl.constexpr):
        _consume(args, 0, HQ, G)

    @gluon.jit
    def _consume1(args, HQ: gl.constexpr, G: gl.constexpr):
        _consume(args, 1, HQ, G)

    @gluon.jit
    def _produce(args, HQ: gl.constexpr, G: gl.constexpr):
        """The producer warp: the program's K and V tiles once, then each active item's Q and
        dO tiles into the ring, in the consumers' order."""
        (descs, smem, bars, ptrs, sizes) = args
        q_desc, do_desc, k_desc, v_desc = descs
        k_smem, v_smem, q_smem, do_smem = smem
        kv_ready, ready, empty = bars
        active, groups = ptrs[1], ptrs[2]
        T, NA, NSPLIT, window = sizes[0], sizes[2], sizes[3], sizes[4]
        STAGES: gl.constexpr = q_smem.type.shape[0]
        BT: gl.constexpr = q_smem.type.shape[1]
        D: gl.constexpr = q_smem.type.shape[2]
        BKW: gl.constexpr = k_smem.type.shape[1]
        i_s, i_bg, i_sp = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        i_b = i_bg // NA
        i_hk = gl.load(groups + i_bg % NA)
        mbarrier.expect(kv_ready, 4 * k_desc.block_type.nbytes)
        for w in gl.static_range(2):
            row = i_b * T + i_s * (2 * BKW) + w * BKW
            _tma_load(k_desc, [row, i_hk * D], kv_ready, k_smem.index(w))
            _tma_load(v_desc, [row, i_hk * D], kv_ready, v_smem.index(w))
        lo, nq = _items(i_s, T, window, BT, 2 * BKW)
        c = 0
        for i_it in range(i_sp, G * nq, NSPLIT):
            i_h = i_hk * G + i_it // nq
            if gl.load(active + i_h) != 0:
                st = c % STAGES
                # a stage is free once both consumers released it; a fresh barrier passes
                # parity 1
                mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(st), 2 * q_desc.block_type.nbytes)
                row = i_b * T + lo + (i_it % nq) * BT
                _tma_load(q_desc, [row, i_h * D], ready.index(st), q_smem.index(st))
                _tma_load(do_desc, [row, i_h * D], ready.index(st), do_smem.index(st))
                c += 1

    @gluon.jit
    def _local_dkv_gluon(q_desc, do_desc, k_desc, v_desc, gate, active, groups, lse_l, delta_l,
                         dk, dv, dkc, dvc, T, NC, NA, NSPLIT, window, stride, scale2, scale,
                         spread, HQ: gl.constexpr, G: gl.constexpr, STAGES: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr):  # fmt: skip
        BT: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BKW: gl.constexpr = k_desc.block_type.shape[0]
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, BKW, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, BKW, D], v_desc.layout)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BT, D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BT, D], do_desc.layout)
        kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_ready, count=1)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        args = (
            (q_desc, do_desc, k_desc, v_desc),
            (k_smem, v_smem, q_smem, do_smem),
            (kv_ready, ready, empty),
            (gate, active, groups, lse_l, delta_l, dk, dv, dkc, dvc),
            (T, NC, NA, NSPLIT, window, stride, scale2, scale, spread),
        )
        gl.warp_specialize(
            [
                (_consume0, (args, HQ, G)),
                (_consume1, (args, HQ, G)),
                (_produce, (args, HQ, G)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )


def local_dkv(q, k, v, gate, do, lay, lse_l, delta_l, dk, dv, dkvc, n_tiles, nsplit) -> None:
    """The local branch's dk/dv added into the float32 dk, dv [B, T, HKV, D] (and, where the
    layer has a global branch, its compressed-key gradient dkvc spread back over the pooled
    keys), as the `tl.dot` kernel's launch in `autograd._window_dkv`, over the same n_tiles
    key tiles of BK and nsplit programs to a tile."""
    BT = query_rows(lay.D)
    dkc, dvc = dkvc
    launch(
        _local_dkv_gluon,
        (n_tiles, lay.B * lay.NA, nsplit),
        q_desc=wg._descriptor(q, BT),
        do_desc=wg._descriptor(do, BT),
        k_desc=wg._descriptor(k, BKW),
        v_desc=wg._descriptor(v, BKW),
        gate=gate,
        active=lay.active,
        groups=lay.groups,
        lse_l=lse_l,
        delta_l=delta_l,
        dk=dk,
        dv=dv,
        dkc=dkc,
        dvc=dvc,
        T=lay.T,
        NC=lay.NC,
        NA=lay.NA,
        NSPLIT=nsplit,
        window=lay.plan.window,
        stride=lay.stride,
        scale2=lay.scale2,
        scale=lay.scale,
        spread=int(lay.has_global),
        HQ=lay.HQ,
        G=lay.G,
        STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4,
        maxnreg=MAX_REGS,
    )
