"""Ray start-up for a search: start a local Ray or join a cluster, print where its dashboard
is, and keep Ray's and Optuna's log lines out of the live display.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import ray
from rich.console import Console

from automla import compat
from automla.run_folder import study_url

# Ray's INFO lines would tear through the live table.
_RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


def start_ray(address: str | None, run_name: str) -> Any:
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # the run's name labels the driver job in the dashboard and in `ray list jobs`
    job = ray.job_config.JobConfig(metadata={"automla_run": run_name})
    if address:
        return ray.init(
            address=address, log_to_driver=False, logging_level=logging.WARNING, job_config=job
        )
    # A new local cluster keeps Ray's default: token authentication on (~/.ray/auth_token).
    # None: the dashboard starts wherever its packages are installed (ray[default]); where
    # they are not, the search runs without it rather than failing
    return ray.init(
        include_dashboard=None,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
        job_config=job,
    )


def print_banner(console: Console, run_dir: Path, url: str | None, address: str | None) -> None:
    rel = os.path.relpath(run_dir)
    where = f"joined {address}" if address else "local Ray"
    if url:
        console.print(f"[bold]Ray dashboard[/] ({where}): {url}")
        if compat.token_auth_on():
            console.print(
                "  token-protected: run `ray get-auth-token` (or read ~/.ray/auth_token) and "
                "paste it when the page asks; API clients send "
                "`Authorization: Bearer <token>`"
            )
    else:
        console.print(f"[yellow]Ray dashboard not available[/] ({where})")
    console.print(
        f"[bold]Optuna dashboard[/]: automla dashboard {rel}  "
        f"(or: optuna-dashboard {study_url(run_dir)})"
    )
    console.print(f"[bold]Run folder[/]: {rel}")


def _not_attention_stats(record: logging.LogRecord) -> bool:
    """Tune's TensorBoard logger takes scalars and arrays; the per-layer attention statistics
    (`attn_gate`, `attn_reach`: lists of dicts) are for the report, and its warning that it
    cannot log them would only alarm."""
    return "(ray/tune/attn_" not in record.getMessage()


_TBX_LOGGER = "ray.tune.logger.tensorboardx"


@contextlib.contextmanager
def ray_output_to(log: logging.Logger) -> Iterator[None]:
    """Send Ray's and Optuna's log lines to search.log while the live display runs, and use
    Tune's quiet legacy output (the new engine prints every trial's error block)."""
    ray_log = logging.getLogger("ray")
    saved = ray_log.handlers[:]
    ray_log.handlers = log.handlers[:]
    logging.getLogger(_TBX_LOGGER).addFilter(_not_attention_stats)
    env = {
        "RAY_AIR_NEW_OUTPUT": "0",
        # a failed trial's last result carries no objectives; trial_records checks them instead
        "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        ray_log.handlers = saved
        logging.getLogger(_TBX_LOGGER).removeFilter(_not_attention_stats)
        optuna.logging.set_verbosity(optuna_level)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
