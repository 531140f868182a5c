"""A search whose driver is killed with SIGKILL part-way resumes with every trial once."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from mtl_tune.analysis import load_sweep
from mtl_tune.spaces import SpaceSampler, load_space

ARGS = ["--method", "ls,cagrad", "--num-samples", "4", "--epochs", "3", "--config", "steps_per_epoch=300",
        "--sampler", "random", "--num-cpus", "2", "--verbose", "0", "--seed", "3"]


def finished_trials(exp_dir: Path) -> dict[str, float]:
    """trial folder → last val/loss2 of trials that reported all 3 epochs."""
    done = {}
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("epoch") == 3.0:
            done[result.parent.name] = lines[-1]["val/loss2"]
    return done


def kill_session(pid: int) -> None:
    """SIGKILL the driver and every process of its session (the local Ray cluster it started)."""
    sid = os.getsid(pid)
    victims = [p for p in psutil.process_iter() if _sid(p) == sid]
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)


def _sid(p):
    try:
        return os.getsid(p.pid)
    except (ProcessLookupError, PermissionError):
        return None


def expected_cagrad_values(n: int) -> list[float]:
    """The random sampler's sequence of c values: defaults first, then seeded draws."""
    space = load_space("cagrad", "toy")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.enqueue_trial(space.default_point(2))
    sampler = SpaceSampler(space, 2, {})
    values = []
    for _ in range(n):
        trial = study.ask()
        sampler(trial)
        values.append(round(trial.params["hparams/c"], 6))
    return sorted(values)


@pytest.mark.slow
def test_sigkill_then_resume_keeps_every_trial_once(tmp_path):
    cmd = [sys.executable, "-m", "mtl_tune.search", *ARGS, "--storage-path", str(tmp_path), "--name", "k"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    before: dict[str, float] = {}
    while time.time() < deadline and proc.poll() is None:
        before = finished_trials(tmp_path / "k" / "ls")
        if len(before) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert len(before) >= 2, "no trial finished in time"
    kill_session(proc.pid)
    assert not (tmp_path / "k" / "trials.csv").exists() or load_sweep(tmp_path / "k").shape[0] < 8

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = load_sweep(tmp_path / "k")
    assert table["method"].value_counts().to_dict() == {"ls": 4, "cagrad": 4}
    assert set(table["status"]) == {"TERMINATED"} and (table["training_iteration"] == 3).all()
    assert table["trial_id"].is_unique
    # trials finished before the kill are kept with their results, not re-run
    kept = {Path(p).name: v for p, v in zip(table["logdir"], table["val/loss2"])}
    for name, value in before.items():
        assert kept[name] == pytest.approx(value)
    # same set of configurations as an uninterrupted run of the seeded sampler
    got = sorted(round(v, 6) for v in table.loc[table.method == "cagrad", "hp/c"])
    assert got == expected_cagrad_values(4)


def test_set_aside_unsaved_start_keeps_the_first_start_and_clears_the_study(tmp_path):
    """A method killed after its study and folder existed but before Tune saved any state: both
    are set aside (nothing deleted), so the resumed start samples as an uninterrupted run would."""
    from types import SimpleNamespace

    from mtl_tune.search.resume_state import set_aside_unsaved_start, tune_state_saved
    from mtl_tune.search.searcher import make_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="k/cagrad")
    study.enqueue_trial({"x": 0.5})
    asked = study.ask()
    asked.suggest_float("x", 0, 1)
    study.enqueue_trial({"x": 0.25})  # still WAITING when the driver died
    exp = tmp_path / "cagrad"
    (exp / "trial_0").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"not a state")
    (exp / "trial_0" / "result.json").write_text('{"epoch": 1}\n')
    assert not tune_state_saved(exp)

    plan = SimpleNamespace(sweep_dir=tmp_path, optuna_storage=url)
    set_aside_unsaved_start(plan, "cagrad", study="k/cagrad")

    assert not exp.exists()
    (aside,) = tmp_path.glob("cagrad.unsaved-*")
    assert (aside / "trial_0" / "result.json").read_text() == '{"epoch": 1}\n'
    names = optuna.get_all_study_names(storage)
    assert "k/cagrad" not in names
    (kept,) = [n for n in names if n.startswith("k/cagrad.unsaved-")]
    states = sorted(t.state.name for t in optuna.load_study(study_name=kept, storage=storage).trials)
    assert states == ["RUNNING", "WAITING"]
    # nothing there: nothing happens
    set_aside_unsaved_start(plan, "cagrad", study="k/cagrad")
    assert len(list(tmp_path.glob("cagrad.unsaved-*"))) == 1 and len(optuna.get_all_study_names(storage)) == 1


