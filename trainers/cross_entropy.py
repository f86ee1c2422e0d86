"""Linear + cross-entropy in row chunks, with no host synchronisation.

The training loss of an LM with a large vocabulary: logits = h @ weight.T, then the mean
cross-entropy over the targets that are not `ignore_index`. Computed in chunks of rows, each
chunk's logits overwritten in place by their gradient (one Triton kernel: the softmax's
normaliser, the row's loss, then softmax - one-hot), so that the (tokens x vocab) logits are
never held whole and no float32 copy of them is made. The gradients of h and weight are
finished in the forward and scaled in the backward. Every shape is fixed by the inputs and the
count of targets stays on the device, so a whole-step CUDA graph can capture it (liger's
version reads that count on the host)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fast_ops import compute_dtype

CHUNK_BYTES = 1 << 30
"""Logits per chunk, in bytes: 1 GiB of bfloat16 is ~10k rows of a 50k vocabulary."""

BLOCK = 8192
"""Vocabulary entries a kernel step reads (a power of two)."""


@triton.jit
def _loss_grad_kernel(
    logits, targets, losses, inv_count, V, stride, ignore_index, BLOCK: tl.constexpr
):
    # One row: its loss, lse - x[target] (0 where ignored), then its logits overwritten with
    # (softmax - one-hot) * inv_count, the gradient of the mean loss (0 where ignored).
    row = tl.program_id(0).to(tl.int64)
    x_row = logits + row * stride
    target = tl.load(targets + row)
    o = tl.arange(0, BLOCK)
    b_m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    b_l = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for i in range(0, V, BLOCK):
        b_x = tl.load(x_row + i + o, mask=i + o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(b_m, tl.max(b_x, 0))
        b_l = b_l * tl.exp(b_m - m_new) + tl.sum(tl.exp(b_x - m_new), 0)
        b_m = m_new
    lse = b_m + tl.log(b_l)
    valid = target != ignore_index
    x_t = tl.load(x_row + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(losses + row, tl.where(valid, lse - x_t, 0.0))
    scale = tl.where(valid, tl.load(inv_count), 0.0)
    for i in range(0, V, BLOCK):
        m = i + o < V
        b_x = tl.load(x_row + i + o, mask=m, other=0.0).to(tl.float32)
        b_g = tl.exp(b_x - lse) - tl.where(i + o == target, 1.0, 0.0)
        tl.store(x_row + i + o, (b_g * scale).to(logits.dtype.element_ty), mask=m)


def _rows_per_chunk(rows: int, vocab: int, itemsize: int) -> int:
    """Rows of equal chunks (the last one shorter), each at most CHUNK_BYTES of logits."""
    most = max(1, CHUNK_BYTES // (vocab * itemsize))
    return -(-rows // -(-rows // most))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, dtype: torch.dtype):
        # the matmuls in `dtype` (autocast's, cast once here); dweight summed in float32
        hd, wd = h.to(dtype), weight.to(dtype)
        N, V = h.shape[0], weight.shape[0]
        count = (targets != ignore_index).sum()
        inv_count = 1.0 / count.to(torch.float32).reshape(1)
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(hd)
        wants_dw = weight.requires_grad
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if wants_dw else None
        rows = _rows_per_chunk(N, V, hd.element_size())
        block = min(BLOCK, triton.next_power_of_2(V))
        for s in range(0, N, rows):
            e = min(N, s + rows)
            logits = hd[s:e] @ wd.T  # (rows, V): its gradient after the kernel
            _loss_grad_kernel[(e - s,)](
                logits, targets[s:e], losses[s:e], inv_count, V, logits.stride(0), ignore_index,
                BLOCK=block, num_warps=8,
            )  # fmt: skip
            torch.mm(logits, wd, out=dh[s:e])
            if wants_dw:
                dw += (logits.T @ hd[s:e]).float()
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return losses.sum() * inv_count[0]

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dw = None if dw is None else (dw * grad).to(w_dtype)
        return (dh * grad).to(h_dtype), dw, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T (h [N, C], weight [V, C], targets [N]) over
    the targets that are not ignore_index (NaN where none is), as F.cross_entropy of those
    logits in float32. Under autocast the matmuls run in its dtype, as a plain linear's."""
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, dtype)
