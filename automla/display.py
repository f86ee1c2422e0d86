"""The live progress of a search: a rich table on a terminal, one line per event otherwise."""

from __future__ import annotations

import json
import logging
import os
import textwrap
import time
from typing import Any

import ray
from ray import tune
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from automla import report as report_mod
from automla.outcomes import Outcome, classify
from automla.schema import RATIOS, SearchConfig
from automla.trial import BUILT

# the live table's word for how a trial Tune ended came out (never stopped: see `classify`)
_SHOWN = {report_mod.COMPLETED: "done", report_mod.PRUNED: "pruned", report_mod.FAILED: "failed"}


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
        self._row(trial)["state"] = "running"
        if _restored(trial):  # a resumed search's unfinished trial, from its last checkpoint
            step = (trial.last_result or {}).get("step")
            self._event(f"resume {trial.trial_id}  from its checkpoint at step {step}")
            return
        # the values Optuna proposed, as they are: the trial's label and built config arrive
        # with its first result, one evaluation later
        self._event(f"start  {trial.trial_id}  {_proposed(trial.config)}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        row = self._row(trial)
        row["last"] = result
        if result.get(BUILT):  # an attempt's first result: the config the trial built
            row["desc"] = _describe(json.loads(result[BUILT]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self._row(trial).get("last") or {}
        self._ended(trial, classify(last, self.config.metrics, ended=True))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error: BaseException | bool = True
        try:  # the error files are still in the driver's staging folder at this point
            if trial.pickled_error_file and os.path.exists(trial.pickled_error_file):
                with open(trial.pickled_error_file, "rb") as f:
                    error = ray.cloudpickle.load(f)
        except Exception:  # cosmetic here; trials.csv records the reason from the results
            pass
        self._ended(trial, classify({}, self.config.metrics, error=error))

    def _ended(self, trial: Any, outcome: Outcome) -> None:
        row = self._row(trial)
        last = row.get("last") or {}
        row["state"] = _SHOWN[outcome.state]
        if outcome.state == report_mod.FAILED:
            row["reason"] = outcome.reason
            self._event(f"FAILED {trial.trial_id}  {outcome.reason}")
        elif outcome.state == report_mod.PRUNED:
            self._event(f"pruned {trial.trial_id}  at step {last.get('step')}")
        else:
            shown = " ".join(f"{m}={_num(last.get(m))}" for m in self.config.metrics)
            self._event(f"done   {trial.trial_id}  {shown}")

    def _row(self, trial: Any) -> dict[str, Any]:
        if trial.trial_id not in self.rows:
            self.rows[trial.trial_id] = {"desc": "", "state": "pending", "last": None}
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
        # only the config wraps: the numbers stay whole on a narrow terminal
        table.add_column("trial", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("config")
        for col in ("step", *self.config.metrics):
            table.add_column(col, justify="right", no_wrap=True)
        for tid, r in list(self.rows.items())[-14:]:
            last = r.get("last") or {}
            style = {"failed": "red", "running": "cyan", "pruned": "dim"}.get(r["state"])
            table.add_row(
                tid,
                r["state"],
                report_mod.Items(r["desc"].split(_SEP), sep=_SEP)
                if r["state"] != "failed"
                else Text(textwrap.shorten(r.get("reason", ""), 70, placeholder=" …")),
                _num(last.get("step")),
                *[_num(last.get(m)) for m in self.config.metrics],
                style=style,
            )
        return Group(head, table)


# between a trial's label and settings in the live table: a single space is also inside some
# of them (`L28 G28 S43`, `gate.hidden=[32, 32]`), and the table breaks lines only here
_SEP = "  "


def _restored(trial: Any) -> bool:
    """Whether Tune starts `trial` again from a checkpoint (it reported before and saved one)."""
    try:
        return trial.checkpoint is not None and bool(trial.last_result)
    except Exception:  # cosmetic: a Tune that keeps this elsewhere shows a plain start
        return False


def _describe(built: dict[str, Any]) -> str:
    """A trial's config in one line: its label, then its searched values (ratio shares left to
    the label)."""
    items = [f"{k}={report_mod.setting_text(v)}" for k, v in _searched(built["params"])]
    return _SEP.join([built["label"], *items])


def _proposed(params: dict[str, Any]) -> str:
    """The values Optuna proposed, less the ratios' raw simplex coordinates (their shares come
    with the built config, in the trial's label)."""
    return " ".join(f"{k}={report_mod.setting_text(v)}" for k, v in _searched(params))


def _searched(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """(short name, value) of the searched settings other than the ratios."""
    return [
        (report_mod.short_name(k), v) for k, v in params.items() if not k.startswith(RATIOS + ".")
    ]


def _num(v: Any) -> str:
    return "" if v is None else report_mod.format_value(v)


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
