"""Reading a run folder wherever it lies, and surviving its damaged files.

A run folder is the user's artefact: copied or moved, it still reports, exports and resumes.
So nothing in it names where it was written: the Optuna study is found as `study.db` beside
the files, and trial folders are recorded relative to the run folder. `trials.json` that is
missing, cut short or of the wrong shape raises RunError naming the file and the way out;
`rebuild_trials` recovers what the study and Ray's per-trial results still hold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TRIALS_FILE = "trials.json"
STUDY_FILE = "study.db"
_RECORD_KEYS = {"trial_id": str, "state": str, "metrics": dict, "params": dict}


class DamagedTrials(ValueError):
    """trials.json cannot be used; `problem` says why."""

    def __init__(self, path: Path, problem: str, way: str | None = None):
        self.path = path
        self.problem = problem
        run = path.parent
        if way is None and (run / STUDY_FILE).is_file():
            way = f"`automla report {run}` rebuilds it from {STUDY_FILE}"
        elif way is None:
            way = f"there is no {STUDY_FILE} to rebuild it from: run the search again"
        super().__init__(f"{path}: {problem}; {way}")


def study_url(run_dir: str | Path) -> str:
    """The SQLite URL of the run's Optuna study, absolute: usable from any directory."""
    return f"sqlite:///{Path(run_dir).resolve() / STUDY_FILE}"


def study_name(run_dir: str | Path) -> str:
    """The name of the one study in the run's study.db (the folder's name when it was made,
    which a moved or renamed folder no longer has)."""
    import optuna

    names = optuna.study.get_all_study_names(study_url(run_dir))
    if len(names) != 1:
        raise ValueError(f"{Path(run_dir) / STUDY_FILE}: expected one study, found {len(names)}")
    return names[0]


def relative_trial_path(run_dir: Path, path: str | Path | None) -> str | None:
    """A trial folder as recorded in trials.json: relative to the run folder when inside it."""
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:  # outside the run folder (a caller's own storage): kept as it is
        return str(path)


def trial_dir(run_dir: str | Path, record: dict[str, Any]) -> Path | None:
    """The trial's Ray folder: recorded relative to the run folder, or (runs written before
    that) absolute, in which case a moved run folder still holds it under ray/."""
    path = record.get("path")
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        return Path(run_dir) / p
    if p.exists():
        return p
    return Path(run_dir) / "ray" / p.name


def read_trials(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of trials.json; DamagedTrials when it is missing, empty, cut short or not a
    list of trial records."""
    path = Path(run_dir) / TRIALS_FILE
    if not path.is_file():
        raise DamagedTrials(path, "missing (the search did not finish writing its results)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedTrials(path, f"cannot be read ({e})") from None
    if not text.strip():
        raise DamagedTrials(path, "empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedTrials(
            path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(data, list):
        raise DamagedTrials(path, f"expected a list of trial records, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DamagedTrials(path, f"record {i} is a {type(record).__name__}, not a mapping")
        for key, kind in _RECORD_KEYS.items():
            if not isinstance(record.get(key), kind):
                raise DamagedTrials(
                    path, f"record {i} has no {key} ({kind.__name__}); not a trials file"
                )
    return data


def rebuild_trials(run_dir: str | Path, config: Any) -> list[dict[str, Any]]:
    """Trial records from the study (state, searched values, objectives, failure) and each
    trial's last result in Ray's folder (every metric), for a run whose trials.json is
    unusable; the damaged file is kept as trials.json.damaged and a new one written."""
    import optuna
    from optuna.trial import TrialState

    from automla import report
    from automla.metrics import known_metrics
    from automla.space import apply, decode, flat_values, trial_label
    from automla.trainers.config import ConfigError, to_dict

    run = Path(run_dir)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name(run), storage=study_url(run))
        trials = study.get_trials(deepcopy=False)
    except Exception as e:  # sqlite's and optuna's errors for a damaged or foreign file
        raise DamagedTrials(
            run / TRIALS_FILE,
            f"unusable, and {run / STUDY_FILE} cannot be read either "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
            "run the search again",
        ) from None
    finally:
        optuna.logging.set_verbosity(level)
    states = {
        TrialState.COMPLETE: report.COMPLETED,
        TrialState.PRUNED: report.PRUNED,
        TrialState.FAIL: report.FAILED,
    }
    records = []
    for t in trials:
        trial_id = str(t.user_attrs.get("ray_trial_id") or f"optuna-{t.number}")
        record: dict[str, Any] = {
            "trial_id": trial_id,
            "optuna_trial": t.number,
            "state": states.get(t.state, report.STOPPED),
            "reason": str(t.user_attrs.get("failure", "")),
            "failure": str(t.user_attrs.get("failure", "")) if t.state == TrialState.FAIL else "",
            "retries": 0,
            "node_ip": "",
            "node_id": "",
            "label": "",
            "params": dict(t.params),
            "metrics": {},
            "config": None,
            "finished": t.datetime_complete.timestamp() if t.datetime_complete else None,
            "path": None,
            "rebuilt": True,
        }
        try:
            trial_config = apply(config.fixed, decode(config.space, t.params, config.fixed))
            record["config"] = to_dict(trial_config)
            record["params"] = flat_values(trial_config, config.space)
            record["label"] = trial_label(trial_config)
        except (ConfigError, ValueError, KeyError):
            pass  # the raw Optuna parameters stay
        folder = run / "ray" / f"trial_{trial_id}"
        last = _last_result(folder / "result.json")
        if last:
            record["path"] = f"ray/trial_{trial_id}"
            record["metrics"] = {k: last[k] for k in known_metrics(last)}
            record["node_ip"], record["node_id"] = last.get("node_ip", ""), last.get("node_id", "")
        elif t.values is not None:
            record["metrics"] = dict(zip(config.metrics, t.values))
        records.append(record)
    damaged = run / TRIALS_FILE
    if damaged.exists():
        shutil.move(damaged, run / f"{TRIALS_FILE}.damaged")
    damaged.write_text(json.dumps(records, indent=1) + "\n")
    return records


def _last_result(path: Path) -> dict[str, Any]:
    """The last whole line of a Ray result.json ({} when there is none)."""
    if not path.is_file():
        return {}
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:  # cut short by a killed driver
            continue
        if isinstance(result, dict):
            return result
    return {}
