"""A run folder's results: the trial table, the Pareto front, hypervolume, and the plot.

`trials.json` is the source of truth (one record per trial, with its full trainer config), with
`reference.json` (the dense reference, see `automla.reference`); `write_outputs` derives
`trials.csv`, `pareto.json`, `hypervolume.csv`, the plots (`pareto.png`, `hypervolume.png`,
`learning_curves.png`, `importances.png`, `attention.png`) and `report.html` from them (and from
Ray's per-trial `result.json` and the study), so `automla report` can be run again at any time.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from automla import attention_view, pareto
from automla import reference as reference_mod
from automla.benchmark_plan import throughput_method
from automla.gpu_usage import summarize_csv
from automla.metrics import known_metrics
from automla.run_folder import DamagedTrials, read_trials, rebuild_trials, study_url, trial_dir
from automla.schema import RATIOS, SearchConfig, load

GPU_USAGE_FILE = "gpu_usage.csv"

COMPLETED = "completed"
PRUNED = "pruned"
FAILED = "failed"
STOPPED = "stopped"
STATES = (COMPLETED, PRUNED, FAILED, STOPPED)
"""Trial states in trials.csv: completed (trained to the end), pruned (stopped early by the
scheduler), failed (with a reason), stopped (interrupted; `search --resume` continues it).
Only completed trials count for the front."""


class RunError(ValueError):
    """A run folder is missing or incomplete."""


class SearchFailed(RuntimeError):
    """Every trial of a search failed; `reasons` holds one line per trial."""

    def __init__(self, run_dir: Path, reasons: list[str]):
        self.run_dir = run_dir
        self.reasons = reasons
        lines = "\n".join(f"  {r}" for r in reasons)
        super().__init__(f"every trial failed (run folder {run_dir}):\n{lines}")


class SearchInterrupted(RuntimeError):
    """The search stopped before its budget was spent (Ctrl-C): what finished is in the run
    folder, and `automla search --resume` continues it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        super().__init__(f"interrupted: continue with `automla search --resume {run_dir}`")


def load_run(
    run_dir: str | Path, *, rebuild: bool = False
) -> tuple[SearchConfig, list[dict[str, Any]]]:
    """The resolved search config and the trial records of a run folder. A trials.json that
    is missing or damaged raises RunError naming it, or with `rebuild` is rebuilt from the
    study (see `run_folder.rebuild_trials`), saying so on stderr."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    if not (run / "space.yaml").is_file():
        raise RunError(f"{run}: not a run folder (space.yaml is missing)")
    config = load(run / "space.yaml")
    try:
        return config, read_trials(run)
    except DamagedTrials as e:
        if not rebuild or not (run / "study.db").is_file():
            raise RunError(str(e)) from None
        try:
            trials = rebuild_trials(run, config)
        except DamagedTrials as again:
            raise RunError(str(again)) from None
        print(
            f"{e.path}: {e.problem}; rebuilt {len(trials)} trials from study.db and the trials' "
            f"Ray results"
            + (
                " (the damaged file is kept beside it)"
                if (run / "trials.json.damaged").exists()
                else ""
            ),
            file=sys.stderr,
        )
        return config, trials


def completed(trials: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Completed trials whose objectives are all finite numbers."""
    out = []
    for t in trials:
        values = [t.get("metrics", {}).get(m) for m in metrics]
        if t.get("state") == COMPLETED and all(finite_number(v) for v in values):
            out.append(t)
    return out


ONE_POINT_FRONT = "one trial dominates all others"
NO_FRONT = "no trial completed"


