"""The MLA layer's slot layout: queries, gates and proj columns gathered from weights in slot
order (empty slots borrow a stored head's weights and are masked out of the op) must give the
outputs, gradients and importance of the layer run the old way, where the active heads'
activations were scattered into zeroed slots and gathered back after the op."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from automla.kernels import AttentionConfig, GateConfig, mla_attention
from automla.trainers import ModelConfig, build_model, compact
from automla.trainers.model import Attention, apply_rotary

HEADS, KV, D = 12, 3, 16  # G = 4; head dim 16 so that the Triton kernels take it too
B, T = 2, 37

GATES = [
    pytest.param(GateConfig(), id="hidden-gate"),
    pytest.param(GateConfig(hidden=[8], activation="tanh", input="query"), id="query-gate"),
]
# The Triton kernels run on the GPU where there is one, else in the interpreter on CPU tensors
# (conftest sets TRITON_INTERPRET=1 without CUDA).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no Triton")
BACKENDS = ["torch", "reference", pytest.param("triton", marks=NEEDS_TRITON)]


def heads(active: set[int], ramps: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.tensor([h in active for h in range(HEADS)])
    scale = torch.ones(HEADS)
    for h, s in ramps.items():
        scale[h] = s
    return mask, scale


# (active heads, mask values): each with a ramped head (0 < xi < 1) and a probed one (xi = 0)
MASKS = {
    # group 1 loses head 5: a hole in the middle of a kept group
    "partial-group": heads(set(range(HEADS)) - {5}, {2: 0.5, 9: 0.0}),
    # group 0 and 2 half kept, group 1 dropped; the first active head is not slot 0
    "scattered": heads({1, 3, 8, 10, 11}, {8: 0.5, 11: 0.0}),
    # whole groups 0 and 2: the slots are filled in order, nothing is masked in the op
    "whole-groups": heads({0, 1, 2, 3, 8, 9, 10, 11}, {0: 0.25, 10: 0.0}),
    "all-heads": heads(set(range(HEADS)), {7: 0.5, 3: 0.0}),
}
# every mask on the PyTorch paths; on the (slow) interpreted Triton path the ones with holes
CASES = [pytest.param(name, b, id=f"{name}-{b}") for b in ("torch", "reference") for name in MASKS]
CASES += [
    pytest.param(name, "triton", id=f"{name}-triton", marks=NEEDS_TRITON)
    for name in ("partial-group", "scattered")
]


def config(gate: GateConfig, backend: str = "torch", n_layers: int = 1) -> ModelConfig:
    mla = AttentionConfig(budget=16, ratios=(0.5, 0.25, 0.25), block_size=4, gate=gate)
    return ModelConfig(
        vocab_size=64, d_model=32, n_layers=n_layers, n_heads=HEADS, n_kv_heads=KV, head_dim=D,
        max_seq_len=40, attention="mla", mla=mla, attn_backend=backend,
    )  # fmt: skip


def model_of(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).train()


def old_way(attn: Attention, x: torch.Tensor, rot: torch.Tensor):
    """The layer computed from its weights the old way, independently of its layout: all stored
    heads projected, the active ones scattered into zeroed slots (G per kept KV head), the naive
    reference op, each active slot gathered back, scaled and projected by its own proj columns.

    Returns the output and, per active stored head i, (o_i, s_i = xi_i o_i) with s_i retaining
    its gradient: the head's importance is <o_i, dL/ds_i>."""
    cfg, G, d = attn.cfg, attn.group, attn.head_dim
    hq, hkv = attn.n_heads, attn.n_kv_heads
    mask, scale = attn.head_mask.cpu(), attn.head_scale.cpu()
    active = mask.nonzero().flatten().tolist()
    orig = [attn.heads[i] for i in active]
    kept = sorted({h // G for h in orig})
    kv_pos = [attn.kv_heads.index(g) for g in kept]
    slot = {i: kept.index(h // G) * G + h % G for i, h in zip(active, orig)}
    by_slot = {s: i for i, s in slot.items()}
    n_slots = G * len(kept)

    Bx, Tx, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight).view(Bx, Tx, hq + 2 * hkv, d)
    q_raw = qkv[:, :, :hq]
    q = apply_rotary(q_raw, rot)
    k = apply_rotary(qkv[:, :, hq : hq + hkv][:, :, kv_pos], rot)
    v = qkv[:, :, hq + hkv :][:, :, kv_pos]
    if cfg.mla.gate.input == "hidden":
        logits = attn.gate(x).view(Bx, Tx, hq, 3)  # every stored head's gate
    else:
        logits = attn.gate(q_raw)
    gate = torch.sigmoid(logits)

    def scatter(t: torch.Tensor) -> torch.Tensor:
        zero = t.new_zeros(Bx, Tx, t.shape[-1])
        return torch.stack(
            [t[:, :, by_slot[s]] if s in by_slot else zero for s in range(n_slots)], 2
        )

    slot_mask = torch.tensor([s in by_slot for s in range(n_slots)])
    y = mla_attention(
        scatter(q), k, v, scatter(gate), cfg.mla, t_max=cfg.max_seq_len,
        head_mask=slot_mask, backend="reference",
    )  # fmt: skip
    out, heads_out = 0, {}
    for i in active:
        o = y[:, :, slot[i]]
        s = o * scale[i]
        s.retain_grad()
        heads_out[i] = (o, s)
        out = out + F.linear(s, attn.proj.weight[:, i * d : (i + 1) * d])
    return out, heads_out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||; NaN or inf anywhere gives inf, so it never passes."""
    x, ref = x.double(), ref.double()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_old_way(attn: Attention, rot: torch.Tensor, seed: int, tol: float = 2e-5):
    """Forward, backward and importance of `attn` on fresh random inputs against `old_way`."""
    device = rot.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, attn.cfg.d_model, generator=g).to(device)
    w_out = torch.randn(B, T, attn.cfg.d_model, generator=g).to(device)
    params = dict(attn.named_parameters())

    # the layer under test
    attn.zero_grad(set_to_none=True)
    attn.importance = torch.zeros(attn.n_heads, device=device)
    xa = x.clone().requires_grad_()
    out = attn(xa, rot)
    (out * w_out).sum().backward()
    got = {n: p.grad.clone() for n, p in params.items()}
    got_x, got_imp = xa.grad, attn.importance.clone()

    # the old way, from the same weights
    attn.zero_grad(set_to_none=True)
    attn.importance = None
    xb = x.clone().requires_grad_()
    ref, heads_out = old_way(attn, xb, rot)
    (ref * w_out).sum().backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    want_imp = torch.zeros(attn.n_heads, device=device)
    for i, (o, s) in heads_out.items():
        want_imp[i] = (o.detach() * s.grad).sum()

    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert rel_err(got_x, xb.grad) < tol, rel_err(got_x, xb.grad)
    assert got.keys() == want.keys()
    for name in got:
        assert rel_err(got[name], want[name]) < tol, (name, rel_err(got[name], want[name]))
    assert rel_err(got_imp, want_imp) < tol, (got_imp, want_imp)
    # heads that are not active are scored exactly 0; active ones (probes included) are not
    inactive = ~attn.head_mask
    assert (got_imp[inactive] == 0).all()
    assert (got_imp[~inactive] != 0).all()
    # pruned heads' q rows, gate rows and proj columns get exactly no gradient
    q_grad = got["qkv.weight"][: attn.n_heads * D].view(attn.n_heads, D, -1)
    assert (q_grad[inactive] == 0).all()
    assert (got["proj.weight"].view(-1, attn.n_heads, D)[:, inactive] == 0).all()
    if attn.cfg.mla.gate.input == "hidden":
        last = attn.gate.net[-1]
        assert (last.weight.grad.view(attn.n_heads, 3, -1)[inactive] == 0).all()
    attn.importance = None


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("name,backend", CASES)
def test_layer_matches_the_old_way(name, backend, gate):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    model = model_of(config(gate, backend)).to(device)
    attn = model.blocks[0].attn
    attn.set_heads(*MASKS[name])
    # a second call reuses the cached layout
    for seed in (1, 2) if device == "cpu" and backend != "triton" else (1,):
        check_against_old_way(attn, model.rope[:T], seed)


@pytest.mark.parametrize("gate", GATES)
def test_compacted_layer_matches_the_old_way(gate):
    """A compacted layer with partially kept groups: its empty slots hold heads that are not
    even stored. Also with a mask on the compacted layer (a stored head pruned, one probed)."""
    cfg = config(gate, n_layers=2)
    model = model_of(cfg).eval()
    mask, scale = MASKS["scattered"]
    model.blocks[0].attn.set_heads(mask, torch.where(scale == 0, 1.0, scale))  # 8 at 0.5
    model.blocks[1].attn.set_heads(*MASKS["partial-group"])
    small = compact(model).train()
    assert small.cfg.kept_heads[0] == [1, 3, 8, 10, 11]
    attn = small.blocks[0].attn
    lay = attn.layout(torch.device("cpu"))
    assert lay.n_slots == 8 and lay.slot_mask.tolist() == [0, 1, 0, 1, 1, 0, 1, 1]

    # the compacted model keeps the masked one's outputs
    idx = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(small(idx)[0], model(idx)[0], rtol=0, atol=2e-5)

    rot = small.rope[:T]
    check_against_old_way(attn, rot, seed=4)
    # stored heads 0, 1, 2, 3, 4 are original heads 1, 3, 8, 10, 11: prune 10, probe 3
    attn.set_heads(torch.tensor([True, True, True, False, True]), torch.tensor([1, 0, 1, 1, 0.5]))
    check_against_old_way(attn, rot, seed=5)


def test_layouts():
    """Slot order on the MLA path: empty slots borrow the first active head; whole groups and
    all heads keep the plain layout (no mask, and no index at all with every head active)."""
    model = model_of(config(GateConfig()))
    attn = model.blocks[0].attn
    cpu = torch.device("cpu")

    attn.set_heads(*MASKS["scattered"])  # heads 1, 3 | 8, 10, 11: groups 0 and 2
    lay = attn.layout(cpu)
    assert (lay.n_active, lay.n_kv, lay.n_slots) == (5, 2, 8)
    assert lay.head_of.tolist() == [1, 1, 1, 3, 8, 1, 10, 11]
    assert lay.slot_mask.tolist() == [0, 1, 0, 1, 1, 0, 1, 1]
    assert lay.scale.tolist() == [1, 1, 1, 1, 0.5, 1, 1, 0]
    assert lay.zero.tolist() == [7] and lay.kv_of is None
    q_rows = lay.rows[: 8 * D].view(8, D)[:, 0] // D
    assert q_rows.tolist() == lay.head_of.tolist()
    assert lay.rows[8 * D :].view(-1, D)[:, 0].tolist() == [r * D for r in (12, 14, 15, 17)]
    assert (lay.cols.view(8, D)[:, 0] // D).tolist() == lay.head_of.tolist()
    assert (lay.gate_rows.view(8, 3)[:, 0] // 3).tolist() == lay.head_of.tolist()
    # what compaction keeps: the active heads packed in order
    packed = attn._build_layout(cpu)
    assert packed.n_slots == 5 and packed.head_of.tolist() == [1, 3, 8, 10, 11]
    assert packed.slot_mask is None and packed.rows.numel() == (5 + 2 * 2) * D

    attn.set_heads(*MASKS["whole-groups"])
    lay = attn.layout(cpu)
    assert lay.n_slots == 8 and lay.slot_mask is None
    assert lay.head_of.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]

    attn.set_heads(torch.ones(HEADS, dtype=torch.bool), torch.ones(HEADS))
    lay = attn.layout(cpu)
    assert lay.rows is None and lay.cols is None and lay.gate_rows is None
    assert lay.slot_mask is None and lay.scale is None and lay.zero is None


class _Record(TorchDispatchMode):
    """Records the aten ops that produce a tensor shaped like the layer's activations."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 3 and tuple(out.shape[:2]) == (B, T):
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("name", ["partial-group", "scattered"])
def test_no_activation_is_scattered_or_gathered(monkeypatch, gate, name):
    """Around the op (here a stand-in without index ops of its own), a partially pruned layer's
    forward and backward run the same activation-sized ops as the unpruned layer: no index_copy
    into slots, no index_select out of them, and no zeros + index_add in the backward."""

    def op(self, q, k, v, gate, mask):
        # reads q, k and v, as attention does: a projection whose output no op reads would get
        # a zero-filled gradient from the split of the fused qkv projection
        G = q.shape[2] // k.shape[2]
        kq = k.unsqueeze(3).expand(*k.shape[:3], G, k.shape[3]).flatten(2, 3)
        vq = v.unsqueeze(3).expand(*v.shape[:3], G, v.shape[3]).flatten(2, 3)
        m = torch.ones(q.shape[2]) if mask is None else mask.to(q.dtype)
        return q * kq * vq * gate[..., :1] * m[:, None]

    monkeypatch.setattr(Attention, "_attend", op)
    model = model_of(config(gate))
    attn = model.blocks[0].attn
    x = torch.randn(B, T, 32, requires_grad=True)

    def ops_of(mask):
        attn.set_head_mask(mask)
        attn.zero_grad(set_to_none=True)
        x.grad = None
        with _Record() as rec:
            attn(x, model.rope[:T]).square().sum().backward()
        return sorted(rec.ops)

    full = ops_of(torch.ones(HEADS, dtype=torch.bool))
    pruned = ops_of(MASKS[name][0])
    assert not [o for o in pruned if "index" in o or "zeros" in o], pruned
    assert pruned == full


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_ignores_masked_slots(backend):
    """What the layout relies on: whatever a masked slot's query and gate hold, the op outputs
    exact zeros there, returns exactly zero dq and dgate there, and the active slots' outputs and
    every other gradient are the same as with zeros in the masked slots."""
    HQ, HKV, Dq = 8, 2, 16
    cfg = AttentionConfig(budget=16, ratios=(0.5, 0.25, 0.25), block_size=4)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, HQ, Dq, generator=g)
    k, v = torch.randn(B, T, HKV, Dq, generator=g), torch.randn(B, T, HKV, Dq, generator=g)
    gate = torch.rand(B, T, HQ, 3, generator=g)
    do = torch.randn(B, T, HQ, Dq, generator=g)
    q, k, v, gate, do = (t.to(device) for t in (q, k, v, gate, do))

    def run(q, gate):
        ins = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        o = mla_attention(*ins, cfg, t_max=40, head_mask=mask, backend=backend)
        (o * do).sum().backward()
        return o.detach(), [t.grad for t in ins]

    keep = mask[:, None].to(device)
    o1, (dq1, dk1, dv1, dg1) = run(q, gate)
    o0, (dq0, dk0, dv0, dg0) = run(q * keep, gate * keep)
    assert torch.isfinite(o1).all()
    assert (o1[:, :, ~mask] == 0).all()
    assert (dq1[:, :, ~mask] == 0).all() and (dg1[:, :, ~mask] == 0).all()
    assert dq1[:, :, mask].abs().sum() > 0 and dg1[:, :, mask].abs().sum() > 0
    # (the Triton path adds its sparse dk/dv atomically: not bitwise)
    torch.testing.assert_close(o1, o0, rtol=1e-6, atol=1e-6)
    for a, b in ((dq1, dq0), (dk1, dk0), (dv1, dv0), (dg1, dg0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
