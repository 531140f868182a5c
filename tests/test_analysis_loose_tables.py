"""Trial tables with values the analysis used to read loosely: a declared objective without its
column, garbage in the status columns, a repeated trial, a table that is no trial table, modes
that are not min/max."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mtl_tune.analysis import completed_trials, hypervolume_mc, load_sweep, mean_rank
from mtl_tune.analysis.report import objective_of
from mtl_tune.analysis._sweep_files import SweepWarning


def _table(**extra):
    base = {"method": ["ls", "mgda", "cagrad"], "trial_id": ["a", "b", "c"], "status": ["TERMINATED"] * 3,
            "epochs": [2, 2, 2], "training_iteration": [2, 2, 2], "diverged": [0, 0, 0],
            "val/loss1": [1.0, 2.0, 3.0], "val/loss2": [3.0, 2.0, 1.0]}
    return pd.DataFrame({**base, **extra})


def test_a_declared_objective_without_its_column_is_said_not_replaced():
    meta = {"objective": {"metrics": ["val/loss1", "val/loss2"], "modes": ["min", "min"]}}
    with pytest.warns(SweepWarning, match=r"without \['val/loss1'\]"):
        assert objective_of(_table().drop(columns="val/loss1"), meta) == (["val/loss2"], ["min"])
    with pytest.raises(ValueError, match="has no column in its trials"):
        objective_of(_table().drop(columns=["val/loss1", "val/loss2"]), meta)


def test_unreadable_status_values_are_not_finished_trials():
    df = _table(diverged=[0, "yes", ""], training_iteration=[2, 2, "abc"])
    assert list(completed_trials(df)["method"]) == ["ls"]
    no_epochs = _table(epochs=[np.nan] * 3, training_iteration=[2, "abc", np.nan])
    assert list(completed_trials(no_epochs)["method"]) == ["ls", "cagrad"]  # empty: not recorded, kept


def _write_sweep(tmp_path, df):
    folder = tmp_path / "s"
    folder.mkdir()
    df.to_csv(folder / "trials.csv", index=False)
    (folder / "sweep.json").write_text(json.dumps({"name": "s", "benchmark": "toy", "methods": ["ls", "mgda"]}))
    return folder


def test_a_repeated_trial_is_read_once_and_said(tmp_path):
    df = _table()
    folder = _write_sweep(tmp_path, pd.concat([df, df.iloc[[1]]], ignore_index=True))
    with pytest.warns(SweepWarning, match=r"1 row\(s\) repeat a trial_id of their sweep \(b\)"):
        loaded = load_sweep(folder)
    assert list(loaded["trial_id"]) == ["a", "b", "c"]


def test_a_table_without_methods_is_no_trial_table(tmp_path):
    folder = _write_sweep(tmp_path, _table().drop(columns="method"))
    with pytest.raises(ValueError, match="no 'method' column"):
        load_sweep(folder)


def test_ranks_take_only_min_and_max():
    t = pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 2.0]})
    assert mean_rank(t, ["min", "MAX"]).tolist() == [1.5, 1.5]
    with pytest.raises(ValueError, match="modes must be 'min' or 'max'"):
        mean_rank(t, ["min", "maximise"])  # was ranked as min


def test_monte_carlo_hypervolume_needs_samples_and_a_finite_reference():
    y = np.array([[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        hypervolume_mc(y, ["min", "min"], [2.0, 2.0], n_samples=0)
    with pytest.raises(ValueError, match="reference point must be finite"):
        hypervolume_mc(y, ["min", "min"], [np.inf, 2.0])
    value, se = hypervolume_mc(y, ["min", "min"], [2.0, 2.0], n_samples=20_000)
    assert abs(value - 3.0) < 5 * se + 1e-12


def test_the_report_summarises_the_search_without_pooling_re_runs_and_preference_trials(tmp_path):
    """analyze pooled the --seeds re-runs and the --preferences sweep with the search: budgets looked
    unequal and fronts, hypervolumes and best trials counted trials comparison.csv leaves out."""
    from mtl_tune.analysis.report import build_report

    df = _table(phase=["search"] * 3)
    rerun = _table(phase=["seeds"] * 3, trial_id=["d", "e", "f"], **{"val/loss1": [0.1, 0.1, 0.1]})
    pref = _table(phase=["prefs"] * 3, trial_id=["g", "h", "i"], **{"val/loss2": [0.0, 0.0, 0.0]})
    folder = _write_sweep(tmp_path, pd.concat([df, rerun, pref], ignore_index=True))
    meta = json.loads((folder / "sweep.json").read_text())
    meta["objective"] = {"metrics": ["val/loss1", "val/loss2"], "modes": ["min", "min"]}
    (folder / "sweep.json").write_text(json.dumps(meta))
    blocks = build_report(load_sweep(folder), tmp_path / "out")
    text = "\n".join(str(b.content) for b in blocks)
    assert "use the 3 search trials only (3 preference-sweep trial(s), 3 seed re-run trial(s)" in text
    fronts = [b.content for b in blocks if isinstance(b.content, pd.DataFrame) and "n_trials" in b.content.columns]
    assert fronts and all(int(f["n_trials"].max()) <= 3 for f in fronts), fronts
