"""Faults during a search: a killed trial worker, and trials that diverge."""

import json
import pickle
from pathlib import Path

import pytest
import yaml

from mtl_tune.analysis import load_sweep
from mtl_tune.search.cli import main


@pytest.mark.slow
def test_killed_worker_restarts_from_its_checkpoint(faulty_cluster, tmp_path, capsys):
    code = main(["--method", "ls", "--num-samples", "2", "--epochs", "3", "--config", "steps_per_epoch=100",
                 "--max-failures", "1", "--storage-path", str(tmp_path), "--name", "f", "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    assert len(list(faulty_cluster.iterdir())) == 2  # both workers were really killed once
    table = load_sweep(tmp_path / "f")
    assert set(table["status"]) == {"TERMINATED"} and (table["training_iteration"] == 3).all()
    assert (table["resumed_from_epoch"] == 1.0).all()  # continued after epoch 1, not restarted from scratch
    assert (table["failures"] == 1).all()  # failure class 3: one lost worker each, one restart each
    state = sorted((tmp_path / "f" / "ls").glob("searcher-state-*.pkl"))[-1]
    assert [t.state.name for t in pickle.loads(state.read_bytes())["_ot_study"].trials] == ["COMPLETE"] * 2
    for logdir in table["logdir"]:
        results = [json.loads(line) for line in (Path(logdir) / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in results][-2:] == [2.0, 3.0]


@pytest.mark.slow
def test_diverging_trials_are_recorded_and_the_search_goes_on(ray_local, tmp_path, capsys):
    # FAMO needs every loss above min_losses; from init 3 the toy's losses are negative, so min_losses = 0 fails at step 1
    space = tmp_path / "famo_bad.yaml"
    space.write_text(yaml.safe_dump({"method": "famo", "params": {
        "gamma": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True, "default": 1e-3},
        "min_losses": {"type": "categorical", "choices": [[0.0, 0.0]], "default": [0.0, 0.0]}}}))
    code = main(["--method", "famo", "--search-space", str(space), "--num-samples", "3", "--epochs", "2",
                 "--config", "steps_per_epoch=50", "--config", "init=3", "--objective", "pareto_distance",
                 "--storage-path", str(tmp_path), "--name", "d", "--verbose", "0"])
    out = capsys.readouterr().out
    assert code == 1  # no trial finished (all diverged): the summary says why and the command fails
    assert 'trial status: {"DIVERGED": 3}' in out
    table = load_sweep(tmp_path / "d")
    assert len(table) == 3 and set(table["status"]) == {"DIVERGED"}
    assert table["error"].str.contains("min_losses").all() and (table["diverged"] == 1).all()
    assert (table["val/pareto_distance"] == 1e6).all()  # a finite penalty the sampler can learn from
    assert "DIVERGED" in out
    # no zombie RUNNING trial in the Optuna study
    # (docs/references.md#a-non-finite-objective-leaves-a-running-optuna-trial)
    state = sorted((tmp_path / "d" / "famo").glob("searcher-state-*.pkl"))[-1]
    study = pickle.loads(state.read_bytes())["_ot_study"]  # OptunaSearch pickles its __dict__
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(v == 1e6 for t in study.trials for v in t.values)
