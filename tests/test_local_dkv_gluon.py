"""The Gluon local dk/dv (`kernels/parallel/local_dkv_gluon.py`, Hopper, head dims 64 and 128).

Gluon has no interpreter: on CPU the kernel is compiled for sm_90 (in a process without
TRITON_INTERPRET) at both head dims; on the GPU the op's gradients with it are compared with the
naive reference and with the `tl.dot` kernel's on fresh random inputs (odd T and a batch of two,
G = 3, a head mask that prunes part of a group and a whole one, a local-only plan, the global
branch's gradient spread back over the keys, and the items of a key tile split over programs).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compiles
from test_triton import make_inputs, rel_err, run_reference, run_triton

from automla.kernels import AttentionConfig
from automla.kernels.parallel import autograd, local_dkv_gluon, window_gluon

COMPILE = r"""
import sys
import torch
from helpers import compile_sm90
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

from automla.kernels.parallel import local_dkv_gluon as lg
from automla.kernels.parallel import window_gluon as wg

dtype, D = getattr(torch, sys.argv[1]), int(sys.argv[2])
T, HQ, HKV, BT = 77, 6, 2, lg.query_rows(D)
q = torch.zeros(1, T, HQ, D, dtype=dtype)
k = torch.zeros(1, T, HKV, D, dtype=dtype)
descs = {n: wg._descriptor(x, rows) for n, x, rows in [("q_desc", q, BT), ("do_desc", q, BT),
         ("k_desc", k, lg.BKW), ("v_desc", k, lg.BKW)]}
sig = {n: native_specialize_impl(BaseBackend, d, False, True, True)[0] for n, d in descs.items()}
sig.update(gate="*bf16" if dtype == torch.bfloat16 else "*fp16", active="*i32", groups="*i32")
sig.update({n: "*fp32" for n in ["lse_l", "delta_l", "dk", "dv", "dkc", "dvc"]})
sig.update({n: "i32" for n in ["T", "NC", "NA", "NSPLIT", "window", "stride"]})
sig.update(scale2="fp32", scale="fp32", spread="i32")
consts = dict(HQ=HQ, G=HQ // HKV, STAGES=lg.STAGES, CONSUMER_REGS=lg.CONSUMER_REGS)
kern = compile_sm90(lg._local_dkv_gluon, sig, consts, lg.MAX_REGS)
print("ok", kern.metadata.shared)
"""


@pytest.mark.skipif(not window_gluon._GLUON, reason="this Triton has no Gluon Hopper dialect")
@pytest.mark.parametrize("dtype,D", [("bfloat16", 64), ("float16", 64), ("bfloat16", 128)])
def test_gluon_local_dkv_compiles_for_sm90(dtype, D):
    assert_compiles(COMPILE, dtype, str(D))


def test_gluon_local_dkv_is_not_taken_off_the_gpu(monkeypatch):
    monkeypatch.setattr(local_dkv_gluon, "ENABLED", 1)  # switched on, still only for CUDA
    assert not local_dkv_gluon.available(torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16))


NSA = (512 / 1664, 128 / 1664, 1024 / 1664)
# (B, T, HQ, HKV, D, budget, ratios, block_size, mask, programs)
GPU_CASES = [
    pytest.param(2, 1999, 6, 2, 64, 256, (0.5, 0.25, 0.25), 32, None, 512, id="B2-T1999-G3"),
    pytest.param(1, 4099, 12, 4, 64, 1664, NSA, 64, None, 512, id="12/4-nsa-spread"),
    pytest.param(1, 3001, 12, 4, 64, 1664, NSA, 64, "mask", 1, id="mask-one-program-a-tile"),
    pytest.param(1, 2500, 8, 2, 64, 512, (1.0, 0.0, 0.0), 64, None, 4096, id="local-only-split"),
    pytest.param(1, 2049, 16, 2, 128, 1664, NSA, 64, "mask", 512, id="D128-mask"),
    pytest.param(2, 1537, 8, 1, 128, 320, (0.4, 0.2, 0.4), 64, None, 512, id="D128-B2-G8"),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,HQ,HKV,D,budget,ratios,bs,mask,programs", GPU_CASES)
def test_gpu_gluon_local_dkv_matches_reference_and_the_tl_dot_kernel(
    B, T, HQ, HKV, D, budget, ratios, bs, mask, programs, monkeypatch
):
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs, select_tile=64)
    q, k, v, gate, do = make_inputs(B, T, HQ, HKV, D, torch.bfloat16, device="cuda", seed=T)
    head_mask = None
    if mask:  # part of the first group and the whole second one pruned
        G = HQ // HKV
        head_mask = torch.ones(HQ, dtype=torch.bool, device="cuda")
        head_mask[0] = head_mask[G : 2 * G] = False
    monkeypatch.setattr(autograd, "LOCAL_DKV_PROGRAMS", programs)
    monkeypatch.setattr(local_dkv_gluon, "ENABLED", 1)
    assert local_dkv_gluon.available(q)
    o, grads = run_triton(q, k, v, gate, do, cfg, head_mask)
    monkeypatch.setattr(local_dkv_gluon, "ENABLED", 0)
    _, grads_dot = run_triton(q, k, v, gate, do, cfg, head_mask)
    o_ref, grads_ref = run_reference(q, k, v, gate, do, cfg, head_mask)
    errs = {"o": rel_err(o, o_ref)}
    for name, x, ref, dot in zip(("dq", "dk", "dv", "dgate"), grads, grads_ref, grads_dot):
        errs[name] = rel_err(x, ref)
        errs[name + " vs tl.dot"] = rel_err(x, dot)
    assert all(e <= 1e-2 for e in errs.values()), errs
