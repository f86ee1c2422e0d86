"""Sparse-branch block selection (DESIGN §1), shared by every implementation.

Selection is not differentiated: it runs under no_grad and returns block indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    With `plan.select_tile` = Bq > 1, every query of a tile of Bq consecutive positions gets
    its tile's selection (`select_tiles`).
    """
    T = q.shape[1]
    idx = select_tiles(q, k, plan, head_mask)  # [B, NT, HKV, n]
    if plan.select_tile == 1:
        return idx
    return idx.repeat_interleave(plan.select_tile, dim=1)[:, :T]


@torch.no_grad()
def select_tiles(
    q: torch.Tensor, k: torch.Tensor, plan: Plan, head_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [B, NT, HKV, n_select] of the blocks each tile of `plan.select_tile` queries
    attends to, NT = ceil(T / select_tile) (DESIGN §1, tile-shared selection).

    With t0 a tile's first position, the candidates are the complete blocks wholly at or before
    t0, less those wholly inside t0's local window; a candidate's score is the per-query score
    (`block_scores`) summed over the tile's queries. Select_tile 1 is the per-query rule.
    """
    B, T, _, _ = q.shape
    HKV = k.shape[2]
    bs, bq = plan.block_size, plan.select_tile
    nb = T // bs
    nt = -(-T // bq)
    if plan.n_select == 0 or nb == 0:
        return torch.full((B, nt, HKV, plan.n_select), -1, dtype=torch.long, device=q.device)
    score = block_scores(q, k, bs, head_mask)  # [B, T, HKV, NB]
    if bq > 1:
        score = F.pad(score, (0, 0, 0, 0, 0, nt * bq - T))
        score = score.view(B, nt, bq, HKV, nb).sum(2)  # [B, NT, HKV, NB]
    t0 = torch.arange(nt, device=q.device) * bq
    cand = candidate_mask(t0, nb, plan)  # [NT, NB]
    score = score.masked_fill(~cand[None, :, None], float("-inf"))
    n = min(plan.n_select, nb)
    top, idx = score.topk(n, dim=-1, sorted=True)
    idx = idx.masked_fill(top == float("-inf"), -1)
    if n < plan.n_select:
        idx = F.pad(idx, (0, plan.n_select - n), value=-1)
    return idx


def candidate_mask(t: torch.Tensor, nb: int, plan: Plan) -> torch.Tensor:
    """[len(t), NB] bool: block j is a sparse candidate for a query (or tile start) at t."""
    t = t[:, None]
    start = torch.arange(nb, device=t.device)[None, :] * plan.block_size
    cand = start + plan.block_size - 1 <= t
    if plan.has_local:
        cand &= start < t - plan.window + 1
    return cand
