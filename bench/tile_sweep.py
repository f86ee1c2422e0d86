"""Launch tiles swept one kernel at a time at given points, each change timed in the whole op.

    python bench/tile_sweep.py [--points 12/4/64:8192:nsa:64 ...] [--kernels window_dq local_dkv]
    python bench/tile_sweep.py --set LOCAL_DKV_PROGRAMS=1024 --kernels local_dkv

For each point (q heads/KV heads/head dim : T : budget : select_tile) and each candidate change
of one kernel's tiles (`CANDIDATES`, applied over the tiles the launch layer would use there):
the outputs and gradients against the unchanged tiles', the kernel's own time (profiler) and
the op's fwd+bwd captured in one CUDA graph, before and after. Prints a markdown row per change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as `kernels`
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import max_diff, module_of, outputs  # noqa: E402
from tile_shapes import in_one_graph, point_inputs  # noqa: E402
from timing import kernel_ms  # noqa: E402

import kernels.parallel.layout as layout  # noqa: E402
from kernels import mla_attention  # noqa: E402

# changes over the current tiles: w = num_warps, s = num_stages, other keys as in _GPU_TILES
CANDIDATES = {
    "window_fwd": [
        {"BT": 128, "w": 8, "s": 3}, {"BK": 128, "s": 3}, {"BT": 128, "BK": 128, "w": 8},
        {"s": 4}, {"s": 2}, {"BT": 32, "w": 4, "s": 3}, {"BT": 32, "w": 4}, {"BK": 32},
        {"BT": 128, "w": 4}, {"BT": 128, "w": 4, "s": 3}, {"HP": 4, "BT": 32},
        {"HP": 2, "BT": 32}, {"HP": 4, "BT": 16},
    ],
    "window_dq": [{"BT": 64, "w": 4, "s": 3}, {"BT": 128, "w": 8}, {"BT": 32, "w": 4},
                  {"BT": 64, "w": 8}, {"BT": 32, "w": 4, "s": 3}, {"BT": 128, "w": 4},
                  {"HP": 4, "BT": 32, "w": 4}],
    "local_dkv": [{"s": 3}, {"BK": 128, "w": 8}, {"BT": 32}, {"BK": 32}, {"w": 8},
                  {"BK": 32, "BT": 32}, {"BK": 128, "w": 4}, {"BT": 128, "w": 4}],
    "global_dkv": [{"s": 3}, {"BT": 32}, {"w": 8}, {"BC": 32}, {"BC": 64}, {"BC": 64, "w": 8},
                   {"BC": 128, "w": 8}, {"BT": 128, "w": 8}, {"BC": 64, "s": 3}],
    "tile_score": [{"ROWS": 64, "w": 4, "s": 3}, {"ROWS": 64, "BN": 64, "w": 4},
                   {"ROWS": 64, "w": 8}, {"BN": 64}, {"ROWS": 64, "BN": 64, "w": 4, "s": 3}],
    "tile_score_lse": [{"BN": 32}, {"BN": 128}, {"ROWS": 128, "w": 8}, {"s": 3}],
    "sparse_tile_fwd": [{"s": 2}, {"w": 8}, {"s": 4}, {"ROWS": 32}],
    "sparse_tile_dq": [{"ROWS": 64, "w": 4, "s": 3}, {"ROWS": 64, "w": 8, "s": 3},
                       {"ROWS": 64, "w": 8, "s": 2}, {"ROWS": 32}],
    "sparse_tile_dkv": [{"w": 8}, {"s": 3}, {"CH": 128}, {"ROWS": 32}, {"ROWS": 16}],
}  # fmt: skip
KERNEL = {
    "window_fwd": "_window_fwd", "window_dq": "_window_bwd_dq", "local_dkv": "_local_bwd_dkv",
    "global_dkv": "_global_bwd_dkv", "tile_score": "_tile_score",
    "tile_score_lse": "_tile_score",
    "sparse_tile_fwd": "_sparse_tile_fwd", "sparse_tile_dq": "_sparse_tile_dq",
    "sparse_tile_dkv": "_sparse_tile_dkv",
}  # fmt: skip


def patch(kernel: str, G: int, D: int, NC: int, change: dict):
    """Make the launch layer use `change` over its tiles for `kernel` at (G, D, NC); returns
    undo."""
    keys = {"w": "num_warps", "s": "num_stages"}
    tiles = layout._gpu_tiles(kernel, G, D, NC)
    tiles.update({keys.get(k, k): v for k, v in change.items()})
    original = layout._gpu_tiles

    def patched(name, g=None, d=None, nc=0):
        return dict(tiles) if name == kernel else original(name, g, d, nc)

    layout._gpu_tiles = patched
    return lambda: setattr(layout, "_gpu_tiles", original)


def sweep_point(point: str, names: list[str], rep: int) -> None:
    cfg, xs = point_inputs(point)
    (*_, hq, d), hkv = xs[0].shape, xs[1].shape[2]
    nc = layout._Layout(xs[0], xs[1], cfg.plan(xs[0].shape[1]), None).NC

    def op(q, k, v, g):
        return mla_attention(q, k, v, g, cfg, backend="triton")

    def fwd_bwd():
        op(*xs[:4]).backward(xs[4])
        for x in xs[:4]:
            x.grad = None

    reference = outputs(xs, cfg)
    base = in_one_graph(op, xs, rep, uses_gate=True)
    base_k = kernel_ms(fwd_bwd, runs=5, width=80)
    print(
        f"\n{point}: op in one graph {base * 1e3:.1f} µs, kernels {sum(base_k.values()) * 1e3:.1f}"
    )
    print(
        "| point | kernel | change | kernel µs before | after | op µs before | after | max rel diff |"
    )
    print("| --- " * 8 + "|", flush=True)
    for name in names:
        before = sum(ms for n, ms in base_k.items() if KERNEL[name] in n)
        for change in CANDIDATES[name]:
            undo = patch(name, hq // hkv, d, nc, change)
            try:
                diff = max_diff(outputs(xs, cfg), reference)
                ms = in_one_graph(op, xs, rep, uses_gate=True)
                after = sum(t for n, t in kernel_ms(fwd_bwd, runs=5, width=80).items()
                            if KERNEL[name] in n)  # fmt: skip
                print(f"| {point} | {name} | {change} | {before * 1e3:.1f} | {after * 1e3:.1f} | "
                      f"{base * 1e3:.1f} | {ms * 1e3:.1f} | {diff:.1e} |", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row too
                print(f"| {point} | {name} | {change} | failed: {repr(e)[:120]} | | | | |")
            finally:
                undo()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", default=["12/4/64:8192:nsa:64"])
    ap.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--rep", type=int, default=30, help="do_bench repetition time (ms)")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="launch-layer settings (integers) for the whole sweep, as kernel_ab's",
    )
    args = ap.parse_args()
    for name, value in (kv.split("=") for kv in args.set):
        setattr(*module_of(name), int(value))
    for point in args.points:
        sweep_point(point, args.kernels, args.rep)


if __name__ == "__main__":
    main()
