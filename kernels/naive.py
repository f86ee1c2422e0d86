"""Naive MLA reference, written straight from DESIGN §1: float32, dense masks, O(T^2).

One plain function per branch (`naive_local`, `naive_global`, `naive_sparse`), each the
branch's own softmax output; `mla_reference` sums them with the gates. It is the oracle of
every test; the model never runs it unless asked to.
"""

from __future__ import annotations

import torch

from .common import masked_attention
from .config import AttentionConfig, Plan
from .selection import select_blocks


def naive_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The local branch: each query attends to the last `plan.window` keys, itself included.

    q [B, T, HQ, D], k/v [B, T, HKV, D] -> float32 [B, HQ, T, D] (zeros when absent).
    """
    return _local(*_heads_first(q, k, v), plan)


def naive_global(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The global branch: each query attends to the means of the strides of `plan.stride` keys
    that end at or before it.

    q [B, T, HQ, D], k/v [B, T, HKV, D] -> float32 [B, HQ, T, D] (zeros when absent).
    """
    return _global(*_heads_first(q, k, v), plan)


def naive_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sparse branch: each query attends to the keys of the blocks that `select_blocks`
    chose for its KV group (head_mask: the active heads, the only ones that score blocks).

    q [B, T, HQ, D], k/v [B, T, HKV, D] -> float32 [B, HQ, T, D] (zeros when absent).
    """
    return _sparse(q, k, *_heads_first(q, k, v), plan, head_mask)


def mla_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    config: AttentionConfig,
    *,
    t_max: int | None = None,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, T, HQ, D], k/v [B, T, HKV, D], gate [B, T, HQ, 3] -> [B, T, HQ, D] in q's dtype."""
    plan = config.plan(t_max or q.shape[1])
    # one float32 copy shared by the branches, so that their gradients sum in one place
    qf, kf, vf = _heads_first(q, k, v)
    gf = gate.float().permute(0, 2, 1, 3)  # [B, HQ, T, 3]
    out = torch.zeros_like(qf)
    if plan.has_local:
        out = out + gf[..., 0:1] * _local(qf, kf, vf, plan)
    if plan.has_global and q.shape[1] // plan.stride > 0:
        out = out + gf[..., 1:2] * _global(qf, kf, vf, plan)
    if plan.has_sparse:
        out = out + gf[..., 2:3] * _sparse(q, k, qf, kf, vf, plan, head_mask)
    if head_mask is not None:
        out = out * head_mask.to(out.dtype)[None, :, None, None]
    return out.transpose(1, 2).to(q.dtype)


def _heads_first(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in float32 [B, HQ, T, D], each KV head repeated for the G query heads of its
    group."""
    G = q.shape[2] // k.shape[2]
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(G, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(G, dim=2).transpose(1, 2)
    return qf, kf, vf


def _local(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, plan: Plan) -> torch.Tensor:
    if not plan.has_local:
        return torch.zeros_like(qf)
    t = torch.arange(qf.shape[2], device=qf.device)
    s = t[None, :]
    mask = (s <= t[:, None]) & (s > t[:, None] - plan.window)  # [T, T]
    return masked_attention(qf, kf, vf, mask, qf.shape[3] ** -0.5)


def _global(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, plan: Plan) -> torch.Tensor:
    B, HQ, T, D = qf.shape
    nb = T // plan.stride if plan.has_global else 0
    if nb == 0:
        return torch.zeros_like(qf)
    kc = kf[:, :, : nb * plan.stride].reshape(B, HQ, nb, plan.stride, D).mean(3)
    vc = vf[:, :, : nb * plan.stride].reshape(B, HQ, nb, plan.stride, D).mean(3)
    t = torch.arange(T, device=qf.device)
    ends = (torch.arange(nb, device=qf.device) + 1) * plan.stride - 1
    mask = ends[None, :] <= t[:, None]  # [T, NB]
    return masked_attention(qf, kc, vc, mask, D**-0.5)


def _sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    qf: torch.Tensor,
    kf: torch.Tensor,
    vf: torch.Tensor,
    plan: Plan,
    head_mask: torch.Tensor | None,
) -> torch.Tensor:
    # q and k in their own layout and dtype: the selection reads them as every implementation does
    if not plan.has_sparse:
        return torch.zeros_like(qf)
    T = q.shape[1]
    G = q.shape[2] // k.shape[2]
    idx = select_blocks(q, k, plan, head_mask)  # [B, T, HKV, n]
    key_block = torch.arange(T, device=q.device) // plan.block_size  # [T]
    # [B, T, HKV, T]: key s belongs to a block selected for query t
    chosen = (idx[..., None] == key_block).any(3)
    mask = chosen.repeat_interleave(G, dim=2).permute(0, 2, 1, 3)  # [B, HQ, T, T]
    return masked_attention(qf, kf, vf, mask, qf.shape[3] ** -0.5)
