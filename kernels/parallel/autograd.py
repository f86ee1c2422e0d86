"""The launch sequence of the forward and backward, the autograd Function, and the public
`mla_triton` with its input checks.
"""

from __future__ import annotations

import torch
import triton

from ..common import check_inputs
from ..config import AttentionConfig, Plan
from . import local_dkv_gluon, sparse, sparse_tile, window_gluon
from .common import _interpret
from .launch import compiling_ahead, launch, tiles_of
from .layout import _Layout, _options
from .selection import _pool
from .window import (
    _global_bwd_dkv_kernel,
    _local_bwd_dkv_kernel,
    _spread_kernel,
    _window_bwd_dq_kernel,
    _window_fwd_kernel,
)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# programs the local dk/dv launch aims for (key tiles x groups x splits); 1 splits nothing
LOCAL_DKV_PROGRAMS = 512
# programs with work that the global dk/dv launch aims for ((tile, chunk) pairs x groups)
GLOBAL_DKV_PROGRAMS = 512
# on CUDA, the sparse branch's selection (forward) and its inversion, dq and dk/dv (backward)
# run on a second stream beside the window branches' kernels: at short T neither chain of
# launches fills the GPU alone
OVERLAP = True
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# From this many compressed keys (T = 4k at stride 64), where the global stride is the block
# size, the tile selection reads the global branch's lse after the window forward rather than
# running both of its passes beside it. With the one-pass score's blocks outside its row
# chunks that pays from 4k (12/4/64: op -0.3 to -1.1% at 4k, -0.4% at 8k, two runs); at 256
# before, when the second stream's overlap was worth more (bench/NOTES.md, eighteenth session).
SELECT_AFTER_NC = 64
# Masks on the window band's edge tiles only (the window forward and dq): the interior tiles,
# which every row of a query tile sees whole, skip the mask's compares and selects. None takes
# it where it was measured to pay (`_edge_masks`); True or False forces it either way.
EDGE_MASKS: bool | None = None
# The same for the local dk/dv, per (head, query tile) item of its loop: a run-time branch,
# not a split loop (its loads are not pipelined: they sit under the active-head test). None
# takes it where it was measured to pay (`_local_dkv_edge`); True or False forces it.
LOCAL_DKV_EDGE: bool | None = None


def _edge_masks(lay: _Layout) -> bool:
    """Whether the window kernels mask only their bands' edge tiles. Measured on an H100
    (bench/RESULTS.md, twenty-sixth session): both kernels -4 to -6% at head dim 64 with a
    window of 512 from T = 4k (the op -1 to -1.7%); slower at head dim 128 (the dq spills), with
    a window of 256 (a band of five key tiles cut into three pipelined loops) and at T = 2k."""
    if EDGE_MASKS is not None:
        return bool(EDGE_MASKS)
    return lay.D <= 64 and lay.plan.window >= 512 and lay.T >= 4096


def _local_dkv_edge(lay: _Layout) -> bool:
    """Whether the local dk/dv skips the band's mask on the items that see their key tile
    whole. Measured on an H100 (bench/RESULTS.md, twenty-seventh session): at head dim 128 the
    op -1.2 and -1.8% at 8k (two runs), -1.8% at 32k, -2.6% at 2k; at head dim 64 within +-1%
    either way (the kernel -1 to -2% at 8k, +1.6% once at 32k), so it stays off there."""
    if LOCAL_DKV_EDGE is not None:
        return bool(LOCAL_DKV_EDGE)
    return lay.D >= 128


def _fork(q: torch.Tensor, lay: _Layout) -> torch.cuda.Stream | None:
    """A side stream that has waited for this stream's work so far, where the sparse branch can
    overlap the window branches; else None. Whatever runs on it is joined (`_join`) before the
    op returns, so every tensor either stream touches outlives the other's use of it."""
    if not (OVERLAP and q.is_cuda and lay.has_sparse and lay.has_window):
        return None
    side = _SIDE_STREAMS.get(q.device)
    if side is None:
        side = _SIDE_STREAMS[q.device] = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    return side


