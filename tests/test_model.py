"""The language model: shapes, causality, MLA against dense attention, the gate and head mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tokens

from automla.kernels import AttentionConfig, GateConfig
from automla.trainers import LanguageModel, ModelConfig, build_model
from automla.trainers.model import apply_rotary, rotary_table


def tiny(attention="mla", **mla) -> ModelConfig:
    mla_cfg = AttentionConfig(**{"budget": 16, "ratios": (0.5, 0.25, 0.25), "block_size": 4, **mla})
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        max_seq_len=40, attention=attention, mla=mla_cfg, attn_backend="torch",
    )  # fmt: skip


def model_of(cfg: ModelConfig, seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def trained_once(model: LanguageModel, autocast: bool = True):
    """The float32 logits and each parameter's gradient of one training forward and backward on
    fixed tokens (bf16 autocast on the CPU, or none)."""
    idx, targets = tokens(2, 37), tokens(2, 37, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model.train()(idx, targets)
    loss.backward()
    return logits.float(), {n: p.grad for n, p in model.named_parameters()}


GATES = [
    pytest.param(GateConfig(), id="hidden-linear"),
    pytest.param(GateConfig(hidden=[16, 8], activation="gelu"), id="hidden-mlp"),
    pytest.param(GateConfig(hidden=[8], activation="tanh", input="query"), id="query-mlp"),
]


@pytest.mark.parametrize("gate", GATES)
def test_forward_shapes_and_loss(gate):
    cfg = tiny(gate=gate)
    model = model_of(cfg)
    idx, targets = tokens(2, 37), tokens(2, 37, seed=2)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 37, 64)
    assert loss.shape == ()
    assert model(idx)[1] is None
    # ignored positions (-100) leave the loss over the others unchanged
    targets[:, ::3] = -100
    keep = targets != -100
    _, loss = model(idx, targets)
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_whole_model_is_causal(attention):
    model = model_of(tiny(attention))
    idx = tokens(2, 40)
    ref, _ = model(idx)
    for t in (0, 5, 17, 30):
        changed = idx.clone()
        changed[:, t + 1 :] = tokens(2, 39 - t, seed=t + 10)
        out, _ = model(changed)
        assert torch.allclose(out[:, : t + 1], ref[:, : t + 1], atol=1e-5), t
        # the test can fail: later logits do move
        assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("T", [40, 29])
def test_global_stride_one_mla_equals_dense_model(backend, T):
    """ratios (0, 1, 0), block 1, budget >= T is full causal attention (DESIGN §1): with the
    dense model's weights and the gate held at 1 the two models agree."""
    dense = model_of(tiny("dense"))
    cfg = tiny(budget=40, ratios=(0, 1, 0), block_size=1)
    cfg.attn_backend = backend
    mla = build_model(cfg).eval()
    missing, unexpected = mla.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".attn.gate." in k for k in missing)
    with torch.no_grad():
        for block in mla.blocks:
            last = block.attn.gate.net[-1]
            last.weight.zero_()
            last.bias.fill_(30.0)  # sigmoid(30) is 1.0 in float32
    idx = tokens(3, T)
    want, _ = dense(idx)
    got, _ = mla(idx)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("gate", GATES)
def test_gate_starts_near_half_and_is_trained(gate):
    model = model_of(tiny(gate=gate)).train()
    idx = tokens(2, 32)
    attn = model.blocks[0].attn
    seen = {}
    attend = attn._attend

    def spy(q, k, v, gate, mask):  # the gate as the op receives it
        seen.setdefault("g", gate)
        return attend(q, k, v, gate, mask)

    attn._attend = spy
    _, loss = model(idx, tokens(2, 32, seed=3))
    assert (seen["g"] - 0.5).abs().max() < 0.1
    loss.backward()
    for block in model.blocks:
        for name, p in block.attn.gate.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_num_params_counts_tied_embedding_once():
    cfg = tiny("dense")
    V, C, L, D = 64, 32, 2, 8
    hidden = 32 * math.ceil(cfg.ffn_mult * C / 32)  # 96
    per_layer = C * (4 + 2 * 2) * D + 4 * D * C + C * 2 * hidden + hidden * C + 2 * C
    assert model_of(cfg).num_params() == V * C + L * per_layer + C
    gate = (C + 1) * 4 * 3  # one linear layer to HQ * 3 logits
    assert model_of(tiny("mla")).num_params() == V * C + L * (per_layer + gate) + C


