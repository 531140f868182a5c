"""Each failure class is handled once (docs/reliability.md): divergence, bad data or
configuration at run time, lost infrastructure; the summary and --resume around them."""

from __future__ import annotations

import contextlib
import copy
import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mtl_tune.benchmarks.base import ConfigError, DataError
from mtl_tune.training.loop import PENALTY, failure_metrics, is_divergence, nonfinite_state, train

TOY = {"benchmark": "toy", "seed": 0, "epochs": 2, "steps_per_epoch": 20, "init": 3, "method": "ls"}


def run(config):
    rows = []
    train(config, lambda m, s: rows.append(copy.deepcopy(m)))
    return rows


# ---------------------------------------------------------------------------- class 1: divergence
@pytest.mark.parametrize("err,expected", [
    (RuntimeError("value cannot be converted to type float without overflow"), True),
    (RuntimeError("The total norm of order 2.0 for gradients from `parameters` is non-finite"), True),
    (OverflowError("math range error"), True),
    (FloatingPointError("overflow encountered in exp"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (ValueError("overflow"), False),  # a ValueError is a configuration problem, not a blow-up
])
def test_what_counts_as_divergence(err, expected):
    assert is_divergence(err) is expected


def test_overflow_runtime_error_is_divergence_with_finite_penalties(monkeypatch):
    from mtl_tune.balancers.ls import LinearScalarization as LS

    def overflow(*args, **kwargs):
        raise RuntimeError("value cannot be converted to type float without overflow")

    monkeypatch.setattr(LS, "train_step", overflow)
    rows = run(TOY)
    assert len(rows) == 1 and rows[0]["diverged"] == 1.0 and "overflow" in rows[0]["error"]
    assert rows[0]["val/loss1"] == PENALTY and rows[0]["val/pareto_distance"] == PENALTY


def test_non_finite_optimizer_state_is_found_and_named():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert nonfinite_state(model, opt) is None
    opt.state[model.bias]["exp_avg_sq"].fill_(float("inf"))
    assert nonfinite_state(model, opt) == "optimizer state exp_avg_sq (group 0, parameter 1)"
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert nonfinite_state(model, opt) == "parameter weight"


def test_inf_optimizer_state_with_finite_loss_diverges(monkeypatch):
    """A huge gradient leaves Adam's second moment inf while the loss stays finite."""
    from mtl_tune.training import loop

    original = loop.Trainer.train_epoch

    def poisoned(self):
        for state in self.optimizer.state.values():
            state["exp_avg_sq"] = torch.full_like(state["exp_avg_sq"], float("inf"))
        return original(self)

    calls = {"n": 0}

    def second_epoch_poisoned(self):
        calls["n"] += 1
        return poisoned(self) if calls["n"] == 2 else original(self)

    monkeypatch.setattr(loop.Trainer, "train_epoch", second_epoch_poisoned)
    rows = run(TOY)
    assert [r["diverged"] for r in rows] == [0.0, 1.0]
    assert "optimizer state exp_avg_sq" in rows[-1]["error"]


# ---------------------------------------------------------------------------- class 2: bad data/config
def test_failure_metrics_carry_the_error_and_finite_penalties_for_every_objective():
    out = failure_metrics({"benchmark": "nyuv2", "epochs": 3}, DataError("nyuv2: /d/train/depth/7.npy holds NaN"))
    assert out["failed"] == 1.0 and out["diverged"] == 0.0 and out["error"].startswith("DataError: nyuv2: /d/train")
    assert out["val/delta_m"] == PENALTY and out["val/seg/miou"] == -PENALTY and out["test/depth/abs_err"] == PENALTY


def test_the_trial_reports_bad_data_once_instead_of_raising(monkeypatch):
    from mtl_tune.search import trainable

    reports = []
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trainable, "_placement", lambda: {"resources/cpu": 1.0, "resources/gpu": 0.0, "node_id": "n"})
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))

    def bad_file(config, report, state):
        raise DataError("celeba: /data/img_align_celeba/000123.jpg cannot be decoded")

    monkeypatch.setattr(trainable, "train", bad_file)
    trainable.train_trial({**TOY, "benchmark": "celeba"})  # returns: Tune sees no exception, so no retry
    assert len(reports) == 1 and reports[0]["failed"] == 1.0 and "000123.jpg" in reports[0]["error"]

    def unexpected(config, report, state):
        raise KeyError("a bug")

    monkeypatch.setattr(trainable, "train", unexpected)
    with pytest.raises(KeyError):  # anything else is Tune's to retry (bounded by --max-failures)
        trainable.train_trial(TOY)


