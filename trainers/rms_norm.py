"""RMSNorm in Triton, its output in autocast's dtype.

As F.rms_norm in float32 (llama's casting: the inverse RMS and the product in float32), but the
output is written once in the dtype that every consumer of a norm in this model casts it to
anyway (the next linear under autocast): the float32 output and its cast, and in the backward
the cast's float32 gradient, are never made. The backward takes blocks of rows per step and
sums the weight's gradient per program (a partial row each, added up after): one row a step
left liger's kernel at a third of the memory's rate on the 125M model (bench/NOTES.md,
twenty-first session)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fast_ops import compute_dtype

ELEMENTS = 8192
"""Elements a program's step reads: BM rows of the row width padded to a power of two."""


@triton.jit
def _rms_norm_fwd_kernel(x, w, y, rstd, M, N, eps, BM: tl.constexpr, BN: tl.constexpr):
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m = (o_m < M)[:, None] & (o_n < N)[None, :]
    o_x = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    b_x = tl.load(x + o_x, mask=m, other=0.0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / N + eps)
    tl.store(rstd + o_m, b_r, mask=o_m < M)
    b_w = tl.load(w + o_n, mask=o_n < N, other=0.0).to(tl.float32)
    tl.store(y + o_x, (b_x * b_r[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(
    dy, x, w, rstd, dx, dw_part, M, N, rows, BM: tl.constexpr, BN: tl.constexpr
):  # fmt: skip
    # The program's `rows` rows, BM a step: dx, and its share of dw in dw_part[program].
    i_p = tl.program_id(0)
    o_n = tl.arange(0, BN)
    m_n = o_n < N
    b_w = tl.load(w + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BN], dtype=tl.float32)
    end = tl.minimum((i_p + 1) * rows, M)
    for i_m in range(i_p * rows, end, BM):
        o_m = i_m + tl.arange(0, BM)
        m = (o_m < end)[:, None] & m_n[None, :]
        o_x = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
        b_x = tl.load(x + o_x, mask=m, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_x, mask=m, other=0.0).to(tl.float32)
        b_r = tl.load(rstd + o_m, mask=o_m < end, other=0.0)
        b_xh = b_x * b_r[:, None]
        b_g = b_dy * b_w[None, :]
        b_c = tl.sum(b_g * b_xh, 1) / N
        tl.store(
            dx + o_x, (b_r[:, None] * (b_g - b_xh * b_c[:, None])).to(dx.dtype.element_ty), mask=m
        )
        b_dw += tl.sum(b_dy * b_xh, 0)
    tl.store(dw_part + i_p * N + o_n, b_dw, mask=m_n)


def _tiles(N: int) -> tuple[int, int]:
    BN = triton.next_power_of_2(N)
    return max(1, ELEMENTS // BN), BN


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs of the backward: a few per SM (8 under the interpreter)."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, dtype: torch.dtype):
        N = x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()
        M = x2.shape[0]
        y = torch.empty(M, N, dtype=dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BM, BN = _tiles(N)
        _rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
            x2, weight, y, rstd, M, N, eps, BM=BM, BN=BN, num_warps=8
        )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        BM, BN = _tiles(N)
        n = max(1, min(triton.cdiv(M, BM), _programs(x2.device)))
        rows = triton.cdiv(triton.cdiv(M, n), BM) * BM
        n = triton.cdiv(M, rows)
        dx = torch.empty_like(x2)
        dw_part = torch.empty(n, N, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd_kernel[(n,)](
            dy.reshape(M, N).contiguous(), x2, weight, rstd, dx, dw_part, M, N, rows,
            BM=BM, BN=BN, num_warps=8,
        )  # fmt: skip
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (N,), weight, eps) over x's last dim N, in float32 inside; the output in
    autocast's dtype where autocast is on (what the next linear would cast it to), else x's."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _RMSNorm.apply(x, weight, eps, dtype)
