"""The public MLA op: checks its inputs and dispatches to an implementation."""

from __future__ import annotations

from typing import Literal

import torch

from .blocked import mla_blocked
from .common import check_inputs
from .config import AttentionConfig, Plan
from .naive import mla_reference

Backend = Literal["auto", "reference", "torch", "triton"]


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    config: AttentionConfig,
    *,
    t_max: int | None = None,
    head_mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Multi-Level Attention: gated local + global + sparse causal attention (DESIGN §1).

    Args:
        q: [B, T, HQ, D] queries.
        k, v: [B, T, HKV, D] keys and values; HKV divides HQ (GQA).
        gate: [B, T, HQ, 3] branch weights (local, global, sparse), already through the sigmoid.
        config: the layer's budget, ratios and block size.
        t_max: the longest sequence the layer is built for (fixes the global stride);
            defaults to T.
        head_mask: [HQ] bool, the active query heads; pruned heads output zeros and cost nothing.
            On q's device or on the CPU: the Triton path reads a CPU mask without waiting for
            the device (a mask on the GPU costs a sync per call to learn which heads run).
        backend: "reference" (naive O(T^2) oracle), "torch" (budget-cost PyTorch),
            "triton" (CUDA kernels), or "auto" (triton on CUDA, torch elsewhere).

    Returns:
        [B, T, HQ, D] in q's dtype.
    """
    check_inputs(q, k, v, gate, head_mask, t_max)
    plan = None
    if backend in ("auto", "triton"):
        # derived once: the choice of backend and the Triton path's checks and kernels take it
        plan = config.plan(t_max or q.shape[1])
        backend = _resolve(q, k, v, plan, backend)
    if backend != "triton" and head_mask is not None:
        head_mask = head_mask.to(q.device)
    if backend == "reference":
        return mla_reference(q, k, v, gate, config, t_max=t_max, head_mask=head_mask)
    if backend == "torch":
        return mla_blocked(q, k, v, gate, config, t_max=t_max, head_mask=head_mask)
    if backend == "triton":
        from .parallel import mla_triton

        return mla_triton(q, k, v, gate, config, t_max=t_max, head_mask=head_mask, plan=plan)
    raise ValueError(f"backend must be auto|reference|torch|triton, got {backend!r}")


def resolve_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: AttentionConfig,
    t_max: int | None,
    backend: Backend,
) -> Backend:
    """The implementation `mla_attention` runs for these inputs: "auto" becomes "triton" where
    the kernels take them (CUDA, supported dtype and sizes), "torch" elsewhere."""
    if backend == "auto":
        return _resolve(q, k, v, config.plan(t_max or q.shape[1]), backend)
    return backend


def _resolve(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, backend: Backend
) -> Backend:
    """`resolve_backend` for a plan already derived."""
    if backend == "auto":
        return "triton" if _triton_fits(q, k, v, plan) else "torch"
    return backend


def attention_flops(plan: Plan, T: int, head_dim: int, n_heads: int, backward: bool = False) -> int:
    """Matrix FLOPs of one layer's attention over a sequence of T tokens (per batch row).

    Counts 2 * 2 * D per key read (scores and weighted sum); the backward costs 2.5x the forward.
    """
    keys = sum(plan.keys_per_query(t) for t in range(T))
    fwd = 4 * head_dim * keys * n_heads
    return int(fwd * 3.5) if backward else fwd


def _triton_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> bool:
    """Whether the Triton kernels take these inputs; "auto" falls back to torch otherwise."""
    if not q.is_cuda:
        return False
    try:
        from .parallel import unsupported
    except ImportError:  # no Triton
        return False
    return unsupported(q, k, v, plan) is None
