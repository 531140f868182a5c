"""The tidy per-trial table (``trials.csv``) and the sweep description (``sweep.json``).

One row per trial, built by :func:`trial_row` from plain values — by the search from Tune's
experiment state of its own folders (:func:`build_table`), by the analysis from the JSON
files of any folder (:mod:`mtl_tune.analysis.trial_files`) — so both give the same columns.
It belongs to the analysis layer: the search writes the table through it, the analysis
reads it back with :func:`mtl_tune.analysis.load_sweep`.

The search's table is rebuilt from Tune's experiment state (never by globbing trial folders: a
restore can leave orphan folders; docs/references.md#restore-needs-an-importable-search-space) and
written atomically (temp file +
rename), so a crash mid-write leaves the previous good copy, with the permissions a plain
``open()`` would give (0o666 less the umask), so the other users of a shared storage path can read it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_tune.spaces import decode_hparams

TABLE = "trials.csv"
SWEEP = "sweep.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (/proc on Linux):
    setting it to read it back, as ``os.umask`` forces, briefly affects other threads' files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename, with the permissions a plain
    ``open(path, "w")`` would give (0o666 less the umask): mkstemp creates 0o600, which would
    hide the tables from the other users of a shared storage path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sweep_json(sweep_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(sweep_dir / SWEEP, json.dumps(info, indent=2, default=str))


def error_text(trial_dir: str | Path | None) -> str:
    """The last line of a trial's ``error.txt`` (plain text written by Tune), "" when none."""
    if trial_dir and (Path(trial_dir) / "error.txt").is_file():
        text = _ANSI.sub("", (Path(trial_dir) / "error.txt").read_text(errors="replace")).strip()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1][:500] if lines else text[:500]
    return ""


def _whole(value: Any) -> int | None:
    """A reported count (a float in Tune's results) as an int; None when absent or not a number."""
    try:
        return int(value) if value is not None and float(value) == int(value) else None
    except (TypeError, ValueError, OverflowError):
        return None


def _status(status: str, last: dict[str, Any]) -> str:
    if last.get("failed"):
        return "FAILED"  # bad data or configuration: the trial ran once and reported its error
    if last.get("diverged"):
        return "DIVERGED"
    if status == "TERMINATED" and last and float(last.get("epoch", 0)) < float(last.get("epochs", 0)):
        return "STOPPED_EARLY"
    return status


def trial_row(sweep: str, n_tasks: int, *, trial_id: str, status: str, config: dict[str, Any],
              last: dict[str, Any], trial_dir: str | Path | None, failures: int = 0) -> dict[str, Any]:
    """One row of the tidy table from plain values (a trial's config, last result and folder).

    Shared by the search (which reads Tune's experiment state) and by the analysis, which
    rebuilds the same row from the JSON files of a trial folder alone.
    """
    row: dict[str, Any] = {
        "sweep": sweep, "benchmark": config.get("benchmark"), "method": config.get("method"),
        "trial_id": trial_id, "status": _status(status, last),
        "error": last.get("error") or error_text(trial_dir) if status == "ERROR" or last.get("error") else "",
        # the trainer reports the epochs it runs: the column is filled when the sweep used the benchmark's default
        "seed": config.get("seed"),
        "epochs": config.get("epochs") if config.get("epochs") is not None else _whole(last.get("epochs")),
        "training_iteration": last.get("training_iteration", 0),
        # times the trial's worker failed (class 3: each restart follows one); 0 for classes 1 and 2
        "failures": failures,
    }
    try:
        hparams = decode_hparams(config.get("hparams"), n_tasks)
    except ValueError:
        hparams = dict(config.get("hparams") or {})
    for key, value in sorted(hparams.items()):
        row[f"hp/{key}"] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    for key, value in last.items():
        if "/" in key and isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("config/"):
            row[key] = value
    for key in ("solver_failures", "diverged", "synthetic", "time_total_s", "resumed_from_epoch"):
        row[key] = last.get(key, 0.0 if key != "time_total_s" else math.nan)
    row["synthetic"] = bool(row["synthetic"]) or bool(config.get("synthetic", False))
    # data-parallel workers of the trial (--workers-per-trial); results written before the flag: 1
    row["workers"] = int(last.get("workers", config.get("workers_per_trial", 1)) or 1)
    row["node_id"] = last.get("node_id", "")
    row["data_source"] = last.get("data_source", "")
    row["data_root"] = config.get("data_root") or ""  # resolved once on the driver
    row["logdir"] = str(trial_dir or "")
    return row


def trial_rows(experiment_dir: Path, sweep: str, n_tasks: int) -> list[dict[str, Any]]:
    """One row per trial of one Tune experiment folder (one method) that this search wrote.

    ``ExperimentAnalysis`` unpickles parts of the experiment state, so only the search
    itself calls this on its own folders; :mod:`mtl_tune.analysis` rebuilds tables of
    folders from elsewhere from their JSON files (:mod:`mtl_tune.analysis.trial_files`).
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    return [trial_row(sweep, n_tasks, trial_id=trial.trial_id, status=str(trial.status), config=dict(trial.config),
                      last=dict(trial.last_result or {}),
                      trial_dir=getattr(trial, "path", None) or getattr(trial, "local_path", None),
                      failures=int(getattr(trial, "num_failures", 0) or 0))
            for trial in analysis.trials]


#: experiment-folder suffix → phase: the Optuna search, seed re-runs, preference sweep
PHASES = {"": "search", ".seeds": "seeds", ".prefs": "prefs"}


def build_table(sweep_dir: Path, methods: Iterable[str], sweep: str, n_tasks: int,
                rows_of: Callable[[Path], list[dict[str, Any]]] | None = None) -> pd.DataFrame:
    """The tidy table of every experiment (methods × phases), sorted by method and phase; ``rows_of``
    reads one experiment's rows (default: :func:`trial_rows`)."""
    rows_of = rows_of or (lambda exp: trial_rows(exp, sweep, n_tasks))
    rows: list[dict[str, Any]] = []
    for method in methods:
        for suffix, phase in PHASES.items():
            exp = sweep_dir / f"{method}{suffix}"
            if exp.is_dir() and any(exp.glob("experiment_state-*.json")):
                rows.extend({**row, "phase": phase} for row in rows_of(exp))
    frame = pd.DataFrame(rows)
    if not frame.empty:
        order = {p: i for i, p in enumerate(PHASES.values())}
        frame = frame.sort_values(["method", "phase", "trial_id"], key=lambda c: c.map(order) if c.name == "phase"
                                  else c, kind="stable").reset_index(drop=True)
    return frame


def write_table(frame: pd.DataFrame, sweep_dir: Path, name: str = TABLE) -> Path:
    path = sweep_dir / name
    atomic_write_text(path, frame.to_csv(index=False))
    return path
