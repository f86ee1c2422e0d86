"""A kernel change timed against the code it replaces, in one run, with cuDNN beside them.

`--before FILE` is an earlier copy of one module of `kernels/parallel/`, under the same file
name (e.g. `git show REV:kernels/parallel/window.py > _ab/window.py`; loaded as a module of
that package, so its relative imports resolve, wherever the file is). Its `@triton.jit` kernels
replace those of the same name in the launch layer for the "before" rows; a branch module that
the launch layer calls as a whole (`sparse_tile.py`, `sparse.py`) replaces it whole. For each point
(head shape, length, budget, select_tile) the script checks that both versions give the same
outputs and gradients, then times MLA fwd+bwd before and after, the changed kernels alone,
and cuDNN's fwd+bwd on the same inputs.

`--set NAME=VALUE` instead changes a setting of the launch layer (`kernels/parallel/autograd.py`;
`MODULE.NAME` for another module of the package, e.g. `sparse_tile.DKV_PROGRAMS`) for the "after"
rows, and `--kernels` names the kernels whose time it moves; `--variant` (repeated) times
several such sets of settings against the same "before" rows in one run. MLA and cuDNN are
timed both as called from Python and captured with their backward in one CUDA graph (as a
whole-step graph runs them: at short T the first is host time):

    python bench/kernel_ab.py --before bench/_before.py \
        [--points 64/4/128:32768:nsa:64 12/4/64:8192:nsa:64 ...] [--rep 200]
    python bench/kernel_ab.py --base LOCAL_DKV_PROGRAMS=1 --set LOCAL_DKV_PROGRAMS=1024 \
        --kernels local_bwd_dkv
    python bench/kernel_ab.py --variant LOCAL_DKV_PROGRAMS=1024 --variant \
        sparse_tile.DKV_PROGRAMS=4096 --variant LOCAL_DKV_PROGRAMS=1024 sparse_tile.DKV_PROGRAMS=4096 \
        --kernels local_bwd_dkv sparse_tile_dkv
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, as `kernels`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, budgets.py, tile_shapes.py
from tile_shapes import in_one_graph, point_inputs, sdpa  # noqa: E402
from timing import kernel_ms  # noqa: E402

import kernels.parallel  # noqa: E402
import kernels.parallel.autograd as launch  # noqa: E402
from kernels import mla_attention  # noqa: E402

POINTS = [
    "64/4/128:32768:nsa:64",
    "64/4/128:8192:nsa:64",
    "12/4/64:32768:nsa:64",
    "12/4/64:8192:nsa:64",
    "16/16/64:32768:nsa:64",
    "12/4/64:8192:nsa:1",
]


def load_before(path: str) -> dict:
    """The launch-layer names that the earlier module replaces: the module itself where the
    launch layer calls it as one (`sparse_tile`, `sparse`: its launches and kernels swapped
    together), else its jit kernels that the launch layer also names."""
    stem = Path(path).stem
    name = "kernels.parallel._before_" + stem  # beside the current module, not over it
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    if type(getattr(launch, stem, None)).__name__ == "module":
        return {stem: mod}
    return {k: getattr(mod, k) for k in vars(launch) if k.startswith("_") and hasattr(mod, k)
            and type(getattr(mod, k)).__name__ == "JITFunction"}  # fmt: skip


def module_of(name: str):
    """The module that holds setting `name` ("NAME": the launch layer; "MODULE.NAME": that
    module of kernels.parallel) and the attribute's own name."""
    if "." not in name:
        return launch, name
    mod, attr = name.rsplit(".", 1)
    return getattr(kernels.parallel, mod), attr


def apply(values: dict) -> None:
    for name, value in values.items():
        mod, attr = module_of(name)
        setattr(mod, attr, value)


def run(q, k, v, gate, do, cfg):
    return mla_attention(q, k, v, gate, cfg, backend="triton").backward(do)


def outputs(args, cfg):
    q, k, v, gate, do = args
    for x in (q, k, v, gate):
        x.grad = None
    o = mla_attention(q, k, v, gate, cfg, backend="triton")
    o.backward(do)
    return [o.detach().clone()] + [x.grad.clone() for x in (q, k, v, gate)]


def max_diff(a: list, b: list) -> float:
    """Largest |a - b| relative to max |b| over outputs and gradients; NaN gives inf."""
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.isfinite(x).all():
            return float("inf")
        worst = max(worst, ((x.float() - y.float()).abs().max() / y.float().abs().max()).item())
    return worst


