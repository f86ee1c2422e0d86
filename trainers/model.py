"""Decoder-only language model whose attention is MLA (or dense SDPA, the baseline).

Pre-norm blocks with RMSNorm, rotary positions, a SwiGLU MLP and tied input/output embeddings.
Each attention layer keeps a `head_mask` buffer of its active query heads and a `head_scale`
buffer of their mask values (head pruning ramps them down): only the active heads and the KV
heads of their groups are attended (MLA also projects the empty query slots of those groups,
masked out of the op), and FLOP and head counts are read from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from automla.kernels import (
    GateConfig,
    HeadGroups,
    Plan,
    attention_flops,
    mla_attention,
    resolve_backend,
)

from . import fast_ops
from .config import ModelConfig
from .graphs import GraphedOp

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False
        """A Triton kernel (CUDA; `LanguageModel.use_fused_ops`), its output in autocast's
        dtype: every consumer here is a linear that would cast it to that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fast_ops.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def add(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) with h = x + r (x where r is None): the residual add and the norm that
        reads its sum, in one kernel each way when fused."""
        if r is None:
            return x, self(x)
        if self.fused and fast_ops.adds_in_norm():
            return fast_ops.add_rms_norm(x, r, self.weight, self.eps)
        h = x + r
        return h, self(h)


def rotary_table(seq_len: int, head_dim: int, base: float) -> torch.Tensor:
    """Unit complex rotations e^(i * t * f), shape (seq_len, head_dim // 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, D) by position; rot (T, D/2) complex.

    One complex multiply is a single fused kernel, faster on CPU than the real-valued form.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2)
    return torch.view_as_real(xc * rot[:, None]).flatten(-2).to(x.dtype)


