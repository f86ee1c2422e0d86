"""Does this Triton gain from TMA descriptors and warp specialisation on Hopper? A minimal
attention forward without a mask (T queries against T keys, 64 heads of 128, bf16), written three
ways: pointer loads, TMA descriptor loads (`tl.make_tensor_descriptor`), and TMA with
`warp_specialize` on the key loop; each over tile sizes, warps and stages, checked against SDPA
(relative error < 1e-2) and timed beside it. A question for the window kernels (bench/NOTES.md):
whether the FA3 shape is within Triton's reach before rewriting them.

    python bench/tma_probe.py [--seq 8192]
"""

import argparse
import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(b_q, b_k, b_v, m, den, acc):
    # one key tile of the running softmax; scores scaled by 0.125 in both kernels and in SDPA
    sc = tl.dot(b_q, tl.trans(b_k)) * 0.125
    mn = tl.maximum(m, tl.max(sc, 1))
    p = tl.exp(sc - mn[:, None])
    a = tl.exp(m - mn)
    return mn, den * a + tl.sum(p, 1), acc * a[:, None] + tl.dot(p.to(b_v.dtype), b_v)


@triton.jit
def _fwd_ptr(
    q,
    k,
    v,
    o,
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    STAGES: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + (o_m * H + i_h)[:, None] * D + o_d[None, :])
    m = tl.full([BM], float("-inf"), tl.float32)
    den = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in tl.range(0, T, BN, num_stages=STAGES):
        o_n = s + tl.arange(0, BN)
        b_k = tl.load(k + (o_n * H + i_h)[:, None] * D + o_d[None, :])
        b_v = tl.load(v + (o_n * H + i_h)[:, None] * D + o_d[None, :])
        m, den, acc = _online_softmax_step(b_q, b_k, b_v, m, den, acc)
    tl.store(
        o + (o_m * H + i_h)[:, None] * D + o_d[None, :], (acc / den[:, None]).to(o.dtype.element_ty)
    )


@triton.jit
def _fwd_tma(
    q,
    k,
    v,
    o,
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    STAGES: tl.constexpr,
    WS: tl.constexpr,
):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    dq = tl.make_tensor_descriptor(q, shape=[T, H * D], strides=[H * D, 1], block_shape=[BM, D])
    dk = tl.make_tensor_descriptor(k, shape=[T, H * D], strides=[H * D, 1], block_shape=[BN, D])
    dv = tl.make_tensor_descriptor(v, shape=[T, H * D], strides=[H * D, 1], block_shape=[BN, D])
    do = tl.make_tensor_descriptor(o, shape=[T, H * D], strides=[H * D, 1], block_shape=[BM, D])
    b_q = dq.load([i_m * BM, i_h * D])
    m = tl.full([BM], float("-inf"), tl.float32)
    den = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for s in tl.range(0, T, BN, num_stages=STAGES, warp_specialize=WS):
        b_k = dk.load([s, i_h * D])
        b_v = dv.load([s, i_h * D])
        m, den, acc = _online_softmax_step(b_q, b_k, b_v, m, den, acc)
    do.store([i_m * BM, i_h * D], (acc / den[:, None]).to(o.dtype.element_ty))


def run_variant(kind, q, k, v, o, BM, BN, warps, stages):
    T, H, D = q.shape
    grid = (T // BM, H)
    if kind == "ptr":
        _fwd_ptr[grid](q, k, v, o, T, H, D, BM, BN, stages, num_warps=warps)
    else:
        ws = kind == "tma+ws"
        _fwd_tma[grid](q, k, v, o, T, H, D, BM, BN, stages, ws, num_warps=warps)


def probe_inputs(T: int, H: int = 64, D: int = 128):
    """q, k, v [T, H, D] in bf16 on the GPU (seeded), and SDPA on them (cuDNN, scale 0.125),
    the peer every probe variant is timed against and checked with."""
    triton.set_allocator(
        lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda")
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )

    def sdpa():
        heads = (x.transpose(0, 1)[None] for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(*heads, scale=0.125)

    return q, k, v, sdpa


def timed_row(kind: str, cfg: str, run, o: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(kind, cfg, ms) of one variant: run() writes o (poisoned first), checked against ref
    (relative error < 1e-2), then timed; a variant that fails or is wrong gets NaN ms and
    says why in cfg."""
    o.fill_(float("nan"))
    try:
        run()
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - out of shared memory, say: in the table
        return kind, f"{cfg} {type(e).__name__}: {str(e)[:80]}", float("nan")
    err = ((o.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:  # NaN fails too
        return kind, f"{cfg} wrong (error {err:.2g})", float("nan")
    return kind, cfg, triton.testing.do_bench(run, rep=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="queries and keys")
    T, H, D = ap.parse_args().seq, 64, 128
    q, k, v, sdpa = probe_inputs(T, H, D)
    ref = sdpa()[0].transpose(0, 1).float()
    flops = 4 * T * T * H * D
    rows = [("sdpa", "", triton.testing.do_bench(sdpa, rep=200))]
    o = torch.empty_like(q)
    for kind, BM, BN, warps, stages in itertools.product(
        ["ptr", "tma", "tma+ws"], [64, 128], [64, 128], [4, 8], [2, 3]
    ):
        cfg = f"BM{BM} BN{BN} w{warps} s{stages}"
        args = (kind, q, k, v, o, BM, BN, warps, stages)
        rows.append(timed_row(kind, cfg, lambda a=args: run_variant(*a), o, ref))
    best = {}
    for kind, cfg, ms in rows:
        print(f"{kind:7s} {cfg:40s} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s")
        if ms == ms and (kind not in best or ms < best[kind][1]):
            best[kind] = (cfg, ms)
    print("best:", {k: (c, round(m, 3), round(flops / m / 1e9)) for k, (c, m) in best.items()})


if __name__ == "__main__":
    main()
