"""Pareto fronts of min/max objectives: the non-dominated set, the knee, and hypervolume.

Pure functions over plain sequences. Internally every objective is turned into one to
minimise (a `max` objective is negated), so "better" always means "smaller".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = Sequence[float]


def to_min(points: Sequence[Point], modes: Sequence[str]) -> list[tuple[float, ...]]:
    """Points with every `max` objective negated, so that all are minimised."""
    for m in modes:
        if m not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {m!r}")
    out = []
    for p in points:
        if len(p) != len(modes):
            raise ValueError(f"point {tuple(p)} has {len(p)} values for {len(modes)} objectives")
        out.append(tuple(float(v) if m == "min" else -float(v) for v, m in zip(p, modes)))
    return out


def dominates(a: Point, b: Point) -> bool:
    """a dominates b (both minimised): no worse everywhere and better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Exact duplicates are all kept (neither dominates the other); points with a NaN are never on
    the front.
    """
    pts = to_min(points, modes)
    ok = [i for i, p in enumerate(pts) if not any(math.isnan(v) for v in p)]
    return [i for i in ok if not any(dominates(pts[j], pts[i]) for j in ok if j != i)]


def normalise(
    points: Sequence[Point], modes: Sequence[str], bounds: Sequence[Point] | None = None
) -> list[tuple[float, ...]]:
    """Min-space points scaled so that 0 is the best and 1 the worst value of each objective.

    `bounds` = (ideal, nadir) in min space; by default the extremes of `points` themselves. An
    objective with no spread maps to 0.
    """
    pts = to_min(points, modes)
    if bounds is None:
        ideal = [min(c) for c in zip(*pts)]
        nadir = [max(c) for c in zip(*pts)]
    else:
        ideal, nadir = list(bounds[0]), list(bounds[1])
    out = []
    for p in pts:
        out.append(
            tuple((v - lo) / (hi - lo) if hi > lo else 0.0 for v, lo, hi in zip(p, ideal, nadir))
        )
    return out


def knee(points: Sequence[Point], modes: Sequence[str]) -> int:
    """Index of the knee of a front: the point closest to the utopia point.

    Each objective is normalised over the non-dominated points to [0, 1] (0 = best); the
    utopia point is then the origin, and the knee is the front point with the smallest
    Euclidean distance to it — the most balanced compromise, independent of the units. Ties
    go to the earlier point. Dominated points in `points` are ignored.
    """
    if not points:
        raise ValueError("knee of an empty set")
    front = non_dominated(points, modes)
    if not front:
        raise ValueError("no finite point to choose from")
    scaled = normalise([points[i] for i in front], modes)
    dist = [math.hypot(*p) for p in scaled]
    return front[min(range(len(front)), key=lambda i: (dist[i], i))]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume dominated by min-space `points` and bounded by `reference` (any dimension).

    Points not strictly better than the reference in every objective add nothing. Exact: a
    sweep in 2-D, slicing along the last objective above that (fine for the tens of points a
    search produces).
    """
    ref = tuple(float(r) for r in reference)
    pts = [tuple(float(v) for v in p) for p in points]
    pts = [p for p in pts if all(v < r for v, r in zip(p, ref))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    if len(ref) == 2:
        return _hv2(pts, ref)
    pts.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, p in enumerate(pts):
        top = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if top > p[-1]:
            volume += (top - p[-1]) * hypervolume([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return volume


def hypervolume_2d(points: Sequence[Point], reference: Point) -> float:
    """2-D hypervolume of min-space points against `reference` (see `hypervolume`)."""
    if len(reference) != 2:
        raise ValueError(f"reference must have 2 values, got {len(reference)}")
    return hypervolume(points, reference)


def _hv2(pts: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    area = 0.0
    best_y = ref[1]
    for x, y in sorted(pts):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def relative_history(
    points: Sequence[Point], modes: Sequence[str], reference: Point
) -> list[float]:
    """Hypervolume after each point (in the given order) against a fixed `reference` point.

    Each objective is measured in units of the reference's own value (|r|; 1 where r is 0), so
    the value is unitless and stays put when a later point is dominated: 0.1 is, for example, a
    10% lower loss at the reference's throughput, or 5% lower at twice the throughput. Points
    not better than the reference in every objective, and non-finite ones, add nothing.
    """
    scale = [abs(float(r)) or 1.0 for r in reference]
    ref = to_min([[float(r) / s for r, s in zip(reference, scale)]], modes)[0]
    seen: list[tuple[float, ...]] = []
    history = []
    for p in points:
        if all(math.isfinite(float(v)) for v in p):
            seen.append(to_min([[float(v) / s for v, s in zip(p, scale)]], modes)[0])
        history.append(hypervolume(seen, ref))
    return history


def hypervolume_history(
    points: Sequence[Point], modes: Sequence[str], margin: float = 0.1
) -> list[float]:
    """Hypervolume after each point (in the given order), in normalised units.

    Objectives are normalised with the ideal and nadir of all `points` (0 best, 1 worst) and the
    reference sits at 1 + margin on every axis, so the extremes of the front count too and the
    value is unitless (at most (1 + margin) ** n_objectives). Non-finite points add nothing.
    """
    finite = [p for p in points if all(math.isfinite(float(v)) for v in p)]
    if not finite:
        return [0.0] * len(points)
    pts = to_min(finite, modes)
    bounds = ([min(c) for c in zip(*pts)], [max(c) for c in zip(*pts)])
    ref = [1.0 + margin] * len(modes)
    seen: list[tuple[float, ...]] = []
    history = []
    for p in points:
        if all(math.isfinite(float(v)) for v in p):
            seen.append(normalise([p], modes, bounds)[0])
        history.append(hypervolume(seen, ref))
    return history