def test_check_saved_states_names_an_unreadable_newest_state(tmp_path):
    """Only the newest state of each experiment counts (the one Tune restores from); search, seeds
    and preference experiments alike; missing folders and whole files pass."""
    from types import SimpleNamespace

    from mtl_tune.search.resume_state import check_saved_states
    from mtl_tune.search.validate import SearchError

    whole = json.dumps({"trial_data": [], "runner_data": {}})
    plan = SimpleNamespace(sweep_dir=tmp_path, spaces={"ls": None, "cagrad": None})
    (tmp_path / "ls").mkdir()
    (tmp_path / "ls" / "experiment_state-2026-01-01_00-00-00.json").write_text(whole[:20])  # older: ignored
    (tmp_path / "ls" / "experiment_state-2026-01-02_00-00-00.json").write_text(whole)
    check_saved_states(plan)
    seeds = tmp_path / "cagrad.seeds"
    seeds.mkdir()
    for text in (whole[:25], "[]", "{\"trial_data\": []}", "\xff"):
        (seeds / "experiment_state-2026-01-03_00-00-00.json").write_text(text)
        with pytest.raises(SearchError, match=r"cagrad\.seeds/experiment_state-2026-01-03_00-00-00\.json is unreadable"):
            check_saved_states(plan)
    (seeds / "experiment_state-2026-01-03_00-00-00.json").write_text(whole)
    check_saved_states(plan)
    # the searcher files Tune restores with the state are pickles (whatever their suffix): a pickle cut
    # short fails, checked by walking its opcodes (nothing is unpickled)
    whole_pickle = pickle.dumps({"searcher": list(range(50))})
    for name in ("search_gen_state-2026-01-03.json", "searcher-state-2026-01-03.pkl", "basic-variant-state-2026-01-03.json"):
        (seeds / name).write_bytes(whole_pickle)
        check_saved_states(plan)
        (seeds / name).write_bytes(whole_pickle[:-5])
        with pytest.raises(SearchError, match=f"{name} is unreadable"):
            check_saved_states(plan)
        (seeds / name).write_bytes(whole_pickle)
    check_saved_states(plan)


def test_check_studies_needs_the_study_of_every_restored_method(tmp_path):
    """A restored searcher continues its Optuna study: a deleted optuna.db (or one without the
    study) is a SearchError naming the studies, before Ray starts and without creating the file."""
    from types import SimpleNamespace

    from mtl_tune.search.resume_state import check_studies
    from mtl_tune.search.searcher import make_storage
    from mtl_tune.search.validate import SearchError

    for method in ("ls", "cagrad"):
        (tmp_path / method).mkdir()
        (tmp_path / method / "tuner.pkl").write_bytes(b"")
        (tmp_path / method / "experiment_state-2026-01-01.json").write_text("{}")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = SimpleNamespace(sweep_dir=tmp_path, spaces={"ls": None, "cagrad": None, "famo": None},
                           options=SimpleNamespace(optuna_storage=None), optuna_storage=url,
                           study_name=lambda m: f"k/{m}")
    with pytest.raises(SearchError, match=r"'k/ls', 'k/cagrad' of this search are not in .*optuna\.db"):
        check_studies(plan)
    assert not (tmp_path / "optuna.db").exists()  # looked at, not created
    optuna.create_study(storage=make_storage(url), study_name="k/ls")
    with pytest.raises(SearchError, match=r"study 'k/cagrad' of this search is not in"):
        check_studies(plan)
    optuna.create_study(storage=make_storage(url), study_name="k/cagrad")
    check_studies(plan)  # famo has no Tune state: it starts afresh and needs no study
    plan.options.optuna_storage = plan.optuna_storage = "postgresql://nobody:secret@127.0.0.1:1/none"
    with pytest.raises(SearchError, match="cannot be opened") as err:
        check_studies(plan)
    assert "secret" not in str(err.value)


