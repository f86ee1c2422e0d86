"""What the attention learned, measured at an evaluation: per layer, the mean gate weight of each
MLA branch, the active query heads, and how far back the sparse branch reaches.

One extra forward pass over one validation row (at most `MAX_TOKENS` of it), under no_grad:
each MLA layer's op is wrapped for the pass to see its queries, keys and gate, and the sparse
selection is recomputed with the kernels' own `select_blocks` (per tile when
`select_tile` > 1, as the kernels select). A dense model, or one trained sequence-parallel,
reports its active heads only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..kernels import BRANCHES, select_blocks
from .model import Attention, LanguageModel

MAX_TOKENS = 4096
"""Longer validation rows are cut here: the block scores grow with T x T / block_size."""


@torch.no_grad()
def attention_stats(
    model: LanguageModel, x: torch.Tensor, autocast: contextlib.AbstractContextManager
) -> dict[str, Any]:
    """Metrics to merge into an evaluation's record, one list entry per layer:

    - `attn_heads`: the ids of the active query heads;
    - `attn_gate` (MLA): the mean gate weight of each branch, {local, global, sparse}, over
      the row's tokens and the active heads; absent branches left out;
    - `attn_reach` (MLA): of the sparse branch's selected blocks, the mean and the largest
      distance in tokens from the query back to the block's first key; None without a sparse
      branch or before any block is complete.
    """
    out: dict[str, Any] = {"attn_heads": [b.attn.head_ids() for b in model.blocks]}
    layers = [b.attn for b in model.blocks]
    if all(a.gate is None for a in layers) or model.sequence_parallel is not None:
        # a sequence-parallel forward is a collective over whole sequences: heads only
        return out
    row = x[:1, :MAX_TOKENS]
    seen: list[dict[str, Any]] = [{} for _ in layers]
    was_training = model.training
    model.eval()
    try:
        with _watching(layers, seen), autocast:
            model(row)
    finally:
        model.train(was_training)
    out["attn_gate"] = [s.get("gate") for s in seen]
    out["attn_reach"] = [s.get("reach") for s in seen]
    return out


@contextlib.contextmanager
def _watching(layers: list[Attention], seen: list[dict[str, Any]]) -> Iterator[None]:
    """Wrap each MLA layer's `_attend` for the block; the wrapper records, then attends."""
    for attn, record in zip(layers, seen):
        if attn.gate is None:
            continue

        def attend(q, k, v, gate, mask, attn=attn, record=record, inner=attn._attend):
            record.update(_layer_stats(attn, q, k, gate, mask))
            return inner(q, k, v, gate, mask)

        attn._attend = attend  # an instance attribute shadows the method until deleted
    try:
        yield
    finally:
        for attn in layers:
            attn.__dict__.pop("_attend", None)


def _layer_stats(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, gate: torch.Tensor, mask: Any
) -> dict[str, Any]:
    plan = attn.plan(q.shape[1])
    present = (plan.has_local, plan.has_global, plan.has_sparse)
    g = gate.float()  # [B, T, S, 3]
    if mask is not None:  # empty slots borrow a head's gate: leave them out
        g = g[:, :, mask.to(g.device).bool()]
    means = g.mean((0, 1, 2)).tolist() if g.numel() else [float("nan")] * 3
    stats: dict[str, Any] = {
        "gate": {name: round(m, 4) for name, m, p in zip(BRANCHES, means, present) if p},
        "reach": None,
    }
    if plan.has_sparse:
        idx = select_blocks(q, k, plan, mask)  # [B, T, HKV, n_select], -1: none
        t = torch.arange(q.shape[1], device=idx.device)[None, :, None, None]
        distance = (t - idx * plan.block_size)[idx >= 0].float()
        if distance.numel():
            stats["reach"] = {
                "mean": round(distance.mean().item(), 1),
                "max": int(distance.max().item()),
            }
    return stats