def _join(side: torch.cuda.Stream | None) -> None:
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


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

    def lse_buffer(present: bool) -> torch.Tensor:
        return torch.empty(B, T, HQ, dtype=torch.float32, device=dev) if present else o

    lse_l, lse_g, lse_s = map(lse_buffer, (lay.has_local, lay.has_global, lay.has_sparse))
    # Only the local branch keeps its output (for its softmax delta): the global branch's
    # backward sums its delta and dgate in its dq loop, and the sparse one takes its delta from
    # <do, o> less the window branches' and its dgate from its dq loop.
    keep = store and lay.has_local
    o_l = torch.empty(B, T, HQ, D, dtype=q.dtype, device=dev) if keep else lse_l
    kc = vc = k
    km = None
    # with stride == block_size the selection's float32 block means come from the global
    # branch's pooling pass, and its softmax is the scores' own
    shared = lay.has_global and lay.has_sparse and lay.plan.stride == lay.plan.block_size
    branch = sparse_tile if lay.plan.select_tile > 1 else sparse
    gluon = lay.has_window and window_gluon.available(q, lay.NC)
    # past SELECT_AFTER_NC compressed keys, tile-shared selection then takes the global
    # branch's lse as its normaliser, so it runs after the window forward: one pass over the
    # blocks instead of two beside it on another stream. So too wherever the Gluon window
    # forward runs: its persistent programs hold every SM, so nothing would run beside it
    # (64/4/128 4k: op -2.3%, 8k -1.1%, seventeenth session)
    after = shared and branch is sparse_tile and (lay.NC >= SELECT_AFTER_NC or gluon)
    # The selection's block means come before the fork: the global branch's pooling where it
    # gives them, else a pooling of their own, the global one after the fork. The selection
    # then holds SMs before the global pooling and the window forward fill the GPU, instead of
    # waiting behind them (12/4/64 2k: -5%, bench/NOTES.md, seventeenth session).
    if shared:
        kc, vc, km = _pool(k, v, lay.plan.stride, lay.NC, q.dtype, km=True)
    elif lay.has_sparse:
        km = _pool(k, None, lay.plan.block_size, lay.NB, None, km=True)[2]
    idx = lse_l
    side = None if after else _fork(q, lay)
    if side is not None:  # the selection beside the window kernel
        with torch.cuda.stream(side):
            idx = branch.select(q, k, lay, km)
    if lay.has_global and not shared:
        kc, vc, _ = _pool(k, v, lay.plan.stride, lay.NC, q.dtype, km=False)
    if lay.has_window:
        # what either window forward takes (the Gluon one: Hopper, head dim 128, long prefixes)
        outs = dict(gate=gate, o=o, o_l=o_l, lse_l=lse_l, lse_g=lse_g, T=T, NC=lay.NC,
                    window=lay.plan.window, stride=lay.stride)  # fmt: skip
        if gluon:
            window_gluon.window_forward(q, k, v, kc, vc, lay, store, **outs)
        else:
            _launch_window(_window_fwd_kernel, "window_fwd", lay, q, k, v, kc, vc, **outs,
                           STORE=store, EDGE=_edge_masks(lay))  # fmt: skip
    _join(side)
    if lay.has_sparse:
        if after:
            idx = branch.select(q, k, lay, km, lse_g=lse_g)
        elif side is None:
            idx = branch.select(q, k, lay, km)
        branch.forward(q, k, v, gate, idx, lay, o, lse_s)
    # o too, for the sparse backward: no memory where the caller keeps it for its own backward
    # (the model's output projection saves it)
    saved = {"o": o, "o_l": o_l, "lse_l": lse_l, "lse_g": lse_g}
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
    # float32: the branches add into them atomically; one buffer, zeroed once, one cast. Behind
    # dk/dv, the global branch's gradient of the compressed keys (dkc/dvc), spread back later.
    # The window dq kernel zeroes it where there is one (every adder runs after it).
    n_kv, n_c = 2 * B * T * HKV * D, 2 * B * lay.NC * HKV * D
    zeroed = lay.any and lay.has_window and n_kv + n_c < 2**31  # its offsets are int32
    buffer = (torch.empty if zeroed else torch.zeros)(n_kv + n_c, dtype=torch.float32, device=dev)
    dkv = buffer[:n_kv].view(2, B, T, HKV, D)
    dk, dv = dkv
    dkvc = buffer[n_kv:].view(2, B, lay.NC, HKV, D)
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
    window = (do, q, k, v, gate, lay, saved)
    dkv_args = (delta_l, delta_g, dk, dv, dkvc)
    dq_args = (dgate, delta_l, delta_g, dq, buffer if zeroed else buffer[:0])
    if lay.has_sparse:
        branch = sparse_tile if lay.plan.select_tile > 1 else sparse
        # the sparse dq reads the window branches' deltas: the window dq runs before it below
        deltas = (delta_l, delta_g, delta_s)
        args = (q, k, v, gate, do, saved["idx"], lay, saved, dgate, deltas, dq, dk, dv)
    side = _fork(q, lay)
    if side is None:
        _window_dq(*window, *dq_args)
        _window_dkv(*window, *dkv_args)
        if lay.has_sparse:
            branch.backward(*args)
    else:
        main = torch.cuda.current_stream(dev)

        def window_dq() -> None:  # called from the side stream's turn, launched on main
            with torch.cuda.stream(main):
                _window_dq(*window, *dq_args)
            side.wait_stream(main)  # the sparse dq adds to the window branches' dq

        # side: the inversion, then (once the window dq is written) the sparse dq and dk/dv;
        # main meanwhile: the window dq, then the window branches' dk/dv
        with torch.cuda.stream(side):
            branch.backward(*args, ready=window_dq)
        _window_dkv(*window, *dkv_args)
        _join(side)
    dkv = dkv.to(k.dtype)
    return dq, dkv[0], dkv[1], dgate


