"""A validated space -> Optuna define-by-run suggestions, and suggestions -> a TrainConfig.

`sample(trial, space)` is the one place that asks Optuna for values; it returns TrainConfig
values keyed by dotted path. The searcher calls it through `define_by_run`, and the trial replays
it on the parameters Ray hands over (`decode`), so both sides agree by construction.

Three rules shape every sampled configuration:

* **simplex** (`simplex_shares`): one uniform weight in [0, 1] per component; shares are the
  weights over their sum; a share below `min_share` is snapped to 0 and the rest renormalised.
  The sampler reaches a corner (a branch absent) by driving that weight down, without any
  extra categorical switch. All-zero weights give equal shares.
* **settings that do not apply** (`applies`): everything under `model.mla.` is sampled only
  for MLA attention, and `pruning.*` only with pruning enabled. The switches
  (`model.attention`, `pruning.enabled`) are sampled first when searched, then read from the
  trial's values or the fixed settings, so a dense trial carries no ratios, budget or gate.
* **branches too small to exist** (`effective_ratios`, which `kernels/config.py` owns beside
  the plan's rule): a branch whose share of the budget rounds to nothing in
  `AttentionConfig.plan` (local: fewer than 0.5 keys, so window 0; global: fewer than 1
  compressed token; sparse: at most half a block, so 0 selected blocks) is absent: its share is
  set to 0 and the others renormalised, so the budget is still spent. If no branch is left, the
  budget is a plain sliding window, ratios (1, 0, 0).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna

from automla.domains import Choice, Domain, IntRange, LogUniform, Simplex, Uniform
from automla.introspect import field_type
from automla.kernels import BRANCHES, effective_ratios
from automla.schema import RATIOS
from automla.trainers.config import ConfigError, TrainConfig, build, to_dict


def param_names(path: str, domain: Domain) -> list[str]:
    """The Optuna parameter names a domain uses."""
    if isinstance(domain, Simplex):
        return [f"{path}.{name}" for name in _components(path)]
    return [path]


ATTENTION = "model.attention"
PRUNING = "pruning.enabled"
_SWITCHES = (ATTENTION, PRUNING)


def applies(path: str, values: Mapping[str, Any], fixed: Mapping[str, Any]) -> bool:
    """Whether the setting `path` matters for a trial with these sampled `values` (dotted) and
    `fixed` settings (nested TrainConfig dict): MLA settings only under MLA attention, pruning
    settings only with pruning on."""
    if path.startswith("model.mla."):
        return _switch(ATTENTION, values, fixed, "mla") == "mla"
    if path.startswith("pruning.") and path != PRUNING:
        return bool(_switch(PRUNING, values, fixed, False))
    return True


def sample(
    trial: optuna.trial.BaseTrial,
    space: Mapping[str, Domain],
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Suggest the domains of `space` that apply on `trial`; returns TrainConfig values by
    dotted path. With `fixed` (the search's fixed settings), settings that do not apply to
    this trial (see `applies`) are not suggested; without it every domain is."""
    values: dict[str, Any] = {}
    order = [p for p in _SWITCHES if p in space] + [p for p in space if p not in _SWITCHES]
    for path in order:
        domain = space[path]
        if fixed is not None and not applies(path, values, fixed):
            continue
        if isinstance(domain, Uniform):
            values[path] = trial.suggest_float(path, domain.lo, domain.hi)
        elif isinstance(domain, LogUniform):
            values[path] = trial.suggest_float(path, domain.lo, domain.hi, log=True)
        elif isinstance(domain, IntRange):
            values[path] = trial.suggest_int(
                path, domain.lo, domain.hi, step=domain.step, log=domain.log
            )
        elif isinstance(domain, Choice):
            values[path] = _suggest_choice(trial, path, domain.values)
        elif isinstance(domain, Simplex):
            weights = [trial.suggest_float(name, 0.0, 1.0) for name in param_names(path, domain)]
            values[path] = simplex_shares(weights, domain.min_share)
        else:
            raise TypeError(f"{path}: unknown domain {domain!r}")
    return values


def define_by_run(
    space: Mapping[str, Domain], fixed: Mapping[str, Any] | None = None
) -> Callable[[optuna.trial.BaseTrial], None]:
    """The define-by-run function for `OptunaSearch(space=...)` (picklable: Tune saves it)."""
    return _DefineByRun(dict(space), None if fixed is None else dict(fixed))


class _DefineByRun:
    def __init__(self, space: dict[str, Domain], fixed: dict[str, Any] | None = None):
        self.space = space
        self.fixed = fixed

    def __call__(self, trial: optuna.trial.BaseTrial) -> None:
        sample(trial, self.space, getattr(self, "fixed", None))  # pickles of older runs lack it


