"""MLA kernels: the naive reference, the budget-cost PyTorch path and the Triton kernels."""

from .config import BRANCHES, AttentionConfig, GateConfig, Plan, effective_ratios
from .heads import HeadGroups
from .naive import mla_reference
from .ops import attention_flops, mla_attention, resolve_backend
from .selection import block_scores, select_blocks, select_tiles

__all__ = [
    "BRANCHES",
    "AttentionConfig",
    "GateConfig",
    "HeadGroups",
    "Plan",
    "attention_flops",
    "block_scores",
    "effective_ratios",
    "mla_attention",
    "mla_reference",
    "resolve_backend",
    "select_blocks",
    "select_tiles",
]
