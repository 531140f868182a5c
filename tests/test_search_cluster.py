"""Multi-node scheduling and fractional GPUs: on one machine with Ray's own cluster utilities,
and the way users run it (``ray start`` head + worker node, token authentication on)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mtl_tune.analysis import load_sweep
from mtl_tune.search.cli import main


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # two nodes with one CPU and one (logical) GPU each: a GPU count is only a label to Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                           "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_trials_run_on_both_nodes_with_fractional_gpus(two_node_cluster, tmp_path, capsys):
    code = main(["--address", two_node_cluster.address, "--method", "ls", "--num-samples", "4", "--epochs", "1",
                 "--config", "steps_per_epoch=400", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.5",
                 "--max-concurrent", "4", "--storage-path", str(tmp_path), "--name", "cl", "--verbose", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    table = load_sweep(tmp_path / "cl")
    assert len(table) == 4 and set(table["status"]) == {"TERMINATED"}
    # the request reached Ray: each trial was granted exactly half a GPU and half a CPU
    assert set(table["resources/gpu"]) == {0.5} and set(table["resources/cpu"]) == {0.5}
    assert table["node_id"].nunique() == 2


def test_address_without_cluster_is_a_clear_error(tmp_path, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    code = main(["--address", "127.0.0.1:1", "--method", "ls", "--num-samples", "1", "--epochs", "1",
                 "--storage-path", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "could not connect to a Ray cluster" in err and "Traceback" not in err


def test_data_root_is_resolved_once_on_the_driver(tmp_path, monkeypatch):
    """The trial config carries the driver's absolute data root (or "" for none), so a worker
    whose environment names another folder (or none) reads what the driver chose."""
    from mtl_tune.registry import get_benchmark
    from mtl_tune.search.runner import SearchOptions, prepare, trial_constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTL_TUNE_MNIST_ROOT", "driver_mnist")  # relative: trials run in their own cwd
    plan = prepare(SearchOptions(benchmark="multi_mnist", methods=["ls"], synthetic=True,
                                 storage_path=str(tmp_path / "res")))
    config = trial_constants(plan, "ls")
    assert config["data_root"] == str(tmp_path / "driver_mnist")
    monkeypatch.setenv("MTL_TUNE_MNIST_ROOT", "/elsewhere/on/the/worker")  # the worker's environment
    worker = get_benchmark("multi_mnist", data_root=config["data_root"], synthetic=True)
    assert worker.root == str(tmp_path / "driver_mnist") and worker.source == "mnist"

    monkeypatch.delenv("MTL_TUNE_MNIST_ROOT")  # a driver without a data root: the offline digits
    plan = prepare(SearchOptions(benchmark="multi_mnist", methods=["ls"], storage_path=str(tmp_path / "res2")))
    config = trial_constants(plan, "ls")
    assert config["data_root"] == ""
    monkeypatch.setenv("MTL_TUNE_MNIST_ROOT", "/elsewhere/on/the/worker")
    worker = get_benchmark("multi_mnist", data_root=config["data_root"])
    assert worker.root is None and worker.source == "sklearn_digits"
    # a benchmark without data gets no data_root key at all
    toy = prepare(SearchOptions(methods=["ls"], storage_path=str(tmp_path / "res3")))
    assert "data_root" not in trial_constants(toy, "ls")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RayStartNode:
    """One ``ray start --block`` node whose processes this test alone owns and stops.

    ``--block`` keeps ``ray start`` in the foreground as the parent of the node's processes;
    stopping sends SIGTERM to it (Ray's own shutdown of its node), then ends any descendant
    still alive by PID. Never ``ray stop``: it would stop every Ray node of this user."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        ports = {flag: _free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                 "--runtime-env-agent-port", "--metrics-export-port")}
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
                   *args, *(f"{flag}={port}" for flag, port in ports.items())]
        self.log = log
        self.proc = subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        import psutil

        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=30)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_start_cluster(tmp_path):
    """A head (1 CPU) and a worker node (1 CPU, its own resources and a different environment)
    started with ``ray start`` on free ports, a temp dir of their own, token authentication on
    with a token of this test."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    token = secrets.token_hex(16)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MTL_TUNE_"))}
    auth = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    temp_dir = tempfile.mkdtemp(prefix="mtlray", dir="/tmp")  # Ray's socket paths must stay short
    ip = ray.util.get_node_ip_address()
    address = f"{ip}:{_free_port()}"
    nodes = []
    try:
        nodes.append(RayStartNode(["--head", f"--port={address.rsplit(':', 1)[1]}", "--num-cpus=1",
                                   "--include-dashboard=false", f"--temp-dir={temp_dir}"], auth, tmp_path / "head.log"))
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection((ip, int(address.rsplit(":", 1)[1])), timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and nodes[0].proc.poll() is None, (tmp_path / "head.log").read_text()
                time.sleep(1)
        # the worker node's environment names a data root the driver never chose
        worker_env = {**auth, "MTL_TUNE_MNIST_ROOT": "/nonexistent/worker/mnist"}
        nodes.append(RayStartNode([f"--address={address}", "--num-cpus=1", '--resources={"worker_node": 1}'],
                                  worker_env, tmp_path / "worker.log"))
        yield address, auth
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_count(address: str, env: dict[str, str]) -> int:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


@pytest.mark.slow
def test_search_on_a_ray_start_cluster_with_token_auth(ray_start_cluster, tmp_path):
    address, auth = ray_start_cluster
    deadline = time.time() + 120
    while _node_count(address, auth) < 2:
        assert time.time() < deadline, "the worker node never joined"
        time.sleep(2)
    repo = Path(__file__).resolve().parents[1]
    driver_env = {**auth, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "mtl_tune.search", "--address", address, "--benchmark", "multi_mnist",
               "--method", "ls", "--num-samples", "4", "--max-concurrent", "2", "--epochs", "1",
               "--config", "pairs_per_image=1", "--storage-path", str(tmp_path / "res"), "--name", "rs", "--verbose", "0"]
    done = subprocess.run(command, env=driver_env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = load_sweep(tmp_path / "res" / "rs")
    assert len(table) == 4 and set(table["status"]) == {"TERMINATED"}
    assert table["node_id"].nunique() == 2  # trials ran on the head and on the worker node
    # the driver had no MNIST root: every trial, also on the worker node, used the offline digits
    assert set(table["data_source"]) == {"sklearn_digits"} and table["data_root"].isna().all()
    # without the token the same cluster refuses the driver
    refused = subprocess.run(command[:-4] + ["--name", "rs2", "--verbose", "0"],
                             env={**driver_env, "RAY_AUTH_TOKEN": "0" * 32}, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and not (tmp_path / "res" / "rs2" / "trials.csv").exists()
