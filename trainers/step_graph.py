"""The forward and backward of a training step replayed from one CUDA graph.

A small model's step is bound by Python, not by the GPU: the gpu.yaml model at 2k tokens
issues a few hundred launches (embeddings, norms, projections, the MLA op's ~22, the loss,
and the backward of all of them) and waits ~19 ms on the host for a few ms of device work.
Graphing each layer's MLA op (`GraphedOp`) removes only that op's share. `StepGraph` captures
the whole forward and backward once per input shape and head layout and replays them with
one launch; clipping and the (fused) AdamW step stay outside, a handful of launches.

The step's gradients live in the graph's memory pool: the capture's backward allocates them
and every replay overwrites them, so the optimiser must not drop them (`holds_grads`). An
eager step (the first with a new shape or head layout, such as every step of a pruning ramp)
runs on the capture stream, so that it also serves as the capture's warm-up; the next step
with the same key is captured and replayed. Where a capture fails (a host sync inside some
op), the step stays eager for the rest of the run, with a warning.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection while capturing. Graphs dropped earlier are freed by the cycle
    collector, and a graph destroyed in the middle of another capture invalidates it
    ("operation not permitted when stream is capturing")."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive now (modules, model, data) stay out of the cycle collector's scans
    until the block ends. With torch, triton and ray loaded a full collection walks ~400k
    objects (0.15 s on this project's CPU machine, 0.27 s in a GPU trial's profile), and every
    capture asks for one (`no_gc`): each step graph, and with `cuda_graphs: op` each layer's
    graphs per input signature (18 in a 20-step gpu.yaml trial when step mode still captured
    per-op graphs too; bench/RESULTS.md). Frozen, a collection walks
    only what the run has made since. One collection first, so that a previous run's garbage
    (a reused worker's last trial, its graphs and their memory) is freed rather than frozen."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # back to the collector: also what lets the interpreter free it at exit


class StepGraph:
    """Forward and backward of a training step, replayed from a CUDA graph where possible."""

    def __init__(
        self,
        params: list[nn.Parameter],
        device: torch.device,
        on_failure: Callable[[], None] | None = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        """Whose gradients the captured backward writes."""
        self.stream = torch.cuda.Stream(device)
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.failure: str | None = None
        """Why capture failed (the step then stays eager); None while it has not."""
        self.replays = 0
        self.captures = 0
        self._on_failure = on_failure

    @property
    def holds_grads(self) -> bool:
        """The parameters' .grad are the graph's: the optimiser must not set them to None."""
        return self._graph is not None

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple, forward: Forward
    ) -> torch.Tensor:
        """Run forward(x, y) -> loss and its backward; returns the detached loss, a tensor of its
        own (valid after the next replay). `key` names what the capture depends on besides the
        shapes (the head layout); `forward` must not synchronise with the host."""
        key = (x.shape, x.dtype, y.shape, y.dtype, key)
        if self.failure is None and key == self._key:
            if self._graph is None:
                self._capture(x, y, forward)
            if self._graph is not None:
                sx, sy, loss = self._static
                sx.copy_(x, non_blocking=True)
                sy.copy_(y, non_blocking=True)
                self._graph.replay()
                self.replays += 1
                return loss.clone()
        self.release()
        self._key = key
        return self._eager(x, y, forward)

    def release(self) -> None:
        """Drop the graph and its memory; the gradients it held go with it."""
        if self._graph is not None:
            self._drop_grads()
            self._graph = self._static = None
        self._key = None

    def _eager(self, x: torch.Tensor, y: torch.Tensor, forward: Forward) -> torch.Tensor:
        # on the capture stream: the libraries' per-stream state (cuBLAS workspaces) is set up
        # there before a capture needs it, as CUDA graphs ask of a warm-up
        current = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            loss = forward(x, y)
            loss.backward()
        current.wait_stream(self.stream)
        return loss.detach()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self, x: torch.Tensor, y: torch.Tensor, forward: Forward) -> None:
        self._drop_grads()  # the captured backward allocates them in the graph's pool
        sx, sy = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(x.device)
        try:
            with no_gc(), torch.cuda.graph(graph, stream=self.stream):
                loss = forward(sx, sy)
                loss.backward()
        except Exception as e:  # noqa: BLE001 - any op that cannot be captured: stay eager
            self.failure = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self._drop_grads()
            torch.cuda.synchronize(x.device)
            log.warning(
                "training step not captured in a CUDA graph, staying eager: %s", self.failure
            )
            if self._on_failure is not None:
                self._on_failure()
            return
        self._graph, self._static = graph, (sx, sy, loss.detach())
        self.captures += 1
