"""Throughput a configuration would have alone: a short exclusive benchmark of training steps.

When several trials share one GPU (or early stopping ends them at different times), the
training clock measures the neighbours as much as the configuration. The benchmark runs a few
full training steps (forward, backward, clipping, AdamW) of a copy of the current model, pruned
heads included, on random tokens, while every other automla trainer on the same device waits:
trainers hold the shared side of a per-device file lock while they step, the benchmark takes
the exclusive side. A file lock needs no server and is released by the kernel when a process
dies, so a crashed trial never blocks its neighbours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .fast_ops import prepare_model
from .model import build_model

if TYPE_CHECKING:
    from .trainer import TrainState

LOCK_DIR = Path(tempfile.gettempdir()) / "automla-device-locks"


class DeviceLock:
    """A readers-writer lock over one device, shared by every process of the machine.

    Two files: a turnstile that a writer closes first, so that a stream of readers cannot
    starve it (flock gives no writer preference), and the lock proper.
    """

    def __init__(self, key: str):
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.paths = (LOCK_DIR / f"{name}.gate", LOCK_DIR / f"{name}.lock")
        self._gate = os.open(self.paths[0], os.O_RDWR | os.O_CREAT, 0o666)
        self._lock = os.open(self.paths[1], os.O_RDWR | os.O_CREAT, 0o666)
        self.shared_held = False

    @classmethod
    def for_device(cls, device: torch.device) -> DeviceLock:
        """The lock of a physical GPU (by UUID, whatever CUDA_VISIBLE_DEVICES says), or of the
        machine's CPUs."""
        if device.type == "cuda":
            return cls(f"cuda-{torch.cuda.get_device_properties(device).uuid}")
        return cls(device.type)

    def acquire_shared(self) -> None:
        if self.shared_held:
            return
        fcntl.flock(self._gate, fcntl.LOCK_SH)  # waits while a benchmark holds the turnstile
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.shared_held = True

    def release_shared(self) -> None:
        if self.shared_held:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self.shared_held = False

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[float]:
        """Hold the device alone; yields the seconds spent waiting for it."""
        self.release_shared()
        t0 = time.perf_counter()
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)  # running steps of others finish first
            try:
                yield time.perf_counter() - t0
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release_shared()
        for fd in (self._gate, self._lock):
            os.close(fd)


class StepGate:
    """The training loop's side: the shared lock held over `every` steps at a time, so that the
    device is synchronised once per group of steps rather than once per step."""

    def __init__(self, lock: DeviceLock, device: torch.device, every: int = 8):
        self.lock, self.device, self.every = lock, device, every
        self._steps = 0

    def before_step(self) -> None:
        self.lock.acquire_shared()

    def after_step(self) -> None:
        self._steps += 1
        if self._steps >= self.every:
            self.pause()

    def pause(self) -> None:
        """Let a waiting benchmark in: finish the queued GPU work, then release."""
        if self.lock.shared_held:
            sync(self.device)
            self.lock.release_shared()
        self._steps = 0


def warmup_compiles(device: torch.device) -> bool:
    """Whether a run's warm-up (its first steps, first evaluation, a benchmark's warm-up) is
    mostly compiling: on CUDA, Triton and torch.compile build kernels and CUDA graphs capture,
    host work of up to tens of seconds on cold caches. Such work runs outside the device lock,
    or a neighbour's benchmark would wait for it, and every trial behind that benchmark
    (bench/RESULTS.md); on a CPU a warm-up step is a step like the others."""
    return device.type == "cuda"


def measure_throughput(
    state: TrainState,
    seq_len: int,
    batch_size: int,
    *,
    steps: int,
    warmup: int,
    lock: DeviceLock | None = None,
) -> dict[str, float]:
    """Median tokens/s of full training steps of a copy of `state.raw_model` at (batch_size,
    seq_len), under `lock.exclusive()` when given. The copy's context is stretched to seq_len
    when that is longer than the model's (the MLA plan follows: same budget, wider global
    stride); the trained model and its optimiser are untouched.

    Returns {"tokens_per_s", "step_ms" (median), "host_ms" (median time for Python to issue a
    step's work, before the device sync), "wait_s" (for the lock)}. host_ms close to step_ms
    means the step is bound by kernel launches, not by the device: its time then hardly grows
    with seq_len, and tokens/s grows with it (CUDA graphs, `model.cuda_graphs`, are the cure).
    """
    # the trainer imports this module
    from .trainer import TrainState, compile_kernels_ahead, step_graph_for, train_step

    model = state.raw_model
    cfg = model.cfg
    if seq_len > cfg.max_seq_len:
        cfg = dataclasses.replace(cfg, max_seq_len=seq_len)
    device = state.device
    copy = build_model(cfg).to(device)
    copy.load_state_dict(model.state_dict())  # head masks and mask values come along
    prepare_model(copy, device)  # fused ops and float8 linears as the trained model's
    # a context training never ran at has kernels of its own to compile
    compile_kernels_ahead(copy, batch_size, seq_len, state.autocast_dtype)
    copy.train()
    optimizer = torch.optim.AdamW(copy.parameters(), lr=1e-6, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if state.scaler is not None else None
    # the step as training runs it: replayed from a CUDA graph where training does that
    graphs = step_graph_for(copy, device, scaler) if state.graphs is not None else None
    bench = TrainState(
        copy, copy, optimizer, scaler, device, state.autocast_dtype, state.grad_clip, None, graphs
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    # only the timed steps hold the device alone; a warm-up that compiles holds nothing
    if lock is not None and not warmup_compiles(device):
        lock.acquire_shared()
    for _ in range(warmup):
        train_step(bench, x, y, lr=1e-6)
    sync(device)
    times, host = [], []
    with lock.exclusive() if lock is not None else contextlib.nullcontext(0.0) as waited:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(bench, x, y, lr=1e-6)
            issued = time.perf_counter()
            sync(device)  # one sync per step: it ends this step's interval and opens the next
            t1 = time.perf_counter()
            times.append(t1 - t0)
            host.append(issued - t0)
            t0 = t1
    if graphs is not None:
        graphs.release()
    del bench, copy, optimizer, graphs
    median = statistics.median(times)
    return {
        "tokens_per_s": batch_size * seq_len / median,
        "step_ms": median * 1e3,
        "host_ms": statistics.median(host) * 1e3,
        "wait_s": float(waited),
    }


def sync(device: torch.device) -> None:
    """Wait for the queued work of a GPU (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
