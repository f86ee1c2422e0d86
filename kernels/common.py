"""Small pieces shared by the PyTorch implementations."""

from __future__ import annotations

import torch


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax attention of q [..., M, D] over k/v [..., N, D] where mask [..., M, N] is true.

    A query with no visible key outputs zeros; its scores are made finite before the softmax
    so that the backward stays free of NaN.
    """
    s = (q @ k.transpose(-1, -2)) * scale
    mask = mask.expand_as(s)
    any_key = mask.any(-1, keepdim=True)
    s = torch.where(mask, s, float("-inf")).where(any_key, 0.0)
    return (torch.softmax(s, dim=-1) * any_key) @ v


def check_inputs(q, k, v, gate, head_mask, t_max) -> None:
    """Shape, device and mask checks shared by every implementation; raises ValueError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, HQ, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(
            f"k and v must be [B={B}, T={T}, HKV, D={D}]; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if HQ % k.shape[2]:
        raise ValueError(f"KV heads ({k.shape[2]}) must divide query heads ({HQ})")
    if gate.shape != (B, T, HQ, 3):
        raise ValueError(f"gate must be [B, T, HQ, 3] = {(B, T, HQ, 3)}, got {tuple(gate.shape)}")
    if head_mask is not None and (head_mask.shape != (HQ,) or head_mask.dtype != torch.bool):
        raise ValueError(
            f"head_mask must be a bool tensor of shape ({HQ},), got "
            f"{head_mask.dtype} {tuple(head_mask.shape)}"
        )
    if t_max is not None and t_max < T:
        raise ValueError(f"t_max ({t_max}) must be >= the sequence length T ({T})")
    if not (q.device == k.device == v.device == gate.device):
        raise ValueError(
            f"q, k, v, gate must share a device; got {q.device}, {k.device}, {v.device}, {gate.device}"
        )
