"""Pareto front, knee and hypervolume against fronts computed by hand."""

from __future__ import annotations

import math
import random

import pytest
from helpers import objectives

from automla import pareto


def test_non_dominated_min_min():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3), (5, 5)]
    # (3, 4) and (5, 5) are dominated by (2, 3); the duplicate (2, 3) stays
    assert pareto.non_dominated(points, ["min", "min"]) == [0, 1, 3, 4]


def test_non_dominated_min_max():
    # val_loss (min) against tokens_per_s (max)
    points = [(1.0, 10.0), (2.0, 20.0), (3.0, 15.0), (0.5, 5.0), (2.0, 19.0)]
    assert pareto.non_dominated(points, ["min", "max"]) == [0, 1, 3]
    assert pareto.non_dominated(points, ["max", "max"]) == [1, 2]


def test_non_dominated_skips_nan_and_checks_input():
    assert pareto.non_dominated([(1, float("nan")), (2, 2)], ["min", "min"]) == [1]
    assert pareto.non_dominated([], ["min", "min"]) == []
    with pytest.raises(ValueError, match="mode"):
        pareto.non_dominated([(1, 2)], ["min", "up"])
    with pytest.raises(ValueError, match="2 values for 3 objectives"):
        pareto.non_dominated([(1, 2)], ["min", "min", "max"])


def test_non_dominated_agrees_with_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 6), rng.randint(0, 6), rng.randint(0, 6)) for _ in range(12)]
        front = pareto.non_dominated(pts, ["min", "max", "min"])
        for i, p in enumerate(pts):
            beaten = any(q[0] <= p[0] and q[1] >= p[1] and q[2] <= p[2] and q != p for q in pts)
            assert (i in front) == (not beaten)


def test_hypervolume_2d_staircase():
    # three steps against (4, 4): 3*1 + 2*1 + 1*1
    assert pareto.hypervolume_2d([(1, 3), (2, 2), (3, 1)], (4, 4)) == 6.0
    # order does not matter; dominated and out-of-reference points add nothing
    assert pareto.hypervolume_2d([(3, 1), (2, 2), (1, 3), (3, 3), (5, 0), (0, 4)], (4, 4)) == 6.0
    assert pareto.hypervolume_2d([(1, 1)], (3, 2)) == 2.0
    assert pareto.hypervolume_2d([], (1, 1)) == 0.0
    with pytest.raises(ValueError):
        pareto.hypervolume_2d([(1, 1, 1)], (2, 2, 2))


def test_hypervolume_3d():
    assert pareto.hypervolume([(1, 1, 1)], (2, 2, 2)) == 1.0
    # two boxes of volume 2 sharing a unit cube
    assert pareto.hypervolume([(0, 1, 1), (1, 0, 1)], (2, 2, 2)) == 3.0
    # the same in 3-D as a flat 2-D front extruded over a unit depth
    assert pareto.hypervolume([(1, 3, 0), (2, 2, 0), (3, 1, 0)], (4, 4, 1)) == 6.0


def test_knee_is_closest_to_utopia():
    # normalised over the front, (0.2, 0.2) is nearer the origin than either extreme
    assert pareto.knee([(0, 1), (0.2, 0.2), (1, 0)], ["min", "min"]) == 1
    # units do not matter: the same front with tokens/s (max) in thousands
    points = [(1.0, 5000.0), (1.2, 18000.0), (2.0, 20000.0), (1.9, 6000.0)]
    # normalised (min space): (0, 1), (0.2, 0.133), (1, 0); (1.9, 6000) is dominated
    assert pareto.knee(points, ["min", "max"]) == 1
    with pytest.raises(ValueError):
        pareto.knee([], ["min", "min"])


def test_knee_ties_go_to_the_first():
    assert pareto.knee([(0, 1), (1, 0)], ["min", "min"]) == 0


def test_normalise():
    pts = pareto.normalise([(1.0, 10.0), (3.0, 20.0), (2.0, 15.0)], ["min", "max"])
    assert pts == [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)]
    assert pareto.normalise([(1.0, 2.0), (1.0, 3.0)], ["min", "min"]) == [(0.0, 0.0), (0.0, 1.0)]


def test_hypervolume_history():
    # min/max: normalised, (1, 10) -> (0, 1) and (2, 20) -> (1, 0); reference 1.1:
    # one alone: 1.1 * 0.1 = 0.11; both: 0.11 + 0.11 - 0.01 = 0.21
    history = pareto.hypervolume_history([(1.0, 10.0), (2.0, 20.0)], ["min", "max"])
    assert history == pytest.approx([0.11, 0.21])
    # (1.5, 12) -> (0.5, 0.8) adds the rectangle [0.5, 1] x [0.8, 1]; a dominated point and a
    # NaN point add nothing
    history = pareto.hypervolume_history(
        [(1.0, 10.0), (2.0, 20.0), (1.5, 12.0), (1.8, 11.0), (math.nan, 1.0)], ["min", "max"]
    )
    assert history == pytest.approx([0.11, 0.21, 0.31, 0.31, 0.31])
    assert all(a <= b for a, b in zip(history, history[1:]))


def _records(points, states=None):
    out = []
    for i, (loss, tps) in enumerate(points):
        out.append(
            {
                "trial_id": f"t{i}",
                "state": (states or {}).get(i, "completed"),
                "label": "L50 G50",
                "params": {"model.mla.budget": 16 * (i + 1)},
                "metrics": {"val_loss": loss, "tokens_per_s": tps},
                "config": {},
                "finished": i,
            }
        )
    return out


def test_summary_and_selection_on_records():
    from automla.export import ExportError, select
    from automla.report import summarise
    from automla.schema import parse

    config = parse(
        {
            "objectives": objectives(),
            "space": {"lr": {"loguniform": [1e-3, 1e-2]}},
        }
    )
    # t1 is dominated by t0; t4 failed (its metrics do not count)
    trials = _records(
        [(2.0, 10.0), (2.5, 9.0), (2.2, 18.0), (3.0, 30.0), (1.0, 99.0)], states={4: "failed"}
    )
    summary = summarise(config, trials)
    assert [e["trial_id"] for e in summary["front"]] == ["t0", "t2", "t3"]
    # normalised over the front: t0 (0, 1), t2 (0.2, 0.6), t3 (1, 0) -> t2 is the knee
    assert summary["knee"] == "t2"
    assert (summary["completed"], summary["failed"]) == (4, 1)
    metrics, modes = config.metrics, config.modes
    assert select(trials, metrics, modes, "knee")["trial_id"] == "t2"
    assert select(trials, metrics, modes, "min:val_loss")["trial_id"] == "t0"
    assert select(trials, metrics, modes, "max:tokens_per_s")["trial_id"] == "t3"
    assert select(trials, metrics, modes, "knee", ["tokens_per_s>=20"])["trial_id"] == "t3"
    assert (
        select(trials, metrics, modes, "min:val_loss", ["model.mla.budget>16, val_loss<2.6"])[
            "trial_id"
        ]
        == "t2"
    )
    with pytest.raises(ExportError, match="no completed trial satisfies val_loss<1"):
        select(trials, metrics, modes, "knee", ["val_loss<1"])
    with pytest.raises(ExportError, match="expected NAME OP NUMBER"):
        select(trials, metrics, modes, "knee", ["val_loss"])