class GateMLP(nn.Module):
    """Maps features to branch logits: Linear (-> act -> Linear)* with the widths of `hidden`."""

    def __init__(self, d_in: int, d_out: int, cfg: GateConfig):
        super().__init__()
        widths = [d_in, *cfg.hidden, d_out]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(_ACTIVATIONS[cfg.activation]())
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for m in linears[:-1]:
            m.reset_parameters()
        # small last layer: logits near 0, so every branch starts with a weight near 0.5
        last = linears[-1]
        nn.init.normal_(last.weight, std=0.1 / math.sqrt(last.in_features))
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; with `rows`, only those outputs of the last layer are computed."""
        if rows is None:
            return self.net(x)
        last = self.net[-1]
        h = self.net[:-1](x)
        return F.linear(h, last.weight.index_select(0, rows), last.bias.index_select(0, rows))


@dataclass
class HeadLayout:
    """How one attention layer runs for its current head mask and scales (built on the CPU
    from the Python-side copies, so the forward never reads the device to decide).

    Stored heads are the query heads the layer holds weights for (all of them, unless the
    model was compacted). The layer computes `n_slots` query heads, each from one stored head's
    weights, in one of two orders:
    - packed: the active heads in order (dense attention; what compaction keeps);
    - slots (the MLA path): the MLA op wants [B, T, HQ, D] queries over [B, T, HKV, D] keys with
      equal groups, so there are G slots per kept KV head, slot r * G + j for head j of the r-th
      kept group. A slot whose head is not active (pruned, or not stored after compaction) is
      masked out of the op, which outputs exact zeros there and passes no gradient back; it
      borrows the first active head's weights, so that the projections come out in slot order
      and no activation is scattered into slots or gathered back.
    With the active heads filling their groups in order the two orders agree.
    """

    device: torch.device
    n_active: int
    n_kv: int
    n_slots: int
    head_of: torch.Tensor
    """[n_slots] stored index of the head each slot computes (an empty slot: the head whose
    weights it borrows; its output is exactly 0, so it adds exactly 0 to that head's score)."""
    rows: torch.Tensor | None
    """qkv weight rows: the q rows of the slots, then the k rows and v rows of the kept KV
    heads (None: all rows, in order)."""
    gate_rows: torch.Tensor | None
    """Rows of the hidden gate's last layer, 3 per slot (None: all)."""
    cols: torch.Tensor | None
    """proj weight columns of the slots (None: all)."""
    slot_mask: torch.Tensor | None
    """[n_slots] bool on the CPU, the slots of active heads (None: all of them)."""
    kv_of: torch.Tensor | None
    """Packed order only: [n_slots] kept-KV index of each active head, for dense attention
    when the heads do not fill their groups in order (None: they do)."""
    scale: torch.Tensor | None
    """[n_slots] mask values (empty slots: 1; None: all 1)."""
    inv_scale: torch.Tensor | None
    """[n_slots] 1 / scale, 0 where the scale is 0."""
    zero: torch.Tensor | None
    """Slots whose scale is 0 (active heads probed for importance)."""
    half_rows: torch.Tensor | None = None
    """Fused rotary only: `rows` (all rows when None) with each q and k head's rows in the
    half layout that liger's kernel rotates (built on first use)."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kept: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.head_dim = d = cfg.head_dim
        self.geometry = HeadGroups(cfg.n_heads, cfg.n_kv_heads)  # of the uncompacted layer
        self.group = self.geometry.size
        self.heads = list(kept) if kept is not None else list(range(cfg.n_heads))
        """Original ids of the stored query heads."""
        self.kv_heads = self.kv_ids(self.heads)
        """Original ids of the stored KV heads."""
        self.n_heads, self.n_kv_heads = len(self.heads), len(self.kv_heads)
        hq, hkv = self.n_heads, self.n_kv_heads
        self.qkv = nn.Linear(cfg.d_model, (hq + 2 * hkv) * d, bias=False)
        self.proj = nn.Linear(hq * d, cfg.d_model, bias=False)
        self.gate: GateMLP | None = None
        if cfg.attention == "mla":
            gate_cfg = cfg.mla.gate
            if gate_cfg.input == "hidden":
                self.gate = GateMLP(cfg.d_model, hq * 3, gate_cfg)
            else:
                self.gate = GateMLP(d, 3, gate_cfg)  # shared by all heads
        self.register_buffer("head_mask", torch.ones(hq, dtype=torch.bool))
        # the mask value xi_h multiplied into each head's output (ramps of head pruning)
        self.register_buffer("head_scale", torch.ones(hq))
        # Python-side copies, so that the forward never syncs a device to know the layout
        self._mask = torch.ones(hq, dtype=torch.bool)
        self._scale = torch.ones(hq)
        self._layout: HeadLayout | None = None
        self.layout_version = 0
        """Bumped whenever the mask or mask values change: what a captured step depends on."""
        self._graphed = GraphedOp() if cfg.cuda_graphs else None
        self.fused = False
        """liger's rotary kernel (CUDA; `LanguageModel.use_fused_ops`)."""
        self.sequence_parallel = None
        """A `sequence_parallel.SequenceParallel`: attention runs across its ranks."""
        self.importance: torch.Tensor | None = None
        """[n_heads] float32 accumulator set by the pruner: each backward adds, per stored
        head, sum over tokens of <o_h, dL/d(xi_h o_h)>. None: not tracked (no hook)."""
        self.register_load_state_dict_post_hook(_resync_mask)

    def set_head_mask(self, mask: torch.Tensor) -> None:
        """Set the active query heads (bool [n_heads]); the seam for head pruning."""
        self.set_heads(mask, self._scale)

    def set_heads(self, mask: torch.Tensor, scale: torch.Tensor) -> None:
        """Active heads (bool [n_heads]) and their mask values (float [n_heads], in [0, 1])."""
        if mask.shape != (self.n_heads,) or mask.dtype != torch.bool:
            raise ValueError(
                f"head_mask must be bool [{self.n_heads}], got {mask.dtype} {mask.shape}"
            )
        if scale.shape != (self.n_heads,) or not scale.is_floating_point():
            raise ValueError(f"head_scale must be float [{self.n_heads}], got {scale.dtype}")
        self._mask = mask.detach().cpu().clone()
        self._scale = scale.detach().cpu().float().clone()
        self.head_mask.copy_(to_device(self._mask, self.head_mask.device))
        self.head_scale.copy_(to_device(self._scale, self.head_scale.device))
        self._layout = None
        self.layout_version += 1

    def _sync_mask(self) -> None:
        self._mask = self.head_mask.cpu().clone()
        self._scale = self.head_scale.float().cpu().clone()
        self._layout = None
        self.layout_version += 1

    def active_heads(self) -> int:
        return int(self._mask.sum())

    def active_kv_heads(self) -> int:
        """KV heads computed: those with at least one active query head."""
        return len(self.kv_ids(self.head_ids()))

    def head_ids(self, mask: torch.Tensor | None = None) -> list[int]:
        """Original ids of the stored heads that `mask` (bool [n_heads], default: the active
        heads) selects."""
        mask = self._mask if mask is None else mask
        return [self.heads[i] for i in mask.nonzero().flatten().tolist()]

    def kv_ids(self, heads: list[int]) -> list[int]:
        """Original ids of the KV heads that the query heads `heads` (original ids) read."""
        return self.geometry.groups_of(heads)

    def layout(self, device: torch.device) -> HeadLayout:
        if self._layout is None or self._layout.device != device:
            self._layout = self._build_layout(device, slots=self.gate is not None)
        return self._layout

    def _build_layout(self, device: torch.device, slots: bool = False) -> HeadLayout:
        """The layout of the current mask, on `device`: with `slots`, the MLA op's slots (what
        the MLA forward runs); otherwise the active heads packed (dense attention, and the
        weights that `pruning.compact` keeps: it reads this default)."""
        d, G, hq, hkv = self.head_dim, self.group, self.n_heads, self.n_kv_heads
        active = self._mask.nonzero().flatten().tolist()
        heads = [self.heads[i] for i in active]  # original ids
        kept_kv = self.kv_ids(heads)
        kv_pos = [self.kv_heads.index(g) for g in kept_kv]  # stored index of each kept KV head
        rank = {g: r for r, g in enumerate(kept_kv)}
        geo = self.geometry
        slot_of = [rank[geo.group_of(h)] * G + geo.member(h) for h in heads]  # each head's slot
        in_order = slot_of == list(range(G * len(kept_kv)))
        head_of = active  # the stored head each slot computes
        slot_mask = None
        if slots and not in_order:
            # empty slots borrow the first active head's weights: the op masks them out
            head_of = [active[0]] * (G * len(kept_kv))
            for i, s in zip(active, slot_of):
                head_of[s] = i
            slot_mask = torch.zeros(len(head_of), dtype=torch.bool)
            slot_mask[slot_of] = True
        scale = self._scale[head_of]
        if slot_mask is not None:
            scale = scale.where(slot_mask, 1.0)  # empty slots output 0 whatever their scale
        unit = bool((scale == 1).all())

        def dev(values, dtype=torch.long):
            t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
            return to_device(t, device)

        rows = cols = gate_rows = None
        if head_of != list(range(hq)):
            cols = [i * d + j for i in head_of for j in range(d)]  # also the q rows of qkv
            rows = list(cols)
            for base in (hq, hq + hkv):
                rows += [(base + p) * d + j for p in kv_pos for j in range(d)]
            gate_rows = [3 * i + c for i in head_of for c in range(3)]
        zero = [p for p, s in enumerate(scale.tolist()) if s == 0]
        inv = torch.where(scale > 0, 1 / scale.clamp_min(1e-30), torch.zeros_like(scale))
        return HeadLayout(
            device=device,
            n_active=len(active),
            n_kv=len(kept_kv),
            n_slots=len(head_of),
            head_of=dev(head_of),
            rows=None if rows is None else dev(rows),
            gate_rows=None if gate_rows is None else dev(gate_rows),
            cols=None if cols is None else dev(cols),
            # stays on the CPU: the Triton op reads it there without a device sync
            slot_mask=slot_mask,
            kv_of=None if slots or in_order else dev([rank[geo.group_of(h)] for h in heads]),
            scale=None if unit else dev(scale),
            inv_scale=None if unit else dev(inv),
            zero=dev(zero) if zero else None,
        )

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # One path for every layout: with all heads active at scale 1 the index tensors are
        # None and it reduces to the plain projections and attention.
        lay = self.layout(x.device)
        if lay.n_active == 0:
            return torch.zeros_like(x)
        B, T, _ = x.shape
        S, K, d = lay.n_slots, lay.n_kv, self.head_dim
        if self.sequence_parallel is not None:
            y = self.sequence_parallel.attend(self, x, rot, lay)
            w = self.proj.weight if lay.cols is None else self.proj.weight.index_select(1, lay.cols)
            return F.linear(self._scale_and_track(y, lay).reshape(B, T, S * d), w)
        # the query heads of the layout (the op's slots for MLA) and the KV heads of their
        # groups: the weight rows come in that order, so no activation is scattered or gathered
        half = self._fused_rotary(x)
        rows = self._half_rows(lay) if half else lay.rows
        w = self.qkv.weight if rows is None else self.qkv.weight.index_select(0, rows)
        if self.gate is not None and self.cfg.mla.gate.input == "hidden":
            x = _autocast_once(x)
        qkv = _linear(self.qkv, x, w).view(B, T, S + 2 * K, d)
        # split, not sliced: a split's backward writes qkv's gradient with one cat, where each
        # slice's would zero a tensor of qkv's size, copy into it and add it to the others
        if half:
            q_in, k_in, v = qkv.split([S, K, K], dim=2)  # (B, T, S, D), (B, T, K, D) x 2
            # q and k in the half layout: one kernel rotates both; q.k is unchanged
            q, k = fast_ops.rotary_half(q_in, k_in, rot.real, rot.imag)
        else:
            qk_in, v = qkv.split([S + K, K], dim=2)
            # rotary on q and k together: one set of elementwise ops
            q, k = apply_rotary(qk_in, rot).split([S, K], dim=2)
            q_in = qk_in[:, :, :S]
        if self.gate is None:
            if lay.kv_of is None:
                y = self._sdpa(q, k, v, self.group)
            else:
                y = self._sdpa(q, k.index_select(2, lay.kv_of), v.index_select(2, lay.kv_of), 1)
        else:
            if self.cfg.mla.gate.input == "hidden":
                logits = self.gate(x, lay.gate_rows).view(B, T, S, 3)
            else:
                # the query before rotary: its content, not its position
                logits = self.gate(fast_ops.from_half(q_in) if half else q_in)
            # empty slots carry a borrowed head's query and gate: the op masks them, so their
            # output is exactly 0 and they get no gradient (nor do the proj columns they borrow)
            y = self._attend(q, k, v, torch.sigmoid(logits), lay.slot_mask)  # (B, T, S, D)
        w = self.proj.weight if lay.cols is None else self.proj.weight.index_select(1, lay.cols)
        return _linear(self.proj, self._scale_and_track(y, lay).reshape(B, T, S * d), w)

    def _fused_rotary(self, x: torch.Tensor) -> bool:
        # a float8 qkv keeps its own (compiled) call on its whole weight: no permuted rows
        return self.fused and not fast_ops.is_float8(self.qkv)

    def _half_rows(self, lay: HeadLayout) -> torch.Tensor:
        if lay.half_rows is None:
            d, n_rot = self.head_dim, lay.n_slots + lay.n_kv  # q and k heads are rotated
            order = fast_ops.half_order(d).to(lay.head_of.device)
            rotated = (torch.arange(n_rot, device=order.device)[:, None] * d + order).flatten()
            v_rows = torch.arange(n_rot * d, (n_rot + lay.n_kv) * d, device=order.device)
            index = torch.cat([rotated, v_rows])
            lay.half_rows = index if lay.rows is None else lay.rows[index]
        return lay.half_rows

    def _attend(self, q, k, v, gate, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        t_max = cfg.max_seq_len
        if (
            self._graphed is not None
            and resolve_backend(q, k, v, cfg.mla, t_max, cfg.attn_backend) == "triton"
            # inside a whole-step capture (`step_graph`) the op is recorded with the rest
            and not torch.cuda.is_current_stream_capturing()
        ):
            return self._graphed(q, k, v, gate, cfg.mla, t_max, mask)
        return mla_attention(
            q, k, v, gate, cfg.mla, t_max=t_max, head_mask=mask, backend=cfg.attn_backend
        )

    def compile_kernels(self, batch: int, seq_len: int, dtype: torch.dtype, threads: int) -> bool:
        """Compile ahead, `threads` at a time, the Triton kernels that this layer's MLA op
        launches for [batch, seq_len] steps in `dtype` under the current head layout, so that
        the first step does not compile them one by one (`kernels.parallel.compile_ahead`).
        False, compiling nothing, where the op runs no Triton kernels (dense attention, the
        CPU, the torch backend, sequence parallelism) or Triton cannot compile ahead."""
        device = self.head_mask.device
        if self.gate is None or self.sequence_parallel is not None or device.type != "cuda":
            return False  # before any import: the CPU path never loads Triton
        from automla.kernels.parallel import async_compile_available, compile_ahead

        if not async_compile_available():
            return False
        lay = self.layout(device)
        if lay.n_active == 0:
            return False
        S, K, d = lay.n_slots, lay.n_kv, self.head_dim
        q = torch.empty(batch, seq_len, S, d, dtype=dtype, device=device)
        kv = torch.empty(batch, seq_len, K, d, dtype=dtype, device=device)
        gate = torch.empty(batch, seq_len, S, 3, dtype=dtype, device=device)
        t_max, mla = self.cfg.max_seq_len, self.cfg.mla
        if resolve_backend(q, kv, kv, mla, t_max, self.cfg.attn_backend) != "triton":
            return False
        compile_ahead(q, kv, kv, gate, mla, t_max=t_max, head_mask=lay.slot_mask, threads=threads)
        return True

    def _scale_and_track(self, y: torch.Tensor, lay: HeadLayout) -> torch.Tensor:
        """Multiply each slot's output by its mask value; while pruning tracks importance, hook
        the backward to add sum <o_h, dL/d(xi_h o_h)> per head (an empty slot adds exactly 0:
        its output is 0)."""
        ys = y if lay.scale is None else y * lay.scale.to(y.dtype)[:, None]
        if self.importance is None or not (torch.is_grad_enabled() and ys.requires_grad):
            return ys
        acc, index, inv = self.importance, lay.head_of, lay.inv_scale
        # detached views: the hook must not hold `ys` itself (a reference cycle through its
        # hooks); their storage is kept anyway, proj saves its input for the weight gradient
        out = ys.detach()
        probed = None
        if lay.zero is not None:
            # heads at mask value 0 are computed only to be measured: keep their raw output
            probed = y.detach().index_select(2, lay.zero)

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                dots = (out.float() * grad.float()).sum((0, 1, 3))  # [S] = xi_h <o_h, g_h>
                if inv is not None:
                    dots = dots * inv
                if probed is not None:
                    g0 = grad.index_select(2, lay.zero).float()
                    dots = dots.index_copy(0, lay.zero, (probed.float() * g0).sum((0, 1, 3)))
                acc.index_add_(0, index, dots)

        ys.register_hook(hook)
        return ys

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, G: int) -> torch.Tensor:
        if G > 1 and not q.is_cuda:
            # the CPU kernels are faster on repeated KV heads than with enable_gqa
            k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
            G = 1
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=G > 1,
        )  # (B, HQ, T, D)
        return y.transpose(1, 2)

    def plan(self, seq_len: int) -> Plan:
        """Keys each query reads: the MLA plan, or every earlier key for dense attention."""
        if self.gate is None:
            return Plan(window=seq_len, stride=0, n_select=0, block_size=1)
        return self.cfg.mla.plan(self.cfg.max_seq_len)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before head pruning carry no mask values: all heads at 1
        state_dict.setdefault(prefix + "head_scale", torch.ones_like(self.head_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _autocast_once(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype where autocast is on. For an input that two projections read:
    autocast would cast it for each (it caches casts of parameters only), and their gradients
    would come back as two casts and a float32 add instead of one add and one cast."""
    return x.to(fast_ops.compute_dtype(x))


def _linear(module: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, with `weight` the module's own or gathered from it: through the module
    when whole (a float8 module runs its own recipe), else in the module's precision."""
    if weight is module.weight:
        return module(x)
    if fast_ops.is_float8(module):
        return fast_ops.float8_linear(module, x, weight)
    return F.linear(x, weight)


def _resync_mask(module: Attention, _incompatible_keys) -> None:
    module._sync_mask()  # a loaded state dict may carry pruned heads


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device`; to a GPU through page-locked memory, so that the copy
    is queued and the host does not wait for the GPU (head layouts change during training)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 32 * math.ceil(cfg.ffn_mult * cfg.d_model / 32)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.fused = False
        """liger's SwiGLU kernel (CUDA; `LanguageModel.use_fused_ops`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down(fast_ops.swiglu(self.gate_up(x)))
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kept: list[int] | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, kept)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.checkpoint = cfg.checkpoint

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x, y = self.run(x, rot)
        return x + y

    def run(
        self, x: torch.Tensor, rot: torch.Tensor, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream x + pending (the previous block's MLP output, not
        yet added; None: 0), its own MLP output left pending: (x', y), the block's output being
        x' + y. Each residual add then runs inside the norm that reads its sum (`RMSNorm.add`),
        the last block's in the model's final norm."""
        # only while gradients are recorded: there is nothing to recompute otherwise
        mode = self.checkpoint if torch.is_grad_enabled() else "none"
        if mode != "none" and pending is not None:
            x = x + pending  # a checkpoint keeps one input of the block, the sum
        if mode == "block":
            return checkpoint(self._run, x, rot, use_reentrant=False)
        if mode == "attention":
            a = checkpoint(self._attention, x, rot, use_reentrant=False)
            x, n = self.mlp_norm.add(x, a)
            return x, self.mlp(n)
        return self._run(x, rot, pending)

    def _attention(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        return self.attn(self.attn_norm(x), rot)

    def _run(
        self, x: torch.Tensor, rot: torch.Tensor, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, n = self.attn_norm.add(x, pending)
        x, n = self.mlp_norm.add(x, self.attn(n, rot))
        return x, self.mlp(n)


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        kept = cfg.kept_heads or [None] * cfg.n_layers
        self.blocks = nn.ModuleList(Block(cfg, heads) for heads in kept)
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        rot = rotary_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope", rot, persistent=False)
        self.sequence_parallel = None
        self.fused = False
        """liger's linear + cross-entropy in training (`use_fused_ops`)."""
        self.reset_parameters()

    def use_fused_ops(self, on: bool) -> None:
        """Run the norms, SwiGLU, rotary and the training loss on liger-kernel's Triton ops
        (Triton kernels: CUDA tensors, or the CPU in Triton's interpreter; `fast_ops.prepare_model`
        turns them on where the config asks)."""
        for m in self.modules():
            if isinstance(m, (LanguageModel, RMSNorm, Attention, MLP)):
                m.fused = on

    def use_op_graphs(self, on: bool) -> None:
        """Replay each layer's MLA op from per-op CUDA graphs (`GraphedOp`) outside a step
        graph, where `cuda_graphs` is set. A step graph turns them off: its captured steps hold
        the op already, and for the few forwards left eager (the first step of a layout, the
        evaluations) per-op captures save nothing on warm caches and cost compiles and captures on
        cold ones (bench/RESULTS.md)."""
        for block in self.blocks:
            if not on:
                block.attn._graphed = None
            elif self.cfg.cuda_graphs and block.attn._graphed is None:
                block.attn._graphed = GraphedOp()

    def layout_key(self) -> tuple[int, ...]:
        """Changes whenever a layer's head mask or mask values do (head pruning)."""
        return tuple(block.attn.layout_version for block in self.blocks)

    def compile_kernels(self, batch: int, seq_len: int, dtype: torch.dtype, threads: int) -> int:
        """`Attention.compile_kernels` for every layer (a layer whose kernels an earlier one
        compiled costs only the op's host launch sequence); returns how many compiled."""
        return sum(b.attn.compile_kernels(batch, seq_len, dtype, threads) for b in self.blocks)

    def set_sequence_parallel(self, sp) -> None:
        """Share every sequence across the ranks of `sp` (a `sequence_parallel.
        SequenceParallel`; None: this process holds whole sequences). Inputs are then this
        rank's tokens, from `sp.shard`."""
        self.sequence_parallel = sp
        for block in self.blocks:
            block.attn.sequence_parallel = sp

    def reset_parameters(self) -> None:
        # GPT-2 init; residual projections scaled down by depth so the stream's variance holds
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            if block.attn.gate is not None:
                block.attn.gate.reset_parameters()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, with targets, the mean cross-entropy
        over the positions whose target is not -100. With fused ops on CUDA, a training
        forward (targets given, gradients recorded) returns no logits: they are never held."""
        T = idx.shape[1]
        sp = self.sequence_parallel
        if sp is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        rot = self.rope[:T] if sp is None else sp.rotary(self.rope, T)
        x, y = self.embed(idx), None  # (B, T, C); the residual stream is x + y
        for block in self.blocks:
            x, y = block.run(x, rot, y)
        h = self.norm.add(x, y)[1]
        train = targets is not None and torch.is_grad_enabled()
        # the chunked loss runs inside a whole-step CUDA graph (`cuda_graphs: step`); liger's
        # (fast_ops.LOSS, for A/B runs) counts the targets on the host, so a captured step
        # takes the plain loss over the logits instead
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.fused and train and sp is None and (fast_ops.capturable_loss() or not capturing):
            # the loss in chunks, no logits (an evaluation, without gradients, still gets them)
            loss = fast_ops.linear_cross_entropy(
                h.flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index=-100
            )
            return None, loss
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None and sp is not None:
            loss = sp.loss(logits, targets)
        elif targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        return logits, loss

    def num_params(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def active_heads_per_layer(self) -> list[int]:
        return [block.attn.active_heads() for block in self.blocks]

    def active_kv_heads_per_layer(self) -> list[int]:
        return [block.attn.active_kv_heads() for block in self.blocks]

    def attn_flops_per_token(self, seq_len: int) -> float:
        """Attention FLOPs (forward + backward) per token at seq_len, summed over layers,
        counting only the active heads."""
        total = 0
        for block in self.blocks:
            attn = block.attn
            total += attention_flops(
                attn.plan(seq_len), seq_len, attn.head_dim, attn.active_heads(), backward=True
            )
        return total / seq_len


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)
