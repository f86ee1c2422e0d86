"""The sampler and the scheduler a space file names, built for Optuna and Ray Tune."""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from ray import tune

from automla.schema import SearchConfig, SpaceError, scheduler_max_t


def make_scheduler(config: SearchConfig) -> Any:
    """ASHA on the file's scheduler metric, with trainer steps as its clock; None without one."""
    s = config.scheduler
    if s is None:
        return None
    return tune.schedulers.ASHAScheduler(
        time_attr="step",
        metric=s.metric,
        mode=s.mode,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        max_t=scheduler_max_t(config),
    )


def make_sampler(config: SearchConfig) -> Any:
    """The seeded Optuna sampler named in the file."""
    s = config.sampler
    startup = s.startup_trials
    if startup is None:
        # the samplers' defaults (10, 50) would leave a small budget entirely random
        startup = max(2, min(10, config.trials // 2))
    if s.name == "tpe":
        # group: conditional settings (MLA ones only under MLA attention) are modelled
        # within each group of trials that share a set of parameters
        with warnings.catch_warnings():  # group is experimental, and the right tool here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=s.seed,
                n_startup_trials=startup,
                multivariate=True,
                group=True,
                constant_liar=True,
            )
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(2, startup))
    if s.name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise SpaceError(
                config.source,
                "sampler.name",
                "'gp' needs scipy, which is not installed (pip install scipy)",
            ) from None
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=s.seed)
