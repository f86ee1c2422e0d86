"""The OptunaSearch of a run: records every trial's outcome in the run folder's study."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import optuna
from ray.tune.search.optuna import OptunaSearch

from automla import compat
from automla import report as report_mod
from automla.outcomes import classify
from automla.run_folder import study_url
from automla.trial import FAILURE


class StudyOptunaSearch(OptunaSearch):
    """OptunaSearch that records every trial's outcome in the study (see `outcomes.classify`):
    a failed trial, or one that reported a NaN or no objective, is told FAIL (the stock searcher
    leaves it RUNNING when Optuna rejects the values), an early-stopped one PRUNED; the Ray
    trial id is kept as a user attribute.

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
        return compat.searcher_state(self)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._reopen()

    def _reopen(self) -> None:
        if compat.searcher_study(self) is not None:
            return
        if self.study_dir is None:
            raise RuntimeError("a restored search needs its run folder: use resume_search")
        compat.reopen_searcher(self, optuna.storages.RDBStorage(study_url(self.study_dir)))

    def suggest(self, trial_id: str) -> dict | None:
        self._reopen()
        params = super().suggest(trial_id)
        asked = compat.asked_trial(self, trial_id)
        if asked is not None:
            asked.set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        from optuna.trial import TrialState

        if compat.asked_trial(self, trial_id) is None:
            return
        self._reopen()
        ot_trial, study = compat.asked_trial(self, trial_id), compat.searcher_study(self)
        compat.mark_told(self, trial_id)
        result = result or {}
        outcome = classify(result, self.metric, error=error, ended=True)
        if outcome.state == report_mod.FAILED:
            failure = result.get(FAILURE) or "error"
            if outcome.failure == "no_result":
                failure = f"objectives {[result.get(m) for m in self.metric]}"
            try:
                ot_trial.set_user_attr("failure", failure)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # a resumed driver replays a trial its predecessor already told
            study.tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
        elif outcome.state == report_mod.PRUNED:
            # stopped early by the scheduler: its metrics are those of a shorter run
            study.tell(ot_trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            values = [result[m] for m in self.metric]
            study.tell(ot_trial, values, state=TrialState.COMPLETE, skip_if_finished=True)
