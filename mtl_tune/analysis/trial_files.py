"""Rebuild a sweep's trial table from the plain-text files Ray Tune writes — never unpickling.

A sweep folder can come from anyone (a colleague, a cluster, a download). Ray's own
readers (``ExperimentAnalysis``, ``Tuner.restore``) unpickle parts of the experiment
state, so opening a crafted folder with them runs its code. This module reads only:

* ``experiment_state-*.json`` with :func:`json.loads`, keeping plain fields (trial id,
  status, folder name) and never decoding the hex-encoded pickles inside it;
* per trial folder: ``params.json`` (the config), the last line of ``result.json``
  (else the last row of ``progress.csv``) and ``error.txt``.

``params.pkl``, ``*.pkl`` searcher/tuner state and checkpoints are never opened. The
rows come from the search's own row builder (:func:`mtl_tune.analysis.trial_table.trial_row`),
so the columns match a ``trials.csv`` written at the end of a sweep.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_tune.analysis.trial_table import PHASES as _ALL_PHASES
from mtl_tune.analysis.trial_table import trial_row

#: experiment-folder suffix → phase, for the suffixed phases (a folder without one is the search)
PHASES = {suffix: phase for suffix, phase in _ALL_PHASES.items() if suffix}


def is_experiment_dir(path: Path) -> bool:
    """A Tune experiment folder: it holds an experiment state file or trial folders."""
    return any(path.glob("experiment_state-*.json")) or any(c.is_dir() and (c / "params.json").is_file()
                                                             for c in path.iterdir())


def find_experiments(root: Path, max_depth: int = 3) -> list[Path]:
    """Experiment folders at most ``max_depth`` below ``root`` (a trial folder holds none)."""
    found: list[Path] = []
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in frontier:
            if is_experiment_dir(d):
                found.append(d)
                continue
            nxt.extend(sorted(c for c in d.iterdir() if c.is_dir() and not c.is_symlink()))
        frontier = nxt
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def state_trials(experiment: Path) -> dict[str, dict[str, str]]:
    """``{trial_id: {"status", "dir"}}`` from the newest experiment state (plain JSON fields only)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    data = _read_json(states[-1]) if states else None
    out: dict[str, dict[str, str]] = {}
    entries = data.get("trial_data", []) if isinstance(data, dict) else []
    for entry in entries if isinstance(entries, list) else []:
        try:
            trial = json.loads(entry[0])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if not isinstance(trial, dict):
            continue
        trial_id, status = trial.get("trial_id"), trial.get("status")
        folder = trial.get("relative_logdir") or trial.get("custom_dirname")
        if isinstance(trial_id, str) and isinstance(status, str) and isinstance(folder, str) and "/" not in folder:
            out[trial_id] = {"status": status, "dir": folder}
    return out


def last_result(trial_dir: Path) -> dict[str, Any]:
    """The last complete report of a trial: ``result.json``'s last JSON line, else ``progress.csv``."""
    lines = (trial_dir / "result.json").read_text(errors="replace").splitlines() \
        if (trial_dir / "result.json").is_file() else []
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write
        if isinstance(value, dict):
            return value
    progress = trial_dir / "progress.csv"
    if progress.is_file():
        with open(progress, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            return {k: _number(v) for k, v in rows[-1].items() if k}
    return {}


def _number(text: str | None) -> Any:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return text


def _inferred_status(trial_dir: Path, config: dict[str, Any], last: dict[str, Any]) -> str:
    """Status when no experiment state names it: error file, else finished epochs, else INCOMPLETE."""
    if (trial_dir / "error.txt").is_file():
        return "ERROR"
    epochs = config.get("epochs") or last.get("epochs")
    done = last.get("done") is True
    if done or (epochs is not None and float(last.get("training_iteration") or 0) >= float(epochs)):
        return "TERMINATED"
    return "INCOMPLETE"


def experiment_trial_ids(experiment: Path) -> set[str]:
    """The trial ids :func:`experiment_rows` would give, cheaply: from the experiment state
    when there is one (no trial file opened), else from each trial folder's last result."""
    known = state_trials(experiment)
    if known:
        return set(known)
    return {str(last_result(c).get("trial_id") or c.name.rsplit("_", 1)[-1])
            for c in sorted(experiment.iterdir()) if (c / "params.json").is_file()}


def experiment_rows(experiment: Path, sweep: str, n_tasks: int) -> list[dict[str, Any]]:
    """One row per trial of one experiment folder, from JSON/CSV files only."""
    phase = next((p for suffix, p in PHASES.items() if experiment.name.endswith(suffix)), "search")
    known = state_trials(experiment)
    if known:  # the state lists the trials; a restore can leave orphan folders, which it does not name
        listed = [(tid, experiment / info["dir"], info["status"]) for tid, info in known.items()]
    else:
        listed = [(None, c, None) for c in sorted(experiment.iterdir()) if (c / "params.json").is_file()]
    rows = []
    for trial_id, trial_dir, status in listed:
        params = _read_json(trial_dir / "params.json")
        last = last_result(trial_dir) if trial_dir.is_dir() else {}
        config = params if isinstance(params, dict) else dict(last.get("config") or {})
        trial_id = trial_id or str(last.get("trial_id") or trial_dir.name.rsplit("_", 1)[-1])
        status = status or _inferred_status(trial_dir, config, last)
        row = trial_row(sweep, n_tasks, trial_id=trial_id, status=status, config=config, last=last,
                        trial_dir=trial_dir)
        rows.append({**row, "phase": phase})
    return rows


def trials_from_files(root: Path, sweep: str, n_tasks: int) -> pd.DataFrame:
    """The tidy table of every experiment under ``root``, from JSON/CSV files only (empty if none)."""
    rows: list[dict[str, Any]] = []
    for experiment in find_experiments(root):
        rows.extend(experiment_rows(experiment, sweep, n_tasks))
    return pd.DataFrame(rows)
