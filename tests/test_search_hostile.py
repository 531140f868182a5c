"""Regressions of a hostile tester's findings: a second driver on a running sweep, Ctrl+C in a
multi-method search, moved/copied sweeps, URL characters in paths, relative search-space
files on --resume, and a corrupt Tune state. All run without starting Ray."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import optuna
import pandas as pd
import pytest

from mtl_tune.search import execution
from mtl_tune.search.cli import main
from mtl_tune.search.lock import LOCK_FILE, SweepLock, check_unlocked
from mtl_tune.search.runner import SearchError, SearchOptions, prepare
from mtl_tune.search.searcher import default_storage_url, make_storage, own_storage_at
from mtl_tune.search.validate import previous_optuna_storage, resume_options


def stored_sweep(root: Path, name: str = "s", **kwargs) -> Path:
    """A sweep folder whose sweep.json records ``SearchOptions(**kwargs)``, as a first run leaves it."""
    options = SearchOptions(storage_path=str(root), name=name, **kwargs)
    sweep = root / name
    sweep.mkdir(parents=True)
    info = {"name": name, "optuna": {"storage": default_storage_url(sweep)}, "args": asdict(options)}
    (sweep / "sweep.json").write_text(json.dumps(info))
    return sweep


# ---------------------------------------------------------------------------- 1: one driver per sweep
def test_a_second_driver_on_a_locked_sweep_is_refused_with_exit_2(tmp_path, capsys):
    sweep = stored_sweep(tmp_path, methods=["ls"])
    with SweepLock(sweep):
        code = main(["--resume", "--storage-path", str(tmp_path), "--name", "s"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{sweep} is in use by another search driver (PID {os.getpid()})" in err
    check_unlocked(sweep)  # released: a later --resume goes ahead


def test_the_lock_dies_with_its_process(tmp_path):
    """kill -9 of the driver frees the sweep (the kernel drops a flock with its last descriptor)."""
    sweep = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom mtl_tune.search.lock import SweepLock\n"
         "lock = SweepLock(Path(sys.argv[1]))\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(600)\n", str(sweep)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SearchError, match=rf"in use by another search driver \(PID {holder.pid}\)"):
            check_unlocked(sweep)
        with pytest.raises(SearchError, match="in use"):
            SweepLock(sweep).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    check_unlocked(sweep)
    with SweepLock(sweep):
        assert (sweep / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_lock_file_alone_is_not_a_search(tmp_path):
    """A run refused after taking the lock (e.g. by --address checks) leaves only the lock file:
    the same --name still starts without --resume."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / LOCK_FILE).write_text("1\n")
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path), name="s"))
    assert plan.sweep_dir == (tmp_path / "s").resolve()


# ---------------------------------------------------------------------------- 2: Ctrl+C
class FakeGrid:
    """What ``check_not_interrupted`` reads of a ResultGrid."""

    def __init__(self, total: int, terminated: int, errors: int = 0) -> None:
        self.total, self.num_terminated, self.num_errors = total, terminated, errors

    def __len__(self) -> int:
        return self.total


@pytest.mark.parametrize("grid,expected,interrupted", [
    (FakeGrid(4, 4), 4, False),
    (FakeGrid(4, 3, 1), 4, False),      # an errored trial ended too
    (FakeGrid(4, 2), 4, True),          # two left RUNNING/PENDING by Tune's SIGINT handler
    (FakeGrid(2, 2), 4, True),          # stopped before the searcher sampled the rest
    (FakeGrid(3, 3), None, False),      # a grid run: no budget to compare
])
def test_an_interrupted_fit_is_recognised(grid, expected, interrupted):
    if interrupted:
        with pytest.raises(execution.Interrupted):
            execution.check_not_interrupted(grid, expected)
    else:
        execution.check_not_interrupted(grid, expected)


