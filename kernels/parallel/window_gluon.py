"""The window forward (local and global branches, as `window._window_fwd_kernel`) written in
Gluon for Hopper, in FlashAttention 3's shape: a producer warp streams the key and value tiles
into a ring of shared-memory stages with TMA, and two consumer warpgroups, each one head of the
program's pair (a pack of HP = 2 heads of one KV group, so both read the same tiles), run the
online softmax on asynchronous warpgroup MMAs, the scores of tile j overlapping P·V of tile
j - 1. Warp specialisation with register reallocation is what made the difference on a plain
attention forward: 1.04x cuDNN against 0.83-0.87x for the same schedule in one partition or in
`tl.dot` code (bench/gluon_probe.py, bench/RESULTS.md).

Taken from MIN_NC compressed keys (4k tokens at stride 64): with masks on edge tiles only and
TMA stores of the outputs its kernel is 14% faster than the `tl.dot` one at 64/4/128 32k, 15%
at 64k and 8-12% at 4k-8k (RESULTS, seventeenth session). It holds every SM (one persistent
program each, 197 KB of shared memory), so nothing runs beside it: the tile selection runs
after it instead, in one pass with the global branch's lse (`autograd.mla_fwd`). At head dim
64 it is slower than the `tl.dot` kernel (+3% at 32k, +12% at 8k): not taken there. Its work
items are short key streams (~17 tiles) where the probe streamed 64. Runs on the GPU only
(Gluon has no interpreter): `available()` says where; elsewhere the op launches the `tl.dot`
kernel, which the CPU tests check. Written against Triton 3.6's Gluon (the device's); the TMA
copies' later names are taken where they exist.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _GLUON = True
except ImportError:  # a Triton without Gluon's Hopper dialect: the tl.dot kernel runs
    _GLUON = False

from .common import _interpret
from .launch import launch, tma_view

# rows per consumer warpgroup and key rows per tile; stages of the ring; registers
BT = 64
BN = 64
STAGES = 4
CONSUMER_REGS = 232
MAX_REGS = 168
HP = 2  # heads per program: one per consumer warpgroup


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


# MLA_GLUON=1 takes it wherever it runs, 0 nowhere; unset (-1), from MIN_NC compressed keys
# on (4k tokens at stride 64), where the op was measured faster with it and the selection
# after it (64/4/128: -2.3% at 4k, -1.1% at 8k, -1.4% at 16k, -1.8% at 32k, -3.8% at 64k;
# bench/RESULTS.md); shorter prefixes were not measured
ENABLED = int(os.environ.get("MLA_GLUON", "-1"))
MIN_NC = 64
# the smallest head dim it takes (64 or 128): written for 128, the heads of the long-context
# shapes; at 64 it is correct (its GPU tests set this to 64) but was timed slower than the
# `tl.dot` kernel (bench/RESULTS.md, seventeenth session)
MIN_HEAD_DIM = 128


def wanted(nc: int) -> bool:
    """Whether the settings take the Gluon forward for a plan with nc compressed keys."""
    return ENABLED == 1 or (ENABLED < 0 and nc >= MIN_NC)


def available(q: torch.Tensor, nc: int) -> bool:
    """Whether the Gluon window forward takes these queries (with nc compressed keys): wanted,
    a Hopper GPU, head dim 128 (64 too from MIN_HEAD_DIM = 64), 16-bit floats, and a Triton
    with Gluon's Hopper dialect."""
    return wanted(nc) and q.shape[-1] in (64, 128) and q.shape[-1] >= MIN_HEAD_DIM and hopper_ok(q)


def hopper_ok(q: torch.Tensor) -> bool:
    """Whether a Gluon Hopper kernel can take these queries: 16-bit floats on a Hopper GPU, and
    a Triton with Gluon's Hopper dialect (not the interpreter)."""
    return (
        _GLUON
        and not _interpret()
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and _device_ok(q.device.index if q.device.index is not None else 0)
    )


