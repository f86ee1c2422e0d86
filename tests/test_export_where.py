"""`export --where` on text, true/false and null settings, beside the numeric conditions."""

from __future__ import annotations

import pytest

from automla.export import ExportError, select

METRICS, MODES = ["val_loss", "tokens_per_s"], ["min", "max"]


def _trials():
    """Three completed trials and a failed one, with number, text, true/false and null settings."""
    settings = [
        ("silu", True, None, 16),
        ("tanh", False, "group", 32),
        ("silu", False, "head", 64),
        ("tanh", True, "group", 128),  # failed: never matches
    ]
    out = []
    for i, (activation, regrow, granularity, budget) in enumerate(settings):
        out.append(
            {
                "trial_id": f"t{i}",
                "state": "failed" if i == 3 else "completed",
                "params": {
                    "model.mla.gate.activation": activation,
                    "pruning.regrow": regrow,
                    "pruning.granularity": granularity,
                    "model.mla.budget": budget,
                },
                "metrics": {"val_loss": 3.0 - 0.1 * i, "tokens_per_s": 100.0 * (i + 1)},
                "config": {},
            }
        )
    return out


def _ids(where):
    """The trials left by `where`, each found as the min:val_loss pick once the others are
    excluded in turn."""
    left, trials = [], _trials()
    while True:
        try:
            t = select(trials, METRICS, MODES, "min:val_loss", where)
        except ExportError:
            return sorted(left)
        left.append(t["trial_id"])
        trials = [x for x in trials if x["trial_id"] != t["trial_id"]]


def test_true_false_settings_compare_ignoring_case():
    assert _ids(["pruning.regrow==true"]) == ["t0"]
    assert _ids(["pruning.regrow==FALSE"]) == ["t1", "t2"]
    assert _ids(["pruning.regrow!=True"]) == ["t1", "t2"]


def test_text_settings_take_equal_and_not_equal():
    assert _ids(["model.mla.gate.activation==silu"]) == ["t0", "t2"]
    assert _ids(["model.mla.gate.activation!=tanh"]) == ["t0", "t2"]
    assert _ids(["pruning.granularity==group, val_loss<3"]) == ["t1"]
    assert _ids(["pruning.granularity==null"]) == ["t0"]
    assert _ids(["pruning.granularity!=null"]) == ["t1", "t2"]
    with pytest.raises(ExportError, match="no completed trial satisfies .*activation==gelu"):
        select(_trials(), METRICS, MODES, "knee", ["model.mla.gate.activation==gelu"])


def test_numbers_compare_as_before_beside_text():
    assert _ids(["model.mla.budget>16"]) == ["t1", "t2"]
    assert _ids(["model.mla.budget==32"]) == ["t1"]
    assert _ids(["tokens_per_s>=200, val_loss<2.85"]) == ["t2"]
    assert _ids(["model.mla.budget>=32", "pruning.regrow==false, val_loss<2.85"]) == ["t2"]
    with pytest.raises(ExportError, match="no completed trial satisfies val_loss<1, pruning"):
        select(_trials(), METRICS, MODES, "knee", ["val_loss<1, pruning.regrow==true"])


def test_text_with_an_ordering_is_refused_in_one_line():
    with pytest.raises(ExportError) as e:
        select(_trials(), METRICS, MODES, "knee", ["model.mla.gate.activation<silu"])
    msg = str(e.value)
    assert "'silu' is not a number" in msg and "'<' needs a number" in msg
    assert "text settings take == or !=" in msg and "\n" not in msg


def test_a_number_and_a_text_setting_do_not_mix():
    with pytest.raises(ExportError, match="model.mla.gate.activation is a text setting"):
        select(_trials(), METRICS, MODES, "knee", ["model.mla.gate.activation==3"])
    with pytest.raises(ExportError, match="val_loss is a number"):
        select(_trials(), METRICS, MODES, "knee", ["val_loss==low"])


def test_unknown_names_list_the_text_settings_too():
    with pytest.raises(ExportError, match="unknown name 'activation'") as e:
        select(_trials(), METRICS, MODES, "knee", ["activation==silu"])
    for name in ("model.mla.gate.activation", "pruning.regrow", "pruning.granularity"):
        assert name in str(e.value)
    # --pick still takes only numbers
    with pytest.raises(ExportError, match="unknown metric 'pruning.regrow'"):
        select(_trials(), METRICS, MODES, "max:pruning.regrow")
