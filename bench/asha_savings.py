"""What early stopping (ASHA) saves: a space searched with and without it, at equal trial budgets.

    python bench/asha_savings.py [--space search_spaces/default.yaml] [--trials 16]

Both searches evaluate at the same steps (`--eval-every`), so they differ only by the
scheduler. Reports trial CPU-hours (the sum over trials of their training time times the CPUs
they held), wall time, how many trials ASHA stopped, and the hypervolume of each final front
with one normalisation and reference point for both (the union of their completed trials), so
the two numbers compare. Writes JSON beside the runs and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from automla import pareto
from automla.runner import run_search
from automla.schema import Scheduler, load


def trial_seconds(trials: list[dict]) -> float:
    return sum(float((t.get("metrics") or {}).get("elapsed_s") or 0.0) for t in trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/default.yaml")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--grace-period", type=int, default=50)
    ap.add_argument("--reduction-factor", type=float, default=2.0)
    ap.add_argument("--out", default=None, help="parent folder of the two runs (default: temp)")
    args = ap.parse_args()
    base = load(args.space)
    base.fixed["eval_every"] = args.eval_every
    steps = int(base.fixed.get("steps", 200))
    asha = Scheduler(
        metric=base.objectives[0].metric,
        mode=base.objectives[0].mode,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_t=steps,
    )
    out = Path(args.out or tempfile.mkdtemp(prefix="asha-"))
    rows = {}
    for name, scheduler in (("no scheduler", None), ("asha", asha)):
        config = dataclasses.replace(base, scheduler=scheduler, trials=args.trials)
        t0 = time.time()
        run = run_search(config, out, name.replace(" ", "-"))
        wall = time.time() - t0
        trials = json.loads((run / "trials.json").read_text())
        rows[name] = {"run": str(run), "wall_s": wall, "trials": trials}

    metrics, modes = base.metrics, base.modes
    done = {name: [t for t in r["trials"] if t["state"] == "completed"] for name, r in rows.items()}
    union = [[t["metrics"][m] for m in metrics] for ts in done.values() for t in ts]
    mins = pareto.to_min(union, modes)
    bounds = ([min(c) for c in zip(*mins)], [max(c) for c in zip(*mins)])
    ref = [1.1] * len(metrics)
    summary = []
    for name, r in rows.items():
        pts = [[t["metrics"][m] for m in metrics] for t in done[name]]
        front = [pts[i] for i in pareto.non_dominated(pts, modes)]
        hv = pareto.hypervolume(pareto.normalise(front, modes, bounds), ref) if front else 0.0
        cpus = base.resources.cpus * base.resources.n_workers
        summary.append(
            {
                "search": name,
                "trials": len(r["trials"]),
                "completed": len(done[name]),
                "stopped_early": sum(t["state"] == "pruned" for t in r["trials"]),
                "cpu_hours": trial_seconds(r["trials"]) * cpus / 3600,
                "wall_s": r["wall_s"],
                "hypervolume": hv,
                "front": len(front),
            }
        )
    (out / "asha_savings.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{args.space}, {args.trials} trials each, evaluations every {args.eval_every} steps;")
    print(
        f"ASHA on {asha.metric} ({asha.mode}), grace {asha.grace_period}, "
        f"reduction {asha.reduction_factor:g}, max_t {asha.max_t}\n"
    )
    print(
        "| search | trials | completed | stopped early | trial CPU-hours | wall s | front | "
        "hypervolume (shared reference) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summary:
        print(
            f"| {s['search']} | {s['trials']} | {s['completed']} | {s['stopped_early']} | "
            f"{s['cpu_hours']:.4f} | {s['wall_s']:.0f} | {s['front']} | {s['hypervolume']:.3f} |"
        )


if __name__ == "__main__":
    main()
