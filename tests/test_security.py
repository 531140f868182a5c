"""Security: no code runs from an analysed folder, names stay inside the storage path, and a
running search's Ray cluster refuses a process without its token."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_tune.analysis import load_sweep
from mtl_tune.analyze import main as analyze_main
from mtl_tune.search.cli import main as search_main

REPO = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling this object writes a file: stands in for any code an attacker ships."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _crafted_sweep(root: Path, marker: Path) -> Path:
    """A sweep folder without trials.csv whose every pickle (experiment state, params.pkl,
    searcher and tuner state) would write ``marker`` when loaded."""
    payload = pickle.dumps(_WritesMarker(marker)).hex()
    sweep = root / "crafted"
    exp = sweep / "ls"
    trial = exp / "ls_0000abcd"
    trial.mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "crafted", "benchmark": "toy", "tasks": ["t1", "t2"]}))
    config = {"benchmark": "toy", "method": "ls", "seed": 0, "epochs": 2, "hparams": {"task_weights": [1.0, 1.0]}}
    state = {"stub": False, "trainable_name": "train_trial", "trial_id": "0000abcd", "status": "TERMINATED",
             "relative_logdir": trial.name, "config": config,
             "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": payload},
             "placement_group_factory": payload, "results": payload, "extra_arg": payload, "_resources": payload}
    runtime = {"last_result": {"_type": "CLOUDPICKLE_FALLBACK", "value": payload},
               "checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": payload}}
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(
        {"trial_data": [[json.dumps(state), json.dumps(runtime)]], "runner_data": {"_type": "CLOUDPICKLE_FALLBACK",
                                                                                   "value": payload}}))
    for name in ("searcher-state-2026-01-01_00-00-00.pkl", "tuner.pkl"):
        (exp / name).write_bytes(bytes.fromhex(payload))
    (trial / "params.pkl").write_bytes(bytes.fromhex(payload))
    (trial / "params.json").write_text(json.dumps(config))
    reports = [{"val/loss1": 1.0 - e / 10, "val/loss2": 2.0, "epoch": e, "epochs": 2, "training_iteration": e,
                "trial_id": "0000abcd"} for e in (1, 2)]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in reports))
    return sweep


def test_analysing_a_crafted_sweep_folder_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    sweep = _crafted_sweep(tmp_path, marker)
    table = load_sweep(sweep)
    assert not marker.exists()
    # the table comes from params.json / result.json alone, with the search's columns
    assert table[["method", "trial_id", "status", "training_iteration"]].values.tolist() == \
        [["ls", "0000abcd", "TERMINATED", 2]]
    assert table["val/loss1"].tolist() == [pytest.approx(0.8)]
    assert table["hp/task_weights"].tolist() == ["[1.0, 1.0]"]
    assert analyze_main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not marker.exists()


def test_the_pickle_opt_in_is_what_runs_a_crafted_folder(tmp_path):
    """The crafted folder is really hostile: Ray's reader (the explicit opt-in) runs its payload."""
    marker = tmp_path / "marker"
    sweep = _crafted_sweep(tmp_path, marker)
    try:
        load_sweep(sweep, allow_pickle=True)
    except Exception:  # noqa: BLE001 - the payload is not a valid Tune state; running it is the point
        pass
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", "..", ".", "x\\y", "bad\nname"])
def test_name_is_a_single_folder_inside_the_storage_path(tmp_path, capsys, name):
    storage = tmp_path / "store"
    storage.mkdir()
    code = search_main(["--method", "ls", "--storage-path", str(storage), "--name", name])
    err = capsys.readouterr().err
    assert code == 2 and "--name" in err and "single folder name" in err
    assert list(tmp_path.iterdir()) == [storage] and not any(storage.iterdir())


def test_the_token_file_is_made_private(tmp_path):
    from mtl_tune.search.execution import keep_token_private

    token = tmp_path / "auth_token"
    token.write_text("0" * 32)
    token.chmod(0o644)  # how Ray writes it under the usual umask
    keep_token_private(token)
    assert token.stat().st_mode & 0o777 == 0o600


def test_resume_help_warns_about_pickles(capsys):
    with pytest.raises(SystemExit):
        search_main(["--help"])
    assert "resume only sweeps you wrote" in " ".join(capsys.readouterr().out.split())


_HOST = """
import sys, ray
from mtl_tune.search import SearchOptions, prepare
from mtl_tune.search.execution import init_ray
init_ray(prepare(SearchOptions(methods=["ls"], num_cpus=1, storage_path=sys.argv[1], verbose=0)))
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # stay up until the test closes stdin
"""

_GUEST = """
import sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
@ray.remote(num_cpus=0)
def touch(path):
    open(path, "w").write("ran")
ray.get(touch.remote(sys.argv[2]), timeout=60)
"""


def _guest(address: str, marker: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _GUEST, address, str(marker)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_process_without_the_token_cannot_run_code_in_a_running_search(tmp_path):
    """The search's own local cluster (``init_ray``) keeps Ray's token authentication: a process
    without the token (another user: no ~/.ray/auth_token, no RAY_AUTH_TOKEN) is refused over the
    machine's network address, with or without RAY_AUTH_MODE set, and one with a wrong token too;
    the same process with the token runs its task (so the refusals are authentication)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    stranger_home = tmp_path / "home"
    stranger_home.mkdir()
    stranger = {**base, "HOME": str(stranger_home)}
    host = subprocess.Popen([sys.executable, "-c", _HOST, str(tmp_path / "res")], env=base, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = host.stdout.readline().strip()
        assert address and not address.startswith("127."), f"no cluster address from the search ({address!r})"
        attempts = {"no_token": stranger, "auth_off": {**stranger, "RAY_AUTH_MODE": "disabled"},
                    "wrong_token": {**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}}
        guests = {k: _guest(address, tmp_path / k, env) for k, env in attempts.items()}
        for key, proc in guests.items():
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode != 0, f"{key}: a process without the token ran a task:\n{out[-2000:]}"
            assert not (tmp_path / key).exists()
        owner = _guest(address, tmp_path / "owner", {**base, "RAY_AUTH_MODE": "token"})  # ~/.ray/auth_token
        out, _ = owner.communicate(timeout=240)
        assert owner.returncode == 0 and (tmp_path / "owner").read_text() == "ran", out[-2000:]
    finally:
        host.stdin.close()
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait(timeout=30)


def test_without_address_the_search_starts_a_cluster_of_its_own(monkeypatch, tmp_path):
    """No --address: ``ray.init(address="local")``, so neither RAY_ADDRESS nor a cluster left by
    ``ray start`` on this machine is joined (Ray would join it, and refuse --num-cpus there)."""
    import ray

    from mtl_tune.search import SearchOptions, prepare
    from mtl_tune.search.execution import init_ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.255.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no_token"))
    init_ray(prepare(SearchOptions(methods=["ls"], num_cpus=1, storage_path=str(tmp_path / "res"), verbose=0)))
    assert len(calls) == 1 and calls[0]["address"] == "local" and calls[0]["num_cpus"] == 1
