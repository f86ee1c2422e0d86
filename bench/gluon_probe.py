"""Can a hand-scheduled Hopper kernel reach cuDNN where `tl.dot` stopped at 0.83x? The attention
forward of `tma_probe.py` (T queries against T keys without a mask, 64 heads of 128, bf16)
written in Gluon, Triton's lower-level dialect: K/V tiles in a ring of shared-memory stages fed
by TMA and mbarriers, asynchronous warpgroup MMAs, and FlashAttention 3's overlap inside a
warpgroup (the scores of key tile j+1 are computed while the softmax of tile j and its P·V run).
Checked against SDPA (relative error < 1e-2) and timed beside it and beside the best `tl.dot`
kernel of `tma_probe.py`. The question for the window kernels (bench/NOTES.md): is the FA3
schedule worth porting them to Gluon?

    python bench/gluon_probe.py [--seq 8192]        # on a Hopper GPU
    python bench/gluon_probe.py --compile-only      # anywhere: compile each variant for sm_90
"""

import argparse
import itertools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from automla.kernels.parallel.window_gluon import _descriptor, ring_barriers

LOG2E = 1.4426950408889634
# the TMA copies were renamed after Triton 3.6 (the device's); the old names raise since
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """Online softmax of one score tile (log2 domain): the tile's P, the factor that rescales
    what was summed before, and the running max and sum."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _load(desc, smem, bars, tile, n, col, BN: gl.constexpr, STAGES: gl.constexpr):
    """Key or value tile `tile` into its stage of the ring (nothing past the last tile)."""
    st = tile % STAGES
    ok = tile < n
    mbarrier.expect(bars.index(st), desc.block_type.nbytes, pred=ok)
    _tma_load(desc, [tile * BN, col], bars.index(st), smem.index(st), ok)


@gluon.jit
def _attn_fwd(q_desc, k_desc, v_desc, o_desc, T, qk_scale, BM: gl.constexpr, BN: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
              num_warps: gl.constexpr):  # fmt: skip
    row = gl.program_id(0) * BM
    col = gl.program_id(1) * D
    # one warpgroup MMA layout per product: S = Q K^T is [BM, BN], O += P V is [BM, D]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    # a ring each for keys and values: a key stage frees once S is computed, before P V
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    n = T // BN
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [row, col], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load(k_desc, k_smem, k_bars, i, n, col, BN, STAGES)
        _load(v_desc, v_smem, v_bars, i, n, col, BN, STAGES)

    zero_s = gl.zeros([BM, BN], gl.float32, layout=s_layout)
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_layout))

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)  # fmt: skip
    s = warpgroup_mma_wait(0, deps=(s,))
    if SPLIT:
        _load(k_desc, k_smem, k_bars, STAGES, n, col, BN, STAGES)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
    for j in range(1, n):
        st = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_bars.index(st), (j // STAGES) & 1)
        # S_j on the tensor cores, then P_{j-1} V_{j-1} behind it; the softmax of S_j runs
        # while the second is in flight
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)  # fmt: skip
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))
        if SPLIT:  # key tile j's stage is free: fetch key tile j+STAGES into it
            _load(k_desc, k_smem, k_bars, j + STAGES, n, col, BN, STAGES)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        # tile j-1's stages are free: fetch tile j-1+STAGES into them
        if not SPLIT:
            _load(k_desc, k_smem, k_bars, j - 1 + STAGES, n, col, BN, STAGES)
        _load(v_desc, v_smem, v_bars, j - 1 + STAGES, n, col, BN, STAGES)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    last = n - 1
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    o = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    q_smem.store(o.to(o_desc.dtype))  # Q is no longer read: its buffer stages the output
    fence_async_shared()
    _tma_store(o_desc, [row, col], q_smem)
    tma.store_wait(0)


QK_SCALE = gl.constexpr(0.125 * LOG2E)  # the probe's scale, as SDPA is called with


@gluon.jit
def _consume(args, WG: gl.constexpr):
    """One consumer warpgroup of the warp-specialised kernel: 64 query rows (half WG of the
    tile) against every key tile, the loads left to the producer warp."""
    q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, row, col, n = args
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BN: gl.constexpr = k_smem.type.shape[1]
    D: gl.constexpr = k_smem.type.shape[2]
    BM: gl.constexpr = q_smem.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_buf = q_smem.index(WG)
    zero_s = gl.zeros([BM, BN], gl.float32, layout=s_layout)
    acc = gl.zeros([BM, D], gl.float32, layout=o_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, layout=gl.SliceLayout(1, s_layout))

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_buf, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False,
                      is_async=True)  # fmt: skip
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, QK_SCALE)
    for j in range(1, n):
        st = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
        s = warpgroup_mma(q_buf, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)  # fmt: skip
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))
        mbarrier.arrive(k_empty.index(st), count=1)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, QK_SCALE)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    last = n - 1
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    o = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    q_buf.store(o.to(o_desc.dtype))
    fence_async_shared()
    _tma_store(o_desc, [row + WG * BM, col], q_buf)
    tma.store_wait(0)


@gluon.jit
def _consume0(args):
    _consume(args, 0)


@gluon.jit
def _consume1(args):
    _consume(args, 1)


@gluon.jit
def _produce(args):
    """The producer warp: Q once, then each key and value tile as soon as both consumers have
    released its stage."""
    q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, row, col, n = args
    q_bar, k_ready, v_ready, k_empty, v_empty = bars
    STAGES: gl.constexpr = k_smem.type.shape[0]
    BN: gl.constexpr = k_smem.type.shape[1]
    BM: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [row, col], q_bar, q_smem.index(0))
    _tma_load(q_desc, [row + BM, col], q_bar, q_smem.index(1))
    for t in range(n):
        st = t % STAGES
        phase = (t // STAGES) & 1
        mbarrier.wait(k_empty.index(st), phase ^ 1)  # a fresh barrier passes parity 1
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        _tma_load(k_desc, [t * BN, col], k_ready.index(st), k_smem.index(st))
        mbarrier.wait(v_empty.index(st), phase ^ 1)
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        _tma_load(v_desc, [t * BN, col], v_ready.index(st), v_smem.index(st))


@gluon.jit
def _attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, T, BN: gl.constexpr, D: gl.constexpr,
                 STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):  # fmt: skip
    """FA3's shape: a producer warp and two consumer warpgroups of 64 rows each."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    row = gl.program_id(0) * 2 * BM
    col = gl.program_id(1) * D
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    k_ready, v_ready, k_empty, v_empty = ring_barriers(STAGES)
    bars = (q_bar, k_ready, v_ready, k_empty, v_empty)
    args = (q_desc, k_desc, v_desc, o_desc, q_smem, k_smem, v_smem, bars, row, col, T // BN)
    gl.warp_specialize(
        [(_consume0, (args,)), (_consume1, (args,)), (_produce, (args,))],
        [4, 1],
        [CONSUMER_REGS, 24],
    )


def descriptors(q, k, v, o, BM, BN):
    """[T, H*D] views of q, k, v, o with the block shapes the kernel loads."""
    return _descriptor(q, BM), _descriptor(k, BN), _descriptor(v, BN), _descriptor(o, BM)


# (BM, warps, BN, stages, split key/value rings)
VARIANTS = [
    *itertools.product([64], [4], [64], [2, 3, 4], [False, True]),
    *itertools.product([64], [4], [128], [2, 3], [True]),
    *itertools.product([128], [8], [64], [3, 4], [False, True]),
    *itertools.product([128], [8], [128], [2, 3], [False, True]),
]


# (BN, stages, consumer registers, maxnreg) of the warp-specialised kernel
WS_VARIANTS = [(128, 2, 240, 168), (64, 3, 240, 168), (64, 4, 240, 168), (128, 2, 232, 168)]


def run(q, k, v, o, BM, warps, BN, stages, split):
    T, H, D = q.shape
    grid = (T // BM, H)
    _attn_fwd[grid](
        *descriptors(q, k, v, o, BM, BN),
        T,
        0.125 * LOG2E,
        BM,
        BN,
        D,
        stages,
        split,
        num_warps=warps,
    )


def run_ws(q, k, v, o, BN, stages, regs, maxnreg):
    T, H, D = q.shape
    _attn_fwd_ws[(T // 128, H)](
        *descriptors(q, k, v, o, 64, BN), T, BN, D, stages, regs, num_warps=4, maxnreg=maxnreg
    )


def _compile(fn, descs, scalars, consts, options):
    """Compile a Gluon kernel for sm_90 without a GPU; a line on what came out."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {
        name: native_specialize_impl(BaseBackend, d, False, True, True)[0]
        for name, d in zip(["q_desc", "k_desc", "v_desc", "o_desc"], descs)
    }
    sig.update(scalars)
    sig.update({name: "constexpr" for name in consts})
    names = list(sig)
    src = GluonASTSource(fn, sig, {(names.index(k),): c for k, c in consts.items()})
    try:
        kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - report and go on
        return f"{type(e).__name__}: {str(e)[:600]}"
    ptx = kern.asm["ptx"]
    waits = sorted(set(ln.split()[1] for ln in ptx.splitlines() if "wgmma.wait_group" in ln))
    regs = sorted(set(ln.split()[1] for ln in ptx.splitlines() if "setmaxnreg" in ln))
    return f"ok, {kern.metadata.shared} B shared, wgmma.wait_group {waits}, setmaxnreg {regs}"


def compile_only(T=8192, H=64, D=128):
    """Compile every variant for sm_90 with no GPU present (shared-memory and layout errors show
    here, not on the device)."""
    x = torch.zeros(T, H, D, dtype=torch.bfloat16)
    for BM, warps, BN, stages, split in VARIANTS:
        consts = {"BM": BM, "BN": BN, "D": D, "STAGES": stages, "SPLIT": split, "num_warps": warps}
        res = _compile(_attn_fwd, descriptors(x, x, x, x, BM, BN), {"T": "i32", "qk_scale": "fp32"},
                       consts, {"num_warps": warps})  # fmt: skip
        print(f"BM{BM} BN{BN} w{warps} s{stages}{' split' * split}: {res}")
    for BN, stages, regs, maxnreg in WS_VARIANTS:
        consts = {"BN": BN, "D": D, "STAGES": stages, "CONSUMER_REGS": regs}
        res = _compile(_attn_fwd_ws, descriptors(x, x, x, x, 64, BN), {"T": "i32"}, consts,
                       {"num_warps": 4, "maxnreg": maxnreg})  # fmt: skip
        print(f"ws BN{BN} s{stages} r{regs}/{maxnreg}: {res}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="queries and keys")
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90, run nothing")
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    from tma_probe import probe_inputs, timed_row
    from tma_probe import run_variant as run_tl_dot

    T, H, D = args.seq, 64, 128
    q, k, v, sdpa = probe_inputs(T, H, D)
    ref = sdpa()[0].transpose(0, 1).float()
    flops = 4 * T * T * H * D
    rows = [("sdpa (cuDNN)", "", triton.testing.do_bench(sdpa, rep=200))]
    o = torch.empty_like(q)
    tl_dot = ("tma+ws", q, k, v, o, 128, 128, 4, 2)  # tma_probe.py's best
    rows.append(
        timed_row("tl.dot tma+ws", "BM128 BN128 w4 s2", lambda: run_tl_dot(*tl_dot), o, ref)
    )
    for variant in VARIANTS:
        BM, warps, BN, stages, split = variant
        cfg = f"BM{BM} BN{BN} w{warps} s{stages}{' split' * split}"
        rows.append(timed_row("gluon", cfg, lambda a=variant: run(q, k, v, o, *a), o, ref))
    for variant in WS_VARIANTS:
        BN, stages, regs, maxnreg = variant
        cfg = f"BM2x64 BN{BN} s{stages} regs {regs}/{maxnreg}"
        rows.append(timed_row("gluon ws", cfg, lambda a=variant: run_ws(q, k, v, o, *a), o, ref))
    base = rows[0][2]
    for kind, cfg, ms in rows:
        tf = flops / ms / 1e9
        print(f"{kind:14s} {cfg:44s} {ms:8.3f} ms {tf:6.0f} TFLOP/s {base / ms:5.2f}x cuDNN")


if __name__ == "__main__":
    main()
