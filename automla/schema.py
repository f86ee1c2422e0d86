"""Search-space files: YAML -> a validated, typed `SearchConfig`.

A file names the objectives, the sampler, the trial budget and concurrency, the resources of
one trial, the fixed `data` / `train` / `model` settings of the trainer, and the `space`: dotted
TrainConfig paths mapped to domains. Every problem raises `SpaceError` naming the file, the key
path and what was expected, before anything starts.

```yaml
objectives: [{metric: val_loss, mode: min}, {metric: tokens_per_s, mode: max}]
sampler: {name: tpe, seed: 0}
trials: 16
concurrency: 2
max_failures: 1            # retries of a trial that crashed or lost its worker
resources: {cpus: 1, gpus: 0}
scheduler: {name: asha, metric: val_loss, mode: min, grace_period: 50}   # optional
data: {source: stdlib}
train: {steps: 100, seq_len: 512}
model: {d_model: 64, max_seq_len: 512}
space:
  model.mla.ratios: {simplex: {min_share: 0.1}}
  model.mla.budget: {choice: [64, 128, 256]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
```
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from automla.benchmark_plan import plan_benchmark
from automla.domains import Choice, Domain, IntRange, LogUniform, Simplex, Uniform, probe_values
from automla.introspect import defaults, field_type, leaf_kind, type_name
from automla.metrics import check_metric
from automla.trainers.config import (
    ConfigError,
    TrainConfig,
    build,
    join_path,
    read_yaml,
    to_dict,
)

Mode = Literal["min", "max"]
SamplerName = Literal["tpe", "nsga2", "gp", "random"]
Reference = Literal["dense", "none"]

RATIOS = "model.mla.ratios"
"""The branch shares, searched as a simplex and shown as a label ('L50 G25 S25')."""

SECTIONS = (
    "objectives",
    "sampler",
    "trials",
    "concurrency",
    "max_failures",
    "resources",
    "scheduler",
    "data",
    "train",
    "model",
    "space",
    "reference",
    "hypervolume",
)


class SpaceError(ValueError):
    """A search-space file is wrong: `file`, the dotted key `path` in it, and what was expected."""

    def __init__(self, file: str, path: str, message: str):
        self.file = file
        self.path = path
        self.message = message
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {message}")


@dataclass(kw_only=True)
class Objective:
    """One objective: a reported metric and whether it is minimised or maximised."""

    metric: str
    mode: Mode

    def __post_init__(self) -> None:
        check_metric(self.metric)


@dataclass(kw_only=True)
class Sampler:
    """The Optuna sampler that proposes trials."""

    name: SamplerName = "tpe"
    seed: int = 0
    startup_trials: int | None = None
    """Random trials before the model kicks in (TPE/GP n_startup_trials, NSGA-II population);
    None keeps the sampler's default, capped at half the trial budget."""

    def __post_init__(self) -> None:
        if self.startup_trials is not None and self.startup_trials < 1:
            raise ConfigError("startup_trials", f"must be >= 1, got {self.startup_trials}")


