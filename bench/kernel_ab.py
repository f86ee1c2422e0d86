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
rows, and `--kernels` names the kernels whose time it moves. MLA and cuDNN are timed both as
called from Python and captured with their backward in one CUDA graph (as a whole-step graph
runs them: at short T the first is host time):

    python bench/kernel_ab.py --before bench/_before.py \
        [--points 64/4/128:32768:nsa:64 12/4/64:8192:nsa:64 ...] [--rep 200]
    python bench/kernel_ab.py --base LOCAL_DKV_PROGRAMS=1 --set LOCAL_DKV_PROGRAMS=1024 \
        --kernels local_bwd_dkv
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


def measure(point: str, before: dict, after: dict, rep: int, names: list[str]) -> dict:
    """One point: outputs compared, then MLA before and after, the kernels `names` (whose
    names contain one of them), cuDNN. before/after: launch-layer attributes to set."""
    cfg, xs = point_inputs(point)
    row, res = {"point": point}, {}

    def mla():
        run(*xs, cfg)

    def op(q, k, v, g):
        return mla_attention(q, k, v, g, cfg, backend="triton")

    for label, values in (("before", before), ("after", after)):
        apply(values)
        res[label] = outputs(xs, cfg)
        row[label] = do_bench(mla, rep=rep, return_mode="median")
        row[label + "_graph"] = in_one_graph(op, xs, rep, uses_gate=True)
        per = kernel_ms(mla, runs=3)
        row[label + "_per"] = {n: v for n, v in per.items() if any(s in n for s in names)}
        row[label + "_kernels"] = sum(row[label + "_per"].values())
    row["diff"] = max_diff(res["after"], res["before"])
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    q, k, v, _, do = xs

    def dense():
        cudnn(q, k, v, None).backward(do)

    row["cudnn"] = do_bench(dense, rep=rep, return_mode="median")
    row["cudnn_graph"] = in_one_graph(cudnn, xs, rep, uses_gate=False)
    return row


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
    before = load_before(args.before) if args.before else {}
    settings = dict(kv.split("=") for kv in args.set)
    base = dict(kv.split("=") for kv in args.base)
    # every setting either side changes is set on both: the code's own value where not given
    before.update({k: getattr(*module_of(k)) for k in {**settings, **base}})
    after = {k: getattr(*module_of(k)) for k in before}
    after.update({k: int(v) for k, v in settings.items()})
    before.update({k: int(v) for k, v in base.items()})
    names = [k for k in before if k not in settings and k not in base] + args.kernels
    print("changed:", ", ".join(sorted(before)), "; timed kernels:", ", ".join(names), flush=True)
    rows = []
    for point in args.points:
        rows.append(measure(point, before, after, args.rep, names))
        print({k: v for k, v in rows[-1].items() if not k.endswith("_per")}, flush=True)
    apply(after)
    print("\n| point | MLA before ms (one graph) | after ms (one graph) | after/before (one graph) "
          "| changed kernels before → after ms | cuDNN ms (one graph) "
          "| after vs cuDNN (one graph) | max rel diff |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['point']} | {r['before']:.3f} ({r['before_graph']:.3f}) | {r['after']:.3f} "
              f"({r['after_graph']:.3f}) | {r['after'] / r['before']:.3f} "
              f"({r['after_graph'] / r['before_graph']:.3f}) | {r['before_kernels']:.3f} → "
              f"{r['after_kernels']:.3f} | {r['cudnn']:.3f} ({r['cudnn_graph']:.3f}) | "
              f"{r['cudnn'] / r['after']:.2f}× ({r['cudnn_graph'] / r['after_graph']:.2f}×) | "
              f"{r['diff']:.1e} |")  # fmt: skip
    print("\n| point | changed kernel | before ms | after ms |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        for n in sorted(set(r["before_per"]) | set(r["after_per"])):
            b, a = r["before_per"].get(n, 0.0), r["after_per"].get(n, 0.0)
            print(f"| {r['point']} | {n} | {b:.3f} | {a:.3f} |")
    print("geomean after/before:",
          round(statistics.geometric_mean(r["after"] / r["before"] for r in rows), 3))  # fmt: skip


if __name__ == "__main__":
    main()
