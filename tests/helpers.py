"""Helpers shared by several test modules (`tests/` is on sys.path: pytest puts it there, and the
driver scripts of the slow tests insert it).

Nothing here is shipped to Ray's workers: trainers they run stay in the test modules, which
register themselves with cloudpickle to be pickled by value."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path


def relative_error(a, b) -> float:
    """|a - b| / |b| over all elements (float32 norms); a must hold no NaN or inf."""
    import torch

    assert torch.isfinite(a).all()
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def objectives() -> list[dict]:
    """The usual two objectives, a fresh list each call: lower val_loss, higher tokens_per_s."""
    return [
        {"metric": "val_loss", "mode": "min"},
        {"metric": "tokens_per_s", "mode": "max"},
    ]


# the smallest model the searches train: one layer, two query heads sharing one KV head
TINY_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 64}

_SEARCH = {
    "sampler": {"name": "random", "seed": 0},
    "trials": 4,
    "concurrency": 2,
    "resources": {"cpus": 1},
    "data": {"source": "stdlib", "max_bytes": 100_000},
    "train": {"steps": 2, "eval_every": 1, "seq_len": 64},
    "model": TINY_MODEL,
    "space": {"model.mla.budget": {"choice": [16, 32]}, "lr": {"loguniform": [1e-3, 1e-2]}},
    # the dense reference is one more training run; the tests that want it ask for it
    "reference": "none",
}


def search_space(**changes) -> dict:
    """A small search-space mapping on one CPU a trial, two at a time, over the MLA budget and lr;
    `changes` replace whole top-level keys. A fresh deep copy each call."""
    return copy.deepcopy({"objectives": objectives(), **_SEARCH, **changes})


def study_of(run_dir: Path):
    """The Optuna study a search kept in its run folder (the one study in its study.db)."""
    import optuna

    from automla.run_folder import study_name, study_url

    return optuna.load_study(study_name=study_name(run_dir), storage=study_url(run_dir))


@contextlib.contextmanager
def local_ray(ship_by_value=None, **init):
    """A Ray started in this process for the block, without its dashboard or worker logs.
    `ship_by_value`: a test module Ray's workers cannot import, pickled by value instead."""
    import ray
    from ray import cloudpickle

    if ship_by_value is not None:
        cloudpickle.register_pickle_by_value(ship_by_value)
    ray.init(include_dashboard=False, log_to_driver=False, **init)
    try:
        yield ray
    finally:
        ray.shutdown()


def tokens(B, T, vocab=64, seed=1):
    """(B, T) random token ids, the same for the same seed."""
    import torch

    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def cpu_train_config(*, max_bytes: int, **fields):
    """A TrainConfig for a short run on one CPU thread (lr 1e-2, a tenth of `max_bytes` held out
    for validation, two eval batches); `fields` give the model and the rest, or replace these."""
    from automla.trainers import DataConfig, TrainConfig

    base = dict(
        data=DataConfig(max_bytes=max_bytes, val_fraction=0.1), lr=1e-2, eval_batches=2,
        device="cpu", threads=1,
    )  # fmt: skip
    return TrainConfig(**{**base, **fields})


def spawn_workers(fn, nprocs: int, make_args) -> tuple:
    """`torch.multiprocessing.spawn(fn, make_args(), nprocs)`; returns the args it ran with.

    Started once more, with fresh args (a new rendezvous), when a worker dies of a native abort
    or segfault: gloo's CPU backend (torch 2.13) does so in about one start in ten on the CI
    machine, inside DistributedDataParallel's set-up or a thread of its own, whatever the
    project's code. A failure of that code raises in the worker (not a signal) or repeats,
    and fails the test."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    args = make_args()
    try:
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
        return args
    except ProcessExitedException as e:
        if e.signal_name not in ("SIGABRT", "SIGSEGV"):
            raise
    args = make_args()
    mp.spawn(fn, args=args, nprocs=nprocs, join=True)
    return args


def cpus() -> int:
    """The CPUs this process may run on (tests that start processes of their own size by it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compile_launch(rec: dict):
    """A launch recorded by `test_triton_compile.recording` compiled for sm_90 on this machine,
    its pointers 16-byte aligned as the GPU's launches specialise them (which is what lets the
    loads be vectorised and so prefetched). Run it where TRITON_INTERPRET is unset."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    names = list(rec["params"])
    sig = {n: rec["params"][n].get("type", "constexpr") for n in names}
    consts = {
        (names.index(n),): p["constexpr"] for n, p in rec["params"].items() if "constexpr" in p
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n][0] == "*"}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=rec["options"])


def compile_sm90(fn, sig: dict, consts: dict, max_regs: int):
    """A Gluon kernel compiled for sm_90 on this machine: sig maps each argument to its type
    (constexprs to "constexpr", their values in consts), pointers 16-byte aligned as the GPU's
    launches specialise them. Asserts that its PTX has warpgroup MMAs, the register split
    between partitions and no spills; returns the compiled kernel. Run it where
    TRITON_INTERPRET is unset (`assert_compiles`): the compiler cannot take the interpreter's
    patched builtins."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {**sig, **{n: "constexpr" for n in consts}}
    names = list(sig)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n][0] == "*"}
    values = {(names.index(n),): c for n, c in consts.items()}
    kern = triton.compile(
        GluonASTSource(fn, sig, values, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "maxnreg": max_regs},
    )
    ptx = kern.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx, "no warpgroup MMA or register split"
    assert "st.local" not in ptx, "registers spilled"
    return kern


def assert_compiles(script: str, *args: str) -> None:
    """Runs `script` (which prints "ok" once its kernel compiled) in a fresh process without
    TRITON_INTERPRET, from the checkout's root, so that it imports the tests' helpers too."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "tests"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
        cwd=root, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]
