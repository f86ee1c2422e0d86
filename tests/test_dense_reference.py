"""The dense reference and the hypervolume it anchors, without Ray: the space file's
`reference` and `hypervolume` keys, the reference's config, its ratios to the front, and a
hypervolume that does not move when a dominated trial is added."""

from __future__ import annotations

import json
import math

import pytest
from helpers import search_space

from automla import reference, report, schema
from automla.schema import SpaceError


def parse(**changes) -> schema.SearchConfig:
    return schema.parse(search_space(**changes), "space.yaml")


def test_reference_defaults_to_dense_and_reads_back():
    data = search_space()
    del data["reference"]
    config = schema.parse(data)
    assert config.reference == "dense"
    config = parse(reference="none", hypervolume={"reference": {"val_loss": 5, "tokens_per_s": 1}})
    again = schema.parse(schema.to_yaml_dict(config))
    assert again.reference == "none"
    assert again.hypervolume_reference == {"val_loss": 5.0, "tokens_per_s": 1.0}


@pytest.mark.parametrize(
    "changes, path",
    [
        ({"reference": "sparse"}, "reference"),
        ({"hypervolume": {"point": {}}}, "hypervolume"),
        ({"hypervolume": {"reference": {"val_loss": 5}}}, "hypervolume.reference"),
        (
            {"hypervolume": {"reference": {"val_loss": "high", "tokens_per_s": 1}}},
            "hypervolume.reference.val_loss",
        ),
    ],
)
def test_bad_reference_keys(changes, path):
    with pytest.raises(SpaceError) as info:
        parse(**changes)
    assert info.value.path == path


def test_cpu_trials_that_share_the_machine_take_the_exclusive_benchmark():
    shared = parse(concurrency=2, reference="none")
    assert shared.fixed["benchmark"]["enabled"]
    alone = parse(concurrency=1, reference="none")
    assert not alone.fixed["benchmark"]["enabled"]
    beside_reference = parse(concurrency=1, reference="dense")
    assert beside_reference.fixed["benchmark"]["enabled"]
    train = {**search_space()["train"], "benchmark": {"enabled": False}}
    assert not parse(concurrency=2, train=train).fixed["benchmark"]["enabled"]


