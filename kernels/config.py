"""Configuration of one MLA layer and the sizes derived from it (DESIGN §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Activation = Literal["silu", "gelu", "relu", "tanh"]
GateInput = Literal["hidden", "query"]
BRANCHES = ("local", "global", "sparse")


@dataclass(kw_only=True)
class GateConfig:
    """The gate MLP that mixes the three branches (one weight per branch per query head)."""

    hidden: list[int] = field(default_factory=list)
    """Hidden widths; [] is a single linear layer."""
    activation: Activation = "silu"
    input: GateInput = "hidden"
    """Read the token's hidden state (default) or its query vectors."""

    def __post_init__(self) -> None:
        self.hidden = [int(h) for h in self.hidden]
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"gate.hidden widths must be positive, got {self.hidden}")
        if self.activation not in ("silu", "gelu", "relu", "tanh"):
            raise ValueError(
                f"gate.activation must be silu|gelu|relu|tanh, got {self.activation!r}"
            )
        if self.input not in ("hidden", "query"):
            raise ValueError(f"gate.input must be 'hidden' or 'query', got {self.input!r}")


@dataclass(frozen=True)
class Plan:
    """Sizes derived from an AttentionConfig at a given maximum length.

    A size of 0 means the branch is absent and costs nothing.
    """

    window: int
    """Keys of the local branch, the query itself included."""
    stride: int
    """Keys pooled into one compressed token of the global branch (0: absent)."""
    n_select: int
    """Blocks the sparse branch attends to."""
    block_size: int
    select_tile: int = 1
    """Consecutive queries that share one sparse selection (1: each query its own)."""

    @property
    def has_local(self) -> bool:
        return self.window > 0

    @property
    def has_global(self) -> bool:
        return self.stride > 0

    @property
    def has_sparse(self) -> bool:
        return self.n_select > 0

    @property
    def branches(self) -> tuple[str, ...]:
        """The names of the branches present."""
        present = (self.has_local, self.has_global, self.has_sparse)
        return tuple(name for name, p in zip(BRANCHES, present) if p)

    def keys_per_query(self, t: int) -> int:
        """Keys (raw or compressed) that the query at position t (0-based) reads."""
        n = 0
        if self.has_local:
            n += min(self.window, t + 1)
        if self.has_global:
            n += (t + 1) // self.stride
        if self.has_sparse:
            n += min(self.n_select, self.candidates(t)) * self.block_size
        return n

    def candidates(self, t: int) -> int:
        """Sparse candidate blocks of the query at position t: those complete at its tile's
        first position t0, less those wholly inside t0's local window."""
        t0 = t - t % self.select_tile
        complete = (t0 + 1) // self.block_size
        if self.has_local:
            # blocks wholly inside the window are not candidates
            first_in_window = -(-(t0 - self.window + 1) // self.block_size)
            complete = min(complete, max(first_in_window, 0))
        return complete


@dataclass(kw_only=True)
class AttentionConfig:
    """One MLA layer: a key budget split between local, global and sparse branches."""

    budget: int = 256
    """Keys each query may read across all branches."""
    ratios: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """(local, global, sparse) shares of the budget, each >= 0, summing to 1."""
    block_size: int = 32
    """Key block pooled by the global branch and selected by the sparse branch (power of two)."""
    select_tile: int = 1
    """Consecutive queries that share one sparse selection (power of two; 1: per query). Tiles
    of 16 or more let the sparse branch run as block-sparse FlashAttention; the search measures
    what the sharing costs in accuracy."""
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if isinstance(self.gate, dict):
            self.gate = GateConfig(**self.gate)
        self.ratios = tuple(float(r) for r in self.ratios)
        if len(self.ratios) != 3:
            raise ValueError(
                f"ratios must have 3 entries (local, global, sparse), got {self.ratios}"
            )
        if any(r < 0 or not math.isfinite(r) for r in self.ratios):
            raise ValueError(f"ratios must be finite and >= 0, got {self.ratios}")
        if abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {self.ratios} (sum {sum(self.ratios)})")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if (
            isinstance(self.select_tile, bool)
            or not isinstance(self.select_tile, int)
            or self.select_tile < 1
            or self.select_tile & (self.select_tile - 1)
        ):
            raise ValueError(f"select_tile must be a power of two >= 1, got {self.select_tile!r}")
        if not self.plan(self.budget).branches:
            raise ValueError(
                f"budget {self.budget} with ratios {self.ratios} and block_size {self.block_size} "
                "leaves every branch empty"
            )

    def plan(self, t_max: int) -> Plan:
        """Derive window, stride and n_select for sequences of at most t_max tokens."""
        local, glob, sparse = self.ratios
        window = round(local * self.budget)
        n_select = round(sparse * self.budget / self.block_size)
        g_keys = glob * self.budget
        stride = 0
        if g_keys >= 1:
            stride = self.block_size * max(1, math.ceil(t_max / self.block_size / g_keys))
        return Plan(
            window=window,
            stride=stride,
            n_select=n_select,
            block_size=self.block_size,
            select_tile=self.select_tile,
        )
