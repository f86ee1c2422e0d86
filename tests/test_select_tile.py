"""Tile-shared selection (DESIGN §1, `select_tile`): the selection against a brute force written
from the design's words, and the PyTorch paths against an attention built from that selection."""

from __future__ import annotations

import math

import pytest
import torch

from automla.kernels import AttentionConfig, mla_attention, mla_reference, select_blocks
from automla.kernels.selection import select_tiles


def rand_inputs(B, T, HQ, HKV, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, T, HKV, D, generator=g)
    v = torch.randn(B, T, HKV, D, generator=g)
    gate = torch.rand(B, T, HQ, 3, generator=g)
    return q, k, v, gate


def brute_tile_selection(q, k, plan, head_mask=None):
    """[B, T, HKV] lists of selected blocks, straight from DESIGN §1's tile rule."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G, bs, bq = HQ // HKV, plan.block_size, plan.select_tile
    out = [[[None] * HKV for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for h in range(HKV):
            means = [k[b, j * bs : (j + 1) * bs, h].mean(0) for j in range(T // bs)]
            for t0 in range(0, T, bq):
                cands = [
                    j
                    for j in range((t0 + 1) // bs)
                    if not (plan.has_local and j * bs > t0 - plan.window)
                ]
                score = {j: 0.0 for j in cands}
                for t in range(t0, min(t0 + bq, T)):
                    n_complete = (t + 1) // bs
                    if not cands:
                        continue
                    for g in range(G):
                        hq = h * G + g
                        if head_mask is not None and not head_mask[hq]:
                            continue
                        s = torch.stack([means[j] @ q[b, t, hq] for j in range(n_complete)])
                        p = torch.softmax(s / math.sqrt(D), 0)
                        for j in cands:
                            score[j] += p[j].item()
                best = sorted(cands, key=lambda j: -score[j])[: plan.n_select]
                for t in range(t0, min(t0 + bq, T)):
                    out[b][t][h] = best
    return out


@pytest.mark.parametrize(
    "T,bs,bq,HQ,HKV,ratios",
    [
        pytest.param(45, 4, 4, 4, 2, (0.25, 0.25, 0.5), id="T45-bs4-Bq4-G2"),
        pytest.param(63, 8, 16, 3, 1, (0.3, 0.2, 0.5), id="T63-bs8-Bq16-G3"),
        pytest.param(50, 4, 2, 2, 2, (0.0, 0.5, 0.5), id="T50-bs4-Bq2-nolocal"),
        pytest.param(37, 4, 64, 4, 1, (0.2, 0.2, 0.6), id="T37-bs4-Bq64-one-tile"),
    ],
)
def test_tile_selection_against_brute_force(T, bs, bq, HQ, HKV, ratios):
    q, k, _, _ = rand_inputs(2, T, HQ, HKV, 8, seed=T + bq)
    plan = AttentionConfig(budget=32, ratios=ratios, block_size=bs, select_tile=bq).plan(T)
    idx = select_blocks(q, k, plan)
    want = brute_tile_selection(q, k, plan)
    for b in range(2):
        for t in range(T):
            for h in range(HKV):
                got = [j for j in idx[b, t, h].tolist() if j >= 0]
                assert got == want[b][t][h], (b, t, h)
    tiles = select_tiles(q, k, plan)
    assert tiles.shape[1] == -(-T // bq)
    assert torch.equal(tiles.repeat_interleave(bq, 1)[:, :T], idx)


def test_tile_selection_ignores_pruned_heads():
    T, HQ, HKV = 40, 4, 1
    q, k, _, _ = rand_inputs(1, T, HQ, HKV, 8, seed=1)
    mask = torch.tensor([True, False, True, False])
    plan = AttentionConfig(budget=24, ratios=(0.2, 0.2, 0.6), block_size=4, select_tile=8).plan(T)
    idx = select_blocks(q, k, plan, mask)
    want = brute_tile_selection(q, k, plan, mask)
    for t in range(T):
        assert [j for j in idx[0, t, 0].tolist() if j >= 0] == want[0][t][0]
    # a pruned head's query takes no part: changing it changes nothing
    q2 = q.clone()
    q2[:, :, 1] = torch.randn_like(q2[:, :, 1]) * 10
    assert torch.equal(select_blocks(q2, k, plan, mask), idx)


def test_select_tile_one_is_the_per_query_rule():
    T = 53
    q, k, _, _ = rand_inputs(1, T, 4, 2, 8, seed=7)
    cfg = AttentionConfig(budget=32, ratios=(0.25, 0.25, 0.5), block_size=4)
    assert cfg.select_tile == 1
    plan = cfg.plan(T)
    assert torch.equal(select_tiles(q, k, plan), select_blocks(q, k, plan))


def test_tile_selection_is_causal():
    """No query of a tile may depend on keys after the tile's first position via selection:
    every selected block is complete at t0 (so at every query of the tile)."""
    T, bs, bq = 64, 4, 16
    q, k, _, _ = rand_inputs(1, T, 2, 1, 8, seed=3)
    plan = AttentionConfig(budget=32, ratios=(0.25, 0.25, 0.5), block_size=bs, select_tile=bq)
    idx = select_blocks(q, k, plan.plan(T))
    t0 = (torch.arange(T) // bq * bq)[None, :, None, None]
    assert ((idx < 0) | ((idx + 1) * bs - 1 <= t0)).all()
    # changing keys after t0 of the last tile leaves that tile's selection unchanged
    k2 = k.clone()
    k2[:, 48 + 1 :] = torch.randn_like(k2[:, 48 + 1 :])
    q2 = q.clone()
    q2[:, 48 + 1 :] = torch.randn_like(q2[:, 48 + 1 :])
    # scores of later queries change, so only the candidate set is pinned: blocks before t0
    idx2 = select_blocks(q2, k2, plan.plan(T))
    assert ((idx2[:, 48:] < 0) | ((idx2[:, 48:] + 1) * bs - 1 <= 48)).all()


def attention_from_selection(q, k, v, gate, plan, sel, head_mask=None):
    """Each branch from its definition, the sparse one over the blocks in `sel` (brute force)."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for hq in range(HQ):
                if head_mask is not None and not head_mask[hq]:
                    continue
                h = hq // G
                o = torch.zeros(D)
                if plan.has_local:
                    ks = list(range(max(0, t - plan.window + 1), t + 1))
                    p = torch.softmax(k[b, ks, h] @ q[b, t, hq] / math.sqrt(D), 0)
                    o += gate[b, t, hq, 0] * (p @ v[b, ks, h])
                if plan.has_global and (t + 1) // plan.stride > 0:
                    n, s = (t + 1) // plan.stride, plan.stride
                    kc = torch.stack([k[b, i * s : (i + 1) * s, h].mean(0) for i in range(n)])
                    vc = torch.stack([v[b, i * s : (i + 1) * s, h].mean(0) for i in range(n)])
                    p = torch.softmax(kc @ q[b, t, hq] / math.sqrt(D), 0)
                    o += gate[b, t, hq, 1] * (p @ vc)
                blocks = sel[b][t][h]
                if plan.has_sparse and blocks:
                    bs = plan.block_size
                    ks = [j * bs + i for j in blocks for i in range(bs)]
                    p = torch.softmax(k[b, ks, h] @ q[b, t, hq] / math.sqrt(D), 0)
                    o += gate[b, t, hq, 2] * (p @ v[b, ks, h])
                out[b, t, hq] = o
    return out


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize(
    "T,bs,bq,HQ,HKV,ratios,masked",
    [
        pytest.param(41, 4, 8, 4, 2, (0.3, 0.2, 0.5), False, id="T41-Bq8-G2"),
        pytest.param(33, 4, 16, 3, 1, (0.0, 0.0, 1.0), False, id="T33-Bq16-G3-sparse-only"),
        pytest.param(30, 4, 4, 4, 1, (0.25, 0.25, 0.5), True, id="T30-Bq4-G4-masked"),
    ],
)
def test_tile_mode_attention_against_brute_force(backend, T, bs, bq, HQ, HKV, ratios, masked):
    q, k, v, gate = rand_inputs(1, T, HQ, HKV, 8, seed=T + HQ)
    cfg = AttentionConfig(budget=24, ratios=ratios, block_size=bs, select_tile=bq)
    plan = cfg.plan(T)
    mask = torch.tensor([True, False] * (HQ // 2) + [True] * (HQ % 2)) if masked else None
    want = attention_from_selection(
        q, k, v, gate, plan, brute_tile_selection(q, k, plan, mask), mask
    )
    got = mla_attention(q, k, v, gate, cfg, head_mask=mask, backend=backend)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("bq", [1, 2, 16, 64])
def test_torch_path_matches_reference_in_tile_mode(bq):
    T, HQ, HKV = 77, 4, 2
    q, k, v, gate = rand_inputs(2, T, HQ, HKV, 16, seed=bq)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    leaves_ref = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    cfg = AttentionConfig(budget=48, ratios=(0.3, 0.2, 0.5), block_size=8, select_tile=bq)
    out = mla_attention(*leaves, cfg, backend="torch")
    ref = mla_reference(*leaves_ref, cfg)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, leaves_ref):
        assert not torch.isnan(a.grad).any()
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 1e-5


@pytest.mark.parametrize("bad", [0, 3, 24, -16, 1.5, True, "16"])
def test_select_tile_must_be_a_power_of_two(bad):
    with pytest.raises(ValueError, match="select_tile"):
        AttentionConfig(select_tile=bad)


def test_keys_per_query_counts_tile_candidates():
    cfg = AttentionConfig(budget=32, ratios=(0.25, 0.25, 0.5), block_size=4, select_tile=16)
    plan = cfg.plan(64)
    # t = 20 sits in the tile starting at 16: candidates are blocks complete at 16 outside
    # its window 9..16 (blocks 0..2), not those of position 20 (blocks 0..3)
    assert plan.candidates(20) == plan.candidates(16) == 3
    per_query = AttentionConfig(budget=32, ratios=(0.25, 0.25, 0.5), block_size=4).plan(64)
    assert per_query.candidates(20) == 4
