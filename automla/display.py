"""The live progress of a search: a rich table on a terminal, one line per event otherwise."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray
from ray import tune
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from automla import report as report_mod
from automla.outcomes import error_reason
from automla.schema import RATIOS, SearchConfig
from automla.space import apply, decode, flat_values, trial_label
from automla.trial import FAILURE, FINAL


class Progress(tune.Callback):
    """Live progress: a rich table on a terminal, one line per event otherwise."""

    def __init__(
        self, console: Console, config: SearchConfig, name: str, started: float, log: logging.Logger
    ):
        self.console = console
        self.config = config
        self.name = name
        self.started = started
        self.log = log
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = (
            Live(
                console=console, refresh_per_second=2, get_renderable=self._render, transient=False
            )
            if console.is_terminal
            else None
        )

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the display does not travel.
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "live", "log")}

    def __enter__(self) -> Progress:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.stop()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = "running"
        self._event(f"start  {trial.trial_id}  {row['desc']}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._row(trial)["last"] = result

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        last = row.get("last") or {}
        if last.get(FAILURE):
            row["state"], row["reason"] = "failed", last.get("reason", "")
            self._event(f"FAILED {trial.trial_id}  {row['reason']}")
        elif not last.get(FINAL, True):
            row["state"] = "pruned"
            self._event(f"pruned {trial.trial_id}  at step {last.get('step')}")
        else:
            row["state"] = "done"
            shown = " ".join(f"{m}={_num(last.get(m))}" for m in self.config.metrics)
            self._event(f"done   {trial.trial_id}  {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = "failed"
        reason = ""
        try:  # the error files are still in the driver's staging folder at this point
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as f:
                    reason = error_reason(ray.cloudpickle.load(f))
        except Exception:  # cosmetic here; trials.csv records the reason from the results
            pass
        row["reason"] = reason
        self._event(f"FAILED {trial.trial_id}  {reason}")

    def _row(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self.rows:
            desc = ""
            try:
                fixed = self.config.fixed
                cfg = apply(fixed, decode(self.config.space, trial.config, fixed))
                values = flat_values(cfg, self.config.space)
                desc = " ".join(
                    [trial_label(cfg)]
                    + [
                        f"{report_mod.short_name(k)}={v}"
                        for k, v in values.items()
                        if not k.startswith(RATIOS + ".")
                    ]
                )
            except Exception as e:  # shown as failed by the trial itself
                desc = f"(invalid: {e})"
            self.rows[trial.trial_id] = {"desc": desc, "state": "pending", "last": None}
        return self.rows[trial.trial_id]

    def _event(self, text: str) -> None:
        self.log.info(text)
        if not self.live:
            # markup off: a failure's text may hold "[/path...]", which rich would parse as a tag
            stamp = f"[{duration(time.time() - self.started)}]"
            self.console.print(f"{stamp} {text}", highlight=False, markup=False)

    def _render(self) -> Group:
        states = [r["state"] for r in self.rows.values()]
        done, failed = states.count("done"), states.count("failed")
        running, pruned = states.count("running"), states.count("pruned")
        head = Text(
            f"search {self.name} · {done + failed + pruned}/{self.config.trials} finished "
            f"({done} completed, {pruned} pruned, {failed} failed, {running} running) · "
            f"{duration(time.time() - self.started)}"
        )
        table = Table(box=None, pad_edge=False)
        for col in ("trial", "state", "config", "step", *self.config.metrics):
            table.add_column(
                col, justify="right" if col not in ("trial", "state", "config") else "left"
            )
        for tid, r in list(self.rows.items())[-14:]:
            last = r.get("last") or {}
            style = {"failed": "red", "running": "cyan", "pruned": "dim"}.get(r["state"])
            table.add_row(
                tid,
                r["state"],
                Text(r["desc"] if r["state"] != "failed" else r.get("reason", "")[:70]),
                _num(last.get("step")),
                *[_num(last.get(m)) for m in self.config.metrics],
                style=style,
            )
        return Group(head, table)


def _num(v: Any) -> str:
    return "" if v is None else report_mod.format_value(v)


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
