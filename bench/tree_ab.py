"""MLA kernels of several source trees timed against each other, with cuDNN, on one GPU.

Where a change spans the launch layer and the kernels (so `kernel_ab.py --before`, which swaps
one module, cannot run the old code), give whole trees instead: each is a folder holding a
`kernels/` package, e.g. an earlier commit's

    git archive REV kernels | tar -x -C /tmp/before
    python bench/tree_ab.py /tmp/before . [--labels before after] [--rounds 2] \
        [--points 12/4/64:8192:nsa:64 ...]

Each tree runs in its own process (its `kernels` imported from that folder only), the trees in
turn, `--rounds` times, so that drift shows as a difference between rounds of one tree. Per
point (q heads/KV heads/head dim : T : budget : select_tile) the op's forward and backward are
captured in one CUDA graph and replayed (`tile_shapes.in_one_graph`: kernels and their gaps, no
host time), cuDNN likewise on the same inputs, and the profiler sums the op's kernels (a fifth
field, e.g. `8/2/64:2048:small:64:8`, sets the batch; 1 by default). The last
table gives each tree's median over rounds and the largest relative difference of its outputs
and gradients from the first tree's; `--kernel NAME ...` adds each named kernel's time (every
kernel whose name contains NAME, summed; medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
POINTS = [
    "12/4/64:8192:nsa:64",
    "12/4/64:2048:small:64",
    "8/2/64:8192:nsa:64",
    "64/4/128:32768:nsa:64",
]


def worker(root: str, points: list[str], save: str, rep: int) -> None:
    """One tree: a JSON line per point on stdout, outputs and gradients saved under `save`."""
    sys.path.insert(0, os.path.abspath(root))
    import torch
    from torch.nn.attention import SDPBackend

    import kernels

    if not kernels.__file__.startswith(os.path.abspath(root)):
        raise SystemExit(f"kernels imported from {kernels.__file__}, not from {root}")
    from tile_shapes import in_one_graph, point_inputs, sdpa
    from timing import kernel_ms

    for point in points:
        cfg, xs = point_inputs(point, kernels.AttentionConfig)

        def op(q, k, v, g, cfg=cfg):
            return kernels.mla_attention(q, k, v, g, cfg, backend="triton")

        o = op(*xs[:4])
        o.backward(xs[4])
        torch.save([o.detach()] + [x.grad for x in xs[:4]], Path(save) / f"{slug(point)}.pt")
        # o's graph would keep the leaves' gradient accumulators, bound to this stream, alive
        # into the capture (on another stream), which CUDA then refuses
        del o
        for x in xs[:4]:
            x.grad = None
        mla = in_one_graph(op, xs, rep, uses_gate=True)
        dense = in_one_graph(sdpa(SDPBackend.CUDNN_ATTENTION), xs, rep, uses_gate=False)

        def fwd_bwd(op=op, xs=xs):
            op(*xs[:4]).backward(xs[4])
            for x in xs[:4]:
                x.grad = None  # no accumulation kernels of the bench's own in the sum

        per = kernel_ms(fwd_bwd, runs=5, width=40)
        row = {"point": point, "mla_ms": mla, "cudnn_ms": dense, "kernels_ms": sum(per.values())}
        print(json.dumps({**row, "per": per}), flush=True)


def kernel_table(rows: dict, labels: list[str], points: list[str], names: list[str]) -> list[str]:
    """Markdown lines: per tree and point, the time in µs of every kernel whose name holds each
    of `names` (summed), the median over the rounds in rows[(label, point)]."""
    lines = ["| tree | point | " + " | ".join(f"{n} µs" for n in names) + " |"]
    lines.append("| --- " * (2 + len(names)) + "|")
    for point in points:
        for label in labels:
            runs = rows[(label, point)]
            us = [
                1e3
                * statistics.median(sum(ms for k, ms in r["per"].items() if n in k) for r in runs)
                for n in names
            ]
            lines.append(f"| {label} | {point} | " + " | ".join(f"{x:.1f}" for x in us) + " |")
    return lines


def slug(point: str) -> str:
    return point.replace("/", "-").replace(":", "_")


def worker_args(tree: str, save: str, rep: int, points: list[str]) -> list[str]:
    """The command-line arguments of one tree's worker process."""
    return ["--worker", tree, "--save", save, "--rep", str(rep), "--points", *points]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs="*", help="folders holding a kernels/ package")
    ap.add_argument("--labels", nargs="+", help="one per tree (default: the folder names)")
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T:BUDGET:BQ[:B]")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetition time (ms)")
    ap.add_argument(
        "--kernel", nargs="+", default=[], help="also a table of these kernels' times (name parts)"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.points, args.save, args.rep)
        return
    if not args.trees:
        ap.error("give at least one tree")
    trees = [str(Path(t).resolve()) for t in args.trees]  # the workers run in bench/
    labels = args.labels or [Path(t).name for t in trees]
    if len(labels) != len(args.trees):
        ap.error(f"{len(args.trees)} trees but {len(labels)} labels")
    missing = [t for t in trees if not (Path(t) / "kernels" / "__init__.py").is_file()]
    if missing:
        ap.error(f"no kernels/ package in {', '.join(missing)}")
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for tree, label in zip(trees, labels):
                save = Path(tmp) / label
                save.mkdir(exist_ok=True)
                cmd = [
                    sys.executable,
                    __file__,
                    *worker_args(tree, str(save), args.rep, args.points),
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{label} (round {r + 1}) failed")
                for line in out.stdout.splitlines():
                    if line.startswith("{"):
                        row = json.loads(line)
                        rows.setdefault((label, row["point"]), []).append(row)
                        print(f"round {r + 1} {label} {row['point']}: MLA {row['mla_ms']:.4f} ms, "
                              f"cuDNN {row['cudnn_ms']:.4f} ms", flush=True)  # fmt: skip
        import torch
        from kernel_ab import max_diff  # here, not in a worker: it imports the checkout's kernels

        print("\n| tree | point | MLA ms (one graph) | cuDNN ms | × cuDNN | kernels ms | "
              "vs first tree | max rel diff |")  # fmt: skip
        print("| --- " * 8 + "|")
        for point in args.points:
            first = None
            for label in labels:
                runs = rows[(label, point)]
                mla = statistics.median(r["mla_ms"] for r in runs)
                dense = statistics.median(r["cudnn_ms"] for r in runs)
                kern = statistics.median(r["kernels_ms"] for r in runs)
                first = first or mla
                diff = max_diff(
                    torch.load(Path(tmp) / label / f"{slug(point)}.pt"),
                    torch.load(Path(tmp) / labels[0] / f"{slug(point)}.pt"),
                )
                print(f"| {label} | {point} | {mla:.4f} | {dense:.4f} | {dense / mla:.3f} | "
                      f"{kern:.4f} | {mla / first:.3f} | {diff:.1e} |")  # fmt: skip
        if args.kernel:
            print("\n" + "\n".join(kernel_table(rows, labels, args.points, args.kernel)))
        for label in labels:
            per = rows[(label, args.points[0])][-1]["per"]
            print(f"\n{label}, {args.points[0]}, kernels (ms): "
                  + ", ".join(f"{n.strip('_')} {ms:.4f}" for n, ms in per.items()))  # fmt: skip


if __name__ == "__main__":
    main()
