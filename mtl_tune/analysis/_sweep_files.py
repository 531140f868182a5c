"""The files of a sweep folder, read with checks: ``sweep.json`` (valid JSON, the fields the analysis
reads of the right type) and ``trials.csv`` (rows cut off mid-line, trials of the folder missing
from it: then the table is rebuilt from the trial folders, and a :class:`SweepWarning` says so).
Every error names the file. Used by :mod:`mtl_tune.analysis.sweep`."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

PathLike = str | Path

class SweepWarning(UserWarning):
    """A sweep was read differently from how it was given or written (a path given twice, two
    folders sharing a sweep name, a cut-off ``trials.csv``); the message names the path."""


META_TYPES: dict[str, type] = {"name": str, "benchmark": str, "methods": list, "objective": dict,
                               "metric_specs": list, "tasks": list, "args": dict}


def load_sweep_meta(path: PathLike) -> dict[str, Any]:
    """The parsed ``sweep.json`` of a sweep directory ({} when the file is absent).

    Raises ``ValueError`` naming the file when it is not valid JSON, not an object, or a
    field the analysis reads has the wrong type (``args`` a list, …)."""
    p = Path(path)
    p = p.parent if p.is_file() else p
    meta_file = p / "sweep.json"
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError: a cut or binary file
        raise ValueError(f"{meta_file}: not valid JSON ({' '.join(str(err).split())})") from None
    _check_meta(meta, meta_file)
    return meta


def _check_meta(meta: Any, meta_file: Path) -> None:
    """Refuse a sweep.json whose shape the analysis would trip over later, far from the file."""
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: must hold a JSON object, got {_json_kind(type(meta))}")
    for key, kind in META_TYPES.items():
        value = meta.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{meta_file}: field {key!r} must be a JSON {_json_kind(kind)}, "
                             f"got {_json_kind(type(value))}")
    config = (meta.get("args") or {}).get("config")
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{meta_file}: field 'args.config' must be a JSON object, got {_json_kind(type(config))}")
    if any(not isinstance(s, dict) for s in meta.get("metric_specs") or []):
        raise ValueError(f"{meta_file}: every entry of 'metric_specs' must be a JSON object")


def _json_kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(kind, kind.__name__)


# --------------------------------------------------------------------------- a cut trials.csv
def read_checked_table(table: Path, folder: Path, meta: dict[str, Any],
                       rebuild: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    """``trials.csv``, unless it is cut off or lacks trials that the experiment folders of the
    sweep's methods hold: then the table rebuilt from those folders (a :class:`SweepWarning`
    says which and why). Cut rows with no folders to rebuild from are dropped, with a warning."""
    header, records = csv_records(table)
    short = [i for i, row in enumerate(records) if len(row) < len(header)]
    experiments = sweep_experiments(folder, meta)
    id_col = header.index("trial_id") if "trial_id" in header else None
    listed = {row[id_col] for row in records if id_col is not None and len(row) > id_col}
    missing = _trial_ids(experiments) - listed if id_col is not None else set()
    problems = ([f"{len(short)} row(s) have fewer fields than the header (cut off mid-line?)"] if short else []) + \
        ([f"{len(missing)} trial(s) of the folder are missing from it"] if missing else [])
    if problems and experiments:
        warnings.warn(f"{table}: {'; '.join(problems)}; rebuilt the table from the trial folders under {folder}",
                      SweepWarning, stacklevel=4)
        rebuilt = rebuild(folder)
        # what the search's own table holds: the methods it ran, not stray experiments next to them
        return rebuilt[rebuilt["method"].isin(meta["methods"])].reset_index(drop=True)
    if short:
        warnings.warn(f"{table}: {problems[0]}; dropped them (no trial folders to rebuild the table from)",
                      SweepWarning, stacklevel=4)
        return read_csv(table, _without(header, records, short))
    return read_csv(table)


def sweep_experiments(folder: Path, meta: dict[str, Any]) -> list[Path]:
    """The Tune experiment folders the search keeps for the methods of ``sweep.json``
    (``<folder>/<method>``, ``<method>.seeds``, ``<method>.prefs``; what its ``trials.csv`` is
    built from). Only those exact folders are looked at, never a walk: a ``trials.csv`` given
    from a shared folder such as /tmp must not pick up unrelated experiments."""
    from mtl_tune.analysis.trial_files import is_experiment_dir
    from mtl_tune.analysis.trial_table import PHASES as ALL_PHASES

    methods = [m for m in meta.get("methods") or [] if isinstance(m, str) and m not in ("", ".", "..")
               and "/" not in m]
    candidates = [folder / f"{m}{suffix}" for m in methods for suffix in ALL_PHASES]
    return [exp for exp in candidates if exp.is_dir() and is_experiment_dir(exp)]


def _trial_ids(experiments: list[Path]) -> set[str]:
    from mtl_tune.analysis.trial_files import experiment_trial_ids

    return set().union(*(experiment_trial_ids(exp) for exp in experiments))


def csv_records(table: Path) -> tuple[list[str], list[list[str]]]:
    """Header and non-blank records of a CSV file as text (blank lines are skipped, as pandas does)."""
    try:
        with open(table, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
    except (ValueError, csv.Error) as err:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{table}: not a readable CSV table ({' '.join(str(err).split())})") from None
    return (rows[0], rows[1:]) if rows else ([], [])


def _without(header: list[str], records: list[list[str]], drop: list[int]) -> str:
    """CSV text of the records but those at positions ``drop``."""
    skip = set(drop)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(row for i, row in enumerate(records) if i not in skip)
    return buf.getvalue()


def read_csv(table: Path, text: str | None = None) -> pd.DataFrame:
    # keep_default_na=False would turn empty metrics into "" strings; read normally and
    # fix the text columns in _normalise instead.
    try:
        return pd.read_csv(io.StringIO(text) if text is not None else table, low_memory=False)
    except ValueError as err:  # ParserError, EmptyDataError, UnicodeDecodeError
        raise ValueError(f"{table}: not a readable CSV table ({' '.join(str(err).split())})") from None
