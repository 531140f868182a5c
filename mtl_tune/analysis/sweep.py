"""Load the tidy trial table of one or many sweeps.

A sweep directory written by :mod:`mtl_tune.search` holds ``trials.csv`` (one row per
trial) and ``sweep.json`` (name, benchmark, objective, metric specs, tasks). Column
families of ``trials.csv``:

* identity: ``sweep, benchmark, method, trial_id, status, error, seed, epochs,
  training_iteration``;
* ``hp/<name>`` — balancer hyperparameters (lists such as ``task_weights`` as JSON text);
* ``<split>/<metric>`` — final reported metrics (``val/loss1``, ``test/seg/miou``,
  ``test_last10/delta_m``), ``train/loss/<task>``, ``weights/<task>``;
* bookkeeping: ``solver_failures, diverged, synthetic, time_total_s, logdir``.

When a directory has no ``trials.csv`` (e.g. a cluster run whose driver died before
writing it) the table is rebuilt from the plain-text files of the Ray Tune experiment
directories below it (``params.json``, ``result.json``, ``progress.csv``, the JSON fields
of ``experiment_state-*.json``; :mod:`mtl_tune.analysis.trial_files`) through the
search's own row builder, so both paths give the same columns. Nothing in a sweep folder
is ever unpickled by default, so opening a folder from someone else runs none of its
code. ``allow_pickle=True`` opts in to Ray's ``ExperimentAnalysis`` instead, which
unpickles Tune's state: use it only on folders you wrote yourself.

Only :func:`completed_trials` decides which trials are "finished": status
``TERMINATED``, not diverged and ``training_iteration >= epochs``. Pareto fronts and
hypervolumes use it by default, because an early-stopped (ASHA) or crashed trial reports
truncated metrics that would otherwise sit on the front
(docs/references.md#early-stopped-trials-told-as-complete).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_tune.analysis._sweep_files import SweepWarning, load_sweep_meta, read_checked_table
from mtl_tune.analysis.trial_table import trial_rows
from mtl_tune.metrics import MetricSpec

PathLike = str | Path

#: statuses written by the search (FAILED: bad data or configuration); only TERMINATED is complete.
STATUSES = ("TERMINATED", "ERROR", "FAILED", "DIVERGED", "RUNNING", "PENDING", "STOPPED_EARLY", "INCOMPLETE")
ID_COLUMNS = ("sweep", "benchmark", "method", "trial_id", "status", "error", "seed", "epochs",
              "training_iteration")
BOOKKEEPING = ("solver_failures", "diverged", "synthetic", "time_total_s", "logdir")


class SweepNotFoundError(FileNotFoundError):
    """No ``trials.csv`` and no Ray experiment under a path; the message names the path."""


#: sweep.json fields the analysis reads → the JSON type they must have (null is always allowed)

# --------------------------------------------------------------------------- loading
def load_sweep(path: PathLike | Sequence[PathLike], *, ray_fallback: bool = True,
               allow_pickle: bool = False) -> pd.DataFrame:
    """Read the trial table(s) of one or several sweeps into one DataFrame.

    ``path`` is a sweep directory, a ``trials.csv`` file, or a list of either. Each
    table keeps (or gets) a ``sweep`` column, so several sweeps concatenate cleanly; a
    ``sweep_dir`` column records where each row came from. The parsed ``sweep.json`` of
    every sweep is in ``df.attrs["sweeps"]`` (``{sweep name: meta}``).

    A sweep given twice (the same folder after resolving links and ``..``, or a folder and
    its own ``trials.csv``) is read once, with a :class:`SweepWarning`. Different folders
    whose sweeps share a name are kept apart: their rows are labelled ``"<name> (<folder>)"``
    (also a :class:`SweepWarning`), so nothing of two different sweeps is ever merged.

    Without ``trials.csv`` the table is rebuilt from the experiment folders' JSON/CSV
    files (``ray_fallback=False`` raises instead). The same happens, with a
    :class:`SweepWarning`, when ``trials.csv`` disagrees with the trial folders next to it
    (rows cut off mid-line, trials the folders hold but the table lacks). ``allow_pickle=True``
    rebuilds it with Ray's ``ExperimentAnalysis``, which unpickles Tune's state and so runs
    code from the folder: only for sweeps you wrote.

    Types are normalised: ``status`` upper-case text, ``error`` text ("" when none),
    ``diverged`` 0/1 int, ``synthetic`` bool, numeric metric columns float.
    Raises :class:`SweepNotFoundError` naming the path when nothing can be read, and
    ``ValueError`` naming the file when ``trials.csv`` or ``sweep.json`` is unreadable.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise SweepNotFoundError("load_sweep: no path given")
    loaded = []
    for p in _distinct_sources([Path(p) for p in paths]):
        df, meta = _load_one(p, ray_fallback=ray_fallback, allow_pickle=allow_pickle)
        loaded.append((_source_label(p), df, meta))
    frames, metas = [], {}
    for df, meta in _label_shared_names(loaded):
        frames.append(df)
        for name in dict.fromkeys(df["sweep"].astype(str)):
            metas[name] = meta
    out = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    if "method" not in out.columns and len(out):  # every table the search writes has one
        raise ValueError(f"{', '.join(map(str, paths))}: the trial table has no 'method' column (columns: "
                         f"{', '.join(map(str, list(out.columns)[:8]))}...); not a trials.csv written by mtl_tune")
    out = _normalise(out)
    dup = (out.duplicated(["sweep", "trial_id"]) & (out["trial_id"] != "")) if "trial_id" in out.columns \
        else pd.Series(False, index=out.index)
    if dup.any():  # one trial listed twice would count twice in every front, rank and mean
        warnings.warn(f"{int(dup.sum())} row(s) repeat a trial_id of their sweep "
                      f"({', '.join(sorted(set(out.loc[dup, 'trial_id'].astype(str)))[:5])}); kept the first of each",
                      SweepWarning, stacklevel=2)
        out = out[~dup].reset_index(drop=True)
    out.attrs["sweeps"] = metas
    return out