@pytest.fixture
def fake_tune(monkeypatch):
    """execute() without Ray: each method 'runs' by calling the hook; records what ran."""
    ran: list[str] = []
    hooks: dict[str, object] = {}

    def run_method(plan, method):
        ran.append(method)
        if method in hooks:
            hooks[method]()

    def finish(plan):
        table = pd.DataFrame({"method": ran, "status": ["TERMINATED"] * len(ran), "phase": ["search"] * len(ran)})
        return execution.Outcome(plan.sweep_dir, table, execution.write_table(table, plan.sweep_dir), None)

    def no_comparison(*_):
        raise AssertionError("an interrupted search must not be compared")

    monkeypatch.setattr(execution, "init_ray", lambda plan: None)
    monkeypatch.setattr(execution, "run_method", run_method)
    monkeypatch.setattr(execution, "finish", finish)
    monkeypatch.setattr(execution.compare, "comparison_table", no_comparison)
    return ran, hooks


@pytest.mark.parametrize("how", ["sigint between runs", "interrupted fit", "KeyboardInterrupt"])
def test_ctrl_c_stops_the_whole_search_with_exit_130(tmp_path, capsys, fake_tune, how):
    ran, hooks = fake_tune

    def interrupt():
        if how == "sigint between runs":
            os.kill(os.getpid(), signal.SIGINT)  # lands on the driver's handler: a flag, checked before ls
        elif how == "interrupted fit":
            raise execution.Interrupted
        else:
            raise KeyboardInterrupt

    hooks["cagrad"] = interrupt
    old = signal.getsignal(signal.SIGINT)
    code = main(["--method", "cagrad,ls,famo", "--storage-path", str(tmp_path), "--name", "i", "--verbose", "0"])
    out = capsys.readouterr().out
    assert code == 130
    assert ran == ["cagrad"]  # no later method ran
    assert "interrupted (Ctrl+C)" in out and "no method comparison" in out
    assert f"python -m mtl_tune.search --storage-path {tmp_path.resolve()} --name i --resume" in out
    assert (tmp_path / "i" / "trials.csv").is_file() and not (tmp_path / "i" / "comparison.csv").exists()
    assert signal.getsignal(signal.SIGINT) is old  # the driver's handler is removed again
    check_unlocked(tmp_path / "i")


# ---------------------------------------------------------------------------- 3: moved or copied sweeps
def test_resume_derives_the_default_storage_from_where_the_sweep_is_now(tmp_path):
    sweep = stored_sweep(tmp_path / "old", methods=["ls"])
    moved = tmp_path / "new" / "s"
    moved.parent.mkdir()
    shutil.move(str(sweep), str(moved))
    assert previous_optuna_storage(moved) is None  # new sweep.json: args.optuna_storage is null
    info = json.loads((moved / "sweep.json").read_text())
    del info["args"]["optuna_storage"]  # a sweep.json from before: only the absolute URL of the old folder
    (moved / "sweep.json").write_text(json.dumps(info))
    assert previous_optuna_storage(moved) is None
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path / "new"), name="s", resume=True))
    assert plan.optuna_storage == default_storage_url(moved) and plan.options.optuna_storage is None
    # an explicit storage stays as given
    info["args"]["optuna_storage"] = info["optuna"]["storage"] = str(tmp_path / "studies.journal")
    (moved / "sweep.json").write_text(json.dumps(info))
    assert previous_optuna_storage(moved) == str(tmp_path / "studies.journal")


def _pickled_study(sweep: Path) -> bytes:
    """A study in the sweep's own optuna.db and Tune's pickle of its storage (searcher checkpoint)."""
    sweep.mkdir(parents=True, exist_ok=True)
    storage = make_storage(default_storage_url(sweep))
    study = optuna.create_study(study_name="s/ls", storage=storage)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    blob = pickle.dumps(storage)
    storage.engine.dispose()
    return blob