def resume_trial_from(folder: Path, monkeypatch) -> list[dict]:
    """Run the toy trainable as Tune would resume it from ``folder`` (a checkpoint directory) and
    return what it reported; training from it fails the test."""
    from mtl_tune.search import trainable

    class Checkpoint:
        @contextlib.contextmanager
        def as_directory(self):
            yield str(folder)

    reports = []
    monkeypatch.setattr(trainable.tune, "get_checkpoint", Checkpoint)
    monkeypatch.setattr(trainable, "_placement", lambda: {"resources/cpu": 1.0, "resources/gpu": 0.0, "node_id": "n"})
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(trainable, "train", lambda *args: pytest.fail("trained from an unusable checkpoint"))
    trainable.train_trial(TOY)
    return reports


def test_a_checkpoint_a_weights_only_load_refuses_fails_the_trial_once_without_running_it(monkeypatch, tmp_path):
    """Resuming from a crafted (or pre-weights-only) state.pt: nothing in it runs, the trial reports one
    failed result that says why, and Tune sees no exception (no retries of the same refusal)."""
    from mtl_tune.search import trainable

    marker = tmp_path / "ran"

    class WritesMarker:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save({"epoch": 1, "payload": WritesMarker()}, folder / trainable.STATE_FILE)
    reports = resume_trial_from(folder, monkeypatch)
    assert not marker.exists()
    assert len(reports) == 1 and reports[0]["failed"] == 1.0
    assert reports[0]["error"].startswith("UnsafeCheckpointError") and "state.pt" in reports[0]["error"]


def test_a_damaged_checkpoint_fails_the_trial_once_naming_it(monkeypatch, tmp_path):
    """A state.pt cut short (the driver killed while Ray copied it, a full disk): retrying would read
    the same bytes, so the trial reports one failed result naming the file."""
    from mtl_tune.search import trainable

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save({"epoch": 1, "model": {"w": torch.zeros(100)}}, folder / trainable.STATE_FILE)
    whole = (folder / trainable.STATE_FILE).read_bytes()
    (folder / trainable.STATE_FILE).write_bytes(whole[: len(whole) // 2])
    reports = resume_trial_from(folder, monkeypatch)
    assert len(reports) == 1 and reports[0]["failed"] == 1.0
    assert reports[0]["error"].startswith("DamagedCheckpointError") and "state.pt is damaged" in reports[0]["error"]


def test_bad_hyperparameter_at_run_time_is_a_config_error():
    with pytest.raises(ConfigError, match="task_weights"):
        run({**TOY, "hparams": {"task_weights": [1.0, 2.0, 3.0]}})


# ---------------------------------------------------------------------------- with Ray
def optuna_states(experiment: Path) -> list[str]:
    state = sorted(experiment.glob("searcher-state-*.pkl"))[-1]
    study = pickle.loads(state.read_bytes())["_ot_study"]  # OptunaSearch pickles its __dict__
    return [t.state.name for t in study.trials]


@pytest.mark.slow
def test_config_error_at_run_time_fails_once_and_the_summary_says_why(ray_local, tmp_path, capsys, monkeypatch):
    from mtl_tune.analysis import load_sweep
    from mtl_tune.search import runner
    from mtl_tune.search.cli import main

    real_prepare = runner.prepare

    def slip_past_validation(options):  # what validation cannot see: a value that only fails inside the trial
        plan = real_prepare(options)
        plan.options.config["init"] = 9
        return plan

    monkeypatch.setattr(runner, "prepare", slip_past_validation)
    code = main(["--method", "cagrad", "--num-samples", "2", "--epochs", "2", "--objective", "loss1",
                 "--max-failures", "2", "--storage-path", str(tmp_path), "--name", "c", "--verbose", "0"])
    out = capsys.readouterr().out
    assert code == 1  # nothing finished: the command fails, without a traceback
    assert "no trial finished" in out and 'trial status: {"FAILED": 2}' in out
    assert "2 trial(s): ConfigError: toy: init must be an index in [0, 4], got 9" in out
    table = load_sweep(tmp_path / "c")
    assert set(table["status"]) == {"FAILED"} and (table["failures"] == 0).all()  # ran once, never retried
    assert (table["diverged"] == 0).all() and table["error"].str.startswith("ConfigError").all()
    assert optuna_states(tmp_path / "c" / "cagrad") == ["FAIL", "FAIL"]


@pytest.mark.slow
def test_lost_worker_without_retries_is_an_error_told_as_fail(faulty_cluster, tmp_path, capsys):
    from mtl_tune.analysis import load_sweep
    from mtl_tune.search.cli import main

    code = main(["--method", "cagrad", "--num-samples", "2", "--epochs", "2", "--objective", "loss1",
                 "--config", "steps_per_epoch=30", "--max-failures", "0", "--storage-path", str(tmp_path),
                 "--name", "k", "--verbose", "0"])
    assert code == 1
    table = load_sweep(tmp_path / "k")
    assert set(table["status"]) == {"ERROR"} and (table["failures"] == 1).all()  # one failure, no restart
    assert optuna_states(tmp_path / "k" / "cagrad") == ["FAIL", "FAIL"]


# ---------------------------------------------------------------------------- --resume arguments
def stored_sweep(tmp_path: Path, **kwargs) -> Path:
    from mtl_tune.search.runner import SearchOptions

    options = SearchOptions(storage_path=str(tmp_path), name="s", **kwargs)
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "s", "args": asdict(options)}))
    return sweep


