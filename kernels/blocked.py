"""MLA in plain PyTorch at the cost the budget says: the path the model runs without Triton.

Each branch touches only the keys it reads: the local branch attends chunks of queries to their
sliding key span, the global branch to the pooled blocks, the sparse branch to gathered
selected blocks. Work is laid out per KV head with its G query heads, so a group shares its
key loads; with a partial head mask only the active query heads are computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import masked_attention
from .config import AttentionConfig, Plan
from .selection import select_blocks

# Upper bound on gathered sparse keys held at once (elements), to bound memory at long T.
_GATHER_ELEMS = 1 << 25


def mla_blocked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    config: AttentionConfig,
    *,
    t_max: int | None = None,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `mla_reference`; differentiable in q, k, v and gate."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    plan = config.plan(t_max or T)
    idx = select_blocks(q, k, plan, head_mask) if plan.has_sparse else None

    if head_mask is None or bool(head_mask.all()):
        # [B, HKV, G, T, D] and [B, HKV, T, D]
        qg = q.reshape(B, T, HKV, G, D).permute(0, 2, 3, 1, 4)
        gg = gate.reshape(B, T, HKV, G, 3).permute(0, 2, 3, 1, 4)
        kg, vg = k.transpose(1, 2), v.transpose(1, 2)
        ig = idx.transpose(1, 2) if idx is not None else None
        out = _grouped(qg, kg, vg, gg, ig, plan)  # [B, HKV, G, T, D]
        return out.permute(0, 3, 1, 2, 4).reshape(B, T, HQ, D)

    # Partial mask: every active query head is its own group; pruned heads are never computed.
    active = head_mask.nonzero().flatten()
    kv_of = active // G
    out = q.new_zeros(B, T, HQ, D)
    if active.numel() == 0:
        return out + 0 * q.sum()  # keep the graph connected for autograd users
    qa = q[:, :, active].permute(0, 2, 1, 3).unsqueeze(2)  # [B, A, 1, T, D]
    ga = gate[:, :, active].permute(0, 2, 1, 3).unsqueeze(2)
    ka = k[:, :, kv_of].transpose(1, 2)  # [B, A, T, D]
    va = v[:, :, kv_of].transpose(1, 2)
    ia = idx[:, :, kv_of].transpose(1, 2) if idx is not None else None
    oa = _grouped(qa, ka, va, ga, ia, plan).squeeze(2).permute(0, 2, 1, 3)  # [B, T, A, D]
    return out.index_copy(2, active, oa)


def _grouped(q, k, v, gate, idx, plan: Plan) -> torch.Tensor:
    """q [B, H, G, T, D], k/v [B, H, T, D], gate [B, H, G, T, 3], idx [B, H, T, n] or None."""
    dtype = q.dtype
    q, k, v, gate = q.float(), k.float(), v.float(), gate.float()
    scale = q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    if plan.has_local:
        out = out + gate[..., 0:1] * _local(q, k, v, plan.window, scale)
    if plan.has_global:
        out = out + gate[..., 1:2] * _global(q, k, v, plan.stride, scale)
    if plan.has_sparse:
        out = out + gate[..., 2:3] * _sparse(q, k, v, idx, plan.block_size, scale)
    return out.to(dtype)


def _local(q, k, v, window: int, scale: float) -> torch.Tensor:
    """Queries in chunks of C attend to their span of window + C - 1 keys."""
    B, H, G, T, D = q.shape
    C = max(16, min(window, 128, T))
    n = -(-T // C)
    pad_t = n * C - T
    span = window - 1 + C
    # keys padded in front by window - 1 so that chunk i's span starts at i * C
    kp = F.pad(k, (0, 0, window - 1, pad_t))
    vp = F.pad(v, (0, 0, window - 1, pad_t))
    kw = kp.unfold(2, span, C).transpose(-1, -2)  # [B, H, n, span, D]
    vw = vp.unfold(2, span, C).transpose(-1, -2)
    qc = F.pad(q, (0, 0, 0, pad_t)).reshape(B, H, G, n, C, D)
    c = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    # key j of chunk i sits at i*C + j - (window-1); query c at i*C + c
    in_window = (j >= c) & (j <= c + window - 1)  # [C, span]
    start = torch.arange(n, device=q.device)[:, None, None] * C
    mask = in_window & (start + j >= window - 1)  # [n, C, span]: drop the front padding
    s = torch.einsum("bhgncd,bhnjd->bhgncj", qc, kw) * scale
    s = s.masked_fill(~mask, float("-inf"))
    o = torch.einsum("bhgncj,bhnjd->bhgncd", torch.softmax(s, dim=-1), vw)
    return o.reshape(B, H, G, n * C, D)[:, :, :, :T]


def _global(q, k, v, stride: int, scale: float) -> torch.Tensor:
    """Attention over the mean-pooled blocks of `stride` keys lying wholly at or before t."""
    B, H, G, T, D = q.shape
    nb = T // stride
    if nb == 0:
        return torch.zeros_like(q)
    kc = k[:, :, : nb * stride].reshape(B, H, nb, stride, D).mean(3).unsqueeze(2)
    vc = v[:, :, : nb * stride].reshape(B, H, nb, stride, D).mean(3).unsqueeze(2)
    t = torch.arange(T, device=q.device)
    visible = (torch.arange(nb, device=q.device) + 1) * stride - 1 <= t[:, None]  # [T, NB]
    return masked_attention(q, kc, vc, visible, scale)


def _sparse(q, k, v, idx, block_size: int, scale: float) -> torch.Tensor:
    """Attention over the gathered selected blocks (idx -1: empty slot)."""
    B, H, G, T, D = q.shape
    n = idx.shape[-1]
    nb = T // block_size
    if nb == 0:
        return torch.zeros_like(q)
    kb = k[:, :, : nb * block_size].reshape(B, H, nb, block_size, D)
    vb = v[:, :, : nb * block_size].reshape(B, H, nb, block_size, D)
    bi = torch.arange(B, device=q.device)[:, None, None, None]
    hi = torch.arange(H, device=q.device)[None, :, None, None]
    chunk = max(1, _GATHER_ELEMS // max(1, B * H * n * block_size * D))
    outs = []
    for t0 in range(0, T, chunk):
        ic = idx[:, :, t0 : t0 + chunk]  # [B, H, Tc, n]
        safe = ic.clamp(min=0)
        ks = kb[bi, hi, safe].flatten(3, 4)  # [B, H, Tc, n*bs, D]
        vs = vb[bi, hi, safe].flatten(3, 4)
        valid = (ic >= 0).repeat_interleave(block_size, dim=-1)  # [B, H, Tc, n*bs]
        qc = q[:, :, :, t0 : t0 + chunk].transpose(2, 3)  # [B, H, Tc, G, D]
        outs.append(masked_attention(qc, ks, vs, valid[..., None, :], scale))
    return torch.cat(outs, dim=2).transpose(2, 3)