def test_a_moved_sweep_reopens_its_own_database(tmp_path):
    blob = _pickled_study(tmp_path / "a" / "s")
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    with own_storage_at(default_storage_url(tmp_path / "b" / "s")):
        storage = pickle.loads(blob)
    assert len(optuna.load_study(study_name="s/ls", storage=storage).trials) == 1
    assert not (tmp_path / "a").exists()  # nothing re-created where the sweep was


def test_a_copied_sweep_writes_its_own_database_not_the_original(tmp_path):
    blob = _pickled_study(tmp_path / "a" / "s")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with own_storage_at(default_storage_url(tmp_path / "b" / "s")):
        storage = pickle.loads(blob)
    study = optuna.load_study(study_name="s/ls", storage=storage)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=2.0))
    original = optuna.load_study(study_name="s/ls", storage=default_storage_url(tmp_path / "a" / "s"))
    assert len(original.trials) == 1 and len(study.trials) == 2
    # outside a restore (or with an explicit storage) unpickling is Optuna's own
    with own_storage_at(None):
        assert pickle.loads(blob).url == default_storage_url(tmp_path / "a" / "s")


# ---------------------------------------------------------------------------- 4: ? # % in paths
@pytest.mark.parametrize("name", ["a?b", "a#b", "a%3Fb", "50%"])
def test_the_default_database_stays_inside_a_sweep_folder_with_url_characters(tmp_path, name):
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path / "r?x#y"), name=name))
    plan.sweep_dir.mkdir(parents=True)
    make_storage(plan.optuna_storage).engine.dispose()
    assert sorted(p.name for p in plan.sweep_dir.iterdir()) == ["optuna.db"]
    assert sorted(p.name for p in (tmp_path / "r?x#y").iterdir()) == [name]


# ---------------------------------------------------------------------------- 5: --search-space on resume
SPACE = "method: cagrad\nparams:\n  c: {type: float, low: 0.1, high: 0.9, default: 0.4}\n"


def test_a_relative_search_space_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "cat.yaml").write_text(SPACE)
    monkeypatch.chdir(tmp_path)
    plan = prepare(SearchOptions(methods=["cagrad"], search_space="cat.yaml", storage_path="r", name="s"))
    assert plan.options.search_space == str(tmp_path.resolve() / "cat.yaml")
    # from another folder the recorded path still names the same file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    stored = asdict(plan.options)
    given = SearchOptions(methods=["cagrad"], storage_path=str(tmp_path / "r"), name="s", resume=True)
    assert resume_options(given, {"storage_path", "name", "resume"}, stored).search_space == stored["search_space"]


def test_a_missing_search_space_from_sweep_json_says_where_the_path_came_from(tmp_path, monkeypatch, capsys):
    stored_sweep(tmp_path, methods=["cagrad"], search_space="yaml/cat.yaml")  # an older, relative record
    monkeypatch.chdir(tmp_path)
    code = main(["--resume", "--storage-path", str(tmp_path), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "search-space file yaml/cat.yaml recorded in sweep.json" in err, err
    # its new location may be given explicitly
    (tmp_path / "cat.yaml").write_text(SPACE)
    given = SearchOptions(methods=["cagrad"], search_space=str(tmp_path / "cat.yaml"), storage_path=str(tmp_path),
                          name="s", resume=True)
    stored = json.loads((tmp_path / "s" / "sweep.json").read_text())["args"]
    merged = resume_options(given, {"search_space", "storage_path", "name", "resume"}, stored)
    assert merged.search_space == str(tmp_path / "cat.yaml")


# ---------------------------------------------------------------------------- 11: corrupt Tune state
def test_a_corrupt_experiment_state_falls_back_to_the_trial_files(tmp_path, capsys):
    plan = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path), name="c", epochs=2))
    trial = plan.sweep_dir / "ls" / "ls_abc12"
    trial.mkdir(parents=True)
    (plan.sweep_dir / "ls" / "experiment_state-2024-01-01_00-00-00.json").write_text('{"trial_data": [')
    config = {"method": "ls", "benchmark": "toy", "seed": 0, "epochs": 2, "hparams": {}}
    (trial / "params.json").write_text(json.dumps(config))
    (trial / "result.json").write_text("\n".join(json.dumps(
        {"trial_id": "abc12", "training_iteration": i, "epoch": i, "val/loss1": 1.0 / i, "val/loss2": 2.0 / i})
        for i in (1, 2)) + "\n")
    table = execution.build_table(plan)
    assert table[["trial_id", "status", "training_iteration"]].values.tolist() == [["abc12", "TERMINATED", 2]]
    assert table["val/loss1"].tolist() == [0.5] and table["phase"].tolist() == ["search"]
    out = capsys.readouterr().out
    assert f"Tune's state in {plan.sweep_dir / 'ls'} is unreadable" in out


