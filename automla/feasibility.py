"""The feasibility probe: before a search starts, try trial configs that stand for the space
and fail early when none can be valid or a domain offers an invalid value."""

from __future__ import annotations

import random
from typing import Any

from automla.domains import Domain, probe_values
from automla.schema import SearchConfig, SpaceError, section_path
from automla.trainers.config import ConfigError, TrainConfig, to_dict


def sample_configs(config: SearchConfig) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Up to 8 valid trial configs that stand for the space (the middle of every domain, then
    seeded random combinations), each with its searched values: for checks too costly to run
    on every probe (reading the data)."""
    from automla.space import apply

    out = []
    for combo in _combos({key: probe_values(d) for key, d in config.space.items()}):
        try:
            out.append((combo, apply(config.fixed, combo)))
        except ConfigError:
            continue
        if len(out) == 8:
            break
    return out


def _combos(probes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The middle value of every domain, then 63 seeded random combinations."""
    rng = random.Random(0)
    combos = [{k: v[len(v) // 2] for k, v in probes.items()}]
    combos += [{k: rng.choice(v) for k, v in probes.items()} for _ in range(63)]
    return combos


def check_trials(config: SearchConfig) -> None:
    """Fail early when no trial can be valid, or when a domain offers an invalid value."""
    from automla.space import apply  # the schema is imported by space; keep the cycle lazy

    probes = {key: probe_values(d) for key, d in config.space.items()}
    combos = _combos(probes)
    valid: list[dict[str, Any]] = []
    first: ConfigError | None = None
    errors: list[ConfigError] = []
    for combo in combos:
        try:
            apply(config.fixed, combo)
        except ConfigError as e:
            first = first or e
            errors.append(e)
            continue
        valid.append(combo)
        if len(valid) == 8:
            break
    if not valid:
        assert first is not None
        # a fixed setting wrong on its own fails every combination: name it, not a searched one
        fixed_errors = [e for e in errors if _locate(e.path, config.space) == section_path(e.path)]
        first = fixed_errors[0] if fixed_errors else first
        message = first.message
        if not message.startswith(("unknown key", "expected")):  # a value, not a typo
            message = f"every trial would be invalid: {message}"
        raise SpaceError(config.source, _locate(first.path, config.space), message)
    # A value is wrong when it fails beside every valid setting of the others (tried: up to 8);
    # values that fail only in some combinations are left to the trial, which is then
    # recorded as failed with the reason.
    for key, values in probes.items():
        for v in values:
            errors = []
            for combo in valid:
                try:
                    apply(config.fixed, {**combo, key: v})
                except ConfigError as e:
                    errors.append(e)
                    continue
                break
            if len(errors) == len(valid):
                e = errors[0]
                where = "" if _related(e.path, key) else f"{section_path(e.path)}: "
                raise SpaceError(
                    config.source,
                    f"space.{key}",
                    f"value {to_dict(v)!r} is invalid: {where}{e.message}",
                )


def _related(error_path: str, key: str) -> bool:
    return error_path == key or key.startswith(error_path + ".") or error_path.startswith(key)


def _locate(error_path: str, space: dict[str, Domain]) -> str:
    """Where in the file a TrainConfig error path lives."""
    for key in space:
        if _related(error_path, key):
            return f"space.{key}"
    return section_path(error_path)
