"""Every sampler and scheduler the CLI offers runs a real (tiny) search, is interrupted
after its first finished trial and completes through ``--resume`` (the searcher, with its
Optuna sampler, is pickled into Tune's state and loaded back)."""

from __future__ import annotations

import os
import pickle
import signal

import pytest

from mtl_tune.search.searcher import SAMPLERS

SCHEDULERS = ("fifo", "asha", "hyperband")
#: (sampler, scheduler, objective): every sampler and every scheduler at least once
CASES = [("tpe", "asha", "loss1"), ("random", "hyperband", "loss1"), ("nsga2", "fifo", "pareto")]


def test_the_cases_cover_every_choice_of_the_cli():
    from mtl_tune.search.cli import build_parser

    choices = {a.dest: set(a.choices) for a in build_parser()._actions if a.choices}
    assert choices["sampler"] == set(SAMPLERS) == {c[0] for c in CASES}
    assert choices["scheduler"] == set(SCHEDULERS) == {c[1] for c in CASES}


def test_nsga2_sampler_survives_pickling_with_its_study():
    import optuna

    from mtl_tune.search.searcher import make_sampler

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler("nsga2", 0, 2, 16))
    for _ in range(6):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        study.tell(trial, [x, 1 - x])
    restored = pickle.loads(pickle.dumps(study))
    trial = restored.ask()
    assert 0 <= trial.suggest_float("x", 0, 1) <= 1 and len(restored.trials) == 7


def interrupting_callbacks(marker):
    """Stands in for ``execute.callbacks``: SIGINT after the first finished trial, once —
    Tune saves its state and returns, as when a user presses Ctrl+C. Tune pickles the
    callbacks into tuner.pkl and restores them on resume, hence a marker file, not a flag."""
    from ray.tune import Callback

    class Interrupt(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGINT)

    return lambda plan: [Interrupt()]


@pytest.mark.slow
@pytest.mark.parametrize("sampler,scheduler,objective", CASES)
def test_search_interrupted_and_resumed(ray_local_module, tmp_path, capsys, monkeypatch, sampler, scheduler, objective):
    from mtl_tune.analysis import load_sweep
    from mtl_tune.search.cli import main

    marker = tmp_path / "interrupted"
    import importlib

    # the module behind the function mtl_tune.search.execute
    monkeypatch.setattr(importlib.import_module("mtl_tune.search.execution"), "callbacks",
                        interrupting_callbacks(str(marker)))
    args = ["--method", "cagrad", "--num-samples", "4", "--epochs", "2", "--config", "steps_per_epoch=100",
            "--sampler", sampler, "--scheduler", scheduler, "--objective", objective, "--verbose", "0"]
    where = ["--storage-path", str(tmp_path), "--name", "s"]
    main(args + where)
    assert marker.exists()
    first = load_sweep(tmp_path / "s")
    assert len(first[first["status"].isin(["TERMINATED", "STOPPED_EARLY"])]) < 4  # really interrupted
    capsys.readouterr()

    code = main(where + ["--resume", "--verbose", "0"])  # the stored arguments are reused
    out = capsys.readouterr().out
    assert code == 0, out
    table = load_sweep(tmp_path / "s")
    assert len(table) == 4 and table["trial_id"].is_unique
    assert set(table["status"]) <= {"TERMINATED", "STOPPED_EARLY"}
    state = sorted((tmp_path / "s" / "cagrad").glob("searcher-state-*.pkl"))[-1]
    study = pickle.loads(state.read_bytes())["_ot_study"]
    states = [t.state.name for t in study.trials]
    assert len(states) == 4 and set(states) <= ({"COMPLETE", "PRUNED"} if scheduler != "fifo" else {"COMPLETE"})
    assert type(study.sampler).__name__ == {"tpe": "TPESampler", "random": "RandomSampler",
                                            "nsga2": "PicklableNSGAIISampler"}[sampler]


def signal_on_first_result(marker, signum):
    """Stands in for ``execute.callbacks``: ``signum`` to the driver at the first reported epoch, once —
    every trial of the method has started, so Tune's run ends with none of them finished."""
    from ray.tune import Callback

    class Stop(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signum)

    return lambda plan: [Stop()]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_trials_run_stops_the_whole_search(ray_local_module, tmp_path, capsys, monkeypatch,
                                                              signum):
    """Ctrl+C (or SIGTERM from kill, timeout, Slurm) while a method's trials run: Tune's own Ctrl+C handler
    ended the run with the running trials counted TERMINATED, so the next method started and the methods
    were ranked, exit 0 (SIGTERM: Ray's handler aborted the driver, exit 134, no table). Now the search
    stops after that run with exit 128 + the signal, no later method and no comparison; --resume
    finishes every trial."""
    import importlib

    from mtl_tune.analysis import load_sweep
    from mtl_tune.search.cli import main

    monkeypatch.setattr(importlib.import_module("mtl_tune.search.execution"), "callbacks",
                        signal_on_first_result(str(tmp_path / "signalled"), signum))
    where = ["--storage-path", str(tmp_path), "--name", "s"]
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = main(["--method", "ls,cagrad", "--num-samples", "1", "--epochs", "3", "--config", "steps_per_epoch=300",
                 "--verbose", "0"] + where)
    out = capsys.readouterr().out
    assert code == 128 + signum, out
    assert "interrupted (" in out and "no method comparison" in out and "--resume" in out
    assert not (tmp_path / "s" / "cagrad").exists() and not (tmp_path / "s" / "comparison.csv").exists()
    first = load_sweep(tmp_path / "s")
    assert list(first["method"]) == ["ls"] and (first["status"] != "TERMINATED").all()
    assert {s: signal.getsignal(s) for s in before} == before and "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ

    assert main(where + ["--resume", "--verbose", "0"]) == 0
    table = load_sweep(tmp_path / "s")
    assert sorted(table["method"]) == ["cagrad", "ls"] and (table["status"] == "TERMINATED").all()
    assert (table["training_iteration"] == 3).all()