def test_attn_flops_per_token():
    T, D, HQ, L = 32, 8, 4, 2
    dense = model_of(tiny("dense"))
    keys = T * (T + 1) // 2
    assert dense.attn_flops_per_token(T) == pytest.approx(L * 3.5 * 4 * D * HQ * keys / T)
    # sliding window of 8 keys (ratios (1, 0, 0))
    local = model_of(tiny(budget=8, ratios=(1, 0, 0)))
    keys = sum(min(8, t + 1) for t in range(T))
    assert local.attn_flops_per_token(T) == pytest.approx(L * 3.5 * 4 * D * HQ * keys / T)
    # a pruned head is not counted
    local.blocks[1].attn.set_head_mask(torch.tensor([True, False, True, True]))
    assert local.active_heads_per_layer() == [4, 3]
    assert local.attn_flops_per_token(T) == pytest.approx(7 * 3.5 * 4 * D * keys / T)


@pytest.mark.parametrize("attention", ["mla", "dense"])
def test_head_mask_zeroes_the_pruned_head(attention):
    """A masked head behaves as if its slice of the output projection were zero. (No sparse
    branch here: its block selection rightly depends on which heads of a group are active.)"""
    cfg = tiny(attention, ratios=(0.5, 0.5, 0.0))
    model = model_of(cfg)
    mask = torch.tensor([True, True, False, True])
    reference = model_of(cfg)
    with torch.no_grad():
        reference.blocks[0].attn.proj.weight[:, 2 * 8 : 3 * 8] = 0.0
    model.blocks[0].attn.set_head_mask(mask)
    idx = tokens(2, 33)
    got, _ = model(idx)
    want, _ = reference(idx)
    assert torch.allclose(got, want, atol=1e-5)
    # the mask travels with the state dict, and the model honours it after loading
    fresh = model_of(cfg, seed=5)
    fresh.load_state_dict(model.state_dict())
    assert fresh.active_heads_per_layer() == [3, 4]
    assert torch.allclose(fresh(idx)[0], got, atol=1e-6)


def test_sequence_longer_than_max_raises():
    with pytest.raises(ValueError, match="max_seq_len"):
        model_of(tiny("dense"))(tokens(1, 41))


def test_rotary_scores_depend_on_relative_position_only():
    q, k = torch.randn(1, 1, 1, 8).expand(1, 20, 1, 8), torch.randn(1, 1, 1, 8).expand(1, 20, 1, 8)
    rot = rotary_table(20, 8, 10_000.0)
    rq, rk = apply_rotary(q, rot)[0, :, 0], apply_rotary(k, rot)[0, :, 0]  # (T, D)
    scores = rq @ rk.T  # scores[m, n] of the same q and k placed at m and n
    assert torch.allclose(scores[5, 2], scores[15, 12], atol=1e-5)
    assert torch.allclose(scores[7, 7], (q[0, 0, 0] * k[0, 0, 0]).sum(), atol=1e-5)
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)
    assert torch.allclose(rq.norm(dim=-1), q[0, :, 0].norm(dim=-1), atol=1e-5)


def test_hidden_gate_reads_one_cast_of_x_under_autocast(monkeypatch):
    # The qkv and gate projections both read x: cast once, the forward is unchanged (autocast
    # would cast the same x to the same dtype) and the gradients agree to bf16 rounding.
    import automla.trainers.model as model_module

    cfg = tiny(gate=GateConfig(hidden=[16, 8], activation="gelu"))
    logits, grads = trained_once(model_of(cfg))
    monkeypatch.setattr(model_module, "_autocast_once", lambda x: x)
    logits_ref, grads_ref = trained_once(model_of(cfg))
    assert torch.equal(logits, logits_ref)
    for name, g in grads_ref.items():
        err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 3e-2, name
    # the embeddings' gradient passes through x's gradient of every layer
    assert not torch.equal(grads["embed.weight"], grads_ref["embed.weight"])