def _source_key(path: Path) -> Path:
    """What a path reads, resolved: the table file when there is one, else the folder (so
    ``r/k9``, ``./r/../r/k9`` and ``r/k9/trials.csv`` are one source)."""
    table = path / "trials.csv" if path.is_dir() else path
    return (table if table.is_file() else path).resolve()


def _distinct_sources(paths: list[Path]) -> list[Path]:
    """``paths`` without repeats of a source already given (each sweep is counted once)."""
    seen: dict[Path, Path] = {}
    for p in paths:
        key = _source_key(p)
        if key in seen:
            warnings.warn(f"{p}: the same sweep as {seen[key]} (given twice); read once", SweepWarning, stacklevel=3)
            continue
        seen[key] = p
    return list(seen.values())


def _source_label(path: Path) -> str:
    """How the report names where a sweep came from: its folder, or a table file not called trials.csv."""
    return str(path.parent if path.is_file() and path.name == "trials.csv" else path)


def _label_shared_names(loaded: list[tuple[str, pd.DataFrame, dict[str, Any]]]
                        ) -> list[tuple[pd.DataFrame, dict[str, Any]]]:
    """Relabel sweeps whose name comes from more than one source as ``"<name> (<source>)"``:
    two runs reusing a --name are different sweeps and must not be pooled into one."""
    sources: dict[str, list[str]] = {}
    for label, df, _ in loaded:
        for name in dict.fromkeys(df["sweep"].astype(str)):
            sources.setdefault(name, []).append(label)
    shared = {name: labels for name, labels in sources.items() if len(labels) > 1}
    for name, labels in shared.items():
        warnings.warn(f"sweep name {name!r} is used by {len(labels)} folders ({', '.join(labels)}); kept apart as "
                      + ", ".join(repr(f"{name} ({label})") for label in labels), SweepWarning, stacklevel=3)
    out = []
    for label, df, meta in loaded:
        names = df["sweep"].astype(str)
        if names.isin(list(shared)).any():
            df = df.copy()
            df["sweep"] = names.where(~names.isin(list(shared)), names + f" ({label})")
        out.append((df, meta))
    return out


