"""The Gluon window forward (`kernels/parallel/window_gluon.py`, head dim 128 on Hopper).

Gluon has no interpreter, so on CPU the kernel is only compiled for sm_90 (in a process without
TRITON_INTERPRET, whose patched builtins the compiler cannot take), for every plan shape it
takes. On the GPU its branch outputs, lse and gated sum are compared with the `tl.dot` kernel's
on fresh random inputs (odd T and a batch of two, packs with a missing head, a head mask,
one-branch plans, no stored outputs), and the whole op with it against the naive reference
(`test_triton.py`'s GPU cases at head dim 128 take it too).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compiles
from test_triton import make_inputs, rel_err, run_reference, run_triton

from automla.kernels import AttentionConfig
from automla.kernels.parallel import autograd, window_gluon
from automla.kernels.parallel.layout import _Layout

COMPILE = r"""
import sys
import torch
from helpers import compile_sm90
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from automla.kernels.parallel import window_gluon as wg

dtype = getattr(torch, sys.argv[1])
# without gradients the op hands the kernel a float32 stand-in for o_l (never written)
kept = sys.argv[2] == "keep"
T, HQ, HKV, D = 77, 6, 2, int(sys.argv[3])
q = torch.zeros(1, T, HQ, D, dtype=dtype)
k = torch.zeros(1, T, HKV, D, dtype=dtype)
descs = {n: wg._descriptor(x, rows) for n, x, rows in [("q_desc", q, wg.BT), ("k_desc", k, wg.BN),
         ("v_desc", k, wg.BN), ("kc_desc", k, wg.BN), ("vc_desc", k, wg.BN), ("o_desc", q, wg.BT),
         ("ol_desc", q, wg.BT)]}
