"""Configuration of one MLA layer and the sizes derived from it (DESIGN §1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
        return derive_plan(
            self.ratios, self.budget, self.block_size, t_max, select_tile=self.select_tile
        )


def derive_plan(
    ratios: Sequence[float], budget: int, block_size: int, t_max: int, select_tile: int = 1
) -> Plan:
    """The rule of `AttentionConfig.plan` on bare values (no validation).

    window = round(local * budget); n_select = round(sparse * budget / block_size); the global
    branch exists when global * budget >= 1 and pools `stride` keys per compressed token, a
    multiple of block_size chosen so that t_max tokens give at most global * budget of them.
    Which branches exist depends on neither t_max nor select_tile.
    """
    local, glob, sparse = ratios
    window = round(local * budget)
    n_select = round(sparse * budget / block_size)
    g_keys = glob * budget
    stride = 0
    if g_keys >= 1:
        stride = block_size * max(1, math.ceil(t_max / block_size / g_keys))
    return Plan(
        window=window,
        stride=stride,
        n_select=n_select,
        block_size=block_size,
        select_tile=select_tile,
    )


def effective_ratios(
    ratios: Sequence[float], budget: int, block_size: int
) -> tuple[float, float, float]:
    """Ratios with every branch that `derive_plan` rounds to nothing set to 0 and the others
    renormalised, so that the budget is still spent (repeated until every share left gives a
    branch). If no branch is left, the budget is a plain sliding window, ratios (1, 0, 0).
    """
    shares = [float(r) for r in ratios]
    while True:
        plan = derive_plan(shares, budget, block_size, t_max=budget)
        present = (plan.has_local, plan.has_global, plan.has_sparse)
        absent = [i for i in range(3) if shares[i] > 0 and not present[i]]
        if not absent:
            return (shares[0], shares[1], shares[2])
        for i in absent:
            shares[i] = 0.0
        total = sum(shares)
        if total <= 0:
            return (1.0, 0.0, 0.0)
        shares = [s / total for s in shares]
