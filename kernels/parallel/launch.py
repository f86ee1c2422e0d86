"""Every kernel launch of the Triton path, and compiling them ahead of the first call.

Triton compiles a kernel at its first launch, one after another: 17 kernels and ~13 s for the
gpu.yaml model's layer in a training step and an evaluation (bench/RESULTS.md), while the GPU
waits. Inside `compiling_ahead`, `launch` hands each kernel to a pool of threads to compile
(Triton's compiler releases the GIL) and runs nothing, so the op's launch sequence, replayed
once on inputs of the right kind, compiles all its kernels at once. The same pool then loads
them: a kernel's first launch also builds its launcher (Triton 3.6 runs the C compiler for it)
and loads its binary, ~0.2 s a kernel, which left ~3.9 s of a layer's first calls when only
the compiling ran ahead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

# inside `compiling_ahead`: the list of what each launch compiled; None outside
_AHEAD: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "mla_compiling_ahead", default=None
)


def launch(kernel, grid: tuple, **kwargs) -> None:
    """kernel[grid](**kwargs); inside `compiling_ahead`, compiled in the pool and not run."""
    compiled = _AHEAD.get()
    if compiled is not None:
        compiled.append(kernel.warmup(grid=grid, **kwargs))
    else:
        kernel[grid](**kwargs)


@functools.cache
def descriptors_available() -> bool:
    """Whether this Triton takes TMA descriptors made on the host
    (`triton.tools.tensor_descriptor`); asked at every launch, hence cached."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tiles_of(rows: int, tma: bool, **tensors: torch.Tensor) -> dict:
    """Kernel arguments for `tensors` (each [..., H, D]): where `tma`, TMA descriptors of
    [rows, D] tiles of their [-1, H * D] views (a kernel addresses a tile by row and column);
    else the tensors themselves."""
    if not tma:
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    def descriptor(x: torch.Tensor) -> TensorDescriptor:
        x2 = tma_view(x)
        return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, x.shape[-1]])

    return {name: descriptor(x) for name, x in tensors.items()}


def tma_view(x: torch.Tensor) -> torch.Tensor:
    """x ([..., H, D]) as the [-1, H * D] matrix that TMA descriptors tile, at a 16-byte
    aligned address (TMA reads from no other; a copy where x is not)."""
    if x.data_ptr() % 16:
        x = x.clone()
    return x.reshape(-1, x.shape[-2] * x.shape[-1])


def async_compile_available() -> bool:
    """Whether this Triton compiles kernels in a pool of threads (AsyncCompileMode, 3.4+)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def compiling_ahead(threads: int, device: torch.device | None = None) -> Iterator[None]:
    """Launches inside compile their kernels in `threads` threads and run none; on leaving,
    every compile has finished and sits in the kernels' caches (errors are raised there), and
    each kernel is loaded on `device`, as its first launch would (None: on the pool thread's
    default device)."""
    from triton.runtime._async_compile import AsyncCompileMode

    compiled: list = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        with AsyncCompileMode(pool):
            token = _AHEAD.set(compiled)
            try:
                yield
            finally:
                _AHEAD.reset(token)
        unique = {id(k): k for k in compiled if k is not None}.values()
        for _ in pool.map(lambda k: _load(k, device), unique):
            pass


def _load(kernel, device: torch.device | None) -> None:
    """Build the launcher of a compiled kernel and load its binary on `device`. A pool thread
    has no current device of its own, hence the explicit one."""
    if hasattr(kernel, "result"):  # a compile handed to the pool: its CompiledKernel
        kernel = kernel.result()
    init = getattr(kernel, "_init_handles", None)  # private: absent, the first launch loads
    if init is not None:
        on_device = device is not None and device.type == "cuda"
        with torch.cuda.device(device) if on_device else contextlib.nullcontext():
            init()
