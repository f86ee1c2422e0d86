"""The Triton RMSNorm (trainers/rms_norm.py) against F.rms_norm: output and both gradients,
rows that do not fill a block, a width that is not a power of two, the output in autocast's
dtype; under the interpreter on CPU, and at the 125M model's sizes on the GPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

from automla.trainers import rms_norm as rn

CUDA = torch.cuda.is_available()  # else conftest runs Triton in its interpreter


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_matches_f_rms_norm(monkeypatch, out):
    if CUDA:
        pytest.skip("the interpreter's small sizes; the GPU test below covers CUDA")
    monkeypatch.setattr(rn, "ELEMENTS", 128)  # width 48 -> 64 padded: 2 rows a step
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 13, 48, generator=g) * 3
    w = 1 + 0.1 * torch.randn(48, generator=g)
    dy = torch.randn(3, 13, 48, generator=g)
    y, dx, dw = _run(lambda x, w: rn._RMSNorm.apply(x, w, 1e-6, out), x, w, dy)
    ry, rdx, rdw = _run(lambda x, w: F.rms_norm(x, (48,), w, 1e-6), x, w, dy.to(out).float())
    assert y.dtype == out
    # the interpreter's casts to bfloat16 truncate: within one of its steps (2^-8), not equal
    assert relative_error(y, ry) < (4e-3 if out == torch.bfloat16 else 1e-6)
    assert relative_error(dx, rdx) < 1e-5 and relative_error(dw, rdw) < 1e-5


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

    y, dx, dw = _run(ours, x, w, dy)
    ry, rdx, rdw = _run(lambda x, w: F.rms_norm(x, (768,), w, 1e-6), x, w, dy.bfloat16().float())
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    # what the plain norm's consumer reads, its output cast to bfloat16: the same but where
    # the float32 sums round differently
    assert (y != ry.bfloat16()).float().mean() < 1e-3
    assert relative_error(dx, rdx) < 1e-4 and relative_error(dw, rdw) < 1e-4
