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