def test_resume_refuses_different_sweep_arguments(tmp_path, capsys):
    from mtl_tune.search.cli import main

    stored_sweep(tmp_path, methods=["ls", "cagrad"], num_samples=6, config={"steps_per_epoch": 30})
    code = main(["--resume", "--storage-path", str(tmp_path), "--name", "s", "--method", "ls,famo",
                 "--num-samples", "6", "--config", "steps_per_epoch=40", "--objective", "loss1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--method ['ls', 'famo'] (stored ['ls', 'cagrad'])" in err
    assert "--config {'steps_per_epoch': 40} (stored {'steps_per_epoch': 30})" in err
    assert "--objective 'loss1' (stored 'pareto')" in err and "--num-samples" not in err  # equal: fine


def test_resume_with_only_the_name_reuses_the_stored_arguments(tmp_path, capsys, monkeypatch):
    import importlib

    from mtl_tune.search.cli import main

    execute_module = importlib.import_module("mtl_tune.search.execution")

    stored_sweep(tmp_path, methods=["ls", "cagrad"], num_samples=6, sampler="nsga2", seed=3,
                 config={"steps_per_epoch": 30})
    seen = {}

    class Stop(Exception):
        pass

    def capture(plan):
        seen["options"] = plan.options
        raise Stop

    monkeypatch.setattr(execute_module, "execute", capture)
    with pytest.raises(Stop):
        main(["--resume", "--storage-path", str(tmp_path), "--name", "s", "--verbose", "0",
              "--sampler", "nsga2"])
    o = seen["options"]
    assert (o.methods, o.num_samples, o.sampler, o.seed, o.config) == (["ls", "cagrad"], 6, "nsga2", 3,
                                                                       {"steps_per_epoch": 30})
    assert o.verbose == 0 and o.resume  # run-environment flags may change on resume


def test_resume_refuses_another_concurrency_limit(tmp_path, capsys):
    """Tune restores each method's searcher with its concurrency limit: --max-concurrent 1 on --resume ran
    two trials at once, silently."""
    from mtl_tune.search.cli import main

    stored_sweep(tmp_path, methods=["ls"], num_samples=2)
    code = main(["--resume", "--storage-path", str(tmp_path), "--name", "s", "--max-concurrent", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--max-concurrent 1 differs from the stored search's" in err and len(err.splitlines()) == 1


def test_a_renamed_sweep_resumes_with_the_studies_it_created(tmp_path):
    """sweep.json records each method's study (named after the sweep when it was made); a copied or
    renamed sweep folder was refused for "missing" studies that its optuna.db holds."""
    import json

    from mtl_tune.search.runner import SearchOptions, prepare
    from mtl_tune.search.validate import previous_studies

    stored_sweep(tmp_path, methods=["ls", "cagrad"], num_samples=2)
    info = json.loads((tmp_path / "s" / "sweep.json").read_text())
    info["optuna"] = {**info.get("optuna", {}), "studies": {"ls": "old/ls", "cagrad": "old/cagrad"}}
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(info))
    assert previous_studies(tmp_path / "s") == {"ls": "old/ls", "cagrad": "old/cagrad"}
    plan = prepare(SearchOptions(methods=["ls", "cagrad"], num_samples=2, storage_path=str(tmp_path), name="s",
                                 resume=True))
    assert plan.study_name("cagrad") == "old/cagrad"
    assert prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path / "new"), name="s")).study_name("ls") == "s/ls"


