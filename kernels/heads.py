"""Head geometry of grouped-query attention: which KV group each query head reads.

One value built once per layer (or per op call) and passed down, so that the model, the
pruner and the kernels agree on the rule instead of each computing `h // G` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadGroups:
    """n_heads query heads in n_kv_heads groups of G consecutive heads: head h reads KV head
    h // G and is member h % G of its group."""

    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"KV heads ({self.n_kv_heads}) must divide query heads ({self.n_heads})"
            )

    @property
    def size(self) -> int:
        """G, the query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def group_of(self, head):
        """The KV group of a query head (an int, or a tensor of head ids)."""
        return head // self.size

    def member(self, head):
        """The head's place inside its group."""
        return head % self.size

    def heads_of(self, group: int) -> list[int]:
        return list(range(group * self.size, (group + 1) * self.size))

    def by_group(self, heads: Iterable[int]) -> dict[int, list[int]]:
        """The groups that `heads` touch, in order, each with its heads among them in order."""
        out: dict[int, list[int]] = {}
        for h in sorted(heads):
            out.setdefault(self.group_of(h), []).append(h)
        return out

    def groups_of(self, heads: Iterable[int]) -> list[int]:
        """The KV groups that the query heads `heads` read, in order."""
        return list(self.by_group(heads))