def decode(
    space: Mapping[str, Domain],
    params: Mapping[str, Any],
    fixed: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """TrainConfig values from the raw Optuna parameters (what Ray passes a trial)."""
    return sample(optuna.trial.FixedTrial(dict(params)), space, fixed)


def simplex_shares(weights: Sequence[float], min_share: float = 0.0) -> tuple[float, ...]:
    """Shares summing to 1 from non-negative weights; shares below `min_share` become 0."""
    w = [max(0.0, float(x)) for x in weights]
    total = sum(w)
    if total <= 0:
        return tuple(1.0 / len(w) for _ in w)
    shares = [x / total for x in w]
    # min_share < 1/n, and the largest share is >= 1/n, so something always survives
    kept = [s if s >= min_share else 0.0 for s in shares]
    total = sum(kept)
    return tuple(s / total for s in kept)


def apply(base: TrainConfig | Mapping[str, Any], values: Mapping[str, Any]) -> TrainConfig:
    """One trial's TrainConfig: `base` with `values` (dotted path -> value) set.

    `base` is best the fixed-settings dict of a SearchConfig (`config.fixed`): a built
    TrainConfig carries derived fields (model.head_dim) that would not follow a searched d_model.
    Raises ConfigError naming the path of a value the trainer's config rejects.
    """
    data = to_dict(base) if not isinstance(base, Mapping) else json.loads(json.dumps(base))
    for path, value in values.items():
        _set(data, path, to_dict(value))
    mla = data.get("model", {}).get("mla", {})
    try:
        ratios = [float(r) for r in mla["ratios"]]
        budget, block = int(mla["budget"]), int(mla["block_size"])
        ok = len(ratios) == 3 and budget >= 1 and block >= 1 and min(ratios) >= 0
    except (KeyError, TypeError, ValueError):
        ok = False  # leave the error to build(), which names the path
    if ok and abs(sum(ratios) - 1.0) <= 1e-6:
        mla["ratios"] = list(effective_ratios(ratios, budget, block))
    return build(TrainConfig, data)


def trial_label(config: TrainConfig) -> str:
    """What a trial's attention is: 'dense', or its MLA branch split ('L50 G25 S25')."""
    if config.model.attention != "mla":
        return config.model.attention
    return ratio_label(config.model.mla.ratios)


def ratio_label(ratios: Sequence[float]) -> str:
    """A short label of the branch split: 'L50 G25 S25' (absent branches left out)."""
    parts = [f"{name[0].upper()}{round(100 * r)}" for name, r in zip(BRANCHES, ratios) if r > 0]
    return " ".join(parts) or "-"


def flat_values(config: TrainConfig, space: Mapping[str, Domain]) -> dict[str, Any]:
    """The searched settings of a built config, one column each (tuples split per component);
    settings that do not apply to it (see `applies`) are left out."""
    data = to_dict(config)
    out: dict[str, Any] = {}
    for path, domain in space.items():
        if not applies(path, {}, data):
            continue
        value = _get(data, path)
        if isinstance(domain, Simplex):
            for name, v in zip(_components(path), value):
                out[f"{path}.{name}"] = round(float(v), 6)
        elif isinstance(value, (list, tuple)):
            out[path] = json.dumps(list(value))
        else:
            out[path] = value
    return out


def _suggest_choice(trial: optuna.trial.BaseTrial, path: str, values: Sequence[Any]) -> Any:
    if all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
        return trial.suggest_categorical(path, list(values))
    # Optuna stores only scalars: lists (gate widths, ratio triples) travel as JSON labels.
    labels = [json.dumps(to_dict(v)) for v in values]
    return values[labels.index(trial.suggest_categorical(path, labels))]


def _switch(path: str, values: Mapping[str, Any], fixed: Mapping[str, Any], default: Any) -> Any:
    if path in values:
        return values[path]
    try:
        return _get(fixed, path)
    except (KeyError, TypeError):
        return default


def _components(path: str) -> tuple[str, ...]:
    if path == RATIOS:
        return BRANCHES
    return tuple(str(i) for i in range(len(typing.get_args(field_type(path)))))


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *head, last = path.split(".")
    d = data
    for i, part in enumerate(head):
        nxt = d.get(part)
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(head[: i + 1]), "expected a section")
        d = nxt
    d[last] = value


def _get(data: Mapping[str, Any], path: str) -> Any:
    d: Any = data
    for part in path.split("."):
        d = d[part]
    return d