if _GLUON:

    @gluon.jit
    def _online(s, m_i, l_i):
        """One online-softmax step on log2-scaled scores; a row with every key masked so far
        keeps m = -inf and l = 0 (its P is exactly 0)."""
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _scores(q_buf, k_smem, k_ready, c, zero_s, STAGES: gl.constexpr):
        st = c % STAGES
        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)
        return warpgroup_mma(
            q_buf, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True
        )

    @gluon.jit
    def _masked(s, o_t, j, key0, window, stride, scale2, LOCAL: gl.constexpr, BN: gl.constexpr):
        """Scores of key tile j, scaled, with the branch's mask: the causal window (local) or
        the compressed keys a query sees (global)."""
        cols = key0 + j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s.type.layout))
        if LOCAL:
            keep = (cols[None, :] <= o_t[:, None]) & (cols[None, :] > o_t[:, None] - window)
        else:
            keep = cols[None, :] < ((o_t + 1) // stride)[:, None]
        return gl.where(keep, s * scale2, float("-inf"))

    @gluon.jit
    def _scaled(s, o_t, j, key0, t0, window, stride, scale2, LOCAL: gl.constexpr,
                BT: gl.constexpr, BN: gl.constexpr):  # fmt: skip
        """Scores of key tile j scaled, masked only where some key of the tile is outside some
        row's reach (the band's first and diagonal tiles, the prefix's last): interior tiles
        skip the mask's compares and selects, ~10% of the kernel's time when applied to all."""
        k_lo = key0 + j * BN
        if LOCAL:
            edge = (k_lo + BN - 1 > t0) | (k_lo <= t0 + BT - 1 - window)
        else:
            edge = k_lo + BN - 1 >= (t0 + 1) // stride
        if edge:
            s = _masked(s, o_t, j, key0, window, stride, scale2, LOCAL, BN)
        else:
            s = s * scale2
        return s

    @gluon.jit
    def _attend(q_buf, k_smem, v_smem, bars, c0, n, key0, t0, o_t, window, stride, scale2,
                LOCAL: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):  # fmt: skip
        """One branch over its n key tiles (ring tiles c0 .. c0 + n - 1) for the rows t0 ..
        t0 + BT - 1: the running max, sum and P·V. The scores of tile j are computed while P·V
        of tile j - 1 runs."""
        k_ready, v_ready, k_empty, v_empty = bars
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BN: gl.constexpr = k_smem.type.shape[1]
        BT: gl.constexpr = q_buf.type.shape[0]
        D: gl.constexpr = q_buf.type.shape[1]
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        zero_s = gl.zeros([BT, BN], gl.float32, layout=s_layout)
        acc = gl.zeros([BT, D], gl.float32, layout=o_layout)
        m_i = gl.full([BT], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BT], gl.float32, layout=gl.SliceLayout(1, s_layout))
        if n > 0:
            s = _scores(q_buf, k_smem, k_ready, c0, zero_s, STAGES)
            s = warpgroup_mma_wait(0, deps=(s,))
            mbarrier.arrive(k_empty.index(c0 % STAGES), count=1)
            s = _scaled(s, o_t, 0, key0, t0, window, stride, scale2, LOCAL, BT, BN)
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            for j in range(1, n):
                c = c0 + j
                prev = (c - 1) % STAGES
                s = _scores(q_buf, k_smem, k_ready, c, zero_s, STAGES)
                p_op = gl.convert_layout(p.to(q_buf.dtype), p_layout)
                mbarrier.wait(v_ready.index(prev), ((c - 1) // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s,))
                mbarrier.arrive(k_empty.index(c % STAGES), count=1)
                s = _scaled(s, o_t, j, key0, t0, window, stride, scale2, LOCAL, BT, BN)
                p, alpha, m_i, l_i = _online(s, m_i, l_i)
                acc = warpgroup_mma_wait(0, deps=(acc,))
                mbarrier.arrive(v_empty.index(prev), count=1)
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            last = c0 + n - 1
            p_op = gl.convert_layout(p.to(q_buf.dtype), p_layout)
            mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        return m_i, l_i, acc

    @gluon.jit
    def _finish(m_i, l_i, acc, o_layout: gl.constexpr):
        """The branch's output and its lse (log2 units; +inf for a row with no key)."""
        ok = l_i > 0
        l_safe = gl.where(ok, l_i, 1.0)
        lse = gl.where(ok, m_i + gl.log2(l_safe), float("inf"))
        return acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None], lse

    @gluon.jit
    def _item(w, n_t, T, NC, NP, window, stride, has_local, has_global, BT: gl.constexpr,
              BN: gl.constexpr):  # fmt: skip
        """Work item w, the same in every partition: its query tile, batch and pack, then the
        ring's plan for it: the local branch's first key and tile count, and the global
        branch's (none for an absent branch)."""
        i_t = w % n_t
        i_p = w // n_t
        lo = gl.maximum(i_t * BT - window + 1, 0) // BN * BN
        hi = gl.minimum((i_t + 1) * BT, T)
        n_l = gl.cdiv(hi - lo, BN) * has_local
        n_g = gl.cdiv(gl.minimum(((i_t + 1) * BT) // stride, NC), BN) * has_global
        return i_t, i_p // NP, i_p % NP, lo, n_l, n_g

    @gluon.jit
    def _consume(args, WG: gl.constexpr, HQ: gl.constexpr, G: gl.constexpr):
        """Consumer warpgroup WG: for each of the program's work items (a query tile of a pack),
        head WG's BT rows through both branches, the gated sum and (store) the local
        output; lse always."""
        (descs, smem, bars, ptrs, sizes) = args
        q_smem, k_smem, v_smem, o_smem = smem
        o_desc, ol_desc = descs[5], descs[6]
        q_ready, q_empty, ring = bars
        gate, packs, o, o_l, lse_l, lse_g = ptrs
        T, NC, NP, NB, window, stride, scale2, has_local, has_global, store = sizes
        BT: gl.constexpr = q_smem.type.shape[1]
        D: gl.constexpr = q_smem.type.shape[2]
        BN: gl.constexpr = k_smem.type.shape[1]
        HP: gl.constexpr = q_smem.type.shape[0]
        o_buf = o_smem.index(WG)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
        )
        q_buf = q_smem.index(WG)
        n_t = gl.cdiv(T, BT)
        c = 0  # ring tiles consumed so far
        k = 0  # work items done so far
        for w in range(gl.program_id(0), n_t * NB, gl.num_programs(0)):
            i_t, i_b, i_pk, lo, n_l, n_g = _item(w, n_t, T, NC, NP, window, stride, has_local,
                                                 has_global, BT, BN)  # fmt: skip
            h = gl.load(packs + i_pk * HP + WG)
            # rows in the scores' layout (masks, lse, gates) and in the output's (stores)
            o_t = i_t * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, s_layout))
            m_t = (o_t < T) & (h >= 0)
            o_row = (i_b * T + o_t).to(gl.int64) * HQ + gl.maximum(h, 0)
            o_to = i_t * BT + gl.arange(0, BT, layout=gl.SliceLayout(1, o_layout))
            o_x = ((i_b * T + o_to).to(gl.int64) * HQ + gl.maximum(h, 0)) * D
            o_x = o_x[:, None] + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))[None, :]
            m_x = ((o_to < T) & (h >= 0))[:, None]
            mbarrier.wait(q_ready, k & 1)
            # an absent branch has no tiles and stores nothing (run-time flags: Triton 3.6
            # fails to lower partitions that a constexpr left without some of their arguments)
            m_i, l_i, acc = _attend(q_buf, k_smem, v_smem, ring, c, n_l, lo, i_t * BT, o_t,
                                    window, stride, scale2, True, s_layout, o_layout)  # fmt: skip
            b_ob, lse = _finish(m_i, l_i, acc, o_layout)
            gl.store(lse_l + o_row, lse, mask=m_t & (has_local != 0))
            # a whole tile of a real head goes out through TMA from shared memory, so the
            # warpgroup does not wait on its stores (~10% of the kernel's time at 32k); a
            # sequence's last, partial tile with masked stores (TMA would write the next
            # sequence's rows)
            whole = (i_t * BT + BT <= T) & (h >= 0)
            row = i_b * T + i_t * BT
            if has_local * store != 0:
                if whole:
                    # o's dtype: o_l is only q-shaped where it is stored (`window_forward`)
                    _store_tile(ol_desc, row, h * D, o_buf, b_ob.to(o.dtype.element_ty))
                else:
                    gl.store(o_l + o_x, b_ob.to(o_l.dtype.element_ty), mask=m_x)
            b_g = gl.load(gate + o_row * 3, mask=m_t & (has_local != 0), other=0.0)
            b_o = gl.convert_layout(b_g.to(gl.float32), gl.SliceLayout(1, o_layout))[:, None]
            b_o = (b_o * b_ob).to(o.dtype.element_ty)  # held in q's dtype, to save registers
            m_i, l_i, acc = _attend(q_buf, k_smem, v_smem, ring, c + n_l, n_g, 0, i_t * BT, o_t,
                                    window, stride, scale2, False, s_layout, o_layout)  # fmt: skip
            # the item's last product that reads Q is done: the producer may load the next
            mbarrier.arrive(q_empty, count=1)
            b_ob, lse = _finish(m_i, l_i, acc, o_layout)
            gl.store(lse_g + o_row, lse, mask=m_t & (has_global != 0))
            b_g = gl.load(gate + o_row * 3 + 1, mask=m_t & (has_global != 0), other=0.0)
            b_g = gl.convert_layout(b_g.to(gl.float32), gl.SliceLayout(1, o_layout))
            b_o = (b_o.to(gl.float32) + b_g[:, None] * b_ob).to(o.dtype.element_ty)
            if whole:
                _store_tile(o_desc, row, h * D, o_buf, b_o)
            else:
                gl.store(o + o_x, b_o, mask=m_x)
            c += n_l + n_g
            k += 1
        # the TMA stores this warpgroup issued have read its buffer before the program ends
        tma.store_wait(0)

    @gluon.jit
    def _store_tile(desc, row, col, buf, x):
        """x [BT, D] to desc's tile at [row, col] through the warpgroup's shared buffer, once
        the buffer's last store has read it; the store itself runs on while the warpgroup
        goes on."""
        tma.store_wait(0)
        buf.store(x)
        fence_async_shared()
        _tma_store(desc, [row, col], buf)

    # the partitions' signature (the workers' must agree): constexprs passed one by one, as
    # Gluon keeps those inside a tuple only as run-time values

    @gluon.jit
    def _consume0(args, HQ: gl.constexpr, G: gl.constexpr):
        _consume(args, 0, HQ, G)

    @gluon.jit
    def _consume1(args, HQ: gl.constexpr, G: gl.constexpr):
        _consume(args, 1, HQ, G)

    @gluon.jit
    def _load_tile(desc, row, col, smem, ready, empty, c, STAGES: gl.constexpr):
        st = c % STAGES
        # a stage is free once both consumers released it; a fresh barrier passes parity 1
        mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(st), desc.block_type.nbytes)
        _tma_load(desc, [row, col], ready.index(st), smem.index(st))

    @gluon.jit
    def _produce(args, HQ: gl.constexpr, G: gl.constexpr):
        """The producer warp: for each work item, the pack's query tiles once the consumers
        are done with the last ones, then the key and value tiles of the local window and of
        the compressed prefix, in the consumers' order."""
        (descs, smem, bars, ptrs, sizes) = args
        q_desc, k_desc, v_desc, kc_desc, vc_desc = descs[:5]
        q_smem, k_smem, v_smem = smem[:3]
        q_ready, q_empty, ring = bars
        k_ready, v_ready, k_empty, v_empty = ring
        gate, packs, o, o_l, lse_l, lse_g = ptrs
        T, NC, NP, NB, window, stride, scale2, has_local, has_global, store = sizes
        BT: gl.constexpr = q_smem.type.shape[1]
        D: gl.constexpr = q_smem.type.shape[2]
        HP: gl.constexpr = q_smem.type.shape[0]
        STAGES: gl.constexpr = k_smem.type.shape[0]
        BN: gl.constexpr = k_smem.type.shape[1]
        n_t = gl.cdiv(T, BT)
        c = 0
        k = 0
        for w in range(gl.program_id(0), n_t * NB, gl.num_programs(0)):
            i_t, i_b, i_pk, lo, n_l, n_g = _item(w, n_t, T, NC, NP, window, stride, has_local,
                                                 has_global, BT, BN)  # fmt: skip
            pack = packs + i_pk * HP
            i_hk = gl.load(pack) // G
            mbarrier.wait(q_empty, (k & 1) ^ 1)  # a fresh barrier passes parity 1
            mbarrier.expect(q_ready, HP * q_desc.block_type.nbytes)
            for u in gl.static_range(HP):
                # a missing head (-1) loads head 0's rows, which its consumer does not store
                h = gl.maximum(gl.load(pack + u), 0)
                _tma_load(q_desc, [i_b * T + i_t * BT, h * D], q_ready, q_smem.index(u))
            for j in range(n_l):
                row = i_b * T + lo + j * BN
                _load_tile(k_desc, row, i_hk * D, k_smem, k_ready, k_empty, c + j, STAGES)
                _load_tile(v_desc, row, i_hk * D, v_smem, v_ready, v_empty, c + j, STAGES)
            for j in range(n_g):
                row = i_b * NC + j * BN
                t = c + n_l + j
                _load_tile(kc_desc, row, i_hk * D, k_smem, k_ready, k_empty, t, STAGES)
                _load_tile(vc_desc, row, i_hk * D, v_smem, v_ready, v_empty, t, STAGES)
            c += n_l + n_g
            k += 1

    @gluon.jit
    def ring_barriers(STAGES: gl.constexpr):
        """The mbarriers of a ring of key and value stages shared by two consumer warpgroups:
        ready (the TMA load landed; one arrival, the producer's expect) and empty (both
        consumers are done with the stage), one per stage each, initialised and fenced."""
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        return k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _window_fwd_gluon(q_desc, k_desc, v_desc, kc_desc, vc_desc, o_desc, ol_desc, gate, packs,
                          o, o_l, lse_l, lse_g, T, NC, NP, NB, window, stride, scale2, has_local,
                          has_global, store, HQ: gl.constexpr, G: gl.constexpr, BN: gl.constexpr,
                          STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):  # fmt: skip
        BT: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BT, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
        # one output buffer per consumer warpgroup, for its TMA stores
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [2, BT, D], o_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        mbarrier.init(q_empty, count=2)
        ring = ring_barriers(STAGES)
        args = (
            (q_desc, k_desc, v_desc, kc_desc, vc_desc, o_desc, ol_desc),
            (q_smem, k_smem, v_smem, o_smem),
            (q_ready, q_empty, ring),
            (gate, packs, o, o_l, lse_l, lse_g),
            (T, NC, NP, NB, window, stride, scale2, has_local, has_global, store),
        )
        fargs = (args, HQ, G)
        gl.warp_specialize(
            [(_consume0, fargs), (_consume1, fargs), (_produce, fargs)],
            [4, 1],
            [CONSUMER_REGS, 24],
        )


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """A Gluon TMA descriptor of [rows, D] tiles of x's [-1, H * D] view."""
    x2, D = tma_view(x), x.shape[-1]
    dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], dtype)
    return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, D], layout)


