"""Naive MLA reference, written straight from DESIGN §1: float32, dense masks, O(T^2).

It is the oracle of every test; the model never runs it unless asked to.
"""

from __future__ import annotations

import torch

from .common import masked_attention
from .config import AttentionConfig
from .selection import select_blocks


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
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    plan = config.plan(t_max or T)
    scale = D**-0.5
    # [B, HQ, T, D]: each KV head repeated for the G query heads of its group
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(G, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(G, dim=2).transpose(1, 2)
    gf = gate.float().permute(0, 2, 1, 3)  # [B, HQ, T, 3]
    t = torch.arange(T, device=q.device)
    out = torch.zeros_like(qf)

    if plan.has_local:
        s = t[None, :]
        mask = (s <= t[:, None]) & (s > t[:, None] - plan.window)  # [T, T]
        out = out + gf[..., 0:1] * masked_attention(qf, kf, vf, mask, scale)

    if plan.has_global:
        nb = T // plan.stride
        if nb > 0:
            kc = kf[:, :, : nb * plan.stride].reshape(B, HQ, nb, plan.stride, D).mean(3)
            vc = vf[:, :, : nb * plan.stride].reshape(B, HQ, nb, plan.stride, D).mean(3)
            ends = (torch.arange(nb, device=q.device) + 1) * plan.stride - 1
            mask = ends[None, :] <= t[:, None]  # [T, NB]
            out = out + gf[..., 1:2] * masked_attention(qf, kc, vc, mask, scale)

    if plan.has_sparse:
        idx = select_blocks(q, k, plan, head_mask)  # [B, T, HKV, n]
        key_block = t // plan.block_size  # [T]
        # [B, T, HKV, T]: key s belongs to a block selected for query t
        chosen = (idx[..., None] == key_block).any(3)
        mask = chosen.repeat_interleave(G, dim=2).permute(0, 2, 1, 3)  # [B, HQ, T, T]
        out = out + gf[..., 2:3] * masked_attention(qf, kf, vf, mask, scale)

    if head_mask is not None:
        out = out * head_mask.to(out.dtype)[None, :, None, None]
    return out.transpose(1, 2).to(q.dtype)
