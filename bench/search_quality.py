"""Search quality: TPE, NSGA-II and random sampling at equal trial budgets, over several seeds.

Plain Optuna (ask/tell, one trial at a time) with the samplers exactly as `automla search`
builds them (`automla.factories.make_sampler`), on two cheap objectives, so that hundreds of
searches take seconds rather than the CPU-hours real trials would:

* `mla`: a synthetic stand-in for the default space, sampled through the same define-by-run
  code as the search (`automla.space.sample`: simplex ratios, budget, block size, width, lr).
  Loss falls with width, with keys in each branch and with lr near 3e-3; throughput falls
  with width and with the keys each query reads. Minimise loss, maximise throughput.
* `zdt1`: the ZDT1 test problem (6 variables, convex front), a recognised reference.

The hypervolume of each finished search is computed on objectives normalised with the ideal
and nadir of every point any sampler found on that problem (0 best, 1 worst), against the
reference point 1.1 on every axis, so the numbers are comparable across samplers (the best
possible is a little under 1.21). Prints a table and writes JSON.

    python bench/search_quality.py --trials 40 --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import optuna

from automla import pareto, schema
from automla.factories import make_sampler
from automla.space import sample

SAMPLERS = ("tpe", "nsga2", "random")

MLA_SPACE = {
    "objectives": [
        {"metric": "val_loss", "mode": "min"},
        {"metric": "tokens_per_s", "mode": "max"},
    ],
    "train": {"seq_len": 512},
    "model": {"max_seq_len": 512, "n_heads": 4, "n_kv_heads": 2},
    "space": {
        "model.d_model": {"choice": [48, 64, 96]},
        "model.mla.ratios": {"simplex": {"min_share": 0.1}},
        "model.mla.budget": {"choice": [16, 32, 64, 128, 256]},
        "model.mla.block_size": {"choice": [16, 32, 64]},
        "lr": {"loguniform": [1.0e-3, 1.0e-2]},
    },
}


def mla_objective(trial: optuna.Trial, space: dict[str, Any]) -> tuple[float, float]:
    v = sample(trial, space)
    width, budget, block = v["model.d_model"], v["model.mla.budget"], v["model.mla.block_size"]
    local, glob, sparse = v["model.mla.ratios"]
    loss = (
        2.0
        + 0.6 * math.exp(-width / 48)
        + 0.25 * math.exp(-local * budget / 24)
        + 0.10 * math.exp(-glob * budget / 8)
        + 0.15 * math.exp(-sparse * budget / (2 * block))
        + 0.05 * math.log10(v["lr"] / 3e-3) ** 2
    )
    cost = width**2 * 0.02 + width * budget * (0.04 * local + 0.01 * glob + 0.08 * sparse)
    cost += width * block * 0.01 * (sparse > 0)
    return loss, 1e4 / cost


def zdt1(trial: optuna.Trial) -> tuple[float, float]:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(6)]
    g = 1 + 9 * sum(x[1:]) / 5
    return x[0], g * (1 - math.sqrt(x[0] / g))


PROBLEMS = {"mla": ["min", "max"], "zdt1": ["min", "min"]}


def run_one(problem: str, sampler_name: str, seed: int, trials: int) -> list[list[float]]:
    config = schema.parse(MLA_SPACE, "bench")
    config = dataclasses.replace(
        config, trials=trials, sampler=schema.Sampler(name=sampler_name, seed=seed)
    )
    study = optuna.create_study(
        directions=["minimize" if m == "min" else "maximize" for m in PROBLEMS[problem]],
        sampler=make_sampler(config),
    )
    points = []
    for _ in range(trials):
        trial = study.ask()
        values = mla_objective(trial, config.space) if problem == "mla" else zdt1(trial)
        study.tell(trial, list(values))
        points.append(list(values))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="trial budget of each search")
    parser.add_argument("--seeds", type=int, default=5, help="searches per sampler and problem")
    parser.add_argument(
        "--out", default=str(Path(__file__).with_name("search_quality.json")), help="JSON output"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    runs: dict[tuple[str, str, int], list[list[float]]] = {}
    seconds: dict[tuple[str, str], float] = {}
    for problem in PROBLEMS:
        for name in SAMPLERS:
            t0 = time.perf_counter()
            for seed in range(args.seeds):
                runs[problem, name, seed] = run_one(problem, name, seed, args.trials)
            seconds[problem, name] = (time.perf_counter() - t0) / args.seeds

    rows = []
    for problem, modes in PROBLEMS.items():
        everything = pareto.to_min(
            [p for (pr, _, _), pts in runs.items() if pr == problem for p in pts], modes
        )
        bounds = ([min(c) for c in zip(*everything)], [max(c) for c in zip(*everything)])
        ref = [1.1] * len(modes)
        for name in SAMPLERS:
            finals, halves = [], []
            for seed in range(args.seeds):
                pts = pareto.normalise(runs[problem, name, seed], modes, bounds)
                finals.append(pareto.hypervolume(pts, ref))
                halves.append(pareto.hypervolume(pts[: args.trials // 2], ref))
            rows.append(
                {
                    "problem": problem,
                    "sampler": name,
                    "trials": args.trials,
                    "seeds": args.seeds,
                    "hypervolume_mean": statistics.mean(finals),
                    "hypervolume_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "hypervolume_half_budget_mean": statistics.mean(halves),
                    "hypervolumes": finals,
                    "seconds_per_search": seconds[problem, name],
                }
            )

    header = (
        f"| problem | sampler | HV after {args.trials // 2} trials | "
        f"HV after {args.trials} trials (mean ± std, {args.seeds} seeds) | s / search |"
    )
    print(header)
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['problem']} | {r['sampler']} | {r['hypervolume_half_budget_mean']:.4f} | "
            f"{r['hypervolume_mean']:.4f} ± {r['hypervolume_std']:.4f} | "
            f"{r['seconds_per_search']:.2f} |"
        )
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
