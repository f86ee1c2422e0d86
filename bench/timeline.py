"""Each kernel's start and end, and its stream, in one call of the op's fwd+bwd.

    python bench/timeline.py [12/4/64:8192:nsa:64 ...]

Per point (q heads/KV heads/head dim : T : budget : select_tile[:batch]) the op's forward and
backward are captured in one CUDA graph, as a whole-step graph runs them, and replayed under
the profiler; the middle one of three replays is printed, times in µs from its first kernel.
Shows what runs beside what on the op's two streams, and what waits for what.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as `kernels`
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tile_shapes import captured, point_inputs  # noqa: E402

from kernels import mla_attention  # noqa: E402

REPLAYS = 3


def kernel_events(graph: torch.cuda.CUDAGraph) -> list[dict]:
    """The kernels of the middle one of REPLAYS replays (chrome-trace events), in start order."""
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    n = len(kernels) // REPLAYS
    return kernels[n : 2 * n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("points", nargs="*", default=["12/4/64:8192:nsa:64"])
    args = ap.parse_args()
    for point in args.points:
        cfg, xs = point_inputs(point)

        def op(q, k, v, gate, cfg=cfg):
            return mla_attention(q, k, v, gate, cfg, backend="triton")

        events = kernel_events(captured(op, xs, uses_gate=True))
        t0 = events[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in events) - t0
        busy = sum(e["dur"] for e in events)
        print(f"\n{point}: {len(events)} kernels, {end:.1f} µs from first start to last end, "
              f"{busy:.1f} µs of kernels")  # fmt: skip
        print("| stream | kernel | start µs | end µs |")
        print("| --- | --- | --- | --- |")
        for e in events:
            name = e["name"].split("(")[0][:48]
            start = e["ts"] - t0
            print(f"| {e['args'].get('stream')} | {name} | {start:.1f} | {start + e['dur']:.1f} |")


if __name__ == "__main__":
    main()
