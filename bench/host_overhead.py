"""Host (Python and launch) time of one MLA op fwd+bwd against the device time of its kernels.

    python bench/host_overhead.py                # CUDA: the 125M model's layer, T = 8192
    python bench/host_overhead.py --profile 25   # and the 25 costliest Python functions

A layer of the 125M model at 8k runs ~25 kernels of a few microseconds to a millisecond; when
the host needs longer to issue them than the GPU to run them, the step waits on Python, and
savings in the kernels (head pruning) do not show in the step time. Host time is measured by
issuing `--calls` calls without waiting for the GPU (few enough not to fill the launch queue).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from timing import kernel_ms

from automla.kernels import AttentionConfig, mla_attention
from automla.trainers.graphs import GraphedOp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, nargs=3, default=[12, 4, 64], metavar=("Q", "KV", "D"))
    ap.add_argument("--budget", type=int, default=1536)
    ap.add_argument("--ratios", type=float, nargs=3, default=[1 / 3, 1 / 6, 1 / 2])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, help="print the N costliest functions")
    args = ap.parse_args()
    dev = torch.device("cuda")
    HQ, HKV, D = args.heads
    T = args.seq
    cfg = AttentionConfig(budget=args.budget, ratios=tuple(args.ratios), block_size=args.block_size)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        x = torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g)
        return x.requires_grad_()

    q, k, v = rand(1, T, HQ, D), rand(1, T, HKV, D), rand(1, T, HKV, D)
    gate = torch.rand(1, T, HQ, 3, device=dev, dtype=torch.bfloat16, generator=g)
    gate.requires_grad_()
    do = torch.randn(1, T, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    masks = {"unpruned": None, "one group off": torch.arange(HQ) < HQ - HQ // HKV}
    variants = [(f"{name}, eager", mask, None) for name, mask in masks.items()]
    variants += [(f"{name}, CUDA graphs", mask, GraphedOp()) for name, mask in masks.items()]

    for name, mask, graphed in variants:

        def call(mask=mask, graphed=graphed):
            if graphed is None:
                o = mla_attention(q, k, v, gate, cfg, head_mask=mask)
            else:
                o = graphed(q, k, v, gate, cfg, T, mask)
            o.backward(do)

        kernels = kernel_ms(call, runs=3)
        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            host.append((time.perf_counter() - t0) * 1e3 / args.calls)
            torch.cuda.synchronize()
        host_ms = statistics.median(host)
        dev_ms = sum(kernels.values())
        print(
            f"{name}: host {host_ms:.2f} ms per fwd+bwd, kernels {dev_ms:.2f} ms "
            f"({len(kernels)} kinds); host/kernels {host_ms / dev_ms:.2f}",
            flush=True,
        )
        if args.profile and graphed is None:
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                call()
            prof.disable()
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
            text = out.getvalue()
            print(text[text.index("ncalls") :], flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/host_overhead.py needs a CUDA GPU")
    main()
