"""Sparse-branch block selection (DESIGN §1), shared by every implementation.

Selection is not differentiated: it runs under no_grad and returns block indices.
"""

from __future__ import annotations

import torch

from .config import Plan


@torch.no_grad()
def block_scores(
    q: torch.Tensor, k: torch.Tensor, block_size: int, head_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-KV-head importance of each complete key block for each query.

    q [B, T, HQ, D], k [B, T, HKV, D] -> [B, T, HKV, NB] with NB = T // block_size: the softmax
    over the complete blocks wholly at or before t of q . mean(K_block) / sqrt(D), summed over
    the active query heads of each group. Blocks after t score 0.
    """
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    nb = T // block_size
    if nb == 0:
        return q.new_zeros(B, T, HKV, 0, dtype=torch.float32)
    # [B, NB, HKV, D]
    kmean = k[:, : nb * block_size].float().reshape(B, nb, block_size, HKV, D).mean(2)
    qg = q.float().reshape(B, T, HKV, HQ // HKV, D)
    # [B, T, HKV, G, NB]
    s = torch.einsum("bthgd,bnhd->bthgn", qg, kmean) * D**-0.5
    t = torch.arange(T, device=q.device)
    visible = (torch.arange(nb, device=q.device) + 1) * block_size - 1 <= t[:, None]  # [T, NB]
    s = s.masked_fill(~visible[None, :, None, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if head_mask is not None:
        p = p * head_mask.reshape(1, 1, HKV, HQ // HKV, 1).to(p.dtype)
    return p.sum(3)


@torch.no_grad()
def select_blocks(
    q: torch.Tensor, k: torch.Tensor, plan: Plan, head_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [B, T, HKV, n_select] of the blocks each query's group attends to, best first.

    Candidates are the complete blocks wholly at or before t, less those wholly inside the local
    window when the local branch is present; slots beyond the number of candidates hold -1.
    """
    B, T, _, _ = q.shape
    HKV = k.shape[2]
    bs = plan.block_size
    nb = T // bs
    if plan.n_select == 0 or nb == 0:
        return torch.full((B, T, HKV, plan.n_select), -1, dtype=torch.long, device=q.device)
    score = block_scores(q, k, bs, head_mask)  # [B, T, HKV, NB]
    cand = candidate_mask(T, nb, plan, q.device)  # [T, NB]
    score = score.masked_fill(~cand[None, :, None], float("-inf"))
    n = min(plan.n_select, nb)
    top, idx = score.topk(n, dim=-1, sorted=True)
    idx = idx.masked_fill(top == float("-inf"), -1)
    if n < plan.n_select:
        idx = torch.nn.functional.pad(idx, (0, plan.n_select - n), value=-1)
    return idx


def candidate_mask(T: int, nb: int, plan: Plan, device: torch.device | str) -> torch.Tensor:
    """[T, NB] bool: block j is a sparse candidate for query t."""
    t = torch.arange(T, device=device)[:, None]
    start = torch.arange(nb, device=device)[None, :] * plan.block_size
    cand = start + plan.block_size - 1 <= t
    if plan.has_local:
        cand &= start < t - plan.window + 1
    return cand
