"""The Triton kernels compile for Hopper (sm_90) with the GPU tiles, without a GPU.

The CPU tests run the kernels under the interpreter with small tiles; the GPU runs them with
the tiles of `_gpu_tiles` (`_GPU_TILES`, with one head per window program where G is not a
multiple of the packed heads), through the real compiler. Here the launches of one MLA forward
and backward are recorded under the interpreter with the GPU's tiles, at awkward shapes (odd T
and n_select, G = 3 and 16, a partial head mask), and each distinct kernel signature is
compiled for sm_90 by Triton's compiler in processes without the interpreter (a few at once,
as the launches are recorded). (A kernel with a `tl.arange` over n_select reached the H200
untested: every CPU test had a power-of-two n_select.)
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import cpus

from automla.kernels import AttentionConfig, parallel
from automla.kernels.parallel import layout

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter"
)

_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}

# (B, T, HQ, HKV, D, dtype, budget, ratios, block_size, mask, select_tile): per-query and
# tile-shared selection (the tile kernels' rows: G = 3 pads to 4, G = 16 fills them)
CASES = [
    (1, 77, 16, 1, 128, torch.bfloat16, 96, (1 / 3, 1 / 6, 1 / 2), 16, [i % 5 != 2 for i in range(16)], 1),
    (2, 45, 6, 2, 64, torch.float16, 80, (0.25, 0.125, 0.625), 16, None, 1),
    (1, 83, 6, 2, 64, torch.bfloat16, 80, (0.25, 0.125, 0.625), 16, [True, False] + [True] * 4, 64),
    (1, 45, 16, 1, 128, torch.float16, 96, (1 / 3, 1 / 6, 1 / 2), 16, None, 16),
]  # fmt: skip


def _describe(fn, kwargs: dict) -> dict:
    """Each parameter as the compiler's signature wants it: a type, or a constexpr value."""
    params = inspect.signature(fn).parameters
    out = {}
    for name, param in params.items():
        value = kwargs[name]
        if "constexpr" in str(param.annotation):
            out[name] = {"constexpr": value}
        elif isinstance(value, torch.Tensor):
            out[name] = {"type": _TYPES[value.dtype]}
        elif hasattr(value, "block_shape"):  # a TMA descriptor (`launch.tiles_of`)
            block = ",".join(str(n) for n in value.block_shape)
            out[name] = {"type": f"tensordesc<{_TYPES[value.base.dtype][1:]}[{block}]>"}
        elif isinstance(value, bool):
            out[name] = {"type": "i1"}
        elif isinstance(value, int):
            out[name] = {"type": "i32" if abs(value) < 2**31 else "i64"}
        else:
            out[name] = {"type": "fp32"}
    return out


TESTS = str(Path(__file__).resolve().parent)

# every module of the Triton package: each defines or launches kernels
MODULES = [
    importlib.import_module(f"{parallel.__name__}.{m.name}")
    for m in pkgutil.iter_modules(parallel.__path__)
]


def _recorder(name: str, kernel, launches: list[dict]):
    """Stands in for `kernel`: each launch is recorded (with the kernel's module, for the
    compiler's process) and then run."""

    class Recorder:
        def __getitem__(self, grid):
            def launch(**kwargs):
                options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
                launches.append(
                    {
                        "kernel": name,
                        "module": kernel.fn.__module__,
                        "params": _describe(kernel.fn, kwargs),
                        "options": options,
                    }
                )
                return kernel[grid](**kwargs, **options)

            return launch

    return Recorder()


def recording(monkeypatch, launches) -> None:
    """From now on the kernels launch with the GPU's tiles and each launch is appended to
    `launches` (a list, or anything with `append`) in the order they run."""
    for module in MODULES:
        if hasattr(module, "_tiles"):
            monkeypatch.setattr(module, "_tiles", layout._gpu_tiles)
    # a kernel is launched from the module that defines it or from one that imports it; one
    # recorder per kernel object, so that a same-named kernel of another module (an old copy
    # kept for comparison) is not recorded in its place
    recorders = {}
    for module in MODULES:
        for name, kernel in vars(module).copy().items():
            if not (name.endswith("_kernel") and hasattr(kernel, "fn")):
                continue
            if id(kernel) not in recorders:
                recorders[id(kernel)] = _recorder(name, kernel, launches)
            monkeypatch.setattr(module, name, recorders[id(kernel)])


def record_launches(monkeypatch, launches: list[dict] | None = None, cases=CASES) -> list[dict]:
    """Every launch of an MLA forward and backward per case, with the GPU's tiles, appended to
    `launches` (a list, or anything with `append`) in the order they run."""
    launches = [] if launches is None else launches
    recording(monkeypatch, launches)
    for B, T, HQ, HKV, D, dtype, budget, ratios, bs, mask, bq in cases:
        cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs, select_tile=bq)
        assert cfg.plan(T).n_select % 2 == 1  # odd on purpose
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
        gate = torch.rand(B, T, HQ, 3, generator=g).to(dtype)
        leaves = [x.requires_grad_() for x in (q, k, v, gate)]
        head_mask = None if mask is None else torch.tensor(mask)
        parallel.mla_triton(*leaves, cfg, head_mask=head_mask).float().sum().backward()
    return launches


COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])  # the tests' helpers
from helpers import compile_launch

PIPELINED = set(sys.argv[1].split(","))
failed = []
for line in sys.stdin:  # one launch record a line, compiled as it comes
    rec = json.loads(line)
    try:
        kernel = compile_launch(rec)
        if rec["kernel"] in PIPELINED and "copy_global_to_local" not in kernel.asm["ttgir"]:
            failed.append(f"{rec['kernel']}: its loop's loads are not prefetched (no async copy)")
    except Exception as e:
        failed.append(f"{rec['kernel']}: {type(e).__name__}: {str(e)[-600:]}")
print("\n\n".join(failed) if failed else "ok")
sys.exit(1 if failed else 0)
"""


# Kernels whose loops stream tiles that Triton's pipeliner must prefetch (asynchronous copies
# or TMA loads, issued a stage ahead): a load it cannot take (unaligned, too narrow, or inside
# an `if` in the loop) is waited for at every step. Not the local dk/dv: its loads sit under
# the loop's per-head activity test (bench/NOTES.md, sixteenth session).
PIPELINED = {
    "_window_fwd_kernel", "_window_bwd_dq_kernel", "_global_bwd_dkv_kernel", "_score_kernel",
    "_tile_score_kernel", "_sparse_fwd_kernel", "_sparse_bwd_dq_kernel", "_sparse_bwd_dkv_kernel",
    "_sparse_tile_fwd_kernel", "_sparse_tile_dq_kernel", "_sparse_tile_dkv_kernel",
}  # fmt: skip


class _Compilers:
    """A few processes without the interpreter that compile each distinct launch for sm_90 as
    soon as it is recorded (each compile is single-threaded), each with its own empty cache;
    the kernels in PIPELINED must come out with their streamed loads prefetched."""

    def __init__(self, tmp_path, n: int):
        script = tmp_path / "compile_kernels.py"
        script.write_text(COMPILE)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.distinct: dict[str, dict] = {}
        self.outputs = [tmp_path / f"compile{i}.out" for i in range(n)]
        self.procs = []
        for i, out in enumerate(self.outputs):
            with open(out, "w") as f:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(script), ",".join(sorted(PIPELINED)), TESTS],
                        stdin=subprocess.PIPE,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"cache{i}")},
                    )
                )

    def append(self, launch: dict) -> None:
        key = json.dumps(launch, sort_keys=True)
        if key not in self.distinct:
            self.distinct[key] = launch
            proc = self.procs[(len(self.distinct) - 1) % len(self.procs)]
            try:
                proc.stdin.write(json.dumps(launch) + "\n")  # parameters in their order
                proc.stdin.flush()
            except BrokenPipeError:  # it died: its exit status and output tell why
                pass

    def failures(self, timeout: float) -> list[str]:
        """Waits for every compile; the output of each process that failed one."""
        for proc in self.procs:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        deadline = time.time() + timeout
        for proc in self.procs:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        return [
            out.read_text()[-8000:]
            for proc, out in zip(self.procs, self.outputs)
            if proc.returncode != 0
        ]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_long_prefixes_take_wide_global_dkv_tiles():
    # from LONG_NC compressed keys the global dk/dv's tiles hold 64 of them (at D 64 too, which
    # takes 32 below); the other kernels' tiles do not depend on the prefix
    assert layout._gpu_tiles("global_dkv", 3, 64, layout.LONG_NC - 1)["BC"] == 32
    assert layout._gpu_tiles("global_dkv", 3, 64, layout.LONG_NC)["BC"] == 64
    assert layout._gpu_tiles("global_dkv", 16, 128, layout.LONG_NC)["BC"] == 64
    for kernel in ("window_fwd", "local_dkv", "sparse_tile_dkv"):
        assert layout._gpu_tiles(kernel, 3, 64, 4096) == layout._gpu_tiles(kernel, 3, 64)


def test_kernels_compile_for_sm90(monkeypatch, tmp_path):
    from automla.kernels.parallel import autograd

    # the selection after the window forward, on its lse, from 4 compressed keys: the Bq 64
    # case (5) takes that score kernel, the Bq 16 case (2) the two-pass one
    monkeypatch.setattr(autograd, "SELECT_AFTER_NC", 4)
    compilers = _Compilers(tmp_path, n=max(1, min(cpus(), 8)))
    try:
        record_launches(monkeypatch, compilers)
        # the window kernels and the local dk/dv with masks on their bands' edges only, at head
        # dims 64 and 128
        monkeypatch.setattr(autograd, "EDGE_MASKS", True)
        monkeypatch.setattr(autograd, "LOCAL_DKV_EDGE", True)
        record_launches(monkeypatch, compilers, cases=[CASES[1], CASES[3]])
        kernels = {x["kernel"] for x in compilers.distinct.values()}
        assert len(kernels) >= 10, kernels  # every kernel of the forward and backward launched
        assert {"_tile_score_kernel", "_sparse_tile_fwd_kernel", "_sparse_tile_dkv_kernel"} <= (
            kernels
        )
        assert PIPELINED <= kernels, PIPELINED - kernels
        failed = compilers.failures(timeout=900)
    finally:
        compilers.stop()
    assert not failed, "\n\n".join(failed)


class _Kernel:
    """Stands in for a jit kernel: records launches (grid) and compiles ahead (warmup), which
    returns a stand-in compiled kernel per distinct set of arguments, as Triton's cache does."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls, self.compiled = name, calls, {}

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append(("run", self.name, grid, _shape_of(kwargs)))

    def warmup(self, *, grid, **kwargs):
        key = _shape_of(kwargs)
        self.calls.append(("compile", self.name, grid, key))
        return self.compiled.setdefault(
            key, _Compiled(f"{self.name}{len(self.compiled)}", self.calls)
        )