def test_tune_state_saved_needs_the_experiment_state(tmp_path):
    from mtl_tune.search.resume_state import tune_state_saved

    assert not tune_state_saved(tmp_path / "missing")
    (tmp_path / "experiment_state-2026.json").write_text("{}")
    assert not tune_state_saved(tmp_path)  # no tuner.pkl: Tune cannot restore it either


@pytest.mark.slow
def test_resume_after_kill_before_tune_saved_state_starts_the_method_again(tmp_path):
    """The race the SIGKILL test above can hit: the driver dies after the second method's folder
    and study exist but before Tune's first experiment state. Made exactly: a finished search
    whose cagrad state files are removed, as they were missing at the kill."""
    args = ["--method", "ls,cagrad", "--num-samples", "2", "--epochs", "2", "--config", "steps_per_epoch=100",
            "--sampler", "random", "--num-cpus", "2", "--verbose", "0", "--seed", "3"]
    cmd = [sys.executable, "-m", "mtl_tune.search", *args, "--storage-path", str(tmp_path), "--name", "k"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    ls_rows = load_sweep(tmp_path / "k").query("method == 'ls'")[["trial_id", "val/loss2"]]
    for state in (tmp_path / "k" / "cagrad").glob("experiment_state-*.json"):
        state.unlink()
    (tmp_path / "k" / "trials.csv").unlink()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "interrupted before Ray Tune saved any state" in resumed.stdout
    table = load_sweep(tmp_path / "k")
    assert table["method"].value_counts().to_dict() == {"ls": len(ls_rows), "cagrad": 2}
    assert set(table["status"]) == {"TERMINATED"}
    # ls was restored, not re-run; cagrad sampled the seeded sequence afresh (no lingering trials)
    assert table.query("method == 'ls'")[["trial_id", "val/loss2"]].reset_index(drop=True).equals(
        ls_rows.reset_index(drop=True))
    got = sorted(round(v, 6) for v in table.loc[table.method == "cagrad", "hp/c"])
    assert got == expected_cagrad_values(2)
    assert len(list((tmp_path / "k").glob("cagrad.unsaved-*"))) == 1

    # a kill while Tune rewrote its state truncates the file: --resume stops with exit 2 naming it and
    # changes nothing (Tune's own restore would start the experiment over in the same folder)
    (state,) = (tmp_path / "k" / "cagrad").glob("experiment_state-*.json")
    state.write_text(state.read_text()[:300])
    before = (tmp_path / "k" / "trials.csv").read_bytes()
    broken = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400)
    assert broken.returncode == 2, broken.stderr[-3000:]
    assert f"{state} is unreadable" in broken.stderr and "move" in broken.stderr
    assert (tmp_path / "k" / "trials.csv").read_bytes() == before
    assert len(list((tmp_path / "k" / "cagrad").glob("experiment_state-*.json"))) == 1
    # the way out the message gives: move the folder aside, resume; cagrad starts afresh
    (tmp_path / "k" / "cagrad").rename(tmp_path / "k" / "cagrad.broken")
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    table = load_sweep(tmp_path / "k")
    assert table["method"].value_counts().to_dict() == {"ls": len(ls_rows), "cagrad": 2}
    assert sorted(round(v, 6) for v in table.loc[table.method == "cagrad", "hp/c"]) == expected_cagrad_values(2)
