"""RMSNorm in Triton, its output in autocast's dtype; optionally with the residual add before it.

As F.rms_norm in float32 (llama's casting: the inverse RMS and the product in float32), but the
output is written once in the dtype that every consumer of a norm in this model casts it to
anyway (the next linear under autocast): the float32 output and its cast, and in the backward
the cast's float32 gradient, are never made. The backward takes blocks of rows per step and
sums the weight's gradient per program (a partial row each, added up after): one row a step
left liger's kernel at a third of the memory's rate on the 125M model (bench/NOTES.md,
twenty-first session).

`add_rms_norm` is h = x + r (the residual stream plus a branch's output) and its norm in one
kernel each way. Apart, the add wrote h and the norm read it again; in the backward the norm
wrote its float32 gradient, a kernel added the residual's gradient to it and another cast the
sum for the branch: here one kernel reads h, the two gradients and writes the sum in each
dtype. Per add at the 125M model's width that is 16 bytes an element less, of 44.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .fast_ops import compute_dtype

ELEMENTS = 8192
"""Elements a program's step reads: BM rows of the row width padded to a power of two."""


@triton.jit
def _rms_norm_fwd_kernel(
    x, r, h, w, y, rstd, M, N, eps, ADD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):  # fmt: skip
    # y = x / rms(x) * w; with ADD, h = x + r rounded to h's dtype (as torch's add) and y its norm
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m = (o_m < M)[:, None] & (o_n < N)[None, :]
    o_x = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    b_x = tl.load(x + o_x, mask=m, other=0.0).to(tl.float32)
    if ADD:
        b_h = (b_x + tl.load(r + o_x, mask=m, other=0.0).to(tl.float32)).to(h.dtype.element_ty)
        tl.store(h + o_x, b_h, mask=m)
        b_x = b_h.to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, 1) / N + eps)
    tl.store(rstd + o_m, b_r, mask=o_m < M)
    b_w = tl.load(w + o_n, mask=o_n < N, other=0.0).to(tl.float32)
    tl.store(y + o_x, (b_x * b_r[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd_kernel(
    dy, x, w, rstd, dh, dx, dr, dw_part, M, N, rows,
    DH: tl.constexpr, DR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # The program's `rows` rows, BM a step: dx (+ dh, the gradient that reached the norm's
    # input from elsewhere, with DH), the same in dr's dtype too (DR), and its share of dw in
    # dw_part[program].
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
        b_dx = b_r[:, None] * (b_g - b_xh * b_c[:, None])
        if DH:
            b_dx += tl.load(dh + o_x, mask=m, other=0.0).to(tl.float32)
        tl.store(dx + o_x, b_dx.to(dx.dtype.element_ty), mask=m)
        if DR:
            tl.store(dr + o_x, b_dx.to(dr.dtype.element_ty), mask=m)
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


def _forward(x2, r2, weight, eps: float, dtype: torch.dtype):
    """(h, y, rstd) of the rows x2 (+ r2 where given; h is None without)."""
    M, N = x2.shape
    h = None if r2 is None else torch.empty(M, N, dtype=torch.result_type(x2, r2), device=x2.device)
    y = torch.empty(M, N, dtype=dtype, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    BM, BN = _tiles(N)
    _rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
        x2, x2 if r2 is None else r2, y if h is None else h, weight, y, rstd, M, N, eps,
        ADD=r2 is not None, BM=BM, BN=BN, num_warps=8,
    )  # fmt: skip
    return h, y, rstd


def _backward(dy, x2, weight, rstd, dh, dtypes, want_dw: bool):
    """Gradients of the norm's input rows x2, one per dtype in `dtypes` (the first carries the
    sum with dh where given; the others are the same values cast), and of the weight."""
    M, N = x2.shape
    BM, BN = _tiles(N)
    n = max(1, min(triton.cdiv(M, BM), _programs(x2.device)))
    rows = triton.cdiv(triton.cdiv(M, n), BM) * BM
    n = triton.cdiv(M, rows)
    dx = torch.empty(M, N, dtype=dtypes[0], device=x2.device)
    dr = dx if dtypes[-1] == dtypes[0] else torch.empty(M, N, dtype=dtypes[-1], device=x2.device)
    dw_part = torch.empty(n, N, dtype=torch.float32, device=x2.device)
    _rms_norm_bwd_kernel[(n,)](
        dy.reshape(M, N).contiguous(), x2, weight, rstd,
        dx if dh is None else dh.reshape(M, N).contiguous(), dx, dr, dw_part, M, N, rows,
        DH=dh is not None, DR=dr is not dx, BM=BM, BN=BN, num_warps=8,
    )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if want_dw else None
    return dx, dr, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        _, y, rstd = _forward(x2, None, weight, eps, dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = _backward(dy, x2, weight, rstd, None, (x2.dtype,), ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, weight, eps: float, dtype: torch.dtype):
        N = x.shape[-1]
        h, y, rstd = _forward(
            x.reshape(-1, N).contiguous(), r.reshape(-1, N).contiguous(), weight, eps, dtype
        )
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape, ctx.dtypes = x.shape, (x.dtype, r.dtype)
        # h's gradient is None where nothing reads h (the model's last norm): no zeros made
        ctx.set_materialize_grads(False)
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dr, dw = _backward(dy, h, weight, rstd, dh, ctx.dtypes, ctx.needs_input_grad[2])
        return dx.view(ctx.shape), dr.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (N,), weight, eps) over x's last dim N, in float32 inside; the output in
    autocast's dtype where autocast is on (what the next linear would cast it to), else x's."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _RMSNorm.apply(x, weight, eps, dtype)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h, weight, eps)) with h = x + r (in torch's promoted dtype), in one kernel;
    x and r of one shape."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _AddRMSNorm.apply(x, r, weight, eps, dtype)
