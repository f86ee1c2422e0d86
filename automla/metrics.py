"""The metric vocabulary: the scalars a trial reports, which objectives, schedulers and
filters may name."""

from __future__ import annotations

import re
import typing

from automla.trainers.config import ConfigError

METRICS = (
    "val_loss",
    "val_ppl",
    "train_loss",
    "tokens_per_s",
    "peak_mem_gb",
    "attn_flops",
    "active_heads",
    "elapsed_s",
    "tokens",
    "step",
    "mqar_acc",
    "train_tokens_per_s",
    "benchmark_wait_s",
    "setup_s",
    "warmup_s",
    "steady_s",
    "val_s",
    "stats_s",
    "benchmark_s",
)
"""Scalar metrics the trainer reports; objectives and filters name these, and
`tokens_per_s@T` (throughput measured at context T, see `trainers.benchmark`)."""

_AT_CONTEXT = re.compile(r"tokens_per_s@([1-9][0-9]*)")


def is_metric(name: str) -> bool:
    return name in METRICS or _AT_CONTEXT.fullmatch(name) is not None


def known_metrics(names: typing.Iterable[str]) -> list[str]:
    """The metric names among `names`: METRICS' order, then tokens_per_s@T by T."""
    names = set(names)
    at = sorted((n for n in names if _AT_CONTEXT.fullmatch(n)), key=metric_context)
    return [m for m in METRICS if m in names] + at


def metric_context(name: str) -> int | None:
    """T of a `tokens_per_s@T` metric, else None."""
    m = _AT_CONTEXT.fullmatch(name)
    return int(m.group(1)) if m else None


def check_metric(name: str) -> None:
    if not is_metric(name):
        raise ConfigError(
            "metric",
            f"unknown metric {name!r}; expected one of {', '.join(METRICS)} or tokens_per_s@T "
            "(T a context length)",
        )