def _load_one(path: Path, *, ray_fallback: bool, allow_pickle: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    if not path.exists():
        raise SweepNotFoundError(f"sweep path {str(path)!r} does not exist")
    csv_file = path if path.is_file() else path / "trials.csv"
    folder = path.parent if path.is_file() else path
    meta = load_sweep_meta(path)
    if csv_file.is_file():
        if csv_file.stat().st_size == 0:
            raise SweepNotFoundError(f"{str(csv_file)!r} is empty")
        df = read_checked_table(csv_file, folder, meta,
                                lambda f: trials_from_ray(f) if allow_pickle else trials_from_folder(f))
    elif ray_fallback and path.is_dir():
        df = trials_from_ray(path) if allow_pickle else trials_from_folder(path)
    else:
        raise SweepNotFoundError(f"no trials.csv in {str(path)!r}")
    name = meta.get("name") or folder.name
    if "sweep" not in df.columns:
        df.insert(0, "sweep", name)
    else:
        df["sweep"] = df["sweep"].astype(object).where(df["sweep"].notna(), name)
    if "benchmark" not in df.columns and meta.get("benchmark"):
        df.insert(1, "benchmark", meta["benchmark"])
    df["sweep_dir"] = str(folder)
    return df, meta


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "status" in df.columns:
        df["status"] = df["status"].astype(object).fillna("").astype(str).str.upper()
    if "error" in df.columns:
        df["error"] = df["error"].astype(object).where(df["error"].notna(), "").astype(str)
    else:
        df["error"] = ""
    if "diverged" in df.columns:
        df["diverged"] = pd.to_numeric(df["diverged"], errors="coerce").fillna(0).astype(int)
    if "synthetic" in df.columns:
        df["synthetic"] = df["synthetic"].map(_to_bool).astype(bool)
    for col in ("method", "benchmark", "sweep", "trial_id"):
        if col in df.columns:
            df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
    return df


def _to_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "t", "1.0")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(v)


# --------------------------------------------------------------------------- Ray fallback
def trials_from_folder(root: PathLike) -> pd.DataFrame:
    """Rebuild the ``trials.csv`` table from the JSON/CSV files of the Tune experiments under
    ``root`` (never unpickling anything; :mod:`mtl_tune.analysis.trial_files`)."""
    from mtl_tune.analysis.trial_files import trials_from_files

    root = Path(root)
    meta = load_sweep_meta(root)
    df = trials_from_files(root, str(meta.get("name") or root.name), len(meta.get("tasks") or []))
    if df.empty:
        raise SweepNotFoundError(f"no trials.csv and no Ray Tune trial (params.json / experiment_state-*.json) "
                                 f"under {str(root)!r}")
    return df


def find_ray_experiments(root: PathLike, max_depth: int = 3) -> list[Path]:
    """Directories at most ``max_depth`` below ``root`` holding ``experiment_state-*.json``."""
    root = Path(root)
    found: list[Path] = []
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in frontier:
            if any(d.glob("experiment_state-*.json")):
                found.append(d)  # a trial dir never holds another experiment
                continue
            nxt.extend(sorted(c for c in d.iterdir() if c.is_dir()))
        frontier = nxt
    return found


def trials_from_ray(root: PathLike) -> pd.DataFrame:
    """Rebuild the ``trials.csv`` table from the Ray experiment(s) under ``root`` with Ray's reader.

    UNSAFE for folders you did not write: ``ExperimentAnalysis`` unpickles Tune's state,
    which can run arbitrary code. :func:`load_sweep` uses it only with ``allow_pickle=True``.

    The search keeps one Tune experiment per method (``<sweep>/<method>/``); each one
    found is read offline with the search's own row builder
    (:func:`mtl_tune.analysis.trial_table.trial_rows`, ``ExperimentAnalysis`` underneath), so
    the rebuilt table has exactly the columns and status rules (``DIVERGED``,
    ``STOPPED_EARLY``) of a ``trials.csv`` written at the end of a sweep.
    """
    root = Path(root)
    experiments = find_ray_experiments(root)
    if not experiments:
        raise SweepNotFoundError(f"no trials.csv and no Ray Tune experiment (experiment_state-*.json) under {str(root)!r}")
    meta = load_sweep_meta(root)
    name = str(meta.get("name") or root.name)
    n_tasks = len(meta.get("tasks") or [])  # 0 → simplex draws stay raw (trial_rows falls back)
    rows: list[dict[str, Any]] = []
    for exp in experiments:
        rows.extend(trial_rows(exp, name, n_tasks))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- selection
