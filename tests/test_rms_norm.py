"""The Triton RMSNorm (trainers/rms_norm.py) against F.rms_norm: output and both gradients,
rows that do not fill a block, a width that is not a power of two, the output in autocast's
dtype; with the residual add before it against the add then F.rms_norm, and in the model;
under the interpreter on CPU, and at the 125M model's sizes on the GPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error, tokens

from automla.kernels import AttentionConfig
from automla.trainers import ModelConfig, build_model, fast_ops
from automla.trainers import rms_norm as rn

CUDA = torch.cuda.is_available()  # else conftest runs Triton in its interpreter


def _run(fn, inputs, grads):
    """fn's outputs (one or a tuple) and its inputs' gradients, the outputs given `grads` (in
    their dtypes; None: that output is not read)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    read = [(o, g.to(o.dtype)) for o, g in zip(outs, grads) if g is not None]
    torch.autograd.backward([o for o, _ in read], [g for _, g in read])
    return *(o.detach() for o in outs), *(t.grad for t in inputs)


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_matches_f_rms_norm(monkeypatch, out):
    if CUDA:
        pytest.skip("the interpreter's small sizes; the GPU test below covers CUDA")
    monkeypatch.setattr(rn, "ELEMENTS", 128)  # width 48 -> 64 padded: 2 rows a step
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, 48, generator=g) * 3
    w = 1 + 0.1 * torch.randn(48, generator=g)
    dy = torch.randn(3, 13, 48, generator=g)
    y, dx, dw = _run(lambda x, w: rn._RMSNorm.apply(x, w, 1e-6, out), (x, w), (dy,))
    ry, rdx, rdw = _run(lambda x, w: F.rms_norm(x, (48,), w, 1e-6), (x, w), (dy.to(out).float(),))
    assert y.dtype == out
    # the interpreter's casts to bfloat16 truncate: within one of its steps (2^-8), not equal
    assert relative_error(y, ry) < (4e-3 if out == torch.bfloat16 else 1e-6)
    assert relative_error(dx, rdx) < 1e-5 and relative_error(dw, rdw) < 1e-5


@pytest.mark.parametrize("r_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reads_h", [True, False])
def test_add_matches_the_add_then_f_rms_norm(monkeypatch, r_dtype, reads_h):
    if CUDA:
        pytest.skip("the interpreter's small sizes; the GPU test below covers CUDA")
    monkeypatch.setattr(rn, "ELEMENTS", 128)  # width 48 -> 64 padded: 2 rows a step
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 13, 48, generator=g) * 3
    r = torch.randn(3, 13, 48, generator=g).to(r_dtype)
    w = 1 + 0.1 * torch.randn(48, generator=g)
    dh = torch.randn(3, 13, 48, generator=g) if reads_h else None
    dy = torch.randn(3, 13, 48, generator=g)

    def ref(x, r, w):
        h = x + r
        return h, F.rms_norm(h, (48,), w, 1e-6)

    ours = lambda x, r, w: rn._AddRMSNorm.apply(x, r, w, 1e-6, torch.float32)  # noqa: E731
    out = _run(ours, (x, r, w), (dh, dy))
    expected = _run(ref, (x, r, w), (dh, dy))
    h, y, dx, dr, dw = out
    assert torch.equal(h, expected[0])  # the add is torch's, rounded once
    assert dx.dtype == torch.float32 and dr.dtype == r_dtype
    for name, a, b in zip(("y", "dx", "dr", "dw"), out[1:], expected[1:]):
        # the interpreter truncates to bfloat16 (2^-8), torch rounds (2^-9)
        tol = 8e-3 if name == "dr" and r_dtype == torch.bfloat16 else 1e-5
        assert relative_error(a, b) < tol, name


@pytest.mark.parametrize("checkpoint", ["none", "attention", "block"])
def test_models_norms_with_their_residual_adds_match_the_plain_path(monkeypatch, checkpoint):
    # Every residual add runs inside the next norm (the last block's in the final one): the
    # model's loss and gradients are the plain path's, checkpointed or not.
    if CUDA:
        pytest.skip("the fused ops' CUDA tests cover this")
    mla = AttentionConfig(budget=16, ratios=(0.5, 0.25, 0.25), block_size=4)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
        mla=mla, attn_backend="torch", checkpoint=checkpoint,
    )  # fmt: skip
    monkeypatch.setattr(fast_ops, "NORM", "triton-add")
    calls = []
    fused_add = rn.add_rms_norm
    monkeypatch.setattr(rn, "add_rms_norm", lambda *a: calls.append(1) or fused_add(*a))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    idx, targets = tokens(2, 32, seed=5), tokens(2, 32, seed=6)
    results = []
    for fused in (False, True):
        for m in model.modules():
            if hasattr(m, "add"):  # the norms alone: the rest of the fused ops needs liger
                m.fused = fused
        model.zero_grad()
        loss = model(idx, targets)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    # the attention's add of each block, the second block's first add (the first block's MLP
    # output) and the last one's in the final norm; checkpointed, that first add runs apart (a
    # checkpoint keeps one input), and a checkpointed block's adds run again in the backward
    assert len(calls) == {"none": 4, "attention": 3, "block": 3 + 2}[checkpoint]
    assert torch.allclose(loss1, loss0, rtol=1e-5)
    for name, g in grads0.items():
        assert relative_error(grads1[name], g) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_gpu_under_autocast_at_the_models_width():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 4099, 768, device="cuda", generator=g)
    w = 1 + 0.1 * torch.randn(768, device="cuda", generator=g)
    dy = torch.randn(2, 4099, 768, device="cuda", generator=g)

    def ours(x, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return rn.rms_norm(x, w, 1e-6)

    y, dx, dw = _run(ours, (x, w), (dy,))
    ry, rdx, rdw = _run(
        lambda x, w: F.rms_norm(x, (768,), w, 1e-6), (x, w), (dy.bfloat16().float(),)
    )
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    # what the plain norm's consumer reads, its output cast to bfloat16: the same but where
    # the float32 sums round differently
    assert (y != ry.bfloat16()).float().mean() < 1e-3
    assert relative_error(dx, rdx) < 1e-4 and relative_error(dw, rdw) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_gpu_add_under_autocast_at_the_models_width():
    # the model's case: the float32 residual stream plus a linear's bf16 output
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 4099, 768, device="cuda", generator=g)
    r = torch.randn(2, 4099, 768, device="cuda", generator=g).bfloat16()
    w = 1 + 0.1 * torch.randn(768, device="cuda", generator=g)
    dh = torch.randn(2, 4099, 768, device="cuda", generator=g)
    dy = torch.randn(2, 4099, 768, device="cuda", generator=g).bfloat16()

    def ours(x, r, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return rn.add_rms_norm(x, r, w, 1e-6)

    def ref(x, r, w):
        h = x + r
        return h, F.rms_norm(h, (768,), w, 1e-6)

    h, y, dx, dr, dw = _run(ours, (x, r, w), (dh, dy))
    rh, ry, rdx, rdr, rdw = _run(ref, (x, r, w), (dh, dy.float()))
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16 and dr.dtype == torch.bfloat16
    assert torch.equal(h, rh)
    assert (y != ry.bfloat16()).float().mean() < 1e-3
    for a, b in ((dx, rdx), (dr, rdr), (dw, rdw)):
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-4
        assert relative_error(a, b) < tol