def _window_dq(do, q, k, v, gate, lay: _Layout, saved, dgate, delta_l, delta_g, dq, zero) -> None:
    """The window branches' dq (written), their dgate columns and softmax deltas; `zero`, the
    float32 buffer that the branches' dk/dv add into (or an empty slice of it), is zeroed on
    the way."""
    if lay.has_window:
        _launch_window(
            _window_bwd_dq_kernel, "window_dq", lay, q, k, v, saved["kc"], saved["vc"],
            gate=gate, do=do, o_l=saved["o_l"], lse_l=saved["lse_l"], lse_g=saved["lse_g"],
            dgate=dgate, delta_l=delta_l, delta_g=delta_g, dq=dq, zero=zero, NZ=zero.numel(),
            T=lay.T, NC=lay.NC, window=lay.plan.window, stride=lay.stride, scale=lay.scale,
            ZB=1024, EDGE=_edge_masks(lay),
        )  # fmt: skip


def _launch_window(kernel, name: str, lay: _Layout, q, k, v, kc, vc, **args) -> None:
    """A window kernel (`name`'s tiles) over query tiles x packs of heads, with what every one
    of them takes: q, the key and value tiles (local and compressed), the packs, the branches."""
    t = lay.tiles(name)
    packs = lay.packs(t["HP"])
    launch(
        kernel,
        (triton.cdiv(lay.T, t["BT"]), lay.B * packs.shape[0]),
        q=q,
        **tiles_of(t["BK"], t["TMA"], k=k, v=v),
        **tiles_of(t["BC"], t["TMA"], kc=kc, vc=vc),
        **args,
        packs=packs,
        NP=packs.shape[0],
        **lay.args,
        BT=t["BT"],
        BK=t["BK"],
        BC=t["BC"],
        HP=t["HP"],
        HAS_LOCAL=lay.has_local,
        HAS_GLOBAL=lay.has_global,
        TMA=t["TMA"],
        **_options(t),
    )


