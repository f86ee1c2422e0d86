"""The OptunaSearch of a run: records every trial's outcome in the run folder's study."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import optuna
from ray.tune.search.optuna import OptunaSearch

from automla import report as report_mod
from automla.run_folder import study_url
from automla.trial import FAILURE, FINAL


class StudyOptunaSearch(OptunaSearch):
    """OptunaSearch that records every trial's outcome in the study: a failed trial, or one that
    reported a NaN or no objective, is told FAIL (the stock searcher leaves it RUNNING when
    Optuna rejects the values), an early-stopped one PRUNED; the Ray trial id is kept as a
    user attribute.

    Its saved state names no path: the storage, the study and the trials are reopened from the
    run folder's study.db when Tune restores it (see `study_in`), so a copied or moved run
    folder resumes (and never writes into the study of the folder it was copied from)."""

    study_dir: ClassVar[Path | None] = None
    """The run folder whose study.db a restored searcher opens, set around `tuner.fit()`."""

    @classmethod
    @contextlib.contextmanager
    def study_in(cls, run_dir: Path) -> Iterator[None]:
        cls.study_dir = run_dir
        try:
            yield
        finally:
            cls.study_dir = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        # trial ids stand for the trials (already ids in a copy not reopened yet)
        state["_ot_trials"] = {k: getattr(t, "_trial_id", t) for k, t in self._ot_trials.items()}
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._reopen()

    def _reopen(self) -> None:
        if self._ot_study is not None:
            return
        if self.study_dir is None:
            raise RuntimeError("a restored search needs its run folder: use resume_search")
        self._storage = optuna.storages.RDBStorage(study_url(self.study_dir))
        self._ot_study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler
        )
        self._ot_trials = {
            k: optuna.trial.Trial(self._ot_study, t) if isinstance(t, int) else t
            for k, t in self._ot_trials.items()
        }

    def suggest(self, trial_id: str) -> dict | None:
        self._reopen()
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._reopen()
        ot_trial = self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)
        # a resumed driver may replay a trial its predecessor already told the study
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():
            return
        result = result or {}
        values = [result.get(m) for m in self._metric]
        if error or result.get(FAILURE):
            ot_trial.set_user_attr("failure", result.get(FAILURE) or "error")
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif not result.get(FINAL, True):
            # stopped early by the scheduler: its metrics are those of a shorter run
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        elif all(report_mod.finite_number(v) for v in values):
            self._ot_study.tell(ot_trial, values, state=TrialState.COMPLETE)
        else:
            ot_trial.set_user_attr("failure", f"objectives {values}")
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
