"""Every place automla reaches into Ray's or Optuna's private APIs, where no public one serves.

Each function names, in its docstring, what private thing it reads or writes and why no public
API does the job. When an upgrade moves one, the function raises `PrivateApiMoved` naming
itself and what it looked for, rather than an AttributeError deep inside a search;
`tests/test_compat.py` calls each against the installed libraries, so the upgrade fails there
first.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class PrivateApiMoved(RuntimeError):
    """A private Ray or Optuna API this module reaches is not where it was."""


def _reaches(what: str) -> Callable[[F], F]:
    """Turn a missing attribute, key or module under `what` into PrivateApiMoved."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (AttributeError, ImportError, KeyError) as e:
                raise PrivateApiMoved(
                    f"automla.compat.{fn.__name__} reaches {what}, which the installed "
                    f"{_versions()} no longer has ({type(e).__name__}: {e}); update the "
                    "adapter for this version"
                ) from e

        return call  # type: ignore[return-value]

    return wrap


def _versions() -> str:
    import optuna
    import ray

    return f"Ray {ray.__version__} / Optuna {optuna.__version__}"


# --- Ray Tune -------------------------------------------------------------------------------


@_reaches("ResultGrid._experiment_analysis.trials[].num_failures")
def trial_failures(results: Any) -> dict[str, int]:
    """Ray trial id -> how many times the trial failed (each failure but the last of a failed
    trial was followed by a retry).

    A `ResultGrid`'s public `Result`s carry the metrics, the error and the folder of a trial,
    but not its failure count; only the Trial objects inside its private experiment analysis do.
    """
    return {t.trial_id: int(t.num_failures) for t in results._experiment_analysis.trials}


@_reaches("Tuner._local_tuner.get_run_config().callbacks")
def set_restored_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """Give a restored Tuner these callbacks.

    `Tuner.restore` brings back the callbacks Tune pickled with the experiment (our live display
    without its console) and takes no `run_config`; the run config of a restored tuner is only
    reachable on its private local tuner.
    """
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks  # noqa: B018 - a moved attribute must fail here, not be created
    run_config.callbacks = list(callbacks)


@_reaches("the search generator state file 'search_gen_state-*' ['experiment'].storage")
def repoint_search_state(experiment_dir: Path) -> None:
    """Point the saved search generator's storage at where the run folder lies now.

    Ray Tune (2.60) restores moved trials into the new folder, but its search generator comes
    back with the Experiment it pickled, storage path included: trials proposed after the resume
    of a moved run folder would write into the old one (or fail where it is gone). No public API
    relocates it; the state file and its layout are Tune's own.
    """
    from ray import cloudpickle

    run_dir = str(experiment_dir.parent)
    for path in experiment_dir.glob("search_gen_state-*"):
        state = cloudpickle.loads(path.read_bytes())
        storage = state["experiment"].storage
        if storage.storage_fs_path != run_dir:
            storage.storage_fs_path = run_dir
            path.write_bytes(cloudpickle.dumps(state))


@_reaches("ray.train._internal.session.get_session().storage.trial_working_directory")
def trial_working_dir() -> Path:
    """The calling Tune trial's working folder: the one `SyncConfig(sync_artifacts=True)`
    brings home from whichever node the trial runs on.

    `tune.get_context().get_trial_dir()` is not a stable answer in Ray 2.60: in an actor
    started for the trial it is the driver's staging folder (driver_artifacts/<trial>), in an
    actor reused from another trial (`reuse_actors`) this working folder (working_dirs/<trial>).
    A trial whose retry runs in the other kind of actor than its first attempt writes two run
    folders, each synced over the same one in the run folder: the last synced wins. The
    session's storage context names the working folder either way; no public API does.
    """
    from ray.train._internal.session import get_session

    return Path(get_session().storage.trial_working_directory)


# --- Ray start-up and the cluster probe ---------------------------------------------------


@_reaches("ray._private.worker.get_dashboard_url")
def dashboard_url() -> str | None:
    """HOST:PORT of the dashboard of the Ray this process is connected to (None or empty
    without one).

    `ray.init` returns it to whoever starts or joins Ray; a caller that connected before us
    (a notebook, the tests) has nothing public to ask, and calling `ray.init` again would reset
    Ray's logger and signal handler.
    """
    import ray._private.worker

    return ray._private.worker.get_dashboard_url() or None