def test_resume_refuses_a_sweep_whose_sweep_json_was_deleted_after_it_ran(tmp_path, capsys):
    """sweep.json is written before the first method: missing beside an experiment that ran, it was
    deleted, and resuming with whatever arguments were given (the defaults) would search other
    methods with another budget into the same folder. Missing with nothing run: a search killed
    before its first method, resumed as given."""
    from mtl_tune.search.validate import SearchError, stored_arguments

    sweep = tmp_path / "s"
    sweep.mkdir()
    assert stored_arguments(sweep) is None
    (sweep / "cagrad").mkdir()
    (sweep / "cagrad" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(SearchError, match=r"sweep\.json is missing, but the sweep holds experiments that ran \(cagrad\)"):
        stored_arguments(sweep)
    from mtl_tune.search.cli import main

    assert main(["--resume", "--storage-path", str(tmp_path), "--name", "s"]) == 2
    assert "put it back" in capsys.readouterr().err


def test_a_full_disk_stops_the_search_with_one_message_and_the_resume_command(tmp_path, capsys, monkeypatch):
    """A full disk surfaces as whatever wrote last (Ray's pyarrow copy, Optuna's SQLite, the OS) deep
    in a chain of Tune errors: exit 1 with one line that says so and how to continue; any other
    exception is not dressed up as one."""
    import errno
    import importlib
    import sqlite3

    from mtl_tune.search.cli import disk_full, main

    execution = importlib.import_module("mtl_tune.search.execution")
    assert disk_full(OSError(errno.ENOSPC, "No space left on device")) == "[Errno 28] No space left on device"
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("An exception is raised during the commit") from inner
    except RuntimeError as outer:
        assert disk_full(outer) == "database or disk is full"
    assert disk_full(OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")).endswith(
        "No space left on device")
    assert disk_full(KeyError("Record does not exist.")) is None

    def full(plan):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("Tune failed to save the experiment state") from err

    monkeypatch.setattr(execution, "execute", full)
    argv = ["--method", "ls", "--storage-path", str(tmp_path), "--name", "s"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: the disk is full ([Errno 28] No space left on device); the search stopped" in err
    assert "--name s --resume" in err

    def other(plan):
        raise KeyError("not a disk problem")

    monkeypatch.setattr(execution, "execute", other)
    with pytest.raises(KeyError, match="not a disk problem"):
        main(["--method", "ls", "--storage-path", str(tmp_path), "--name", "t"])


def _state_of(config) -> dict:
    """A real trainer state after one epoch of ``config``."""
    states = []
    train({**config, "epochs": 1}, lambda m, s: states.append(s))
    return states[-1]


@pytest.mark.parametrize("state, why", [
    (lambda: _state_of({**TOY, "benchmark": "multi_mnist", "batch_size": 64, "pairs_per_image": 1,
                        "eval_batch_size": 64}), "Error(s) in loading state_dict"),
    (lambda: _state_of({**TOY, "method": "nashmtl"}), "nashmtl"),  # another method's balancer state
    (lambda: {"epoch": 1}, "it has no 'model'"),
    (lambda: {**_state_of(TOY), "epoch": 7}, "at epoch 7, outside this run's 0…2"),
    (lambda: {**_state_of(TOY), "epoch": -5}, "at epoch -5"),
])
def test_a_checkpoint_that_does_not_fit_the_trial_fails_it_once_naming_it(monkeypatch, tmp_path, state, why):
    """A whole state.pt of another benchmark, method or configuration (or not a trainer state): the
    load failed the same way at every retry with a bare torch/KeyError, not naming the file; an epoch
    outside the run trained too long or reported nothing."""
    from mtl_tune.checkpoint import to_plain
    from mtl_tune.search import trainable

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    torch.save(to_plain(state()), folder / trainable.STATE_FILE)
    reports = []
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: _Checkpoint(folder))
    monkeypatch.setattr(trainable, "_placement", lambda: {"resources/cpu": 1.0, "resources/gpu": 0.0, "node_id": "n"})
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    trainable.train_trial(TOY)
    assert len(reports) == 1 and reports[0]["failed"] == 1.0, reports
    error = reports[0]["error"]
    assert error.startswith("MismatchedCheckpointError: state.pt of the trial's checkpoint") and why in error, error


class _Checkpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.folder)
