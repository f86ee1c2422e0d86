"""The local branch alone (causal sliding-window attention, window W, self included) forward and
backward through every backend that can run it, beside dense cuDNN, all in one run: MLA's
Triton kernels (a local-only plan), cuDNN through cudnn-frontend (its diagonal band), torch's
built-in FlashAttention-2 (window_size_left), FlexAttention (a sliding-window block mask). Also
MLA's global-only and full NSA-sized plans, so the table says what each part of the window
kernels costs.

Each backend is first checked against a float32 masked reference at T=1024 (output and q, k, v
gradients). Times: the profiler's kernel time per fwd+bwd (the GPU's work, no host) and the
event-timed median of back-to-back calls.

    python bench/local_backends.py [--shapes 12/4/64 8/2/64 64/4/128] [--lengths 2048 8192 32768]
        [--window 512]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

try:
    from automla.kernels import AttentionConfig, mla_attention, mla_reference
except ImportError:  # not installed: import the folder directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import AttentionConfig, mla_attention, mla_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, budgets.py, tile_shapes.py
from budgets import budget_config  # noqa: E402
from tile_shapes import DTYPE, inputs, sdpa  # noqa: E402
from timing import device_ms, kernel_ms  # noqa: E402


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """Our [B, T, H, D] tensors as cuDNN's and FlexAttention's [B, H, T, D] (a view)."""
    return x.transpose(1, 2)


class CudnnWindow(torch.autograd.Function):
    """cuDNN's SDPA with a causal diagonal band of `window` keys, graphs built once per shape."""

    graphs: dict = {}

    @staticmethod
    def build(q, k, window):
        import cudnn

        key = (tuple(q.shape), tuple(k.shape), window)
        if key in CudnnWindow.graphs:
            return CudnnWindow.graphs[key]
        B, T, HQ, D = q.shape
        handle = cudnn.create_handle()
        scale = 1.0 / math.sqrt(D)

        def new_graph():
            return cudnn.pygraph(
                io_data_type=cudnn.data_type.BFLOAT16,
                intermediate_data_type=cudnn.data_type.FLOAT,
                compute_data_type=cudnn.data_type.FLOAT,
                handle=handle,
            )

        def output(t, like):
            t.set_output(True).set_dim(list(bhsd(like).shape)).set_stride(list(bhsd(like).stride()))

        band = dict(diagonal_band_left_bound=window, diagonal_band_right_bound=0)
        fwd = new_graph()
        tq, tk, tv = (fwd.tensor_like(bhsd(x)) for x in (q, k, k))
        o, stats = fwd.sdpa(
            name="local", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale, **band
        )
        output(o, q)
        stats.set_output(True).set_data_type(cudnn.data_type.FLOAT)

        bwd = new_graph()
        bq, bk, bv, bo, bdo = (bwd.tensor_like(bhsd(x)) for x in (q, k, k, q, q))
        bst = bwd.tensor_like(torch.empty(B, HQ, T, 1, dtype=torch.float32, device=q.device))
        dq, dk, dv = bwd.sdpa_backward(
            name="local_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bst, attn_scale=scale, **band
        )
        for t, like in ((dq, q), (dk, k), (dv, k)):
            output(t, like)
        for g in (fwd, bwd):
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
        size = max(fwd.get_workspace_size(), bwd.get_workspace_size())
        ws = torch.empty(size, dtype=torch.uint8, device=q.device)
        entry = (
            handle,
            fwd,
            (tq, tk, tv, o, stats),
            bwd,
            (bq, bk, bv, bo, bdo, bst, dq, dk, dv),
            ws,
        )
        CudnnWindow.graphs[key] = entry
        return entry

    @staticmethod
    def forward(ctx, q, k, v, window):
        import cudnn

        handle, fwd, (tq, tk, tv, to, tst), _, _, ws = CudnnWindow.build(q, k, window)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        B, T, HQ, D = q.shape
        o = torch.empty_like(q)
        stats = torch.empty(B, HQ, T, 1, dtype=torch.float32, device=q.device)
        pack = {tq: bhsd(q), tk: bhsd(k), tv: bhsd(v), to: bhsd(o), tst: stats}
        fwd.execute(pack, ws, handle=handle)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        import cudnn

        q, k, v, o, stats = ctx.saved_tensors
        handle, _, _, bwd, tensors, ws = CudnnWindow.build(q, k, ctx.window)
        bq, bk, bv, bo, bdo, bst, tdq, tdk, tdv = tensors
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        pack = {bq: q, bk: k, bv: v, bo: o, bdo: do.contiguous(), tdq: dq, tdk: dk, tdv: dv}
        bwd.execute({t: bhsd(x) for t, x in pack.items()} | {bst: stats}, ws, handle=handle)
        return dq, dk, dv, None