def completed_trials(df: pd.DataFrame, include_incomplete: bool = False) -> pd.DataFrame:
    """Trials that finished their requested epochs normally (the default Pareto/HV input).

    Kept: ``status == "TERMINATED"`` and ``diverged != 1`` and
    ``training_iteration >= epochs``. A condition whose column is absent (or whose ``epochs`` is
    empty) is not applied; a value that is not a number where one is expected (``diverged=yes``,
    ``training_iteration=abc``) does not count as finished.
    ``include_incomplete=True`` returns ``df`` unchanged (e.g. to show ASHA-stopped trials).
    """
    if include_incomplete:
        return df
    keep = pd.Series(True, index=df.index)
    if "status" in df.columns:
        keep &= df["status"].astype(str).str.upper() == "TERMINATED"
    if "diverged" in df.columns:  # empty: not recorded (kept); a value that is no number: not a finished trial
        raw = df["diverged"]
        flag = pd.to_numeric(raw, errors="coerce")
        unreadable = flag.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        keep &= ~unreadable & (flag.fillna(0) < 0.5)
    if "training_iteration" in df.columns and "epochs" in df.columns:
        it = pd.to_numeric(df["training_iteration"], errors="coerce")
        ep = pd.to_numeric(df["epochs"], errors="coerce")
        keep &= (ep.isna() & (it.notna() | df["training_iteration"].isna())) | (it >= ep)
    return df[keep]


def hp_columns(df: pd.DataFrame) -> list[str]:
    """The ``hp/<name>`` columns, in table order."""
    return [c for c in df.columns if c.startswith("hp/")]


def metric_columns(df: pd.DataFrame, split: str | None = None) -> list[str]:
    """Numeric ``<split>/<metric>`` columns (not ``hp/``, ``train/``, ``weights/``)."""
    skip = ("hp/", "train/", "weights/")
    cols = [c for c in df.columns if "/" in c and not c.startswith(skip) and pd.api.types.is_numeric_dtype(df[c])]
    return [c for c in cols if split is None or c.split("/", 1)[0] == split]


def expand_list_hps(df: pd.DataFrame) -> pd.DataFrame:
    """Replace each JSON-list hyperparameter column (``hp/task_weights`` = ``"[0.5, 1.5]"``)
    by one numeric column per component (``hp/task_weights[0]``, ``hp/task_weights[1]``), so
    list-valued hyperparameters can be plotted and compared like scalars. Other columns are kept."""
    out = df.copy()
    for col in hp_columns(df):
        decoded = df[col].map(decode_hp)
        lists = decoded[decoded.map(lambda v: isinstance(v, list))]
        if lists.empty or not lists.map(lambda v: all(isinstance(x, (int, float)) for x in v)).all():
            continue
        width = int(lists.map(len).max())
        pos = out.columns.get_loc(col)
        out = out.drop(columns=col)
        for i in range(width):
            values = decoded.map(lambda v, i=i: float(v[i]) if isinstance(v, list) and i < len(v) else float("nan"))
            out.insert(pos + i, f"{col}[{i}]", values)
    return out


def decode_hp(value: Any) -> Any:
    """Decode a JSON-text hyperparameter (``"[1.0, 2.0]"``) into its Python value."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def metric_specs(meta: dict[str, Any]) -> list[MetricSpec]:
    """``sweep.json``'s ``metric_specs`` as :class:`MetricSpec` objects."""
    return [MetricSpec(name=s["name"], task=s["task"], higher_is_better=bool(s["higher_is_better"]),
                       baseline=s.get("baseline"), primary=bool(s.get("primary", False)))
            for s in meta.get("metric_specs", [])]


def sweep_objective(meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(metric keys, modes) of the sweep's search objective from ``sweep.json``."""
    obj = meta.get("objective") or {}
    metrics, modes = list(obj.get("metrics", [])), list(obj.get("modes", []))
    if len(metrics) != len(modes):
        raise ValueError(f"sweep.json objective has {len(metrics)} metrics but {len(modes)} modes")
    return metrics, modes


def sweep_meta_of(df: pd.DataFrame, sweep: str | None = None) -> dict[str, Any]:
    """The ``sweep.json`` of ``sweep`` (default: the only/first sweep) attached by :func:`load_sweep`."""
    metas: dict[str, Any] = df.attrs.get("sweeps", {}) or {}
    if not metas:
        return {}
    if sweep is None:
        return next(iter(metas.values()))
    return metas.get(sweep, {})


def iter_sweeps(df: pd.DataFrame) -> Iterable[tuple[str, pd.DataFrame, dict[str, Any]]]:
    """(name, rows, meta) for every sweep in a table loaded by :func:`load_sweep`."""
    names = list(dict.fromkeys(df["sweep"])) if "sweep" in df.columns else [""]
    for name in names:
        part = df[df["sweep"] == name] if "sweep" in df.columns else df
        yield name, part, sweep_meta_of(df, name)
