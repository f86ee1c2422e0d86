"""Where a run's CUDA memory peaks: the allocations alive at the peak, summed by the line of
this project's code that made them.

    with Recording() as rec:    # CUDA: the allocator's history of allocations and frees
        run()
    peak = rec.peak()           # a Peak: bytes before, at the peak, and the top sites
    print(peak.describe())

`peak_of(trace, base)` reads the allocator's trace (`torch.cuda.memory._snapshot()`'s
device_traces) on its own, so it is checked on the CPU with a made-up trace. Memory counts as
freed when the tensor lets it go ("free_requested"), as `torch.cuda.max_memory_allocated` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
NO_FRAME = "no frame of ours (autograd's C++ ops)"


def site(frames: list[dict]) -> str:
    """The innermost frame in this project's code outside bench/, as file:line; else the
    innermost frame in the bench scripts; else NO_FRAME (allocations of autograd's C++
    backward ops carry no Python frame)."""
    ours = [f for f in frames if f.get("filename", "").startswith(ROOT)]
    library = [f for f in ours if "/bench/" not in f["filename"]]
    if not ours:
        return NO_FRAME
    f = (library or ours)[0]
    return f"{f['filename'][len(ROOT) + 1 :]}:{f.get('line', 0)} {f.get('name', '')}"


@dataclasses.dataclass
class Peak:
    base: int
    """Bytes allocated before the trace began (parameters, optimizer state, ...)."""
    peak: int
    """Bytes allocated at the trace's highest point, base included."""
    event: int
    """The trace event at which it was reached (of `events`)."""
    events: int
    sites: list[tuple[str, int, int]]
    """(site, bytes, allocations) of the memory alive at the peak that the trace allocated,
    largest first."""

    def describe(self, top: int = 12) -> str:
        gb = 2**30
        lines = [
            f"peak {self.peak / gb:.3f} GB at event {self.event} of {self.events} "
            f"({self.base / gb:.3f} GB allocated before the trace)"
        ]
        for where, size, count in self.sites[:top]:
            lines.append(f"  {size / 2**20:9.1f} MiB  {count:4d}x  {where}")
        rest = self.sites[top:]
        if rest:
            lines.append(
                f"  {sum(s for _, s, _ in rest) / 2**20:9.1f} MiB  in {len(rest)} more sites"
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "sites": [list(s) for s in self.sites]}

    @classmethod
    def from_json(cls, d: dict) -> Peak:
        return cls(**{**d, "sites": [tuple(s) for s in d["sites"]]})

    def against(self, other: Peak, top: int = 12) -> str:
        """The sites where this peak holds more or less than `other`'s, largest first."""
        mine = {s: b for s, b, _ in self.sites}
        theirs = {s: b for s, b, _ in other.sites}
        diff = {s: mine.get(s, 0) - theirs.get(s, 0) for s in mine.keys() | theirs.keys()}
        diff = sorted(((s, d) for s, d in diff.items() if d), key=lambda x: -abs(x[1]))
        # the part allocated before the traces (parameters, and whatever an earlier run left
        # allocated) apart: the traces' own difference is what the two steps allocate
        own = (self.peak - self.base) - (other.peak - other.base)
        lines = [
            f"{(self.peak - other.peak) / 2**20:+.1f} MiB at the peak, {own / 2**20:+.1f} MiB of "
            "it allocated in the traces; by site:"
        ]
        lines += [f"  {d / 2**20:+9.1f} MiB  {s}" for s, d in diff[:top]]
        return "\n".join(lines)


def peak_of(trace: list[dict], base: int = 0) -> Peak:
    """The peak of `base` plus the trace's allocations less its frees, and what was alive then.
    Frees of blocks allocated before the trace lower the running total below `base`."""
    total = best = 0
    best_at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            total += e["size"]
            if total > best:
                best, best_at = total, i
        elif e["action"] == "free_requested":
            total -= e["size"]
    # replay up to the peak: the blocks allocated in the trace and not yet freed
    live: dict[int, dict] = {}
    for e in trace[: best_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    by_site: dict[str, list[int]] = {}
    for e in live.values():
        where = site(e.get("frames", []))
        if where == NO_FRAME:  # told apart by their size, which often names the tensor
            where += f", blocks of {e['size'] / 2**20:.2f} MiB"
        entry = by_site.setdefault(where, [0, 0])
        entry[0] += e["size"]
        entry[1] += 1
    sites = sorted(((k, v[0], v[1]) for k, v in by_site.items()), key=lambda s: -s[1])
    return Peak(base=base, peak=base + best, event=best_at, events=len(trace), sites=sites)


class Recording:
    """Records the CUDA allocator's allocations and frees (with Python stacks) on the current
    device while the block runs; `peak()` then reads them."""

    def __enter__(self) -> Recording:
        self.device = torch.cuda.current_device()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.memory._record_memory_history(
            enabled="all", context="alloc", stacks="python", clear_history=True
        )
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.trace = torch.cuda.memory._snapshot()["device_traces"][self.device]
        torch.cuda.memory._record_memory_history(enabled=None)

    def peak(self) -> Peak:
        return peak_of(self.trace, self.base)
