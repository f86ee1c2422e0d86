"""The domains of a searched setting (`space:` in a space file) and the values a check
tries of each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True, frozen=True)
class Uniform:
    lo: float
    hi: float


@dataclass(kw_only=True, frozen=True)
class LogUniform:
    lo: float
    hi: float


@dataclass(kw_only=True, frozen=True)
class IntRange:
    lo: int
    hi: int
    step: int = 1
    log: bool = False


@dataclass(kw_only=True, frozen=True)
class Choice:
    values: tuple[Any, ...]


@dataclass(kw_only=True, frozen=True)
class Simplex:
    """Shares summing to 1 (the ratios): one uniform weight per component, normalised; shares
    below `min_share` are snapped to 0 so the sampler can reach corners where a branch is
    absent (see `automla.space.simplex_shares`)."""

    min_share: float = 0.05


Domain = Uniform | LogUniform | IntRange | Choice | Simplex


def middle_value(domain: Domain) -> Any:
    """A representative value of a domain: its middle choice, midpoint or equal shares."""
    values = probe_values(domain)
    return values[0] if isinstance(domain, Simplex) else values[len(values) // 2]


def probe_values(domain: Domain) -> list[Any]:
    """The values a check tries of a domain: all of a small grid or choice, else its ends and
    middle (the simplex: its centre and corners)."""
    from automla.space import simplex_shares

    if isinstance(domain, Uniform):
        return [domain.lo, (domain.lo + domain.hi) / 2, domain.hi]
    if isinstance(domain, LogUniform):
        return [domain.lo, math.sqrt(domain.lo * domain.hi), domain.hi]
    if isinstance(domain, IntRange):
        grid = range(domain.lo, domain.hi + 1, domain.step)
        if len(grid) <= 256:
            return list(grid)
        return [domain.lo, grid[len(grid) // 2], domain.hi]
    if isinstance(domain, Choice):
        return list(domain.values)
    corners = [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    return [simplex_shares(w, domain.min_share) for w in corners]
