"""Every adapter in `automla.compat` against the installed Ray and Optuna: an upgrade that moves
a private API they reach fails here, with PrivateApiMoved naming the adapter. All but the last
test run without starting Ray."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from automla import compat
from automla.run_folder import study_url
from automla.searcher import StudyOptunaSearch


def test_a_moved_attribute_names_the_adapter():
    with pytest.raises(compat.PrivateApiMoved, match=r"compat\.trial_failures reaches"):
        compat.trial_failures(SimpleNamespace())


def test_trial_failures_of_a_result_grid():
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

    grid = ResultGrid(SimpleNamespace(trials=[]))  # where a ResultGrid keeps its analysis
    trial = Trial("f", stub=True, trial_id="t1")
    trial.run_metadata.num_failures = 2  # what Tune counts on each failure
    grid._experiment_analysis.trials = [trial]
    assert compat.trial_failures(grid) == {"t1": 2}


def test_callbacks_of_a_tuner(tmp_path: Path):
    from ray import tune

    tuner = tune.Tuner(_trainable, run_config=tune.RunConfig(storage_path=str(tmp_path)))
    callback = tune.Callback()
    compat.set_restored_callbacks(tuner, [callback])
    assert tuner._local_tuner.get_run_config().callbacks == [callback]


def test_search_state_follows_a_moved_run_folder(tmp_path: Path):
    from ray import cloudpickle
    from ray.tune.experiment import Experiment
    from ray.tune.search import SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    old = tmp_path / "old" / "ray"
    old.mkdir(parents=True)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    generator = SearchGenerator(OptunaSearch(space=space, metric="m", mode="min"))
    generator.add_configurations([Experiment("ray", _trainable, storage_path=str(old.parent))])
    generator.save_to_dir(str(old), "now")
    new = tmp_path / "new"
    shutil.move(old.parent, new)
    compat.repoint_search_state(new / "ray")
    (state_file,) = (new / "ray").glob("search_gen_state-*")
    state = cloudpickle.loads(state_file.read_bytes())
    assert state["experiment"].storage.storage_fs_path == str(new)


def test_local_cluster_address_looks_up_without_joining():
    try:
        found = compat.local_cluster_address()
    except ConnectionError:  # no cluster on this machine: the answer Ray gives for that
        return
    host, _, port = found.rpartition(":")
    assert host and port.isdigit()


def test_dashboard_url_needs_a_connected_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray from another test is up")
    with pytest.raises(Exception) as raised:
        compat.dashboard_url()
    assert not isinstance(raised.value, compat.PrivateApiMoved)


def test_token_auth_mode(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert compat.token_auth_on()  # Ray's default
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not compat.token_auth_on()


def test_token_metadata_carries_the_token():
    # Ray reads its authentication settings once per process
    code = "import json; from automla import compat; print(json.dumps(compat.token_metadata()))"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "a" * 32}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    metadata = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "a" * 32 in " ".join(metadata.values()), (
        f"compat.token_metadata sent no token in token mode: {metadata}"
    )


def test_searcher_state_round_trip(tmp_path: Path):
    """The OptunaSearch internals StudyOptunaSearch relies on: the asked trial of a Ray trial,
    the study, the saved state without the storage, reopening it, and a replayed outcome."""
    searcher = StudyOptunaSearch(
        space=_define_by_run,
        metric=["m"],
        mode=["min"],
        study_name="s",
        storage=optuna.storages.RDBStorage(study_url(tmp_path)),
    )
    searcher.suggest("t")
    asked = compat.asked_trial(searcher, "t")
    assert isinstance(asked, optuna.trial.Trial)
    assert isinstance(compat.searcher_study(searcher), optuna.Study)
    assert compat.asked_trial(searcher, "unknown") is None
    state = compat.searcher_state(searcher)
    assert state["_storage"] is None and state["_ot_study"] is None
    assert all(isinstance(v, int) for v in state["_ot_trials"].values())
    saved = pickle.dumps(searcher)
    searcher.on_trial_complete("t", {"m": 1.0, "automla_final": True})
    assert compat.asked_trial(searcher, "t") is None  # told once
    # a restored copy from before the outcome (a resumed driver) replays it
    replay = pickle.loads(saved)
    assert compat.searcher_study(replay) is None
    compat.reopen_searcher(replay, optuna.storages.RDBStorage(study_url(tmp_path)))
    assert compat.asked_trial(replay, "t").number == asked.number
    replay.on_trial_complete("t", {"automla_failure": "diverged"})
    (trial,) = optuna.load_study(study_name="s", storage=study_url(tmp_path)).trials
    assert trial.state.name == "COMPLETE" and trial.values == [1.0]
    assert "failure" not in trial.user_attrs


@pytest.mark.slow
def test_adapters_on_a_running_tune(tmp_path: Path):
    """One tiny Tune run: a trial's retry is counted, the dashboard URL is the one `ray.init`
    gave, the trial finds its working folder, and a restored tuner takes our callbacks."""
    import ray
    from ray import cloudpickle, tune

    class Seen(tune.Callback):
        def __init__(self):
            self.ended = False

        def on_experiment_end(self, trials, **info):
            self.ended = True

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    context = ray.init(include_dashboard=False, log_to_driver=False, num_cpus=1)
    try:
        assert compat.dashboard_url() == (context.dashboard_url or None)
        trainable = tune.with_parameters(_fail_once, marker=str(tmp_path / "failed"))
        tuner = tune.Tuner(
            trainable,
            run_config=tune.RunConfig(
                name="ray",
                storage_path=str(tmp_path),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
            ),
        )
        results = tuner.fit()
        assert list(compat.trial_failures(results).values()) == [1]
        # the trial's working folder, where Ray also moved its working directory
        (result,) = results
        assert result.metrics["dir"] == result.metrics["cwd"]
        restored = tune.Tuner.restore(str(tmp_path / "ray"), trainable)
        seen = Seen()
        compat.set_restored_callbacks(restored, [seen])
        restored.fit()
        assert seen.ended
    finally:
        ray.shutdown()


def _trainable(config: dict) -> None:
    from ray import tune

    tune.report({"m": 1.0})


def _fail_once(config: dict, marker: str) -> None:
    from ray import tune

    if not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("the first attempt fails")
    tune.report({"m": 1.0, "dir": str(compat.trial_working_dir()), "cwd": os.getcwd()})


def _define_by_run(trial: optuna.trial.BaseTrial) -> None:
    trial.suggest_float("x", 0.0, 1.0)