def measure(point: str, sides: list[tuple[str, dict]], rep: int, names: list[str]) -> dict:
    """One point: each side's outputs compared with the first's, then MLA under each side
    (label, launch-layer attributes to set), the kernels `names` (whose names contain one of
    them), cuDNN."""
    cfg, xs = point_inputs(point)
    row, res = {"point": point}, {}

    def mla():
        run(*xs, cfg)

    def op(q, k, v, g):
        return mla_attention(q, k, v, g, cfg, backend="triton")

    for label, values in sides:
        apply(values)
        res[label] = outputs(xs, cfg)
        row[label] = do_bench(mla, rep=rep, return_mode="median")
        row[label + "_graph"] = in_one_graph(op, xs, rep, uses_gate=True)
        per = kernel_ms(mla, runs=3)
        row[label + "_per"] = {n: v for n, v in per.items() if any(s in n for s in names)}
        row[label + "_kernels"] = sum(row[label + "_per"].values())
    first = sides[0][0]
    row["diff"] = max(max_diff(res[label], res[first]) for label, _ in sides[1:])
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    q, k, v, _, do = xs

    def dense():
        cudnn(q, k, v, None).backward(do)

    row["cudnn"] = do_bench(dense, rep=rep, return_mode="median")
    row["cudnn_graph"] = in_one_graph(cudnn, xs, rep, uses_gate=False)
    return row


def sides_of(before: dict, base: dict, variants: list[dict]) -> list[tuple[str, dict]]:
    """("before", ...) then ("after", ...) or ("after1", ...), ... for several variants: every
    setting any side changes is set on every side, at the code's own value where not given.
    before: what an earlier module replaces (`load_before`)."""
    changed = {k for values in (base, *variants) for k in values}
    own = {k: getattr(*module_of(k)) for k in changed}
    current = {k: getattr(*module_of(k)) for k in before}  # what the earlier module replaces
    first = {**before, **own, **base}
    after = {**current, **own}
    labels = ["after"] if len(variants) <= 1 else [f"after{i + 1}" for i in range(len(variants))]
    return [("before", first)] + [(lb, {**after, **v}) for lb, v in zip(labels, variants or [{}])]


def table(rows: list[dict], sides: list[tuple[str, dict]]) -> None:
    """The op's times per side against the first, and cuDNN's; then each timed kernel's."""
    labels = [label for label, _ in sides]
    head = "| point | " + " | ".join(f"{lb} ms (one graph)" for lb in labels)
    head += " | " + " | ".join(f"{lb}/before (one graph)" for lb in labels[1:])
    print(f"\n{head} | cuDNN ms (one graph) | best vs cuDNN (one graph) | max rel diff |")
    print("| --- " * (2 * len(labels) + 3) + "|")
    for r in rows:
        times = [f"{r[lb]:.3f} ({r[lb + '_graph']:.3f})" for lb in labels]
        ratios = [
            f"{r[lb] / r['before']:.3f} ({r[lb + '_graph'] / r['before_graph']:.3f})"
            for lb in labels[1:]
        ]
        best = min(r[lb] for lb in labels)
        best_graph = min(r[lb + "_graph"] for lb in labels)
        print(f"| {r['point']} | {' | '.join(times + ratios)} | {r['cudnn']:.3f} "
              f"({r['cudnn_graph']:.3f}) | {r['cudnn'] / best:.2f}× "
              f"({r['cudnn_graph'] / best_graph:.2f}×) | {r['diff']:.1e} |")  # fmt: skip
    print("\n| point | timed kernel | " + " | ".join(f"{lb} ms" for lb in labels) + " |")
    print("| --- " * (len(labels) + 2) + "|")
    for r in rows:
        for n in sorted(set().union(*(r[lb + "_per"] for lb in labels))):
            cells = " | ".join(f"{r[lb + '_per'].get(n, 0.0):.3f}" for lb in labels)
            print(f"| {r['point']} | {n} | {cells} |")
    for lb in labels[1:]:
        ratio = statistics.geometric_mean(r[lb] / r["before"] for r in rows)
        print(f"geomean {lb}/before: {ratio:.3f}")


def settings(pairs: list[str]) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="an earlier copy of a kernels/parallel module")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="launch-layer settings (integers) for the after rows",
    )
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="instead of --set, one of several sets of settings, each timed (repeat the flag)",
    )
    ap.add_argument(
        "--base",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the before rows (default: the code's own)",
    )
    ap.add_argument("--kernels", nargs="+", default=[], help="kernels a --set change moves")
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T:BUDGET:BQ[:B]")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    args = ap.parse_args()
    if args.set and args.variant:
        ap.error("give --set or --variant, not both")
    before = load_before(args.before) if args.before else {}
    variants = [settings(v) for v in args.variant] or ([settings(args.set)] if args.set else [])
    sides = sides_of(before, settings(args.base), variants)
    changed = {k for _, values in sides for k in values}
    names = list(before) + args.kernels
    print("changed:", ", ".join(sorted(changed)), "; timed kernels:", ", ".join(names), flush=True)
    rows = []
    for point in args.points:
        rows.append(measure(point, sides, args.rep, names))
        print({k: v for k, v in rows[-1].items() if not k.endswith("_per")}, flush=True)
    apply(sides[-1][1])
    table(rows, sides)


if __name__ == "__main__":
    main()