@_reaches("ray._private.services.canonicalize_bootstrap_address_or_die")
def local_cluster_address() -> str:
    """The GCS address of the Ray cluster running on this machine (`--address auto`); raises
    ConnectionError when there is none.

    `ray.init(address="auto")` finds it the same way but then connects (and retries for
    minutes); nothing public only looks it up.
    """
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die("auto")


def token_metadata() -> tuple[tuple[str, str], ...]:
    """The gRPC metadata Ray's own clients send when token authentication is on (empty when it
    is off, or in a Ray older than token authentication).

    Reaches `ray._private.authentication` (its token check and gRPC metadata): Ray offers no
    public client helper for its token, and the probe of a cluster before `ray.init` must send
    it as Ray's clients do. Test: `test_compat.py` checks the helpers load in the installed Ray.
    """
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )
    except ImportError:  # an older Ray without token authentication
        return ()
    return _get_authentication_metadata_tuple() if is_token_auth_enabled() else ()


def token_auth_on() -> bool:
    """Whether a local Ray started now protects its dashboard with a token (its default).

    Reaches `ray._private.authentication.authentication_token_setup.AUTH_MODE_ENV_VAR`: the
    name of the variable Ray reads is a private constant; reading it through Ray keeps this
    check in step with Ray. False in a Ray older than token authentication.
    """
    try:
        from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR
    except ImportError:
        return False
    return os.environ.get(AUTH_MODE_ENV_VAR, "token").lower() == "token"


# --- Ray's OptunaSearch ----------------------------------------------------------------------
# StudyOptunaSearch keeps its study in the run folder and tells Optuna every outcome itself;
# OptunaSearch exposes neither the Optuna trial it asked for a Ray trial nor its study.


@_reaches("OptunaSearch._ot_trials / _completed_trials")
def asked_trial(searcher: Any, trial_id: str) -> Any:
    """The Optuna trial the searcher asked for Ray trial `trial_id`; None when it asked none or
    has already been told its outcome."""
    if trial_id in searcher._completed_trials:
        return None
    return searcher._ot_trials.get(trial_id)


@_reaches("OptunaSearch._completed_trials")
def mark_told(searcher: Any, trial_id: str) -> None:
    """Record on the searcher that Ray trial `trial_id`'s outcome was told to the study."""
    searcher._completed_trials.add(trial_id)


@_reaches("OptunaSearch._ot_study")
def searcher_study(searcher: Any) -> Any:
    """The searcher's Optuna study (None in a restored copy not reopened yet)."""
    return searcher._ot_study


@_reaches("OptunaSearch.__dict__ ('_storage', '_ot_study', '_ot_trials') and Trial._trial_id")
def searcher_state(searcher: Any) -> dict[str, Any]:
    """The searcher's saved state without its storage and study (they hold the path of the
    study) and with each asked trial saved as its storage id (Optuna trials hold the study).

    OptunaSearch pickles its whole `__dict__`; which fields hold the study is its own business.
    """
    state = dict(searcher.__dict__)
    for key in ("_storage", "_ot_study"):
        if key not in state:
            raise KeyError(key)
        state[key] = None
    # ids stand for the trials (already ids in a copy not reopened yet)
    state["_ot_trials"] = {
        k: t if isinstance(t, int) else t._trial_id for k, t in state["_ot_trials"].items()
    }
    return state


@_reaches("OptunaSearch._storage / _ot_study / _ot_trials / _study_name / _sampler")
def reopen_searcher(searcher: Any, storage: Any) -> None:
    """Reopen a restored searcher's study on `storage` (the run folder's study.db) and turn the
    saved trial ids back into Optuna trials."""
    import optuna

    searcher._storage = storage
    study = optuna.load_study(
        study_name=searcher._study_name, storage=storage, sampler=searcher._sampler
    )
    searcher._ot_study = study
    searcher._ot_trials = {
        k: optuna.trial.Trial(study, t) if isinstance(t, int) else t
        for k, t in searcher._ot_trials.items()
    }
