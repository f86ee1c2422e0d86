"""Data-parallel helpers: process group set-up, rank queries, batch sharding, reductions.

Every helper works without torch.distributed initialised and then behaves as a world of one,
so the trainer calls them unconditionally. Sharding is exact: every rank draws the whole
global batch from the same seeded generator and keeps its own contiguous rows, so N workers
see the same examples, in the same order, as one worker with the same global batch.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and reports."""
    return rank() == 0


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> bool:
    """Join the process group described by torchrun-style environment variables (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); returns True when one is running.

    Does nothing when a group is already initialised (Ray Train's TorchTrainer sets it up) or
    when WORLD_SIZE is unset or 1. On CUDA the process takes GPU LOCAL_RANK.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s)
    )
    return is_distributed()


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: with several ranks a bare 'cuda' means the GPU the
    launcher made current for this process (one GPU per rank)."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_batch(batch_size: int, world: int | None = None) -> int:
    """Rows per rank (per data-parallel group with sequence parallelism) of a global batch;
    raises ConfigError when it does not split evenly."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ConfigError(
            "batch_size",
            f"batch_size={batch_size} is the global batch and must split evenly over "
            f"{world} workers (data-parallel groups); use a multiple of {world}",
        )
    return batch_size // world


def shard(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of rows (dim 0) of each global-batch tensor."""
    world = world_size()
    if world == 1:
        return tensors
    out = []
    for t in tensors:
        rows = check_batch(t.shape[0], world)
        out.append(t[rank() * rows : (rank() + 1) * rows])
    return tuple(out)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average `t` across ranks in place (a no-op for one process); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` across ranks in place (a no-op for one process); returns `t`."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(value: float) -> float:
    """The largest of each rank's `value` (e.g. peak memory: the worst worker counts)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