# ---------------------------------------------------------------------------- 10: --address at a non-Ray port
def test_an_address_where_something_else_listens_is_refused_quickly(tmp_path, capsys):
    """An HTTP server passes a TCP probe; ray.init then retried for minutes. The probe now asks
    for gRPC's HTTP/2 answer, which Ray's GCS gives and an HTTP/1 server does not."""
    import socket
    import threading
    import time

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_http1():
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.0 400 Bad request\r\n\r\n")

    threading.Thread(target=answer_http1, daemon=True).start()
    start = time.monotonic()
    code = main(["--method", "ls", "--address", f"127.0.0.1:{port}", "--storage-path", str(tmp_path / "r")])
    err = capsys.readouterr().err
    server.close()
    assert code == 2 and f"--address 127.0.0.1:{port}: 127.0.0.1:{port} accepts connections but is not a Ray head" in err
    assert time.monotonic() - start < 30 and not (tmp_path / "r").exists()


def test_the_help_lists_exactly_the_preference_aware_methods():
    from mtl_tune.registry import balancer_names, balancer_class
    from mtl_tune.search.cli import PREFERENCE_AWARE
    from mtl_tune.search.validate import preference_arg

    builtin = [m for m in balancer_names() if balancer_class(m).__module__.startswith("mtl_tune.")]
    assert sorted(PREFERENCE_AWARE) == sorted(m for m in builtin if preference_arg(m))


def test_a_lock_file_that_cannot_be_opened_is_a_search_error(tmp_path):
    """A lock file that is a folder (or not ours, or on a read-only path): SearchError, not a traceback."""
    sweep = tmp_path / "s"
    (sweep / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(SearchError, match="cannot take the lock"):
        SweepLock(sweep).acquire()


@pytest.mark.parametrize("phase", ["seeds", "prefs"])
def test_a_signal_in_the_re_run_phases_stops_before_the_next_method(monkeypatch, phase):
    """Ctrl+C during a method's --seeds (or --preferences) run: the next method's run started anyway."""
    import threading
    from types import SimpleNamespace

    stop, ran = threading.Event(), []

    def run_grid(plan, experiment, param_space):
        ran.append(experiment)
        stop.set()  # the signal arrives while this run goes on

    monkeypatch.setattr(execution, "run_grid", run_grid)
    monkeypatch.setattr(execution, "best_config", lambda *args: {"hparams": {}})
    monkeypatch.setattr(execution.compare, "ranking_objective", lambda plan: ("val/loss1", "min"))
    monkeypatch.setattr(execution, "trial_constants", lambda plan, method: {})
    spaces = {m: SimpleNamespace(constants=lambda: {}) for m in ("ls", "amtl", "upgrad")}
    plan = SimpleNamespace(spaces=spaces, options=SimpleNamespace(seed=0, seeds=2, preferences=3),
                           bench=SimpleNamespace(n_tasks=2))
    with pytest.raises(execution.Interrupted):
        if phase == "seeds":
            execution.run_seeds(plan, None, stop)
        else:
            execution.run_preferences(plan, stop)
    assert ran == [f"ls.{phase}"]