def _window_dkv(do, q, k, v, gate, lay: _Layout, saved, delta_l, delta_g, dk, dv, dkvc) -> None:
    """The local and global branches' dk/dv, added to the float32 dk, dv. dkvc: the zeroed
    float32 [2, B, NC, HKV, D] that the global branch's compressed-key gradient is summed in."""
    B, T, HKV, D = lay.B, lay.T, lay.HKV, lay.D
    dkc, dvc = dkvc
    # both kernels read the queries' side (q, do, the gate) and the compressed-key buffers
    shared = dict(
        q=q, gate=gate, active=lay.active, groups=lay.groups, do=do, dkc=dkc, dvc=dvc, T=T,
        NC=lay.NC, NA=lay.NA, stride=lay.stride, **lay.args, scale=lay.scale,
    )  # fmt: skip
    if lay.has_global:
        t = lay.tiles("global_dkv")
        BT, BC, stride = t["BT"], t["BC"], lay.stride
        n_tiles = triton.cdiv(lay.NC, BC)
        # query rows that each tile's programs read, summed over the tiles (from the first
        # query tile that sees the tile): cut in chunks so that the launch fills the GPU
        rows = sum(max(0, T - ((c * BC + 1) * stride - 1) // BT * BT) for c in range(n_tiles))
        chunk = triton.cdiv(rows * B * lay.NA, GLOBAL_DKV_PROGRAMS)
        chunk = min(triton.cdiv(T, BT), max(1, triton.cdiv(chunk, BT))) * BT
        launch(
            _global_bwd_dkv_kernel, (n_tiles, B * lay.NA, triton.cdiv(T, chunk)),
            **{**shared, **tiles_of(BT, t["TMA"], q=q, do=do)}, kc=saved["kc"], vc=saved["vc"],
            lse_g=saved["lse_g"], delta_g=delta_g, chunk=chunk, BT=BT, BC=BC, TMA=t["TMA"],
            **_options(t),
        )  # fmt: skip
    if lay.has_local:
        gluon = local_dkv_gluon.available(q)
        t = lay.tiles("local_dkv")
        BK, BT = (
            (local_dkv_gluon.BK, local_dkv_gluon.query_rows(D)) if gluon else (t["BK"], t["BT"])
        )
        n_tiles = triton.cdiv(T, BK)
        # each key tile's (head, query tile) items split over programs until the launch has
        # about LOCAL_DKV_PROGRAMS of them: at short T there are too few key tiles alone
        items = lay.G * triton.cdiv(min(lay.plan.window + BK, T) + BT, BT)
        nsplit = max(1, min(items, LOCAL_DKV_PROGRAMS // (n_tiles * B * lay.NA)))
        if gluon:
            local_dkv_gluon.local_dkv(
                q, k, v, gate, do, lay, saved["lse_l"], delta_l, dk, dv, dkvc, n_tiles, nsplit
            )
        else:
            # SPREAD: the global branch's key gradient goes back over the pooled keys here,
            # not in a launch of its own
            launch(
                _local_bwd_dkv_kernel, (n_tiles, B * lay.NA, nsplit), **shared,
                k=k, v=v, lse_l=saved["lse_l"], delta_l=delta_l, dk=dk, dv=dv,
                NSPLIT=nsplit, window=lay.plan.window, BT=BT, BK=BK,
                SPREAD=lay.has_global, EDGE=_local_dkv_edge(lay), **_options(t),
            )  # fmt: skip
    elif lay.has_global:
        BK = min(64, triton.next_power_of_2(lay.stride))
        launch(
            _spread_kernel, (lay.NC, B * lay.NA),
            dkc=dkc, dvc=dvc, groups=lay.groups, dk=dk, dv=dv, T=T, NC=lay.NC, NA=lay.NA,
            stride=lay.stride, HKV=HKV, D=D, BK=BK,
        )  # fmt: skip


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
    plan: Plan | None = None,
) -> torch.Tensor:
    """Multi-Level Attention on Triton kernels; the contract of `mla_reference`.

    Args:
        q: [B, T, HQ, D] queries, bfloat16 / float16 (float32 too, for the interpreter).
        k, v: [B, T, HKV, D] in q's dtype; HKV divides HQ.
        gate: [B, T, HQ, 3] branch weights (local, global, sparse), any float dtype.
        config: the layer's budget, ratios and block size.
        t_max: the longest sequence the layer is built for (fixes the global stride).
        head_mask: [HQ] bool, the active query heads; pruned heads are not computed.
        plan: `config.plan(t_max or T)` when the caller has derived it already (as
            `mla_attention` does, once per call); derived here otherwise.

    Returns:
        [B, T, HQ, D] in q's dtype; differentiable in q, k, v and gate.

    Raises:
        ValueError: inputs the kernels cannot take (device, dtype, shape, head dim).
    """
    plan, head_mask = _checked(q, k, v, gate, config, t_max, head_mask, plan)
    return MLATritonFunction.apply(q, k, v, gate.to(q.dtype), plan, head_mask)


def compile_ahead(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    config: AttentionConfig,
    *,
    t_max: int | None = None,
    head_mask: torch.Tensor | None = None,
    threads: int = 4,
) -> None:
    """Compile, `threads` at a time, every kernel that `mla_triton` launches for inputs of this
    kind (shapes, dtype, device, plan, head mask; their values are never read): the forward
    that keeps what the backward needs, the backward, and the forward without gradients. No
    kernel runs. Afterwards the op's first calls find their kernels compiled instead of
    compiling them one by one (`launch.py`); the same threads then load them on q's device.
    Needs CUDA tensors and a Triton with AsyncCompileMode (`launch.async_compile_available`).
    The launches are made here, not through autograd: on CUDA its engine runs the backward in a
    thread of its own, outside this thread's `compiling_ahead`."""
    plan, head_mask = _checked(q, k, v, gate, config, t_max, head_mask, None)
    q, k, v = (x.contiguous() for x in (q, k, v))
    gate = gate.to(q.dtype).contiguous()  # as MLATritonFunction receives them
    lay = _Layout(q, k, plan, head_mask)
    with torch.no_grad(), compiling_ahead(threads, q.device):
        o, saved = mla_fwd(q, k, v, gate, lay, store=True)
        mla_bwd(o, q, k, v, gate, lay, saved)
        mla_fwd(q, k, v, gate, lay, store=False)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> str | None:
    """Why the kernels cannot take inputs of this kind under this plan (None: they can).
    Shared by the checks of `mla_triton` and by the "auto" backend, which falls back to torch
    instead."""
    B, T, HQ, D = q.shape
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (
            f"q, k, v must all be bfloat16, float16 or float32; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if HQ // k.shape[2] > 64:
        return f"the kernels take at most 64 query heads per KV head, got {HQ // k.shape[2]}"
    if D not in (16, 32, 64, 128):
        return f"the kernels take head dims 16, 32, 64 or 128, got {D}"
    sparse = plan.has_sparse
    # offsets inside one batch row are 32-bit; the block scores have a row per token, or per
    # selection tile with tile-shared selection
    rows = -(-T // plan.select_tile)
    if T * HQ * D >= 2**31 or (sparse and rows * k.shape[2] * (T // plan.block_size) >= 2**31):
        return f"sequence too long for the kernels' 32-bit offsets: T={T}, HQ={HQ}, D={D}"
    if sparse and plan.block_size > 128:
        return f"the sparse kernels take block_size <= 128, got {plan.block_size}"
    return None


def _checked(q, k, v, gate, config, t_max, head_mask, plan) -> tuple[Plan, torch.Tensor | None]:
    """The checks of `mla_triton` (ValueError); returns the plan and the head mask as the
    kernels take it: on the host (`_Layout` reads it there), None when every head is active."""
    _check(q, k, v, gate, t_max, head_mask)
    if plan is None:
        plan = config.plan(t_max or q.shape[1])
    reason = unsupported(q, k, v, plan)
    if reason is not None:
        raise ValueError(reason)
    if head_mask is not None:
        head_mask = head_mask.cpu()
        if bool(head_mask.all()):
            head_mask = None
    return plan, head_mask


def _check(q, k, v, gate, t_max, head_mask) -> None:
    """The checks of `mla_triton` that need no plan (`unsupported` follows them)."""
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
    if head_mask is not None and head_mask.device not in (q.device, torch.device("cpu")):
        raise ValueError(f"head_mask must be on {q.device} or the CPU, got {head_mask.device}")
