"""TrainConfig introspection: the type of a dotted setting and the defaults of a section,
read from the dataclasses' fields."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from automla.trainers.config import ConfigError, TrainConfig, to_dict


def field_type(path: str) -> Any:
    """The type annotation of a dotted TrainConfig path; raises ConfigError if there is none."""
    cls: Any = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(path, f"'{'.'.join(parts[:i])}' is a setting, not a section")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in names:
            raise ConfigError(
                path, f"{cls.__name__} has no field {part!r}; it has: {', '.join(names)}"
            )
        cls = hints[part]
    return cls


def leaf_kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return leaf_kind(args[0])
    if tp is float:
        return "float"
    if tp is int:
        return "int"
    if origin is tuple and args and all(a is float for a in args):
        return "shares"
    return "other"


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def defaults(cls: type) -> dict[str, Any]:
    """Field defaults as a nested dict, without running __post_init__ (derived values stay
    unset, e.g. head_dim None)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out