def window_forward(q, k, v, kc, vc, lay, store: bool, **outs) -> None:
    """The Gluon window forward on `lay`'s packs of two heads. outs: the gate, the outputs and
    the sizes that `autograd.mla_fwd` gives either window forward."""
    packs = lay.packs(HP)
    items = triton.cdiv(lay.T, BT) * lay.B * packs.shape[0]
    o, o_l = outs["o"], outs["o_l"]
    o_desc = _descriptor(o, BT)
    # o_l is a stand-in (not q-shaped, never written) where the local output is not kept
    ol_desc = _descriptor(o_l, BT) if o_l.shape == o.shape else o_desc
    launch(
        _window_fwd_gluon,
        (min(items, _sm_count(q.device.index or 0)),),
        q_desc=_descriptor(q, BT),
        k_desc=_descriptor(k, BN),
        v_desc=_descriptor(v, BN),
        kc_desc=_descriptor(kc, BN),
        vc_desc=_descriptor(vc, BN),
        o_desc=o_desc,
        ol_desc=ol_desc,
        **outs,
        packs=packs,
        NP=packs.shape[0],
        NB=lay.B * packs.shape[0],
        scale2=lay.scale2,
        has_local=int(lay.has_local),
        has_global=int(lay.has_global),
        store=int(store),
        HQ=lay.HQ,
        G=lay.G,
        BN=BN,
        STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4,
        maxnreg=MAX_REGS,
    )
