"""Decoder-only language model whose attention is MLA (or dense SDPA, the baseline).

Pre-norm blocks with RMSNorm, rotary positions, a SwiGLU MLP and tied input/output embeddings.
Each attention layer keeps a `head_mask` buffer of its active query heads: the MLA op skips
pruned heads, and FLOP and head counts are read from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from automla.kernels import GateConfig, Plan, attention_flops, mla_attention

from .config import ModelConfig

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
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
        # Python-side copy of "no head is pruned", so the forward never syncs a device to know
        self._all_active = True
        self.register_load_state_dict_post_hook(_resync_mask)

    def set_head_mask(self, mask: torch.Tensor) -> None:
        """Set the active query heads (bool [n_heads]); the seam for head pruning."""
        if mask.shape != (self.n_heads,) or mask.dtype != torch.bool:
            raise ValueError(
                f"head_mask must be bool [{self.n_heads}], got {mask.dtype} {mask.shape}"
            )
        self.head_mask.copy_(mask)
        self._sync_mask()

    def _sync_mask(self) -> None:
        self._all_active = bool(self.head_mask.all())

    def active_heads(self) -> int:
        return int(self.head_mask.sum())

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, hq + 2 * hkv, d)
        # rotary on q and k together: one set of elementwise ops
        qk = apply_rotary(qkv[:, :, : hq + hkv], rot)
        q, k = qk.split([hq, hkv], dim=2)  # (B, T, HQ, D), (B, T, HKV, D)
        v = qkv[:, :, hq + hkv :]  # (B, T, HKV, D)
        if self.gate is None:
            y = self._dense(q, k, v)
        else:
            if self.cfg.mla.gate.input == "hidden":
                logits = self.gate(x).view(B, T, hq, 3)
            else:
                # the query before rotary: its content, not its position
                logits = self.gate(qkv[:, :, :hq])
            gate = torch.sigmoid(logits)  # (B, T, HQ, 3)
            y = mla_attention(
                q,
                k,
                v,
                gate,
                self.cfg.mla,
                t_max=self.cfg.max_seq_len,
                head_mask=self.head_mask,
                backend=self.cfg.attn_backend,
            )  # (B, T, HQ, D)
        return self.proj(y.reshape(B, T, hq * d))

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal SDPA over the active heads; pruned heads output zeros."""
        B, T, hq, d = q.shape
        G = hq // self.n_kv_heads
        if not self._all_active:
            active = self.head_mask.nonzero().flatten()
            out = q.new_zeros(B, T, hq, d)
            ya = self._sdpa(q[:, :, active], k[:, :, active // G], v[:, :, active // G], 1)
            return out.index_copy(2, active, ya)
        return self._sdpa(q, k, v, G)

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


def _resync_mask(module: Attention, _incompatible_keys) -> None:
    module._sync_mask()  # a loaded state dict may carry pruned heads


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = 32 * math.ceil(cfg.ffn_mult * cfg.d_model / 32)
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rot)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        rot = rotary_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope", rot, persistent=False)
        self.reset_parameters()

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, with targets, the mean cross-entropy
        over the positions whose target is not -100."""
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rope[:T])
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100
            )
        return logits, loss

    def num_params(self) -> int:
        """Parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def active_heads_per_layer(self) -> list[int]:
        return [block.attn.active_heads() for block in self.blocks]

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
