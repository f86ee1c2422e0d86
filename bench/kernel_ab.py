"""A kernel change timed against the code it replaces, in one run, with cuDNN beside them.

`--before FILE` is an earlier copy of one module of `kernels/parallel/`, under the same file
name (e.g. `git show REV:kernels/parallel/window.py > _ab/window.py`; loaded as a module of
that package, so its relative imports resolve, wherever the file is). Its `@triton.jit` kernels
replace those of the same name in the launch layer for the "before" rows; a branch module that
the launch layer calls as a whole (`sparse_tile.py`, `sparse.py`) replaces it whole. For each point
(head shape, length, budget, select_tile) the script checks that both versions give the same
outputs and gradients, then times MLA fwd+bwd before and after, the changed kernels alone,
and cuDNN's fwd+bwd on the same inputs.

`--set NAME=VALUE` instead changes a setting of the launch layer (`kernels/parallel/autograd.py`)
for the "after" rows, and `--kernels` names the kernels whose time it moves:

    python bench/kernel_ab.py --before bench/_before.py \
        [--points 64/4/128:32768:nsa:64 12/4/64:8192:nsa:64 ...] [--rep 200]
    python bench/kernel_ab.py --set GLOBAL_DKV_PROGRAMS=4096 --kernels global_bwd_dkv spread
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
from budgets import budget_config  # noqa: E402
from tile_shapes import inputs, sdpa  # noqa: E402
from timing import kernel_ms  # noqa: E402

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
    shape, T, budget, bq = point.split(":")
    hq, hkv, d = (int(x) for x in shape.split("/"))
    cfg = budget_config(int(T), budget, int(bq))
    xs = inputs(int(T), hq, hkv, d)
    row, res = {"point": point}, {}

    def mla():
        run(*xs, cfg)

    for label, kernels in (("before", before), ("after", after)):
        vars(launch).update(kernels)
        res[label] = outputs(xs, cfg)
        row[label] = do_bench(mla, rep=rep, return_mode="median")
        per = kernel_ms(mla, runs=3)
        row[label + "_per"] = {n: v for n, v in per.items() if any(s in n for s in names)}
        row[label + "_kernels"] = sum(row[label + "_per"].values())
    row["diff"] = max_diff(res["after"], res["before"])
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION)
    q, k, v, _, do = xs

    def dense():
        cudnn(q, k, v, None).backward(do)

    row["cudnn"] = do_bench(dense, rep=rep, return_mode="median")
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
    ap.add_argument("--kernels", nargs="+", default=[], help="kernels a --set change moves")
    ap.add_argument("--points", nargs="+", default=POINTS, metavar="SHAPE:T:BUDGET:BQ")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    args = ap.parse_args()
    before = load_before(args.before) if args.before else {}
    settings = dict(kv.split("=") for kv in args.set)
    before.update({k: getattr(launch, k) for k in settings})
    after = {k: getattr(launch, k) for k in before}
    after.update({k: int(v) for k, v in settings.items()})
    names = [k for k in before if k not in settings] + args.kernels
    print("changed:", ", ".join(sorted(before)), "; timed kernels:", ", ".join(names), flush=True)
    rows = []
    for point in args.points:
        rows.append(measure(point, before, after, args.rep, names))
        print({k: v for k, v in rows[-1].items() if not k.endswith("_per")}, flush=True)
    vars(launch).update(after)
    print("\n| point | MLA before ms | after ms | after/before | changed kernels before → after ms "
          "| cuDNN ms | after vs cuDNN | max rel diff |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['point']} | {r['before']:.3f} | {r['after']:.3f} | "
              f"{r['after'] / r['before']:.3f} | {r['before_kernels']:.3f} → "
              f"{r['after_kernels']:.3f} | {r['cudnn']:.3f} | {r['cudnn'] / r['after']:.2f}× | "
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