class _Compiled:
    """Stands in for Triton's CompiledKernel: records where it is loaded."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def _init_handles(self):
        self.calls.append(("load", self.name, threading.current_thread().name))


def _shape_of(kwargs: dict) -> str:
    """A launch's arguments as the compiler sees them: tensors by dtype and shape, TMA
    descriptors also by tile, the rest (sizes, flags, constexprs, tiles) by value."""

    def kind(v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype), tuple(v.shape)
        if hasattr(v, "block_shape"):
            return "tiles", *kind(v.base), tuple(v.block_shape)
        return v

    return json.dumps({k: kind(v) for k, v in kwargs.items()}, sort_keys=True, default=str)


def test_launch_compiles_ahead_only_inside_the_block():
    from automla.kernels.parallel.launch import compiling_ahead, launch

    calls = []
    kernel = _Kernel("k", calls)
    launch(kernel, (3, 1), x=1, BLOCK=16)
    with compiling_ahead(threads=2):
        launch(kernel, (3, 1), x=1, BLOCK=16)
    launch(kernel, (2,), x=2, BLOCK=16)
    assert [c[:3] for c in calls] == [
        ("run", "k", (3, 1)),
        ("compile", "k", (3, 1)),
        ("load", "k0", calls[2][2]),
        ("run", "k", (2,)),
    ]


def test_compiling_ahead_loads_each_compiled_kernel_once_in_the_pool():
    # a first launch builds the launcher and loads the binary: the pool does it for every
    # kernel compiled in the block, once each, after the compiles and before the block is left
    from automla.kernels.parallel.launch import compiling_ahead, launch

    calls = []
    a, b = _Kernel("a", calls), _Kernel("b", calls)
    with compiling_ahead(threads=2):
        launch(a, (1,), x=1)
        launch(b, (1,), x=1)
        launch(a, (2,), x=1)  # the same compiled kernel: another grid only
        launch(a, (1,), x=2)
    loads = [c for c in calls if c[0] == "load"]
    assert sorted(c[1] for c in loads) == ["a0", "a1", "b0"]
    assert calls[:4] == [c for c in calls if c[0] == "compile"]  # compiles first
    assert all(c[2] != threading.current_thread().name for c in loads)


@pytest.mark.parametrize("case", CASES, ids=[f"G{c[2] // c[3]}-bq{c[-1]}" for c in CASES])
def test_compile_ahead_compiles_what_the_op_launches(monkeypatch, case):
    # the kernels, tiles and argument kinds that compile_ahead hands to the compiler are
    # exactly those that a training step (forward, backward) and an evaluation (forward
    # without gradients) launch, so the first real call compiles nothing
    B, T, HQ, HKV, D, dtype, budget, ratios, bs, mask, bq = case
    calls: list = []
    for module in MODULES:
        for name, kernel in vars(module).copy().items():
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                monkeypatch.setattr(module, name, _Kernel(name, calls))
    cfg = AttentionConfig(budget=budget, ratios=ratios, block_size=bs, select_tile=bq)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    gate = torch.rand(B, T, HQ, 3, generator=g).to(dtype)
    head_mask = None if mask is None else torch.tensor(mask)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    parallel.mla_triton(*leaves, cfg, head_mask=head_mask).float().sum().backward()
    with torch.no_grad():
        parallel.mla_triton(q, k, v, gate, cfg, head_mask=head_mask)
    launched = {c[1:] for c in calls if c[0] == "run"}
    calls.clear()
    parallel.compile_ahead(q, k, v, gate, cfg, head_mask=head_mask, threads=2)
    compiles = [c for c in calls if c[0] == "compile"]
    assert compiles and all(c[0] in ("compile", "load") for c in calls)
    assert {c[1:] for c in compiles} == launched
    # and every kernel it compiled is loaded, once
    assert len([c for c in calls if c[0] == "load"]) == len(set(compiles))