def test_reference_config_is_the_fixed_model_with_dense_attention():
    config = parse(
        reference="dense",
        train={"steps": 7, "seq_len": 64, "pruning": {"enabled": True, "warmup_steps": 2}},
        model={"n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64},
        space={
            "model.mla.budget": {"choice": [16, 32]},
            "model.d_model": {"choice": [32, 48, 64]},
            "pruning.fraction": {"uniform": [0.1, 0.3]},
        },
    )
    ref = reference.reference_config(config)
    assert ref.model.attention == "dense"
    assert not ref.pruning.enabled
    assert ref.model.d_model == 48  # the middle choice of a searched setting that applies
    assert ref.steps == 7 and ref.seq_len == 64 and ref.seed == config.fixed["seed"]


def test_compare_states_ratios_and_differences():
    vs = reference.compare(
        {"val_loss": 1.41, "tokens_per_s": 1900.0},
        {"val_loss": 1.50, "tokens_per_s": 1000.0},
        ["val_loss", "tokens_per_s"],
    )
    assert vs["tokens_per_s"]["ratio"] == pytest.approx(1.9)
    assert vs["val_loss"]["difference"] == pytest.approx(-0.09)
    assert reference.compare_text(vs) == "-0.09 val_loss, 1.9x tokens_per_s"


def _trial(n: int, loss: float, speed: float) -> dict:
    return {
        "trial_id": f"t{n}",
        "optuna_trial": n,
        "state": "completed",
        "label": "L100",
        "params": {},
        "metrics": {"val_loss": loss, "tokens_per_s": speed},
        "config": {},
    }


DENSE = {"state": "completed", "metrics": {"val_loss": 2.0, "tokens_per_s": 1000.0}}
TRIALS = [_trial(0, 1.8, 1500.0), _trial(1, 1.9, 2500.0), _trial(2, 2.2, 4000.0)]


def test_hypervolume_against_the_dense_reference():
    config = parse()
    summary = report.summarise(config, TRIALS, DENSE)
    assert summary["hypervolume_stable"]
    # in units of the reference: (0.1 x 0.5) + (0.05 x 1.0) beyond it; t2 is slower-worse
    assert summary["hypervolume"] == pytest.approx(0.1 * 0.5 + 0.05 * 1.0)
    assert [e["vs_reference_text"] for e in summary["front"]][
        0
    ] == "-0.2 val_loss, 1.5x tokens_per_s"
    assert summary["reference"]["metrics"] == DENSE["metrics"]


@pytest.mark.parametrize(
    "ref, hv",
    [(DENSE, None), (None, {"reference": {"val_loss": 3.0, "tokens_per_s": 500.0}})],
)
def test_a_dominated_trial_leaves_the_hypervolume_unchanged(ref, hv):
    config = parse(hypervolume=hv)
    before = report.summarise(config, TRIALS, ref)
    worse = _trial(3, 2.5, 1200.0)  # dominated by t1, and the worst loss of all
    after = report.summarise(config, TRIALS + [worse], ref)
    assert after["hypervolume"] == before["hypervolume"] > 0
    # the run's own normalisation moves with it: that figure is flagged as not comparable
    plain = report.summarise(parse(), TRIALS, None)
    assert not plain["hypervolume_stable"] and "not comparable" in plain["hypervolume_note"]
    assert report.summarise(parse(), TRIALS + [worse], None)["hypervolume"] != plain["hypervolume"]


def test_one_point_front_is_said_so():
    trials = [_trial(0, 1.5, 3000.0), _trial(1, 1.8, 2000.0), _trial(2, 1.9, 1000.0)]
    plain = report.summarise(parse(), trials, None)
    assert plain["front_note"] == "one trial dominates all others"
    assert report.hypervolume_text(plain) == "n/a: one trial dominates all others"
    anchored = report.summarise(parse(), trials, DENSE)
    text = report.hypervolume_text(anchored)
    assert text.startswith(f"{anchored['hypervolume']:.4f} (vs dense reference)")
    assert text.endswith("one trial dominates all others")


def test_a_zero_hypervolume_names_the_objective_nobody_beats():
    # a recall metric at chance everywhere: the front beats the reference on loss and speed,
    # ties it on recall, and the volume beyond it is 0; the text says why
    config = parse(objectives=[{"metric": "val_loss", "mode": "min"},
                               {"metric": "tokens_per_s", "mode": "max"},
                               {"metric": "mqar_acc", "mode": "max"}],
                   data={"source": "mqar"})  # fmt: skip
    dense = {"state": "completed", "metrics": {**DENSE["metrics"], "mqar_acc": 0.01}}
    trials = [_trial(i, loss, tps) for i, (loss, tps) in enumerate([(1.8, 1500.0), (1.9, 2500.0)])]
    for t in trials:
        t["metrics"]["mqar_acc"] = 0.01
    summary = report.summarise(config, trials, dense)
    assert summary["hypervolume"] == 0 and summary["hypervolume_unbeaten"] == ["mqar_acc"]
    assert report.hypervolume_text(summary).endswith("no completed trial beats it on mqar_acc")
    trials[1]["metrics"]["mqar_acc"] = 0.02
    summary = report.summarise(config, trials, dense)
    assert summary["hypervolume"] > 0 and summary["hypervolume_unbeaten"] == []


def test_a_failed_reference_is_shown_but_anchors_nothing():
    failed = {"state": "failed", "reason": "boom", "metrics": {}}
    summary = report.summarise(parse(), TRIALS, failed)
    assert not summary["hypervolume_stable"]
    assert summary["reference"]["state"] == "failed"
    assert all(e["vs_reference"] == {} for e in summary["front"])
    assert not math.isnan(summary["hypervolume"])


def test_pruned_heads_and_when():
    from automla.attention_view import pruned_heads

    history = [
        {"step": 10, "attn_heads": [[0, 1, 2, 3], [0, 1, 2, 3]]},
        {"step": 20, "attn_heads": [[0, 2, 3], [0, 1, 2, 3]]},
        {"step": 30, "attn_heads": [[0, 3], [0, 1, 2, 3]]},
    ]
    assert pruned_heads(history) == [[(1, 20), (2, 30)], []]


def test_a_resume_trains_the_reference_only_when_it_has_none(tmp_path):
    config = parse(reference="dense")
    ref = reference.reference_config(config)
    assert reference.needs_training(config, tmp_path)  # none yet (or cancelled with the search)
    entry = reference.record(tmp_path, ref, [{"step": 1, "val_loss": 3.0}])
    assert entry["state"] == "failed" and "step 1 of 2" in entry["reason"]
    assert reference.needs_training(config, tmp_path)
    entry = reference.record(tmp_path, ref, None, "RuntimeError: boom")
    assert entry["state"] == "failed" and entry["reason"] == "RuntimeError: boom"
    assert reference.needs_training(config, tmp_path)
    history = [{"step": 1, "val_loss": 3.0}, {"step": 2, "val_loss": 2.5, "attn_heads": [[0]]}]
    entry = reference.record(tmp_path, ref, history)
    assert entry["state"] == "completed" and entry["metrics"] == {"step": 2, "val_loss": 2.5}
    assert not reference.needs_training(config, tmp_path)
    assert reference.load_reference(tmp_path)["history"] == history
    assert not reference.needs_training(parse(reference="none"), tmp_path / "empty")


def test_pruning_decisions_from_the_trainers_log(tmp_path):
    from automla.attention_view import pruning_decisions

    log = tmp_path / "pruning.jsonl"
    lines = [
        {"step": 1, "active_heads_per_layer": [4, 4]},
        {"step": 10, "removed": [[], [1]]},
        {"step": 20, "removed": [[2], [1, 3]]},
        {"step": 30, "removed": [[2], [1]]},  # head 3 of layer 1 grew back
        {"step": 40, "removed": [[2], [1, 3]]},
    ]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n" + '{"step": 4')
    assert pruning_decisions(log) == [[(2, 20)], [(1, 10), (3, 40)]]
    assert pruning_decisions(tmp_path / "none.jsonl") is None