class FA2Window(torch.autograd.Function):
    """torch's built-in FlashAttention-2 with a left window (it takes fewer KV heads as is)."""

    @staticmethod
    def forward(ctx, q, k, v, window):
        T, D = q.shape[1], q.shape[3]
        res = torch.ops.aten._flash_attention_forward(
            q,
            k,
            v,
            None,
            None,
            T,
            T,
            0.0,
            True,
            False,
            scale=1.0 / math.sqrt(D),
            window_size_left=window - 1,
            window_size_right=0,
        )
        o, lse, seed, offset = res[0], res[1], res[2], res[3]
        ctx.save_for_backward(q, k, v, o, lse, seed, offset)
        ctx.window = window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed, offset = ctx.saved_tensors
        T, D = q.shape[1], q.shape[3]
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do.contiguous(),
            q,
            k,
            v,
            o,
            lse,
            None,
            None,
            T,
            T,
            0.0,
            True,
            seed,
            offset,
            scale=1.0 / math.sqrt(D),
            window_size_left=ctx.window - 1,
            window_size_right=0,
        )
        return dq, dk, dv, None


_FLEX: dict = {}


def flex_local(q, k, v, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T, HQ, D = q.shape
    key = (T, window)
    if key not in _FLEX:

        def band(b, h, qi, ki):
            return (ki <= qi) & (ki > qi - window)

        _FLEX[key] = (create_block_mask(band, None, None, T, T), torch.compile(flex_attention))
    mask, fn = _FLEX[key]
    return bhsd(fn(bhsd(q), bhsd(k), bhsd(v), block_mask=mask, enable_gqa=True))


def mla_plan(kind: str, T: int, window: int):
    if kind == "local":
        return AttentionConfig(budget=window, ratios=(1.0, 0.0, 0.0), block_size=64)
    if kind == "global":
        return AttentionConfig(budget=T // 64, ratios=(0.0, 1.0, 0.0), block_size=64)
    return budget_config(T, "nsa", 64)


def backends(window: int) -> dict:
    def mla(kind):
        def run(q, k, v, gate):
            return mla_attention(q, k, v, gate, mla_plan(kind, q.shape[1], window))

        return run

    return {
        "mla local": mla("local"),
        "cudnn local": lambda q, k, v, g: CudnnWindow.apply(q, k, v, window),
        "fa2 local": lambda q, k, v, g: FA2Window.apply(q, k, v, window),
        "flex local": lambda q, k, v, g: flex_local(q, k, v, window),
        "mla global": mla("global"),
        "mla nsa": mla("nsa"),
        "cudnn dense": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def check(name, fn, window, hq, hkv, d) -> str:
    """The largest relative error of a local backend's o, dq, dk, dv against MLA's float32
    reference on a local-only plan (gate 1: o is the local branch's output) at T 1024."""
    if not name.endswith("local"):
        return "-"
    q, k, v, _, do = inputs(1024, hq, hkv, d, seed=1)
    gate = torch.ones(*q.shape[:3], 3, device=q.device, dtype=DTYPE)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = mla_reference(qr, kr, vr, gate.float(), mla_plan("local", 1024, window))
    ref.backward(do.float())
    out = fn(q, k, v, gate)
    out.backward(do)
    errs = []
    for a, b in ((out, ref), (q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        a = a.float()
        if not torch.isfinite(a).all():
            return "NaN"
        errs.append(((a - b).norm() / b.norm()).item())
    return f"{max(errs):.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["12/4/64", "8/2/64", "64/4/128"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        hq, hkv, d = (int(x) for x in shape.split("/"))
        for name, fn in backends(args.window).items():
            try:
                err = check(name, fn, args.window, hq, hkv, d)
            except Exception as e:  # a backend that cannot run this shape says why, once
                print(f"{shape} {name}: {type(e).__name__}: {str(e)[:300]}")
                continue
            for T in args.lengths:
                q, k, v, gate, do = inputs(T, hq, hkv, d)

                def fwd_bwd(fn=fn, q=q, k=k, v=v, gate=gate, do=do):
                    fn(q, k, v, gate).backward(do)
                    q.grad = k.grad = v.grad = None

                try:
                    kern = sum(kernel_ms(fwd_bwd, runs=5).values())
                    ev = device_ms(fwd_bwd, repeats=20)
                except Exception as e:
                    print(f"{shape} {T} {name}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append((shape, T, name, err, kern, ev))
                print(
                    f"{shape} {T:>6} {name:<12} err {err:>7}  kernels {kern:8.3f} ms  events {ev:8.3f} ms",
                    flush=True,
                )
    print("\n| heads | T | backend | rel. err (T 1024) | kernels ms fwd+bwd | events ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, T, name, err, kern, ev in rows:
        print(f"| {shape} | {T} | {name} | {err} | {kern:.3f} | {ev:.3f} |")


if __name__ == "__main__":
    main()
