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


def device_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() on the CUDA device: calls are queued back to back and timed
    by events, so the host's launch time counts only where the GPU waits for it."""
    for _ in range(warmup):
        fn()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def kernel_ms(fn, runs: int = 3, warmup: int = 2, width: int = 60) -> dict[str, float]:
    """Device milliseconds per call of each CUDA kernel that fn() launches (the profiler's
    totals over `runs` calls, divided by runs), largest first; names cut to `width`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            times[e.key[:width]] = times.get(e.key[:width], 0.0) + t / 1e3 / runs
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def print_kernels(title: str, times: dict[str, float], top: int = 12) -> None:
    """The `top` kernels of a kernel_ms result, and the total."""
    print(f"\n{title}: {sum(times.values()):.2f} ms of kernels")
    for name, ms in list(times.items())[:top]:
        print(f"  {ms:8.3f} ms  {name}")
