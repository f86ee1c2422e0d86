"""The chunked linear + cross-entropy (trainers/cross_entropy.py) against F.cross_entropy of the
whole logits: loss and both gradients, several chunks, ignored targets, under the interpreter
on CPU and at the 125M model's vocabulary on the GPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

from automla.trainers import cross_entropy as ce

CUDA = torch.cuda.is_available()  # else conftest runs Triton in its interpreter


def _reference(h, w, y, scale):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logits = (h.to(torch.bfloat16) @ w.to(torch.bfloat16).T) if h.is_cuda else h @ w.T
    loss = F.cross_entropy(logits.float(), y, ignore_index=-100)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _chunked(h, w, y, scale, autocast=False):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = ce.linear_cross_entropy(h, w, y)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("ignored", [0, 9])
def test_matches_cross_entropy_over_chunks(monkeypatch, ignored):
    if CUDA:
        pytest.skip("the interpreter's small sizes; the GPU test below covers CUDA")
    monkeypatch.setattr(ce, "BLOCK", 128)  # V 300: three steps, the last one partial
    monkeypatch.setattr(
        ce, "CHUNK_BYTES", 11 * 300 * 4
    )  # at most 11 rows a chunk: 37 rows in 4 (10, 10, 10, 7)
    g = torch.Generator().manual_seed(ignored)
    N, C, V = 37, 24, 300
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:ignored]] = -100
    loss, dh, dw = _chunked(h, w, y, 3.0)
    ref_loss, ref_dh, ref_dw = _reference(h, w, y, 3.0)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    assert relative_error(dh, ref_dh) < 1e-5 and relative_error(dw, ref_dw) < 1e-5
    if ignored:  # the ignored rows get no gradient
        assert dh[y == -100].abs().max() == 0


def test_no_target_is_nan_without_nan_gradients(monkeypatch):
    if CUDA:
        pytest.skip("interpreter case")
    monkeypatch.setattr(ce, "BLOCK", 64)
    h, w = torch.randn(5, 8), torch.randn(70, 8)
    loss, dh, dw = _chunked(h, w, torch.full((5,), -100), 1.0)
    assert torch.isnan(loss) and (dh == 0).all() and (dw == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_gpu_bf16_at_the_models_vocabulary():
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, V = 4096, 768, 50304
    h = torch.randn(N, C, device="cuda", generator=g)
    w = torch.randn(V, C, device="cuda", generator=g) * 0.02
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[:100] = -100
    loss, dh, dw = _chunked(h, w, y, 2.0, autocast=True)
    ref_loss, ref_dh, ref_dw = _reference(h, w, y, 2.0)
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    assert relative_error(dh, ref_dh) < 1e-2 and relative_error(dw, ref_dw) < 1e-2
