"""The Optuna study of a search lives in a real storage (SQLite in the sweep folder by
default, any RDB URL or a journal file), survives Tune's searcher checkpoint, and holds
every trial with the state the search told it."""

import json
import os

import pytest

optuna = pytest.importorskip("optuna")

from mtl_tune.search.runner import SearchError, SearchOptions, check_optuna_storage, prepare  # noqa: E402
from mtl_tune.search.searcher import (  # noqa: E402
    MTLOptunaSearch,
    default_storage_url,
    make_sampler,
    make_storage,
    public_storage_url,
)


def _searcher(spec=None):
    from ray import tune

    kwargs = {"study_name": "sw/ls", "storage": make_storage(spec)} if spec else {}
    s = MTLOptunaSearch(space={"c": tune.uniform(0.0, 1.0)}, metric=["val/a", "val/b"], mode=["min", "max"],
                        sampler=make_sampler("tpe", 0, 2, 8), **kwargs)
    s.set_search_properties(None, None, {})
    return s


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_study_survives_the_searcher_checkpoint_and_keeps_every_state(tmp_path, kind):
    spec = f"sqlite:///{tmp_path / 'o.db'}" if kind == "sqlite" else str(tmp_path / "journal.log")
    searcher = _searcher(spec)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val/a": 1.0, "val/b": 2.0, "epoch": 2, "epochs": 2})
    searcher.suggest("t2")
    searcher.suggest("late")
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune does for --resume: pickles the searcher
    searcher.on_trial_complete("late", {"val/a": 0.9, "val/b": 2.5, "epoch": 2, "epochs": 2})  # told after it
    searcher.suggest("lost")  # asked after the checkpoint, then the driver is killed
    restored = _searcher()  # a fresh in-memory one, as Tuner.restore builds it
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t2", {"val/a": 0.5, "val/b": 3.0, "epoch": 1, "epochs": 2})  # truncated
    restored.on_trial_complete("late", {"val/a": 0.1, "val/b": 9.0, "epoch": 2, "epochs": 2})  # Tune re-ran it
    restored.suggest("t3")
    restored.on_trial_complete("t3", None, error=True)
    restored.suggest("t4")
    restored.on_trial_complete("t4", {"val/a": 0.2, "val/b": 5.0, "epoch": 2, "epochs": 2})
    # read back through a new connection, as optuna-dashboard would
    study = optuna.load_study(study_name="sw/ls", storage=make_storage(spec))
    got = [(t.user_attrs["tune_trial_id"], t.state.name, t.values) for t in study.trials]
    # no zombie RUNNING trial; the trial told before the kill keeps its first values
    assert got == [("t1", "COMPLETE", [1.0, 2.0]), ("t2", "PRUNED", None), ("late", "COMPLETE", [0.9, 2.5]),
                   ("lost", "FAIL", None), ("t3", "FAIL", None), ("t4", "COMPLETE", [0.2, 5.0])]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]


def test_storage_flag_validation(tmp_path):
    assert default_storage_url(tmp_path / "sw") == f"sqlite:///{(tmp_path / 'sw').resolve()}/optuna.db"
    assert check_optuna_storage("postgresql://u:pw@db/x") == "postgresql://u:pw@db/x"
    assert public_storage_url("postgresql://u:pw@db/x") == "postgresql://u:***@db/x"
    assert check_optuna_storage(str(tmp_path / "j.log")) == str(tmp_path / "j.log")
    with pytest.raises(SearchError, match="is a folder"):
        check_optuna_storage(str(tmp_path))
    with pytest.raises(SearchError, match="does not exist or is not writable"):
        check_optuna_storage(str(tmp_path / "no" / "j.log"))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert check_optuna_storage("sqlite:///rel.db") == f"sqlite:///{tmp_path.resolve()}/rel.db"
    finally:
        os.chdir(cwd)
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path), name="p"))
    assert plan.optuna_storage == default_storage_url(tmp_path / "p") and plan.study_name("ls") == "p/ls"


@pytest.mark.slow
def test_search_writes_its_studies_to_sqlite_in_the_sweep_folder(ray_local, tmp_path, capsys):
    from mtl_tune.analysis import load_sweep
    from mtl_tune.search.cli import main

    code = main(["--method", "ls,cagrad", "--num-samples", "2", "--epochs", "1", "--config", "steps_per_epoch=50",
                 "--storage-path", str(tmp_path), "--name", "st", "--verbose", "0"])
    out = capsys.readouterr().out
    assert code == 0
    url = f"sqlite:///{(tmp_path / 'st' / 'optuna.db').resolve()}"
    assert f"optuna-dashboard {url}" in out
    meta = json.loads((tmp_path / "st" / "sweep.json").read_text())
    assert meta["optuna"] == {"storage": url, "studies": {"ls": "st/ls", "cagrad": "st/cagrad"}}
    assert sorted(optuna.get_all_study_names(url)) == ["st/cagrad", "st/ls"]
    table = load_sweep(tmp_path / "st")
    for method in ("ls", "cagrad"):
        study = optuna.load_study(study_name=f"st/{method}", storage=url)
        rows = table[table["method"] == method].set_index("trial_id")
        stored = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
        assert set(stored) == set(rows.index)  # every trial, once
        for trial_id, t in stored.items():
            assert rows.loc[trial_id, "status"] == "TERMINATED" and t.state.name == "COMPLETE"
            assert t.values == pytest.approx([rows.loc[trial_id, "val/loss1"], rows.loc[trial_id, "val/loss2"]])


def test_resume_keeps_the_storage_recorded_in_sweep_json(tmp_path):
    sweep = tmp_path / "r"
    sweep.mkdir()
    journal = str(tmp_path / "studies.journal")
    (sweep / "sweep.json").write_text(json.dumps({"optuna": {"storage": journal}}))
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path), name="r", resume=True))
    assert plan.optuna_storage == journal
    (sweep / "sweep.json").write_text(json.dumps({"optuna": {"storage": "postgresql://u:***@db/x"}}))
    with pytest.raises(SearchError, match="pass that URL again with --optuna-storage"):
        prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path), name="r", resume=True))