@dataclass(kw_only=True)
class Resources:
    """What one trial reserves from Ray."""

    cpus: float = 1.0
    """Per worker; also each worker's torch thread count (at least 1)."""
    gpus: float = 0.0
    """Per trial: a fraction below 1 (trials share a GPU) or N >= 1 whole GPUs (the trial trains
    on N data-parallel workers, one GPU each)."""
    workers: int = 1
    """Data-parallel workers per trial (Ray Train; gloo on CPU). With gpus >= 1 it is gpus."""
    sequence_parallel: int = 1
    """P: workers sharing each sequence (All-to-All sequence parallelism); the trial trains
    workers / P data-parallel groups of P. Sets the trainer's `sequence_parallel`."""

    def __post_init__(self) -> None:
        if self.cpus <= 0:
            raise ConfigError("cpus", f"must be > 0, got {self.cpus}")
        if self.gpus < 0:
            raise ConfigError("gpus", f"must be >= 0, got {self.gpus}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ConfigError("gpus", f"above 1 must be a whole number, got {self.gpus}")
        if self.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {self.workers}")
        if self.gpus >= 1 and self.workers not in (1, int(self.gpus)):
            raise ConfigError(
                "workers",
                f"with gpus: {self.gpus:g} a trial has {int(self.gpus)} workers "
                f"(one per GPU), got workers: {self.workers}",
            )
        if 0 < self.gpus < 1 and self.workers > 1:
            raise ConfigError(
                "workers", f"a GPU fraction ({self.gpus}) is for one-worker trials sharing a GPU"
            )
        P = self.sequence_parallel
        if P < 1:
            raise ConfigError("sequence_parallel", f"must be >= 1, got {P}")
        if self.n_workers % P:
            given = f"gpus: {self.gpus:g}" if self.gpus >= 1 else f"workers: {self.workers}"
            raise ConfigError(
                "sequence_parallel",
                f"must divide the trial's {self.n_workers} worker(s) ({given}; one per GPU on "
                f"GPUs): a trial trains workers / P data-parallel groups of P, got {P}",
            )

    @property
    def n_workers(self) -> int:
        return int(self.gpus) if self.gpus >= 1 else self.workers

    @property
    def gpus_per_worker(self) -> float:
        return 1.0 if self.gpus >= 1 else self.gpus


@dataclass(kw_only=True)
class Scheduler:
    """Early stopping (ASHA) on one reported metric, in trainer steps."""

    name: Literal["asha"] = "asha"
    metric: str = "val_loss"
    mode: Mode = "min"
    grace_period: int = 1
    """Steps a trial runs before it can be stopped."""
    reduction_factor: float = 3.0
    """Only the best 1/reduction_factor of the trials at a rung go on."""
    max_t: int | None = None
    """The step at which no trial is stopped any more; None: the trials' `steps`."""

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if self.grace_period < 1:
            raise ConfigError("grace_period", f"must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            raise ConfigError("reduction_factor", f"must be > 1, got {self.reduction_factor}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(
                "max_t", f"must be >= grace_period ({self.grace_period}), got {self.max_t}"
            )


@dataclass(kw_only=True)
class SearchConfig:
    """A validated search-space file."""

    objectives: list[Objective]
    sampler: Sampler = field(default_factory=Sampler)
    trials: int = 12
    concurrency: int = 1
    max_failures: int = 0
    """Ray retries of a trial that raised or lost its worker, from its last checkpoint;
    diverged (NaN/inf), out-of-memory and invalid trials are never retried."""
    resources: Resources = field(default_factory=Resources)
    scheduler: Scheduler | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    """The fixed trainer settings as a nested TrainConfig dict (defaults filled in, searched
    paths left out); `automla.space.apply(fixed, values)` builds one trial's config."""
    space: dict[str, Domain] = field(default_factory=dict)
    reference: Reference = "dense"
    """`dense`: the search also trains the fixed model with dense attention once, as the
    baseline of every front (see `automla.reference`); `none`: no baseline."""
    hypervolume_reference: dict[str, float] | None = None
    """A fixed hypervolume reference point, one value per objective (used without a dense
    reference); None: see `automla.report.hypervolume_reference`."""
    source: str = ""
    """The file it was read from, for messages."""

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]


def load(path: str | Path) -> SearchConfig:
    """Read and validate a search-space YAML file; raises SpaceError."""
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpaceError(file, "", f"cannot read the file ({e.strerror or e})") from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpaceError(file, "", f"not valid YAML{where}: {problem}") from None
    return parse(data, file)


def parse(data: Any, file: str = "<space>") -> SearchConfig:
    """Validate a loaded search-space mapping (see `load`)."""
    if not isinstance(data, dict):
        raise SpaceError(
            file, "", f"expected a mapping with keys {', '.join(SECTIONS)}, got {_kind(data)}"
        )
    unknown = sorted(set(map(str, data)) - set(SECTIONS))
    if unknown:
        raise SpaceError(file, unknown[0], f"unknown key; expected one of {', '.join(SECTIONS)}")
    for key in ("objectives", "space"):
        if key not in data:
            raise SpaceError(file, key, "missing; it is required")

    objectives = _objectives(data["objectives"], file)
    sampler = _build(Sampler, data.get("sampler", {}), "sampler", file)
    resources = _build(Resources, data.get("resources", {}), "resources", file)
    trials = _positive_int(data.get("trials", 12), "trials", file)
    concurrency = _positive_int(data.get("concurrency", 1), "concurrency", file)
    max_failures = _positive_int(data.get("max_failures", 0), "max_failures", file, low=0)
    scheduler = None
    if data.get("scheduler") is not None:
        scheduler = _build(Scheduler, data["scheduler"], "scheduler", file)

    sections = {}
    for key in ("data", "train", "model"):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise SpaceError(file, key, f"expected a mapping of settings, got {_kind(value)}")
        sections[key] = value
    for key in ("model", "data"):
        if key in sections["train"]:
            raise SpaceError(file, f"train.{key}", f"set these in the top-level '{key}' section")
    user_fixed = {**sections["train"], "model": sections["model"], "data": sections["data"]}
    has_mqar = sections["data"].get("source") == "mqar" or bool(sections["data"].get("mqar_mix"))
    for o in objectives:
        _check_mqar(o.metric, has_mqar, file, "objectives")

    raw_space = data["space"]
    if not isinstance(raw_space, dict) or not raw_space:
        raise SpaceError(
            file,
            "space",
            "expected a non-empty mapping of dotted TrainConfig "
            f"paths to domains, got {_kind(raw_space)}",
        )
    space: dict[str, Domain] = {}
    for key, spec in raw_space.items():
        key = str(key)
        tp = _field_type(key, file)
        space[key] = _domain(spec, tp, key, file)
        if _get(user_fixed, key) is not _MISSING:
            raise SpaceError(
                file,
                f"space.{key}",
                f"also fixed in '{section_path(key)}'; "
                "a setting is either fixed or searched, not both",
            )

    _check_sequence_parallel(resources, sections["train"], space, file)
    fixed = _merge(defaults(TrainConfig), user_fixed)
    for key in space:
        _pop(fixed, key)
    fixed["sequence_parallel"] = resources.sequence_parallel
    reference = _reference(data.get("reference", "dense"), file)
    hv_reference = _hypervolume(data.get("hypervolume"), objectives, file)
    # the reference trains beside the trials: one more run sharing the machine
    runs_at_once = concurrency + (reference != "none")
    plan_benchmark(fixed, sections["train"], objectives, scheduler, resources, runs_at_once)
    config = SearchConfig(
        objectives=objectives,
        sampler=sampler,
        trials=trials,
        concurrency=concurrency,
        max_failures=max_failures,
        resources=resources,
        scheduler=scheduler,
        fixed=fixed,
        space=space,
        reference=reference,
        hypervolume_reference=hv_reference,
        source=file,
    )
    if scheduler is not None:
        _check_scheduler(config)
        _check_mqar(scheduler.metric, has_mqar, file, "scheduler.metric")
    from automla.feasibility import check_trials  # it imports this module

    try:
        check_trials(config)
    except SpaceError as e:
        if e.path != "train.sequence_parallel":
            raise
        raise SpaceError(file, "resources.sequence_parallel", e.message) from None
    if reference == "dense":
        from automla.reference import reference_config  # it imports this module

        try:
            reference_config(config)
        except ConfigError as e:
            raise SpaceError(file, "reference", f"the dense reference is invalid: {e}") from None
    return config


def _check_sequence_parallel(
    resources: Resources, user_train: dict, space: dict[str, Domain], file: str
) -> None:
    """The trainer's `sequence_parallel` follows `resources.sequence_parallel`: it is neither
    searched nor set apart (a resolved file repeats it in `train`, equal)."""
    if "sequence_parallel" in space:
        raise SpaceError(
            file, "space.sequence_parallel", "set by resources.sequence_parallel; not searched"
        )
    given = user_train.get("sequence_parallel", resources.sequence_parallel)
    if given != resources.sequence_parallel:
        raise SpaceError(
            file,
            "train.sequence_parallel",
            f"set it as resources.sequence_parallel (there: {resources.sequence_parallel})",
        )


def to_yaml_dict(config: SearchConfig) -> dict[str, Any]:
    """The resolved file: every fixed setting spelled out; `parse` reads it back unchanged."""
    fixed = copy.deepcopy(config.fixed)
    model, data = fixed.pop("model"), fixed.pop("data")
    return {
        "objectives": [{"metric": o.metric, "mode": o.mode} for o in config.objectives],
        "sampler": dataclasses.asdict(config.sampler),
        "trials": config.trials,
        "concurrency": config.concurrency,
        "max_failures": config.max_failures,
        "resources": dataclasses.asdict(config.resources),
        "scheduler": dataclasses.asdict(config.scheduler) if config.scheduler else None,
        "data": data,
        "train": fixed,
        "model": model,
        "space": {k: domain_to_dict(d) for k, d in config.space.items()},
        "reference": config.reference,
        "hypervolume": (
            {"reference": dict(config.hypervolume_reference)}
            if config.hypervolume_reference
            else None
        ),
    }


def domain_to_dict(domain: Domain) -> dict[str, Any]:
    if isinstance(domain, Uniform):
        return {"uniform": [domain.lo, domain.hi]}
    if isinstance(domain, LogUniform):
        return {"loguniform": [domain.lo, domain.hi]}
    if isinstance(domain, IntRange):
        out: dict[str, Any] = {"int": [domain.lo, domain.hi]}
        if domain.step != 1:
            out["step"] = domain.step
        if domain.log:
            out["log"] = True
        return out
    if isinstance(domain, Choice):
        return {"choice": [to_dict(v) for v in domain.values]}
    return {"simplex": {"min_share": domain.min_share}}


def scheduler_max_t(config: SearchConfig) -> int:
    """ASHA's last rung: the file's max_t, else the trials' steps (the most a searched
    `steps` domain offers)."""
    assert config.scheduler is not None
    if config.scheduler.max_t is not None:
        return config.scheduler.max_t
    if "steps" in config.space:
        return max(probe_values(config.space["steps"]))
    return int(config.fixed["steps"])


def _check_scheduler(config: SearchConfig) -> None:
    s, file = config.scheduler, config.source
    assert s is not None
    steps = config.fixed.get("steps")
    if s.max_t is not None and isinstance(steps, int) and s.max_t > steps:
        raise SpaceError(
            file, "scheduler.max_t", f"must be <= train.steps ({steps}), got {s.max_t}"
        )
    max_t = scheduler_max_t(config)
    if s.grace_period > max_t:
        where = "scheduler.max_t" if s.max_t is not None else "train.steps"
        raise SpaceError(
            file,
            "scheduler.grace_period",
            f"{s.grace_period} exceeds the {max_t} steps a trial runs ({where}): ASHA could "
            "never stop one; lower grace_period",
        )


def _check_mqar(metric: str, has_mqar: bool, file: str, path: str) -> None:
    if metric == "mqar_acc" and not has_mqar:
        raise SpaceError(
            file, path, "metric 'mqar_acc' needs data.source: mqar or data.mqar_mix > 0"
        )


def _reference(value: Any, file: str) -> Reference:
    if value not in typing.get_args(Reference):
        raise SpaceError(file, "reference", f"expected 'dense' or 'none', got {value!r}")
    return value


def _hypervolume(value: Any, objectives: list[Objective], file: str) -> dict[str, float] | None:
    """`hypervolume: {reference: {metric: value, ...}}`: one finite number per objective."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"reference"}:
        raise SpaceError(
            file, "hypervolume", "expected {reference: {<objective metric>: <value>, ...}}"
        )
    point = value["reference"]
    metrics = [o.metric for o in objectives]
    if not isinstance(point, dict) or sorted(map(str, point)) != sorted(metrics):
        raise SpaceError(
            file,
            "hypervolume.reference",
            f"expected one value for each objective ({', '.join(metrics)}), got {point!r}",
        )
    out = {}
    for m in metrics:
        v = point[m]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpaceError(file, f"hypervolume.reference.{m}", f"expected a number, got {v!r}")
        out[m] = float(v)
    return out


def _objectives(value: Any, file: str) -> list[Objective]:
    if not isinstance(value, list):
        raise SpaceError(
            file, "objectives", f"expected a list of {{metric, mode}} mappings, got {_kind(value)}"
        )
    if len(value) < 2:
        raise SpaceError(file, "objectives", f"expected two or more objectives, got {len(value)}")
    out = [_build(Objective, v, f"objectives[{i}]", file) for i, v in enumerate(value)]
    metrics = [o.metric for o in out]
    for i, m in enumerate(metrics):
        if m in metrics[:i]:
            raise SpaceError(file, f"objectives[{i}].metric", f"{m!r} is named twice")
    return out


def _build(cls: type, value: Any, path: str, file: str) -> Any:
    if value is None:
        value = {}
    try:
        return build(cls, value)
    except ConfigError as e:
        raise SpaceError(file, join_path(path, e.path), e.message) from None


def _positive_int(value: Any, path: str, file: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(file, path, f"expected an integer >= {low}, got {_kind(value)}")
    if value < low:
        raise SpaceError(file, path, f"expected an integer >= {low}, got {value}")
    return value


def _field_type(key: str, file: str) -> Any:
    where = f"space.{key}"
    if key.startswith("train."):
        raise SpaceError(
            file,
            where,
            f"paths start at TrainConfig's root: write '{key[len('train.') :]}', not '{key}'",
        )
    try:
        tp = field_type(key)
    except ConfigError as e:
        raise SpaceError(file, where, f"not a TrainConfig setting: {e.message}") from None
    if dataclasses.is_dataclass(tp):
        names = ", ".join(f.name for f in dataclasses.fields(tp))
        raise SpaceError(
            file, where, f"is a section, not a setting; name one of its fields ({names})"
        )
    return tp


_DOMAIN_KINDS = ("uniform", "loguniform", "int", "choice", "simplex")


def _domain(spec: Any, tp: Any, key: str, file: str) -> Domain:
    where = f"space.{key}"
    kinds = ", ".join(_DOMAIN_KINDS)
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(file, where, f"expected a domain mapping ({kinds}), got {_kind(spec)}")
    kind_keys = [k for k in spec if k in _DOMAIN_KINDS]
    if len(kind_keys) != 1:
        raise SpaceError(
            file,
            where,
            f"expected exactly one domain kind ({kinds}), got {sorted(map(str, spec)) or 'none'}",
        )
    kind = kind_keys[0]
    allowed_extra = {"int": {"step", "log"}}.get(kind, set())
    extra = sorted(set(map(str, spec)) - {kind} - allowed_extra)
    if extra:
        raise SpaceError(file, f"{where}.{extra[0]}", f"unknown key for a {kind} domain")
    arg = spec[kind]
    leaf = leaf_kind(tp)

    if kind in ("uniform", "loguniform"):
        if leaf != "float":
            raise SpaceError(
                file,
                where,
                f"{kind} needs a float setting; this one is {type_name(tp)}: {_hint(leaf)}",
            )
        lo, hi = _pair(arg, where, kind, file, number=True)
        if not lo < hi:
            raise SpaceError(file, where, f"{kind} needs lo < hi, got [{lo}, {hi}]")
        if kind == "loguniform":
            if lo <= 0:
                raise SpaceError(file, where, f"loguniform needs 0 < lo < hi, got [{lo}, {hi}]")
            return LogUniform(lo=float(lo), hi=float(hi))
        return Uniform(lo=float(lo), hi=float(hi))

    if kind == "int":
        if leaf not in ("int", "float"):
            raise SpaceError(
                file,
                where,
                f"int needs a numeric setting; this one is {type_name(tp)}: {_hint(leaf)}",
            )
        lo, hi = _pair(arg, where, kind, file, number=False)
        step = spec.get("step", 1)
        log = spec.get("log", False)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise SpaceError(file, f"{where}.step", f"expected an integer >= 1, got {_kind(step)}")
        if not isinstance(log, bool):
            raise SpaceError(file, f"{where}.log", f"expected true or false, got {_kind(log)}")
        if not lo < hi:
            raise SpaceError(file, where, f"int needs lo < hi, got [{lo}, {hi}]")
        if (hi - lo) % step:
            raise SpaceError(
                file, f"{where}.step", f"hi - lo ({hi - lo}) must be a multiple of step ({step})"
            )
        if log and (lo < 1 or step != 1):
            raise SpaceError(file, where, "log: true needs lo >= 1 and step 1")
        return IntRange(lo=lo, hi=hi, step=step, log=log)

    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SpaceError(
                file, where, f"choice needs a non-empty list of values, got {_kind(arg)}"
            )
        seen = set()
        for i, v in enumerate(arg):
            label = json.dumps(to_dict(v), sort_keys=True)
            if label in seen:
                raise SpaceError(file, f"{where}.choice[{i}]", f"{v!r} is listed twice")
            seen.add(label)
        return Choice(values=tuple(_freeze(v) for v in arg))

    # simplex
    if leaf != "shares":
        raise SpaceError(
            file,
            where,
            f"simplex needs a tuple of shares (model.mla.ratios); this setting is {type_name(tp)}",
        )
    n = len(typing.get_args(tp))
    if arg is None:
        arg = {}
    if not isinstance(arg, dict):
        raise SpaceError(
            file,
            f"{where}.simplex",
            f"expected a mapping like {{min_share: 0.05}}, got {_kind(arg)}",
        )
    try:
        simplex = build(Simplex, arg)
    except ConfigError as e:
        raise SpaceError(file, join_path(f"{where}.simplex", e.path), e.message) from None
    if not 0 <= simplex.min_share < 1 / n:
        raise SpaceError(
            file, f"{where}.simplex.min_share", f"must be in [0, 1/{n}), got {simplex.min_share}"
        )
    return simplex


def _hint(leaf: str) -> str:
    return {
        "int": "use {int: [lo, hi]} or {choice: [...]}",
        "float": "use {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {choice: [...]}",
        "shares": "use {simplex: {min_share: ...}} or {choice: [...]}",
    }.get(leaf, "use {choice: [...]}")


def _pair(arg: Any, where: str, kind: str, file: str, *, number: bool) -> tuple[Any, Any]:
    expected = "two numbers [lo, hi]" if number else "two integers [lo, hi]"
    if not isinstance(arg, list) or len(arg) != 2:
        raise SpaceError(file, where, f"{kind} needs {expected}, got {_kind(arg)}")
    for i, v in enumerate(arg):
        ok = isinstance(v, (int, float)) if number else isinstance(v, int)
        if isinstance(v, bool) or not ok or (number and not math.isfinite(v)):
            what = "a number" if number else "an integer"
            raise SpaceError(file, f"{where}.{kind}[{i}]", f"expected {what}, got {_kind(v)}")
    return arg[0], arg[1]


def section_path(path: str) -> str:
    """Where a TrainConfig path is set in a space file: 'lr' -> 'train.lr'."""
    head = path.split(".")[0].split("[")[0]
    return path if head in ("model", "data") else f"train.{path}" if path else "train"


_MISSING = object()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def _pop(d: dict[str, Any], path: str) -> None:
    *head, last = path.split(".")
    for part in head:
        d = d.get(part, {})
    d.pop(last, None)


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"
