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
from .heads import HeadGroups
from .selection import select_blocks


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
    kv_of = HeadGroups(HQ, HKV).group_of(active)
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
    with torch.autocast(q.device.type, enabled=False):
        return _grouped_fp32(q, k, v, gate, idx, plan)


def _grouped_fp32(q, k, v, gate, idx, plan: Plan) -> torch.Tensor:
    # float32 maths whatever the caller's autocast says: the index_add buffers must agree
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
    """Queries in chunks of C attend to their span of window + C - 1 keys (SDPA with a mask)."""
    B, H, G, T, D = q.shape
    C = max(16, min(window, 128, T))
    n = -(-T // C)
    pad_t = n * C - T
    span = window - 1 + C
    # keys padded in front by window - 1 so that chunk i's span starts at i * C
    kw = F.pad(k, (0, 0, window - 1, pad_t)).unfold(2, span, C).transpose(-1, -2)
    vw = F.pad(v, (0, 0, window - 1, pad_t)).unfold(2, span, C).transpose(-1, -2)
    kw = kw.reshape(B * H * n, 1, span, D).expand(-1, G, -1, -1)  # [B*H*n, G, span, D]
    vw = vw.reshape(B * H * n, 1, span, D).expand(-1, G, -1, -1)
    qc = F.pad(q, (0, 0, 0, pad_t)).reshape(B, H, G, n, C, D).transpose(2, 3)
    qc = qc.reshape(B * H * n, G, C, D)
    c = torch.arange(C, device=q.device)[:, None]
    j = torch.arange(span, device=q.device)[None, :]
    # key j of chunk i sits at i*C + j - (window-1); query c at i*C + c
    start = torch.arange(n, device=q.device)[:, None, None] * C
    mask = (j >= c) & (j <= c + window - 1) & (start + j >= window - 1)  # [n, C, span]
    mask = mask.expand(B * H, n, C, span).reshape(B * H * n, 1, C, span)
    o = F.scaled_dot_product_attention(qc, kw, vw, attn_mask=mask, scale=scale)
    o = o.reshape(B, H, n, G, C, D).transpose(2, 3).reshape(B, H, G, n * C, D)
    return o[:, :, :, :T]


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
    """Attention over each query's selected blocks (idx [B, H, T, n], -1: empty slot).

    Gathering every selected block per query would copy block_size keys per (query, slot).
    Instead the (query, slot) pairs are sorted by block and packed into tiles of M pairs that
    share one block: each tile multiplies its M x G queries by that block's keys, so the
    traffic is one query row per pair and the arithmetic is what the selection reads. The
    softmax over a query's blocks is done in the tile layout with per-query scatters.
    """
    B, H, G, T, D = q.shape
    nb = T // block_size
    if nb == 0:
        return torch.zeros_like(q)
    n_blocks = B * H * nb
    rows = B * H * T
    kb = k[:, :, : nb * block_size].reshape(n_blocks, block_size, D)
    vb = v[:, :, : nb * block_size].reshape(n_blocks, block_size, D)
    with torch.no_grad():
        slot_query, tile_block = _pack_tiles(idx, nb, n_blocks, dummy=rows)
    n_tiles, M = slot_query.shape
    slot_query = slot_query.flatten()
    # one extra zero row serves the padding slots of the tiles
    qrows = F.pad(q.transpose(2, 3).reshape(rows, G, D), (0, 0, 0, 0, 0, 1))
    qt = qrows[slot_query].view(n_tiles, M * G, D)
    # the scale goes on the (few) keys rather than on the (many) scores
    s = torch.bmm(qt, (kb * scale)[tile_block].transpose(1, 2)).view(-1, G, block_size)
    with torch.no_grad():
        # any per-query constant works as the shift; the max keeps exp() in range
        m = s.new_full((rows + 1, G), float("-inf"))
        m = m.scatter_reduce(0, slot_query[:, None].expand(-1, G), s.amax(-1), "amax")
    e = torch.exp(s - m[slot_query][..., None])
    denom = s.new_zeros(rows + 1, G).index_add(0, slot_query, e.sum(-1))
    p = e / denom[slot_query][..., None]
    ot = torch.bmm(p.view(n_tiles, M * G, block_size), vb[tile_block])
    o = q.new_zeros(rows + 1, G, D).index_add(0, slot_query, ot.view(-1, G, D))
    return o[:rows].view(B, H, T, G, D).transpose(2, 3)


def _pack_tiles(idx: torch.Tensor, nb: int, n_blocks: int, dummy: int):
    """Pack the valid (query, slot) pairs into tiles of M pairs that share one key block.

    Returns slot_query [n_tiles, M] (the query row of each slot, `dummy` for padding) and
    tile_block [n_tiles] (the global block id, (b*H + h)*nb + j, of each tile).
    """
    B, H, T, n = idx.shape
    flat = idx.reshape(-1)
    pair = (flat >= 0).nonzero().squeeze(1)
    block = (pair // (T * n)) * nb + flat[pair]
    block, order = torch.sort(block, stable=True)
    query = pair[order] // n
    counts = torch.bincount(block, minlength=n_blocks)
    # tiles of about the mean number of pairs per used block keep the padding small
    M = int(min(128, max(16, query.numel() // max(1, int((counts > 0).sum())))))
    tiles_per = (counts + M - 1) // M
    tile_start = torch.cumsum(tiles_per, 0) - tiles_per
    rank = (
        torch.arange(query.numel(), device=idx.device) - (torch.cumsum(counts, 0) - counts)[block]
    )
    pos = (tile_start[block] + rank // M) * M + rank % M
    tile_block = torch.repeat_interleave(torch.arange(n_blocks, device=idx.device), tiles_per)
    slot_query = torch.full((tile_block.numel() * M,), dummy, dtype=torch.long, device=idx.device)
    slot_query[pos] = query
    return slot_query.view(-1, M), tile_block
