"""Timing shared by the bench scripts (each runs as `python bench/X.py`, which puts bench/ on
the import path)."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, repeats: int, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median milliseconds of fn() over `repeats` calls after `warmup` untimed ones; on a CUDA
    `device` the device is synchronised around each timed call."""
    for _ in range(warmup):
        fn()
    sync = device is not None and device.type == "cuda"
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
