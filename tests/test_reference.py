"""The naive MLA reference against independently built attentions, and the PyTorch paths
against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from automla.kernels import (
    AttentionConfig,
    block_scores,
    mla_attention,
    mla_reference,
    select_blocks,
)
from automla.kernels import blocked as blocked_mod
from automla.kernels.naive import naive_global, naive_local, naive_sparse

BACKENDS = ["reference", "torch"]


def rand_inputs(B, T, HQ, HKV, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, HKV, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, HKV, D, generator=g, dtype=dtype)
    gate = torch.rand(B, T, HQ, 3, generator=g, dtype=dtype)
    return q, k, v, gate


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in result"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def attention_with_mask(q, k, v, allowed):
    """Plain softmax attention; allowed [T, S] built by the test itself."""
    G = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,HQ,HKV", [(37, 4, 4), (64, 4, 2), (50, 8, 1)])
def test_global_stride_one_is_full_causal(backend, T, HQ, HKV):
    q, k, v, gate = rand_inputs(2, T, HQ, HKV, 16, seed=T)
    gate[..., 1] = 1.0
    cfg = AttentionConfig(budget=T, ratios=(0, 1, 0), block_size=1)
    assert cfg.plan(T).stride == 1
    out = mla_attention(q, k, v, gate, cfg, backend=backend)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    assert rel_err(out, attention_with_mask(q, k, v, allowed)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,window,HQ,HKV", [(40, 7, 4, 2), (63, 16, 2, 2), (33, 64, 4, 1)])
def test_local_only_is_sliding_window(backend, T, window, HQ, HKV):
    q, k, v, gate = rand_inputs(1, T, HQ, HKV, 16, seed=window)
    gate[..., 0] = 1.0
    cfg = AttentionConfig(budget=window, ratios=(1, 0, 0), block_size=8)
    out = mla_attention(q, k, v, gate, cfg, backend=backend)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(
        -window
    )
    assert rel_err(out, attention_with_mask(q, k, v, allowed)) < 1e-5


def test_global_branch_against_hand_pooling():
    T, stride, D = 21, 4, 8
    q, k, v, gate = rand_inputs(1, T, 2, 1, D, seed=3)
    gate[..., 1] = 1.0
    cfg = AttentionConfig(budget=64, ratios=(0, 1, 0), block_size=stride)
    assert cfg.plan(T).stride == stride
    out = mla_reference(q, k, v, gate, cfg)
    for t in range(T):
        n = (t + 1) // stride
        for h in range(2):
            if n == 0:
                assert out[0, t, h].abs().max() == 0
                continue
            kc = torch.stack([k[0, i * stride : (i + 1) * stride, 0].mean(0) for i in range(n)])
            vc = torch.stack([v[0, i * stride : (i + 1) * stride, 0].mean(0) for i in range(n)])
            p = torch.softmax(kc @ q[0, t, h] / math.sqrt(D), 0)
            assert torch.allclose(out[0, t, h], p @ vc, atol=1e-5)


def test_selection_against_brute_force():
    T, bs, HQ, HKV, D = 45, 4, 4, 2, 8
    q, k, _, _ = rand_inputs(1, T, HQ, HKV, D, seed=5)
    cfg = AttentionConfig(budget=32, ratios=(0.25, 0.25, 0.5), block_size=bs)
    plan = cfg.plan(T)
    idx = select_blocks(q, k, plan)
    G = HQ // HKV
    for t in range(T):
        for h in range(HKV):
            complete = [j for j in range((t + 1) // bs)]
            if not complete:
                assert (idx[0, t, h] == -1).all()
                continue
            score = torch.zeros(len(complete))
            for g in range(G):
                means = torch.stack([k[0, j * bs : (j + 1) * bs, h].mean(0) for j in complete])
                score += torch.softmax(means @ q[0, t, h * G + g] / math.sqrt(D), 0)
            cands = [j for j in complete if not j * bs > t - plan.window]
            best = sorted(cands, key=lambda j: -score[j])[: plan.n_select]
            got = [j for j in idx[0, t, h].tolist() if j >= 0]
            assert got == best, (t, h)


@pytest.mark.parametrize("ratios", [(0.25, 0.25, 0.5), (0.0, 0.5, 0.5)], ids=["LGS", "GS"])
def test_branches_summed_with_the_gates_are_the_reference(ratios):
    T, HQ, HKV = 45, 6, 2
    q, k, v, gate = rand_inputs(2, T, HQ, HKV, 8, seed=7)
    mask = torch.tensor([True, False, True, True, False, False])
    cfg = AttentionConfig(budget=32, ratios=ratios, block_size=4)
    plan = cfg.plan(T)
    branches = [
        naive_local(q, k, v, plan),
        naive_global(q, k, v, plan),
        naive_sparse(q, k, v, plan, mask),
    ]
    for b, present in zip(branches, (plan.has_local, plan.has_global, plan.has_sparse)):
        assert b.shape == (2, HQ, T, 8) and b.dtype == torch.float32
        assert (b.abs().amax() > 0) == present
    g = gate.permute(0, 2, 1, 3)  # [B, HQ, T, 3]
    out = sum(g[..., i : i + 1] * b for i, b in enumerate(branches)) * mask[:, None, None]
    ref = mla_reference(q, k, v, gate, cfg, head_mask=mask)
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "T,bs,HQ,HKV,ratios",
    [
        (63, 8, 4, 2, (0.5, 0.25, 0.25)),
        (77, 16, 2, 1, (0.2, 0.3, 0.5)),
        (40, 4, 4, 4, (0.0, 0.5, 0.5)),
        (50, 8, 8, 2, (0.0, 0.0, 1.0)),
    ],
)
def test_causality(backend, T, bs, HQ, HKV, ratios):
    q, k, v, gate = rand_inputs(1, T, HQ, HKV, 16, seed=T + bs)
    cfg = AttentionConfig(budget=32, ratios=ratios, block_size=bs)
    out = mla_attention(q, k, v, gate, cfg, backend=backend, t_max=128)
    t = T // 2
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, gate))
    for x in (q2, k2, v2, g2):
        x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :])
    out2 = mla_attention(q2, k2, v2, g2, cfg, backend=backend, t_max=128)
    assert torch.equal(out[:, : t + 1], out2[:, : t + 1])
    assert not torch.equal(out[:, t + 1 :], out2[:, t + 1 :])


CASES = [
    pytest.param(2, 63, 4, 2, 16, (0.5, 0.25, 0.25), 8, 32, id="B2-T63-HQ4-G2-mixed"),
    pytest.param(1, 111, 8, 1, 16, (0.3, 0.2, 0.5), 16, 64, id="B1-T111-HQ8-G8-mixed"),
    pytest.param(1, 96, 4, 4, 32, (1.0, 0.0, 0.0), 8, 24, id="B1-T96-G1-local"),
    pytest.param(1, 70, 4, 2, 16, (0.0, 1.0, 0.0), 4, 16, id="B1-T70-G2-global"),
    pytest.param(1, 70, 16, 1, 8, (0.0, 0.0, 1.0), 4, 16, id="B1-T70-G16-sparse"),
    pytest.param(1, 50, 4, 2, 64, (0.25, 0.0, 0.75), 8, 32, id="B1-T50-D64-local-sparse"),
]


@pytest.mark.parametrize("B,T,HQ,HKV,D,ratios,bs,budget", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_matches_reference(B, T, HQ, HKV, D, ratios, bs, budget, masked):
    q, k, v, gate = rand_inputs(B, T, HQ, HKV, D, seed=T * HQ)
    head_mask = None
    if masked:
        head_mask = torch.zeros(HQ, dtype=torch.bool)
        head_mask[torch.randperm(HQ, generator=torch.Generator().manual_seed(T))[: HQ // 2 + 1]] = 1
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    ref = mla_reference(*leaves, cfg, head_mask=head_mask)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    leaves2 = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    out = mla_attention(*leaves2, cfg, head_mask=head_mask, backend="torch")
    grads = torch.autograd.grad(out, leaves2, dout)
    assert rel_err(out, ref) < 1e-5
    for name, g, r in zip("q k v gate".split(), grads, ref_grads):
        assert rel_err(g, r) < 1e-4, name
    if head_mask is not None:
        off = ~head_mask
        assert out[:, :, off].abs().max() == 0
        assert grads[0][:, :, off].abs().max() == 0
        assert grads[3][:, :, off].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_input(backend):
    q, k, v, gate = (x.requires_grad_() for x in rand_inputs(1, 64, 4, 2, 16, seed=11))
    cfg = AttentionConfig(budget=32, ratios=(0.5, 0.25, 0.25), block_size=8)
    mla_attention(q, k, v, gate, cfg, backend=backend).square().sum().backward()
    for name, x in zip("q k v gate".split(), (q, k, v, gate)):
        assert x.grad is not None and x.grad.abs().sum() > 0, name
        assert torch.isfinite(x.grad).all(), name
    assert (gate.grad.abs().sum((0, 1, 2)) > 0).all()  # every branch's gate weight learns


def test_absent_branch_costs_nothing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an absent branch was computed")

    monkeypatch.setattr(blocked_mod, "_sparse", forbidden)
    monkeypatch.setattr(blocked_mod, "_global", forbidden)
    monkeypatch.setattr(blocked_mod, "select_blocks", forbidden)
    q, k, v, gate = (x.requires_grad_() for x in rand_inputs(1, 48, 4, 2, 16, seed=2))
    cfg = AttentionConfig(budget=16, ratios=(1, 0, 0), block_size=8)
    mla_attention(q, k, v, gate, cfg, backend="torch").sum().backward()
    # the absent branches' gate weights get no input, hence no gradient
    assert gate.grad[..., 1:].abs().max() == 0
    assert gate.grad[..., 0].abs().max() > 0


def test_branch_rounding_to_nothing_is_absent():
    cfg = AttentionConfig(budget=100, ratios=(0.9, 0.1, 0.0), block_size=64)
    plan = cfg.plan(1024)
    assert plan.window == 90 and plan.has_global and not plan.has_sparse
    # sparse share 0.1 of 100 keys is less than half a block of 64: no block is selected
    assert AttentionConfig(budget=100, ratios=(0.9, 0, 0.1), block_size=64).plan(64).n_select == 0


def test_keys_per_query_counts_what_the_branches_read():
    cfg = AttentionConfig(budget=64, ratios=(0.25, 0.25, 0.5), block_size=8)
    T = 200
    plan = cfg.plan(T)
    q, k, _, _ = rand_inputs(1, T, 2, 1, 8)
    idx = select_blocks(q, k, plan)
    for t in (0, 5, 15, 16, 40, 199):
        local = min(plan.window, t + 1)
        glob = (t + 1) // plan.stride
        sparse = int((idx[0, t, 0] >= 0).sum()) * plan.block_size
        assert plan.keys_per_query(t) == local + glob + sparse, t


def test_block_scores_are_group_probabilities():
    q, k, _, _ = rand_inputs(1, 40, 4, 2, 8, seed=9)
    s = block_scores(q, k, 8)
    nb = 40 // 8
    for t in range(40):
        complete = (t + 1) // 8
        assert torch.allclose(
            s[0, t, :, :complete].sum(-1), torch.full((2,), 2.0 if complete else 0.0)
        )
        assert s[0, t, :, complete:nb].abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=0), "budget"),
        (dict(ratios=(0.5, 0.6, 0.0)), "sum to 1"),
        (dict(ratios=(1.5, -0.5, 0.0)), ">= 0"),
        (dict(ratios=(1.0, 0.0)), "3 entries"),
        (dict(block_size=24), "power of two"),
        (dict(budget=2, ratios=(0.0, 0.0, 1.0), block_size=64), "every branch empty"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionConfig(**kwargs)


def test_op_rejects_bad_inputs():
    cfg = AttentionConfig()
    q, k, v, gate = rand_inputs(1, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="divide"):
        mla_attention(
            q, k[:, :, :1].expand(1, 16, 3, 8), v[:, :, :1].expand(1, 16, 3, 8), gate, cfg
        )
    with pytest.raises(ValueError, match="gate"):
        mla_attention(q, k, v, gate[..., :2], cfg)
    with pytest.raises(ValueError, match="head_mask"):
        mla_attention(q, k, v, gate, cfg, head_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="t_max"):
        mla_attention(q, k, v, gate, cfg, t_max=8)
    with pytest.raises(ValueError, match="backend"):
        mla_attention(q, k, v, gate, cfg, backend="cuda")
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        mla_attention(q[0], k, v, gate, cfg)


def test_head_groups():
    from automla.kernels import HeadGroups

    geo = HeadGroups(12, 4)
    assert geo.size == 3 and geo.group_of(7) == 2 and geo.member(7) == 1
    assert geo.heads_of(1) == [3, 4, 5]
    assert geo.by_group([11, 0, 2, 9]) == {0: [0, 2], 3: [9, 11]}
    assert geo.groups_of([5, 4, 10]) == [1, 3]
    assert torch.equal(geo.group_of(torch.tensor([0, 5, 11])), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="must divide"):
        HeadGroups(12, 5)
