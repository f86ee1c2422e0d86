"""Space -> Optuna suggestions -> TrainConfig: every domain kind, the simplex, the branch rule."""

from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest

from automla import schema, space
from automla.domains import Choice, IntRange, LogUniform, Simplex, Uniform
from automla.kernels import AttentionConfig

SPACE = {
    "model.mla.ratios": Simplex(min_share=0.1),
    "model.mla.budget": IntRange(lo=16, hi=64, step=16),
    "model.mla.block_size": Choice(values=(16, 32)),
    "model.mla.gate.hidden": Choice(values=((), (16,), (32, 8))),
    "model.mla.gate.activation": Choice(values=("silu", "tanh")),
    "lr": LogUniform(lo=1e-3, hi=1e-2),
    "weight_decay": Uniform(lo=0.0, hi=0.2),
    "warmup_steps": IntRange(lo=1, hi=8, log=True),
}
FIXED = schema.parse(
    {
        "objectives": [
            {"metric": "val_loss", "mode": "min"},
            {"metric": "tokens_per_s", "mode": "max"},
        ],
        "train": {"seq_len": 64},
        "model": {"d_model": 32, "max_seq_len": 256},  # the default budget (256) fits
        "space": {"seed": {"choice": [0]}},
    }
).fixed


def test_every_domain_kind_from_a_fixed_trial():
    params = {
        "model.mla.ratios.local": 0.6,
        "model.mla.ratios.global": 0.3,
        "model.mla.ratios.sparse": 0.1,
        "model.mla.budget": 48,
        "model.mla.block_size": 32,
        "model.mla.gate.hidden": "[32, 8]",
        "model.mla.gate.activation": "tanh",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 4,
    }
    values = space.sample(optuna.trial.FixedTrial(params), SPACE)
    assert values["model.mla.ratios"] == pytest.approx((0.6, 0.3, 0.1))
    assert {k: v for k, v in values.items() if k != "model.mla.ratios"} == {
        "model.mla.budget": 48,
        "model.mla.block_size": 32,
        "model.mla.gate.hidden": (32, 8),
        "model.mla.gate.activation": "tanh",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 4,
    }
    assert space.decode(SPACE, params) == values
    config = space.apply(FIXED, values)
    mla = config.model.mla
    # sparse: 0.1 * 48 / 32 = 0.15 blocks rounds to none, so its share moves to the others
    assert mla.ratios == pytest.approx((0.6 / 0.9, 0.3 / 0.9, 0.0))
    assert (mla.budget, mla.block_size) == (48, 32)
    assert (mla.gate.hidden, mla.gate.activation) == ([32, 8], "tanh")
    assert (config.lr, config.weight_decay, config.warmup_steps) == (2e-3, 0.05, 4)
    assert config.seq_len == 64 and config.model.d_model == 32


def test_param_names_are_what_optuna_records():
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    trial = study.ask()
    space.define_by_run(SPACE)(trial)
    expected = [n for path, d in SPACE.items() for n in space.param_names(path, d)]
    assert list(trial.params) == expected
    assert trial.params["model.mla.gate.hidden"] in ("[]", "[16]", "[32, 8]")


