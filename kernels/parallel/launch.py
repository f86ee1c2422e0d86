"""Every kernel launch of the Triton path, and compiling them ahead of the first call.

Triton compiles a kernel at its first launch, one after another: 17 kernels and ~13 s for the
gpu.yaml model's layer in a training step and an evaluation (bench/RESULTS.md), while the GPU
waits. Inside
`compiling_ahead`, `launch` hands each kernel to a pool of threads to compile (Triton's
compiler releases the GIL) and runs nothing, so the op's launch sequence, replayed once on
inputs of the right kind, compiles all its kernels at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

_AHEAD = contextvars.ContextVar("mla_compiling_ahead", default=False)


def launch(kernel, grid: tuple, **kwargs) -> None:
    """kernel[grid](**kwargs); inside `compiling_ahead`, compiled in the pool and not run."""
    if _AHEAD.get():
        kernel.warmup(grid=grid, **kwargs)
    else:
        kernel[grid](**kwargs)


def async_compile_available() -> bool:
    """Whether this Triton compiles kernels in a pool of threads (AsyncCompileMode, 3.4+)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def compiling_ahead(threads: int) -> Iterator[None]:
    """Launches inside compile their kernels in `threads` threads and run none; on leaving,
    every compile has finished and sits in the kernels' caches (errors are raised there)."""
    from triton.runtime._async_compile import AsyncCompileMode

    with ThreadPoolExecutor(max(1, threads)) as pool, AsyncCompileMode(pool):
        token = _AHEAD.set(True)
        try:
            yield
        finally:
            _AHEAD.reset(token)
