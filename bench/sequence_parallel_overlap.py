"""Sequence parallelism on CPU (gloo): how much of the All-to-All hides behind compute.

    python bench/sequence_parallel_overlap.py [--ranks 2 4] [--seq 4096] [--reps 20]
                                              [--json out.json]

P gloo processes, one thread each, share one sequence and run one MLA attention layer of a
small model (the PyTorch path the trainer takes on CPU) forward and backward, four ways,
interleaved rep by rep so that a load change on the machine hits them alike:
- overlap on: the shipped code; the k/v exchange starts before the q projection and is waited
  for after the q/gate exchange.
- overlap off: `SequenceParallel(overlap=False)`, every exchange waited for as it starts.
- compute only: no communication, each exchange returning a copy of what it received in a real
  step (zero-filled buffers, as `bench/sequence_parallel.py --time` uses, make the MLA op ~10%
  faster here than on the real values, so they would overstate the communication).
- collectives alone: the layer's six All-to-Alls (forward: k/v, q + gate, outputs; backward:
  the same three the other way), replayed with the sizes they had, without the compute; and
  the forward k/v exchange alone, the only one the overlap can hide.
Each time is the median over the reps (after warm-up) of the slowest rank's time, the ranks
starting each rep together at a barrier. off - on: the median over reps of the difference
within a rep, with its 25th and 75th percentiles. Blocked: how long a rank's thread spends in
the exchanges (starting them and waiting for them), the k/v exchange and all six, per step,
mean over the ranks: the communication the layer did not hide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from automla.kernels import AttentionConfig, resolve_backend
from automla.trainers import ModelConfig
from automla.trainers.model import Attention, rotary_table
from automla.trainers.sequence_parallel import SequenceParallel, setup

MODES = ("overlap on", "overlap off", "compute only", "collectives", "k/v exchange")


@dataclass
class RecordingSequenceParallel(SequenceParallel):
    """The real exchanges, each one's element type, sizes and receive buffer kept (the buffers
    are filled once the step is done)."""

    calls: list[tuple[torch.dtype, list[int], list[int]]] = field(default_factory=list)
    received: list[torch.Tensor] = field(default_factory=list)

    def exchange(self, send, send_sizes, recv_sizes):
        self.calls.append((send.dtype, list(send_sizes), list(recv_sizes)))
        recv, work = super().exchange(send, send_sizes, recv_sizes)
        self.received.append(recv)
        return recv, work


class _Done:
    def wait(self) -> None:
        pass


@dataclass
class ReplaySequenceParallel(SequenceParallel):
    """No communication: the i-th exchange of a step returns a copy of `received[i]`."""

    received: list[torch.Tensor] = field(default_factory=list)
    calls: int = 0

    def exchange(self, send, send_sizes, recv_sizes):
        got = self.received[self.calls % len(self.received)]
        self.calls += 1
        assert got.numel() == sum(recv_sizes) and got.dtype == send.dtype
        return got.clone(), _Done()


@dataclass
class TimedSequenceParallel(SequenceParallel):
    """The real exchanges; `blocked[i]` adds the seconds this rank's thread spent in the i-th
    exchange of a step: starting it, and waiting on its handle."""

    blocked: list[float] = field(default_factory=list)
    calls: int = 0

    def exchange(self, send, send_sizes, recv_sizes):
        index = self.calls % len(self.blocked)
        self.calls += 1
        t0 = time.perf_counter()
        recv, work = super().exchange(send, send_sizes, recv_sizes)  # waits when overlap off
        self.blocked[index] += time.perf_counter() - t0
        return recv, _TimedWait(work, self.blocked, index)


@dataclass
class _TimedWait:
    work: dist.Work
    blocked: list[float]
    index: int

    def wait(self) -> None:
        t0 = time.perf_counter()
        self.work.wait()
        self.blocked[self.index] += time.perf_counter() - t0


def model_config(T: int) -> ModelConfig:
    """8 query heads of 64 in 4 KV groups (one or more per rank at P = 2 and 4), MLA at the
    default split of a 256-key budget."""
    mla = AttentionConfig(budget=256, ratios=(0.5, 0.25, 0.25), block_size=32)
    return ModelConfig(
        d_model=512, n_layers=1, n_heads=8, n_kv_heads=4, head_dim=64, max_seq_len=T, mla=mla
    )


def _worker(rank: int, world: int, folder: str, T: int, reps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        result = _measure(world, T, reps, warmup)
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _measure(world: int, T: int, reps: int, warmup: int) -> dict:
    cfg = model_config(T)
    torch.manual_seed(0)
    attn = Attention(cfg)
    base = setup(world)
    place = dict(size=base.size, rank=base.rank, group=base.group, seq_len=T)
    recorded = RecordingSequenceParallel(**place)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(1, T, cfg.d_model, generator=g)
    w_all = torch.randn(1, T, cfg.d_model, generator=g)
    x = base.tokens(x_all).clone().requires_grad_(True)
    grad = base.tokens(w_all)
    rot = base.rotary(rotary_table(T, cfg.head_dim, cfg.rope_base), x.shape[1])

    def layer(sp: SequenceParallel) -> None:
        attn.sequence_parallel = sp
        x.grad = None
        attn.zero_grad(set_to_none=True)
        attn(x, rot).backward(grad)

    layer(recorded)
    calls = recorded.calls  # one step's six exchanges, in order
    received = [t.clone() for t in recorded.received]
    sps = {
        "overlap on": TimedSequenceParallel(**place, blocked=[0.0] * len(calls)),
        "overlap off": TimedSequenceParallel(**place, overlap=False, blocked=[0.0] * len(calls)),
        "compute only": ReplaySequenceParallel(**place, received=received),
    }
    sends = [torch.randn(sum(s)).to(dtype) for dtype, s, _ in calls]
    recvs = [torch.empty(sum(r), dtype=dtype) for dtype, _, r in calls]

    def collectives(n: int) -> None:
        for (_, s, r), send, recv in list(zip(calls, sends, recvs))[:n]:
            dist.all_to_all_single(recv, send, r, s, group=base.group)

    runs = {
        "overlap on": lambda: layer(sps["overlap on"]),
        "overlap off": lambda: layer(sps["overlap off"]),
        "compute only": lambda: layer(sps["compute only"]),
        "collectives": lambda: collectives(len(calls)),
        "k/v exchange": lambda: collectives(1),
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    blocked: dict[str, list[list[float]]] = {"overlap on": [], "overlap off": []}
    for rep in range(warmup + reps):
        for mode in MODES:
            sp = sps.get(mode)
            if isinstance(sp, TimedSequenceParallel):
                sp.blocked[:] = [0.0] * len(calls)
            dist.barrier()
            t0 = time.perf_counter()
            runs[mode]()
            slowest = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rep < warmup:
                continue
            times[mode].append(slowest.item())
            if isinstance(sp, TimedSequenceParallel):
                mean = torch.tensor(sp.blocked) / world
                dist.all_reduce(mean)
                blocked[mode].append(mean.tolist())
    hidden = [off - on for off, on in zip(times["overlap off"], times["overlap on"])]
    waits = {}
    for mode, steps in blocked.items():
        waits[f"{mode} k/v blocked ms"] = statistics.median(b[0] for b in steps) * 1e3
        waits[f"{mode} blocked ms"] = statistics.median(sum(b) for b in steps) * 1e3
    q = torch.zeros(1, T, cfg.n_heads // world, cfg.head_dim)
    # what this rank sends to the others (its own chunk stays)
    sent = [(sum(s) - s[base.rank]) * dtype.itemsize for dtype, s, _ in calls]
    return {
        "P": world,
        "T": T,
        "tokens_per_rank": x.shape[1],
        "backend": resolve_backend(q, q, q, cfg.mla, T, cfg.attn_backend),
        "exchanges": len(calls),
        "sent_mib_per_rank": sum(sent) / 2**20,
        **{f"{mode} ms": statistics.median(t) * 1e3 for mode, t in times.items()},
        "hidden ms": statistics.median(hidden) * 1e3,
        "hidden ms p25-p75": [v * 1e3 for v in statistics.quantiles(hidden, n=4)[::2]],
        **waits,
        "reps": reps,
    }


def run(world: int, T: int, reps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, folder, T, reps, warmup), nprocs=world, join=True)
        with open(os.path.join(folder, "result.json")) as f:
            return json.load(f)


def table(rows: list[dict]) -> str:
    head = ["P", "T", "tokens/rank", "a2a MiB sent/rank", "compute only ms"]
    head += ["collectives alone ms (k/v fwd)", "overlap off ms", "overlap on ms"]
    head += ["off - on ms [p25, p75]", "k/v blocked ms off / on", "all blocked ms off / on"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lo, hi = r["hidden ms p25-p75"]
        cells = [str(r["P"]), str(r["T"]), str(r["tokens_per_rank"])]
        cells.append(f"{r['sent_mib_per_rank']:.1f}")
        cells.append(f"{r['compute only ms']:.1f}")
        cells.append(f"{r['collectives ms']:.1f} ({r['k/v exchange ms']:.1f})")
        cells += [f"{r['overlap off ms']:.1f}", f"{r['overlap on ms']:.1f}"]
        cells.append(f"{r['hidden ms']:.1f} [{lo:.1f}, {hi:.1f}]")
        for key in ("k/v blocked ms", "blocked ms"):
            cells.append(f"{r[f'overlap off {key}']:.1f} / {r[f'overlap on {key}']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [run(P, args.seq, args.reps, args.warmup) for P in args.ranks]
    for r in rows:
        r["machine"] = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        r["torch"] = torch.__version__
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"attention backend: {rows[0]['backend']}, fp32, gloo, one thread per process")
    print(table(rows))


if __name__ == "__main__":
    main()