def test_sampled_configs_are_always_valid():
    study = optuna.create_study(
        directions=["minimize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=1)
    )
    absent = [0, 0, 0]
    for _ in range(300):
        trial = study.ask()
        values = space.sample(trial, SPACE)
        shares = values["model.mla.ratios"]
        assert math.isclose(sum(shares), 1.0, abs_tol=1e-9)
        assert all(s == 0 or s >= 0.1 for s in shares)
        config = space.apply(FIXED, values)  # AttentionConfig raises if every branch is empty
        plan = config.model.mla.plan(config.seq_len)
        present = (plan.has_local, plan.has_global, plan.has_sparse)
        for i, r in enumerate(config.model.mla.ratios):
            assert (r > 0) == present[i]
            absent[i] += not present[i]
        assert space.decode(SPACE, trial.params) == values
        study.tell(trial, [0.0, 0.0])
    assert all(a > 0 for a in absent), "every corner of the simplex must be reachable"


def test_simplex_shares_by_hand():
    assert space.simplex_shares([1, 1, 2]) == (0.25, 0.25, 0.5)
    # 0.05 / 1.05 < 0.1: snapped to zero, the rest renormalised
    assert space.simplex_shares([0.05, 0.5, 0.5], 0.1) == (0.0, 0.5, 0.5)
    assert space.simplex_shares([0.0, 0.0, 0.7], 0.1) == (0.0, 0.0, 1.0)
    assert space.simplex_shares([0.0, 0.0, 0.0], 0.1) == pytest.approx((1 / 3,) * 3)
    shares = space.simplex_shares([0.3, 0.2, 0.9], 0.05)
    assert shares == pytest.approx((0.3 / 1.4, 0.2 / 1.4, 0.9 / 1.4))


@pytest.mark.parametrize(
    "ratios, budget, block, expected",
    [
        pytest.param((0.5, 0.25, 0.25), 256, 32, (0.5, 0.25, 0.25), id="all-present"),
        pytest.param((0.0, 0.0, 1.0), 16, 64, (1.0, 0.0, 0.0), id="sparse-only-too-small"),
        pytest.param((0.5, 0.0, 0.5), 64, 64, (1.0, 0.0, 0.0), id="half-block-rounds-down"),
        pytest.param((0.5, 0.0, 0.5), 128, 64, (0.5, 0.0, 0.5), id="one-block"),
        pytest.param((0.9, 0.1, 0.0), 8, 16, (1.0, 0.0, 0.0), id="global-under-one-token"),
        pytest.param((0.05, 0.95, 0.0), 8, 16, (0.0, 1.0, 0.0), id="local-under-half-key"),
        pytest.param((0.2, 0.4, 0.4), 32, 32, (1 / 3, 2 / 3, 0.0), id="sparse-renormalised"),
    ],
)
def test_effective_ratios_by_hand(ratios, budget, block, expected):
    assert space.effective_ratios(ratios, budget, block) == pytest.approx(expected)


def test_effective_ratios_match_the_plan():
    rng = random.Random(0)
    for _ in range(2000):
        w = [rng.random() ** 3 for _ in range(3)]
        ratios = space.simplex_shares(w, 0.0)
        budget = rng.choice([1, 3, 8, 16, 24, 64, 100, 256])
        block = rng.choice([1, 4, 16, 64, 128])
        eff = space.effective_ratios(ratios, budget, block)
        assert math.isclose(sum(eff), 1.0, abs_tol=1e-9)
        plan = AttentionConfig(budget=budget, ratios=eff, block_size=block).plan(budget)
        assert [r > 0 for r in eff] == [plan.has_local, plan.has_global, plan.has_sparse]
        if eff == ratios:
            continue
        assert all(e == 0 for e, r in zip(eff, ratios) if r == 0), "no branch appears"


def test_apply_follows_searched_sizes():
    config = space.apply(FIXED, {"model.d_model": 64, "model.n_heads": 8, "model.n_kv_heads": 4})
    assert config.model.head_dim == 8  # derived from the searched d_model, not the base's
    built = space.apply(FIXED, {})
    assert space.apply(built, {"lr": 1e-3}).lr == 1e-3  # a built TrainConfig works as base too


def test_apply_names_a_bad_value():
    with pytest.raises(schema.ConfigError) as info:
        space.apply(FIXED, {"model.mla.block_size": 24})
    assert info.value.path == "model.mla.block_size" and "power of two" in info.value.message


def test_flat_values_and_labels():
    config = space.apply(
        FIXED, {"model.mla.ratios": (0.5, 0.25, 0.25), "model.mla.gate.hidden": (16,)}
    )
    flat = space.flat_values(
        config, {"model.mla.ratios": Simplex(), "model.mla.gate.hidden": Choice(values=((), (16,)))}
    )
    assert flat == {
        "model.mla.ratios.local": 0.5,
        "model.mla.ratios.global": 0.25,
        "model.mla.ratios.sparse": 0.25,
        "model.mla.gate.hidden": "[16]",
    }
    assert space.ratio_label((0.5, 0.25, 0.25)) == "L50 G25 S25"
    assert space.ratio_label((0.0, 1.0, 0.0)) == "G100"


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_samplers_are_seeded(sampler):
    from automla.factories import make_sampler

    config = schema.parse(
        {
            "objectives": [
                {"metric": "val_loss", "mode": "min"},
                {"metric": "tokens_per_s", "mode": "max"},
            ],
            "sampler": {"name": sampler, "seed": 7},
            "trials": 8,
            "model": {"d_model": 32},
            "space": {"model.mla.ratios": {"simplex": {}}, "lr": {"loguniform": [1e-3, 1e-2]}},
        }
    )

    def run() -> list[dict]:
        study = optuna.create_study(
            directions=["minimize", "maximize"], sampler=make_sampler(config)
        )
        out = []
        for i, j in itertools.product(range(3), range(2)):
            t = study.ask()
            space.sample(t, config.space)
            out.append(t.params)
            study.tell(t, [float(i + j), float(i * j)])
        return out

    assert run() == run()


CONDITIONAL = {
    "model.attention": Choice(values=("mla", "dense")),
    "pruning.enabled": Choice(values=(False, True)),
    "model.mla.budget": IntRange(lo=16, hi=64, step=16),
    "model.mla.ratios": Simplex(min_share=0.1),
    "pruning.fraction": Uniform(lo=0.1, hi=0.4),
    "lr": LogUniform(lo=1e-3, hi=1e-2),
}


@pytest.mark.parametrize("attention", ["mla", "dense"])
@pytest.mark.parametrize("pruning", [False, True])
def test_settings_that_do_not_apply_are_not_sampled(attention, pruning):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"model.attention": attention, "pruning.enabled": pruning})
    trial = study.ask()
    values = space.sample(trial, CONDITIONAL, FIXED)
    assert ("model.mla.budget" in values) == (attention == "mla")
    assert ("model.mla.ratios.local" in trial.params) == (attention == "mla")
    assert ("pruning.fraction" in values) == pruning
    assert "lr" in values
    assert space.decode(CONDITIONAL, trial.params, FIXED) == values
    config = space.apply(FIXED, values)
    flat = space.flat_values(config, CONDITIONAL)
    assert any(k.startswith("model.mla.") for k in flat) == (attention == "mla")
    assert ("pruning.fraction" in flat) == pruning
    assert space.trial_label(config) == (
        "dense" if attention == "dense" else space.ratio_label(config.model.mla.ratios)
    )


def test_fixed_switches_decide_too():
    dense = {**FIXED, "model": {**FIXED["model"], "attention": "dense"}}
    only = {k: v for k, v in CONDITIONAL.items() if k not in ("model.attention", "pruning.enabled")}
    values = space.decode(only, {"lr": 2e-3}, dense)  # fixed dense, pruning off by default
    assert values == {"lr": 2e-3}
    assert space.applies("model.mla.budget", {}, FIXED)
    assert not space.applies("pruning.fraction", {}, FIXED)
    assert space.applies("pruning.fraction", {"pruning.enabled": True}, FIXED)