sig = {n: native_specialize_impl(BaseBackend, d, False, True, True)[0] for n, d in descs.items()}
ptr = "*bf16" if dtype == torch.bfloat16 else "*fp16"
sig.update(gate=ptr, packs="*i32", o=ptr, o_l=ptr if kept else "*fp32", lse_l="*fp32")
sig.update(lse_g="*fp32")
sig.update({n: "i32" for n in ["T", "NC", "NP", "NB", "window", "stride"]}, scale2="fp32")
sig.update({n: "i32" for n in ["has_local", "has_global", "store"]})
consts = dict(HQ=HQ, G=HQ // HKV, BN=wg.BN, STAGES=wg.STAGES, CONSUMER_REGS=wg.CONSUMER_REGS)
kern = compile_sm90(wg._window_fwd_gluon, sig, consts, wg.MAX_REGS)
print("ok", kern.metadata.shared)
"""


@pytest.mark.skipif(not window_gluon._GLUON, reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize(
    "dtype,o_l,D",
    [("bfloat16", "keep", 128), ("float16", "keep", 128), ("bfloat16", "stand-in", 128),
     ("bfloat16", "keep", 64)],
)  # fmt: skip
def test_gluon_window_forward_compiles_for_sm90(dtype, o_l, D):
    assert_compiles(COMPILE, dtype, o_l, str(D))


def test_gluon_window_forward_is_not_taken_off_the_gpu(monkeypatch):
    monkeypatch.setattr(window_gluon, "ENABLED", 1)  # switched on, still only for CUDA
    q = torch.zeros(1, 8, 2, 128, dtype=torch.bfloat16)
    assert not window_gluon.available(q, 1024)


def test_gluon_window_forward_is_wanted_for_long_prefixes_unless_set(monkeypatch):
    # unset (-1): from MIN_NC compressed keys; MLA_GLUON=1 or 0 override it
    for enabled, short, long in [(-1, False, True), (1, True, True), (0, False, False)]:
        monkeypatch.setattr(window_gluon, "ENABLED", enabled)
        n = window_gluon.MIN_NC
        assert (window_gluon.wanted(n - 1), window_gluon.wanted(n)) == (short, long), enabled


def _window_outputs(q, k, v, gate, cfg, head_mask, store, gluon: bool, monkeypatch):
    monkeypatch.setattr(window_gluon, "ENABLED", int(gluon))
    plan = cfg.plan(q.shape[1])
    lay = _Layout(q, k, plan, head_mask)
    o, saved = autograd.mla_fwd(q, k, v, gate.to(q.dtype), lay, store)
    names = ["lse_l", "lse_g"] + (["o_l"] if store else [])
    return o, {n: saved[n] for n in names if saved[n] is not o}, lay


NSA = (512 / 1664, 128 / 1664, 1024 / 1664)
# (B, T, HQ, HKV, D, budget, ratios, block_size, mask, store)
GPU_CASES = [
    pytest.param(1, 8192, 64, 4, 128, 1664, NSA, 64, None, True, id="64/4-8k-nsa"),
    pytest.param(2, 1999, 6, 2, 128, 256, (0.5, 0.25, 0.25), 32, None, True, id="B2-T1999-G3"),
    pytest.param(1, 1537, 16, 1, 128, 320, (0.4, 0.2, 0.4), 64, "mask", True, id="T1537-G16-mask"),
    pytest.param(1, 3001, 8, 2, 128, 512, (1.0, 0.0, 0.0), 64, None, True, id="local-only"),
    pytest.param(1, 2048, 8, 1, 128, 2048, (0.0, 1.0, 0.0), 1, None, True, id="global-only-causal"),
    pytest.param(1, 4099, 12, 4, 128, 1664, NSA, 64, None, False, id="no-store"),
    pytest.param(2, 3001, 12, 4, 64, 1664, NSA, 64, "mask", True, id="D64-G3-mask"),
    pytest.param(1, 4099, 12, 4, 64, 1664, NSA, 64, None, False, id="D64-no-store"),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,HQ,HKV,D,budget,ratios,bs,mask,store", GPU_CASES)
def test_gpu_gluon_window_forward_matches_the_tl_dot_kernel(
    B, T, HQ, HKV, D, budget, ratios, bs, mask, store, monkeypatch
):
    monkeypatch.setattr(window_gluon, "MIN_HEAD_DIM", 64)
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs)
    q, k, v, gate, _ = make_inputs(B, T, HQ, HKV, D, torch.bfloat16, device="cuda", seed=T)
    head_mask = None
    if mask:
        head_mask = torch.arange(HQ) % 3 != 1
        head_mask[: HQ // HKV // 2] = False
    o, saved, lay = _window_outputs(q, k, v, gate, cfg, head_mask, store, True, monkeypatch)
    assert window_gluon.available(q, lay.NC)
    o_ref, saved_ref, _ = _window_outputs(q, k, v, gate, cfg, head_mask, store, False, monkeypatch)
    errs = {"o": rel_err(o, o_ref)}
    active = torch.arange(HQ) if head_mask is None else head_mask.nonzero()[:, 0]
    for name, x in saved.items():
        # pruned heads' rows are written by neither kernel
        x, ref = x[:, :, active.to(x.device)], saved_ref[name][:, :, active.to(x.device)]
        if name.startswith("lse"):  # rows with no key hold +inf in both
            assert torch.equal(torch.isinf(x), torch.isinf(ref)), name
            x, ref = torch.where(torch.isinf(x), 0, x), torch.where(torch.isinf(ref), 0, ref)
        errs[name] = rel_err(x, ref)
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.gpu
def test_gpu_op_with_the_gluon_window_forward_matches_reference(monkeypatch):
    monkeypatch.setattr(window_gluon, "ENABLED", 1)  # by default only from MIN_NC keys
    cfg = AttentionConfig(budget=1664, ratios=(512 / 1664, 128 / 1664, 1024 / 1664), block_size=64)
    q, k, v, gate, do = make_inputs(2, 2500, 16, 2, 128, torch.bfloat16, device="cuda", seed=5)
    assert window_gluon.available(q, 1)
    o, grads = run_triton(q, k, v, gate, do, cfg)
    o_ref, grads_ref = run_reference(q, k, v, gate, do, cfg)
    errs = {"o": rel_err(o, o_ref)}
    for name, x, ref in zip(("dq", "dk", "dv", "dgate"), grads, grads_ref):
        errs[name] = rel_err(x, ref)
    assert all(e <= 1e-2 for e in errs.values()), errs