def summarise(
    config: SearchConfig,
    trials: list[dict[str, Any]],
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The front (records, each compared with the dense reference), the knee, the hypervolume
    and its history after every trial. `reference` is the run's reference.json record."""
    metrics, modes = config.metrics, config.modes
    done = completed(trials, metrics)
    points = [[t["metrics"][m] for m in metrics] for t in done]
    front_idx = pareto.non_dominated(points, modes) if points else []
    knee_id = done[pareto.knee(points, modes)]["trial_id"] if points else None
    # every trial in the order Optuna proposed them; one that did not complete adds nothing
    ordered = sorted(trials, key=proposal_order)
    done_ids = {t["trial_id"] for t in done}
    nan = [math.nan] * len(metrics)
    history_points = [
        [t["metrics"][m] for m in metrics] if t["trial_id"] in done_ids else nan for t in ordered
    ]
    ref = _usable_reference(reference, metrics)
    hv = hypervolume_reference(config, ref)
    if hv["point"] is None:
        history = pareto.hypervolume_history(history_points, modes)
        hv["reference"] = _reference(points, metrics, modes)
    else:
        point = [hv["point"][m] for m in metrics]
        history = pareto.relative_history(history_points, modes, point)
    front = sorted((done[i] for i in front_idx), key=lambda t: t["metrics"][metrics[0]])
    unbeaten = []
    if hv["point"] is not None and done:
        unbeaten = _unbeaten(points, [hv["point"][m] for m in metrics], metrics, modes)
    return {
        "objectives": [{"metric": m, "mode": d} for m, d in zip(metrics, modes)],
        "trials": len(trials),
        "completed": len(done),
        "pruned": sum(t.get("state") == PRUNED for t in trials),
        "failed": sum(t.get("state") == FAILED for t in trials),
        "stopped": sum(t.get("state") == STOPPED for t in trials),
        "knee": knee_id,
        "throughput": throughput_method(config.fixed),
        "hypervolume": history[-1] if history else 0.0,
        "hypervolume_stable": hv["point"] is not None,
        "hypervolume_note": hv["note"],
        "hypervolume_reference": hv["reference"],
        "hypervolume_unbeaten": unbeaten,
        "front_note": (
            NO_FRONT if not done else ONE_POINT_FRONT if len(front) == 1 and len(done) > 1 else ""
        ),
        "reference": _reference_entry(reference, metrics),
        "hypervolume_history": [
            {
                "trial": n + 1,
                "trial_id": t["trial_id"],
                "state": t.get("state"),
                "hypervolume": hv,
            }
            for n, (t, hv) in enumerate(zip(ordered, history))
        ],
        "front": [_front_entry(t, t["trial_id"] == knee_id, ref, metrics) for t in front],
    }


def hypervolume_reference(
    config: SearchConfig, reference_metrics: dict[str, float] | None
) -> dict[str, Any]:
    """The hypervolume's reference point: the dense reference's metrics, else the space file's
    `hypervolume.reference`, else none (`point` None: the run normalises over its own trials,
    so its figure moves with its best and worst and is not comparable with another run's)."""
    if reference_metrics is not None:
        point, source = reference_metrics, "the dense reference"
    elif config.hypervolume_reference:
        point, source = dict(config.hypervolume_reference), "the space file's reference point"
    else:
        return {
            "point": None,
            "reference": {},
            "note": "normalised over this run's completed trials (0 best, 1 worst), reference "
            "point 1.1 on every axis: it moves with the run's own best and worst, so it is not "
            "comparable between runs",
        }
    return {
        "point": point,
        "reference": {"reference": point, "source": source},
        "note": f"against {source} ({_point_text(point)}), each objective in units of the "
        "reference's value: the share of the objective space where the front beats it in "
        "every objective (0: nowhere); comparable between runs with the same space and "
        "reference",
    }


def hypervolume_text(summary: dict[str, Any]) -> str:
    """The hypervolume as one phrase for a terminal line or a page."""
    note = summary.get("front_note")
    if note == NO_FRONT:
        return f"n/a: {note}"
    if summary.get("hypervolume_stable"):
        source = summary["hypervolume_reference"].get("source", "")
        text = f"{summary['hypervolume']:.4f} (vs {source.removeprefix('the ')})"
        unbeaten = summary.get("hypervolume_unbeaten")
        if unbeaten:
            text += f": no completed trial beats it on {' or '.join(unbeaten)}"
        return f"{text}; {note}" if note else text
    if note:
        return f"n/a: {note}"
    return f"{summary['hypervolume']:.4f} (normalised over this run; not comparable)"


def _unbeaten(
    points: list[list[float]], point: list[float], metrics: list[str], modes: list[str]
) -> list[str]:
    """The objectives on which no point is strictly better than the reference point: each one
    makes the hypervolume 0, however good the front is on the others (a recall metric at
    chance for every trial, say)."""
    return [
        m
        for i, (m, mode) in enumerate(zip(metrics, modes))
        if not any((p[i] < point[i]) if mode == "min" else (p[i] > point[i]) for p in points)
    ]


def _point_text(point: dict[str, float]) -> str:
    return ", ".join(f"{m} {format_value(v)}" for m, v in point.items())


def _usable_reference(
    reference: dict[str, Any] | None, metrics: list[str]
) -> dict[str, float] | None:
    """The objectives of a completed reference, when all are finite."""
    if not reference or reference.get("state") != COMPLETED:
        return None
    values = {m: reference.get("metrics", {}).get(m) for m in metrics}
    if not all(finite_number(v) for v in values.values()):
        return None
    return {m: float(v) for m, v in values.items()}


def _reference_entry(reference: dict[str, Any] | None, metrics: list[str]) -> dict[str, Any]:
    """What pareto.json says of the reference (its history stays in reference.json)."""
    if not reference:
        return {}
    return {k: v for k, v in reference.items() if k != "history"}


def proposal_order(trial: dict[str, Any]) -> tuple[bool, int, str]:
    """Sort key of trial records: Optuna's proposal order, trials Optuna never saw last."""
    number = trial.get("optuna_trial")
    return (number is None, number or 0, trial["trial_id"])


def _reference(
    points: list[list[float]], metrics: list[str], modes: list[str], margin: float = 0.1
) -> dict[str, Any]:
    """The reference point in each metric's own units, with the ideal and nadir it comes from."""
    if not points:
        return {}
    ideal = [min(c) if m == "min" else max(c) for c, m in zip(zip(*points), modes)]
    nadir = [max(c) if m == "min" else min(c) for c, m in zip(zip(*points), modes)]
    ref = [n + margin * (n - i) for i, n in zip(ideal, nadir)]
    return {
        "reference": dict(zip(metrics, ref)),
        "ideal": dict(zip(metrics, ideal)),
        "nadir": dict(zip(metrics, nadir)),
        "margin": margin,
    }


def write_outputs(
    run_dir: str | Path, config: SearchConfig, trials: list[dict[str, Any]]
) -> dict[str, Any]:
    """(Re)write trials.csv, pareto.json, hypervolume.csv and pareto.png; return the summary."""
    run = Path(run_dir)
    reference = reference_mod.load_reference(run)
    summary = summarise(config, trials, reference)
    summary["gpu_usage"] = summarize_csv(run / GPU_USAGE_FILE)
    _write_csv(run / "trials.csv", trials)
    (run / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(run / "hypervolume.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "trial_id", "state", "hypervolume"])
        for h in summary["hypervolume_history"]:
            w.writerow([h["trial"], h["trial_id"], h["state"], f"{h['hypervolume']:.6f}"])
    plot(run / "pareto.png", config, trials, summary)
    plot_hypervolume(run / "hypervolume.png", summary)
    plot_learning_curves(run / "learning_curves.png", config, trials)
    summary_importances = importances(run, config)
    plot_importances(run / "importances.png", summary_importances)
    panels = attention_panels(trials, summary, reference, run)
    if not attention_view.plot(run / "attention.png", panels):
        (run / "attention.png").unlink(missing_ok=True)
    write_html(run / "report.html", run.name, summary, summary_importances, panels)
    return summary


def attention_panels(
    trials: list[dict[str, Any]],
    summary: dict[str, Any],
    reference: dict[str, Any] | None,
    run_dir: str | Path,
) -> list[attention_view.Panel]:
    """The runs whose attention the report shows: the knee, then the dense reference."""
    panels: list[attention_view.Panel] = []
    knee = next((t for t in trials if t["trial_id"] == summary.get("knee")), None)
    if knee is not None:
        title = f"knee {knee['trial_id']} ({knee.get('label', '')})"
        decisions = None
        folder = trial_dir(run_dir, knee)
        if folder is not None:  # Ray brings each trial's train/ folder home
            decisions = attention_view.pruning_decisions(folder / "train" / "pruning.jsonl")
        panels.append((title, curves(knee, run_dir), decisions))
    if reference and reference.get("history"):
        panels.append((reference_mod.LABEL, reference["history"], None))
    return panels


def curves(trial: dict[str, Any], run_dir: str | Path) -> list[dict[str, Any]]:
    """Every result a trial reported to Ray, from its `result.json` (empty when there is none);
    its folder is recorded relative to the run folder `run_dir`."""
    folder = trial_dir(run_dir, trial)
    path = folder / "result.json" if folder is not None else None
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed driver
            continue
    return out


def plot_learning_curves(path: str | Path, config: SearchConfig, trials: list[dict[str, Any]]):
    """One panel per objective: every trial's metric against its step; completed trials in
    colour, pruned grey, failed red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = config.metrics
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.8), dpi=110)
    styles = {PRUNED: ("0.6", "--"), FAILED: ("tab:red", ":"), STOPPED: ("tab:orange", ":")}
    for t in trials:
        points = [r for r in curves(t, Path(path).parent) if "step" in r]
        colour, ls = styles.get(t.get("state"), (None, "-"))
        for ax, m in zip(axes, metrics):
            xy = [(r["step"], r[m]) for r in points if finite_number(r.get(m))]
            if xy:
                ax.plot(*zip(*xy), color=colour, ls=ls, lw=1.0, alpha=0.8)
    for ax, m, mode in zip(axes, metrics, config.modes):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{m} ({mode})")
        ax.grid(alpha=0.3)
    fig.suptitle("learning curves (grey dashed: pruned, red dotted: failed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def importances(run_dir: str | Path, config: SearchConfig) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances of each objective over the study's completed trials
    (empty for an objective when there are too few trials to fit them)."""
    import optuna

    db = Path(run_dir) / "study.db"
    if not db.is_file():
        return {}
    storage = study_url(run_dir)
    try:
        names = optuna.study.get_all_study_names(storage)
    except Exception:  # a damaged study.db: the report goes on without importances
        return {}
    if len(names) != 1:
        return {}
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=names[0], storage=storage)
        out = {}
        for i, (m, mode) in enumerate(zip(config.metrics, config.modes)):
            sign = 1.0 if mode == "min" else -1.0  # the evaluator looks for low target values
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    scores = optuna.importance.get_param_importances(
                        study, target=lambda t, i=i, sign=sign: sign * t.values[i]
                    )
            except (ValueError, RuntimeError):  # fewer than two completed trials, one param
                scores = {}
            out[m] = {k: float(v) for k, v in scores.items()}
        return out
    finally:
        optuna.logging.set_verbosity(level)


def plot_importances(path: str | Path, scores: dict[str, dict[str, float]]) -> None:
    """Horizontal bars of each objective's parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(scores) or ["(no study)"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.8), dpi=110)
    axes = axes if len(metrics) > 1 else [axes]
    for ax, m in zip(axes, metrics):
        items = sorted(scores.get(m, {}).items(), key=lambda kv: kv[1])
        if items:
            ax.barh([short_name(k) for k, _ in items], [v for _, v in items], color="tab:blue")
        else:
            ax.text(0.5, 0.5, "too few completed trials", ha="center", transform=ax.transAxes)
        ax.set_title(f"importance for {m}", fontsize=10)
        ax.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_html(
    path: str | Path,
    name: str,
    summary: dict[str, Any],
    scores: dict[str, dict[str, float]],
    attention: list[attention_view.Panel] | None = None,
) -> None:
    """One self-contained page: the front as a table and every plot embedded (base64 PNG)."""
    import base64
    import html

    run = Path(path).parent
    metrics = [o["metric"] for o in summary["objectives"]]
    params = []
    for e in summary["front"]:
        params += [k for k in e["params"] if k not in params]
    head = ["trial", *(f"{o['metric']} ({o['mode']})" for o in summary["objectives"]), "ratios"]
    head.append("vs dense reference")
    rows = []
    for e in summary["front"]:
        cells = [_trial_cell(e)]
        cells += [format_value(e["metrics"][m]) for m in metrics] + [e["label"]]
        cells.append(e.get("vs_reference_text", ""))
        cells += [setting_text(e["params"].get(p, "")) for p in params]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    ref = summary.get("reference") or {}
    if ref:
        done = ref.get("state") == COMPLETED
        cells = [reference_mod.LABEL, *(_reference_cell(ref, m) for m in metrics), "dense"]
        cells.append("1x" if done else f"{ref.get('state')}: {ref.get('reason', '')}")
        cells += [""] * len(params)
        rows.append(
            '<tr style="font-style:italic">'
            + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            + "</tr>"
        )
    images = []
    for png in ("pareto.png", "hypervolume.png", "learning_curves.png", "importances.png"):
        if (run / png).is_file():
            data = base64.b64encode((run / png).read_bytes()).decode()
            images.append(
                f"<h2>{png[:-4].replace('_', ' ')}</h2>"
                f'<img alt="{png}" src="data:image/png;base64,{data}">'
            )
    counts = ", ".join(f"{summary.get(s, 0)} {s}" for s in STATES)
    attention_section = ""
    if attention:
        png = run / "attention.png"
        uri = None
        if png.is_file():
            uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        attention_section = attention_view.html_section(attention, uri)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>AutoMLA run {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}
td.bar{{text-align:left}}span.bar{{display:inline-block;height:.8em;background:#4c72b0}}</style>
</head>
<body><h1>AutoMLA run {html.escape(name)}</h1>
<p>{summary["trials"]} trials ({counts}); hypervolume {html.escape(hypervolume_text(summary))}.
</p><p>How to read the hypervolume: {html.escape(summary.get("hypervolume_note", ""))}.</p>
<p>tokens_per_s: {html.escape(summary.get("throughput", ""))}.</p>
{_gpu_line(summary.get("gpu_usage"))}
<h2>Pareto front</h2><table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}
{"".join(f"<th>{html.escape(short_name(p))}</th>" for p in params)}</tr>
{"".join(rows)}</table>
{"".join(images)}
{attention_section}
<h2>parameter importances</h2>{_importances_html(scores)}
</body></html>
"""
    Path(path).write_text(page)


def _importances_html(scores: dict[str, dict[str, float]]) -> str:
    """Each parameter's importance per objective as a table, to 2 decimals with a bar, most
    important first (Optuna's scores sum to 1; their 16 digits say nothing more)."""
    import html

    metrics = [m for m, per in scores.items() if per]
    if not metrics:
        return "<p>too few completed trials to fit them.</p>"
    params = sorted(
        {p for m in metrics for p in scores[m]},
        key=lambda p: -sum(scores[m].get(p, 0.0) for m in metrics),
    )
    rows = []
    for p in params:
        cells = [f'<td title="{html.escape(p)}">{html.escape(short_name(p))}</td>']
        for m in metrics:
            v = scores[m].get(p)
            cells.append(
                '<td class="bar">-</td>'
                if v is None
                else f'<td class="bar">{v:.2f} <span class="bar" style="width:{100 * v:.0f}px">'
                "</span></td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    return f"<table><tr><th>parameter</th>{head}</tr>{''.join(rows)}</table>"


def _gpu_line(usage: dict[str, Any] | None) -> str:
    if not usage:
        return ""
    per_gpu = ", ".join(f"GPU {g}: {u:.0f}%" for g, u in usage["mean_util_pct_per_gpu"].items())
    return (
        f"<p>GPU utilisation over the search: {usage['mean_util_pct']:.0f}% mean ({per_gpu}; "
        f"{usage['samples']} samples of the driver's machine), peak memory "
        f"{usage['peak_mem_mib'] / 1024:.1f} GiB.</p>"
    )


def plot_hypervolume(path: str | Path, summary: dict[str, Any]) -> None:
    """Hypervolume after every trial; trials that did not complete are marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = summary["hypervolume_history"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    xs = [h["trial"] for h in hist]
    ax.step(xs, [h["hypervolume"] for h in hist], where="post", color="tab:blue")
    colours = {FAILED: "tab:red", PRUNED: "0.6", STOPPED: "tab:orange"}
    for state, colour in colours.items():
        marked = [h["trial"] for h in hist if h["state"] == state]
        if marked:
            ax.scatter(marked, [0] * len(marked), marker="x", color=colour, label=state)
    ax.set_xlabel("trial (proposal order)")
    stable = summary.get("hypervolume_stable")
    ax.set_ylabel("hypervolume" + ("" if stable else " (normalised over this run)"))
    ax.set_title(f"final hypervolume {hypervolume_text(summary)}", fontsize=9)
    ax.grid(alpha=0.3)
    if any(h["state"] in colours for h in hist):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(
    run_dir: str | Path, *, console: Console | None = None, as_json: bool = False
) -> dict[str, Any]:
    """Re-derive a run folder's outputs and print the front (a rich table, or JSON); a damaged
    trials.json is rebuilt from the study first."""
    config, trials = load_run(run_dir, rebuild=True)
    summary = write_outputs(run_dir, config, trials)
    console = console or Console()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(front_table(summary, Path(run_dir).name))
        console.print(
            f"{summary['completed']} completed, {summary['failed']} failed of "
            f"{summary['trials']} trials · hypervolume {hypervolume_text(summary)} · "
            f"page {Path(run_dir) / 'report.html'}"
        )
    return summary


def front_table(summary: dict[str, Any], title: str = "") -> Group:
    """The Pareto front as a rich table, best first on the first objective, knee marked; each
    trial's searched settings listed below it (a settings column squeezed the numbers to `1.9…`
    on an 80-column terminal and still wrapped values mid-word at 120)."""
    if not summary["front"]:
        return Group(Text(f"Pareto front {title}: none, {NO_FRONT}".replace("  ", " ")))
    metrics = [o["metric"] for o in summary["objectives"]]
    table = Table(title=f"Pareto front {title}".strip(), title_justify="left")
    # the objectives and ratios never wrap: when the terminal is narrow, the trial and the
    # comparison columns wrap first (rich shrinks only wrapping columns while it can)
    table.add_column("trial")
    for o in summary["objectives"]:
        table.add_column(f"{o['metric']}\n({o['mode']})", justify="right", no_wrap=True)
    table.add_column("ratios", no_wrap=True)
    ref = summary.get("reference") or {}
    if ref:
        table.add_column("vs dense reference")
    for entry in summary["front"]:
        table.add_row(
            _trial_cell(entry),
            *[format_value(entry["metrics"][m]) for m in metrics],
            entry["label"],
            *([_comparison_cell(entry.get("vs_reference_text", ""))] if ref else []),
            style="bold" if entry["knee"] else None,
        )
    if ref:
        done = ref.get("state") == COMPLETED
        table.add_row(
            reference_mod.LABEL,
            *[_reference_cell(ref, m) for m in metrics],
            "dense",
            "1x" if done else f"{ref.get('state')}: {ref.get('reason')}",
            style="italic",
        )
    settings = Table.grid(padding=(0, 2))
    settings.add_column(no_wrap=True)
    settings.add_column()
    for entry in summary["front"]:
        items = [
            f"{short_name(k)}={setting_text(v)}"
            for k, v in entry["params"].items()
            if not k.startswith(RATIOS)
        ]
        if items:
            style = "bold" if entry["knee"] else None
            settings.add_row(_trial_cell(entry), Items(items, sep="  "), style=style)
    if not settings.rows:
        return Group(table)
    return Group(table, Text("settings of the front"), Padding(settings, (0, 0, 0, 2)))


def _trial_cell(entry: dict[str, Any]) -> str:
    return entry["trial_id"] + (" (knee)" if entry["knee"] else "")


def _comparison_cell(text: str) -> Items:
    """'-0.16 val_loss, 0.54x tokens_per_s', broken only after a comma."""
    parts = text.split(", ") if text else []
    return Items([p + "," for p in parts[:-1]] + parts[-1:], sep=" ")


class Items:
    """Items on as few lines as the width allows, broken only between items (rich's own
    wrapping breaks at any space, splitting `gate.hidden=[32, 32]` or `-0.16 val_loss`); its
    narrowest is its widest item, so rich knows how far a column of them can shrink."""

    def __init__(self, items: list[str], sep: str = " "):
        self.items = items
        self.sep = sep

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        widest = max((cell_len(i) for i in self.items), default=0)
        return Measurement(widest, cell_len(self.sep.join(self.items))).with_maximum(
            options.max_width
        )

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines: list[str] = []
        for item in self.items:
            joined = f"{lines[-1]}{self.sep}{item}" if lines else item
            if lines and cell_len(joined) <= options.max_width:
                lines[-1] = joined
            else:
                lines.append(item)
        # an item wider than the whole width is left to rich (wrapped at its spaces)
        yield Text("\n".join(lines))


def _reference_cell(ref: dict[str, Any], metric: str) -> str:
    v = ref.get("metrics", {}).get(metric)
    return format_value(v) if ref.get("state") == COMPLETED and v is not None else "-"


def short_name(path: str) -> str:
    """'model.mla.gate.hidden' -> 'gate.hidden', 'model.d_model' -> 'd_model'."""
    for prefix in ("model.mla.", "model."):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def plot(
    path: str | Path, config: SearchConfig, trials: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """The first two objectives: dominated trials grey, the front highlighted and labelled by
    ratios, the knee starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mx, my = config.metrics[0], config.metrics[1]
    done = completed(trials, config.metrics)
    front_ids = {e["trial_id"] for e in summary["front"]}
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    rest = [t for t in done if t["trial_id"] not in front_ids]
    for dense, marker, label in ((False, "o", "dominated"), (True, "s", "dominated (dense)")):
        shown = [t for t in rest if (t.get("label") == "dense") == dense]
        if shown:
            ax.scatter(
                [t["metrics"][mx] for t in shown],
                [t["metrics"][my] for t in shown],
                color="0.7",
                marker=marker,
                s=28,
                label=label,
            )
    front = sorted(summary["front"], key=lambda e: e["metrics"][mx])
    fx = [e["metrics"][mx] for e in front]
    fy = [e["metrics"][my] for e in front]
    if front:
        # the attainment staircase: a point covers larger x when x is minimised
        steps = "steps-post" if config.modes[0] == "min" else "steps-pre"
        ax.plot(fx, fy, color="tab:blue", lw=1.2, alpha=0.6, drawstyle=steps)
        ax.scatter(fx, fy, color="tab:blue", s=46, zorder=3, label="Pareto front")
        for e, x, y in zip(front, fx, fy):
            ax.annotate(e["label"], (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
        knee = [e for e in front if e["knee"]]
        if knee:
            ax.scatter(
                [knee[0]["metrics"][mx]],
                [knee[0]["metrics"][my]],
                marker="*",
                s=220,
                color="tab:orange",
                zorder=4,
                label="knee",
            )
    ref = summary.get("reference") or {}
    rx, ry = (ref.get("metrics") or {}).get(mx), (ref.get("metrics") or {}).get(my)
    if ref.get("state") == COMPLETED and finite_number(rx) and finite_number(ry):
        ax.scatter([rx], [ry], marker="D", s=60, color="black", zorder=4, label=reference_mod.LABEL)
        ax.annotate(
            reference_mod.LABEL, (rx, ry), textcoords="offset points", xytext=(6, -12), fontsize=8
        )
        if summary.get("hypervolume_stable"):  # the region that beats it on both axes
            ax.axvline(rx, color="black", lw=0.6, ls=":")
            ax.axhline(ry, color="black", lw=0.6, ls=":")
    arrow = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(f"{mx} ({arrow[config.modes[0]]})")
    ax.set_ylabel(f"{my} ({arrow[config.modes[1]]})")
    failed = summary["failed"]
    ax.set_title(
        f"{summary['completed']} completed trials"
        + (f", {failed} failed" if failed else "")
        + (f", {summary['pruned']} pruned" if summary["pruned"] else "")
        + (" (not shown)" if failed or summary["pruned"] else "")
        + f" · hypervolume {hypervolume_text(summary)}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to name where no trial completed
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _front_entry(
    t: dict[str, Any], is_knee: bool, reference: dict[str, float] | None, metrics: list[str]
) -> dict[str, Any]:
    vs = reference_mod.compare(t["metrics"], reference, metrics) if reference else {}
    return {
        "trial_id": t["trial_id"],
        "knee": is_knee,
        "label": t.get("label", ""),
        "params": t.get("params", {}),
        "metrics": t["metrics"],
        "vs_reference": vs,
        "vs_reference_text": reference_mod.compare_text(vs),
        "config": t["config"],
    }


def _write_csv(path: Path, trials: list[dict[str, Any]]) -> None:
    params: list[str] = []
    for t in trials:
        params += [k for k in t.get("params", {}) if k not in params]
    metrics = known_metrics(k for t in trials for k in t.get("metrics", {}))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["trial_id", "optuna_trial", "state", "reason", "failure", "retries", "node_ip"]
        w.writerow([*head, "node_id", "ratios", *params, *metrics])
        for t in trials:
            w.writerow(
                [
                    t["trial_id"],
                    t.get("optuna_trial", ""),
                    t["state"],
                    t.get("reason", ""),
                    t.get("failure", ""),
                    t.get("retries", 0),
                    t.get("node_ip", ""),
                    t.get("node_id", ""),
                    t.get("label", ""),
                    *[_cell(t.get("params", {}).get(p)) for p in params],
                    *[_cell(t.get("metrics", {}).get(m)) for m in metrics],
                ]
            )


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def finite_number(v: Any) -> bool:
    """A real, finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_value(v: Any) -> str:
    """A metric in a table or a line: from 1000 up whole with separators (`43,519`, int or
    float alike), a smaller float to 4 significant digits (`1.972`)."""
    if finite_number(v) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def setting_text(v: Any) -> str:
    """A searched setting's value: a float to 3 significant digits (`0.139`, not
    `0.13865206088892373`), anything else as it is."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)
