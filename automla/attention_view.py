"""What the attention learned, for the report: the knee's and the dense reference's gates, heads
and sparse reach over training, from the `attn_*` metrics the trainer records at each
evaluation (see `automla.trainers.attention_stats`).

`attention.png` has one column per run: the mean gate weight of each branch per layer (top) and
the mean distance back to the sparse branch's selected blocks per layer (bottom), against the
step. The page adds a table of the heads each layer lost and when: the pruner's decision step
from the trial's `pruning.jsonl` where the run folder has it, else the first evaluation
without the head.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

Pruned = list[list[tuple[int, int]]]
"""Per layer, (head, step) for each head gone at the end of a run."""
Panel = tuple[str, list[dict[str, Any]], Pruned | None]
"""(title, the run's evaluations, its pruning decisions when known)."""

_STYLES = {"local": "-", "global": "--", "sparse": ":"}


def evaluations(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations that carry attention metrics, in step order."""
    rows = [r for r in history if "attn_heads" in r and "step" in r]
    return sorted(rows, key=lambda r: r["step"])


def pruning_decisions(path: str | Path) -> Pruned | None:
    """From a trainer's pruning.jsonl: per layer, each head removed at the end of the run and
    the step of the decision that removed it (the last one, when regrowth brought it back in
    between); None without the file."""
    path = Path(path)
    if not path.is_file():
        return None
    since: list[dict[int, int]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed trial
            continue
        removed = record.get("removed")
        if removed is None:
            continue
        since += [{} for _ in range(len(removed) - len(since))]
        for layer, heads in enumerate(removed):
            kept = {h: since[layer].get(h, record["step"]) for h in heads}
            since[layer] = kept
    return [sorted(layer.items()) for layer in since]


def pruned_heads(history: list[dict[str, Any]]) -> Pruned:
    """Per layer, (head, step of the first evaluation without it) for each head gone by the
    last evaluation."""
    rows = evaluations(history)
    if not rows:
        return []
    first = set().union(*(set(h) for h in rows[0]["attn_heads"]))
    n_heads = max(first, default=-1) + 1
    out = []
    for layer in range(len(rows[-1]["attn_heads"])):
        lost = []
        for head in range(n_heads):
            if head in rows[-1]["attn_heads"][layer]:
                continue
            when = next((r["step"] for r in rows if head not in r["attn_heads"][layer]), None)
            if when is not None:
                lost.append((head, when))
        out.append(lost)
    return out


def plot(path: str | Path, panels: list[Panel]) -> bool:
    """Write attention.png; False (and nothing written) when no run recorded attention
    metrics."""
    shown = [(title, evaluations(h)) for title, h, _ in panels]
    shown = [(title, rows) for title, rows in shown if rows]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(shown), figsize=(5.5 * len(shown), 6.4), dpi=110)
    axes = axes.reshape(2, len(shown))
    for col, (title, rows) in enumerate(shown):
        top, bottom = axes[0, col], axes[1, col]
        steps = [r["step"] for r in rows]
        n_layers = len(rows[-1]["attn_heads"])
        for layer in range(n_layers):
            colour = f"C{layer}"
            for branch, ls in _STYLES.items():
                ys = [_gate(r, layer, branch) for r in rows]
                if any(y is not None for y in ys):
                    top.plot(steps, ys, ls=ls, color=colour, label=f"layer {layer} {branch}")
            reach = [_reach(r, layer) for r in rows]
            if any(y is not None for y in reach):
                bottom.plot(steps, reach, color=colour, marker="o", label=f"layer {layer}")
        top.set_title(title, fontsize=10)
        top.set_ylabel("mean gate weight")
        top.set_ylim(0, 1)
        bottom.set_ylabel("sparse reach (tokens back, mean)")
        bottom.set_xlabel("step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        if not any("attn_gate" in r for r in rows):
            top.text(0.5, 0.5, "dense attention: no gate", ha="center", transform=top.transAxes)
        if not bottom.lines:
            bottom.text(0.5, 0.5, "no sparse branch", ha="center", transform=bottom.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def html_section(panels: list[Panel], image: str | None) -> str:
    """The page's section: the plot (a data URI or None) and, per run, its last evaluation's
    gates and reach and the heads it pruned."""
    parts = ["<h2>what the attention learned</h2>"]
    if image:
        parts.append(f'<img alt="attention.png" src="{image}">')
    for title, history, decisions in panels:
        rows = evaluations(history)
        if not rows:
            parts.append(f"<p>{html.escape(title)}: no attention metrics recorded.</p>")
            continue
        last = rows[-1]
        lost, when = (decisions, "at step") if decisions else (pruned_heads(history), "by step")
        cells = []
        for layer, heads in enumerate(last["attn_heads"]):
            gate = ", ".join(
                f"{b} {v:.2f}" for b, v in ((_b, _gate(last, layer, _b)) for _b in _STYLES) if v
            )
            reach = (last.get("attn_reach") or [None] * (layer + 1))[layer]
            layer_lost = lost[layer] if layer < len(lost) else []
            gone = ", ".join(f"head {h} {when} {s}" for h, s in layer_lost)
            cells.append(
                [
                    str(layer),
                    gate or "-",
                    f"{reach['mean']:.0f} (max {reach['max']})" if reach else "-",
                    " ".join(map(str, heads)),
                    gone or "none",
                ]
            )
        head = ["layer", "mean gate", "sparse reach, tokens", "active heads", "pruned"]
        parts.append(
            f"<h3>{html.escape(title)} at step {last['step']}</h3><table><tr>"
            + "".join(f"<th>{h}</th>" for h in head)
            + "</tr>"
            + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in cells
            )
            + "</table>"
        )
    return "\n".join(parts)


def _gate(row: dict[str, Any], layer: int, branch: str) -> float | None:
    gates = row.get("attn_gate") or []
    if layer >= len(gates) or not gates[layer]:
        return None
    return gates[layer].get(branch)


def _reach(row: dict[str, Any], layer: int) -> float | None:
    reach = row.get("attn_reach") or []
    if layer >= len(reach) or not reach[layer]:
        return None
    return reach[layer]["mean"]
