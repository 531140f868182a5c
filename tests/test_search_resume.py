"""A search whose driver is killed with SIGKILL part-way resumes with every trial once."""

import json
import os
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
