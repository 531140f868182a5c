"""The default number of trials at once: what fits on the cluster's nodes (CPUs, GPUs, memory)."""

from types import SimpleNamespace

import pytest

from mtl_tune.search import concurrency
from mtl_tune.search.concurrency import TRIAL_PROCESS_MEMORY, trials_that_fit

GIB = 2.0**30


def node(cpu: float, gpu: float = 0.0, memory: float = 64 * GIB) -> dict[str, float]:
    out = {"CPU": cpu, "memory": memory}
    if gpu:
        out["GPU"] = gpu
    return out


@pytest.mark.parametrize("nodes, cpus, gpus, workers, expected", [
    ([node(16)], 1, 0, 1, 16),
    ([node(16)], 4, 0, 1, 4),
    ([node(16, gpu=1)], 1, 1, 1, 1),                 # one GPU: one trial, not 16 waiting on it
    ([node(16, gpu=1)], 1, 0.25, 1, 4),              # fractional GPUs pack
    ([node(16, gpu=1)], 1, 1 / 3, 1, 3),             # 1 ÷ (1/3) is 3, not 2
    ([node(2, gpu=4)], 1, 1, 1, 2),                  # CPUs bind before GPUs
    ([node(8, gpu=2), node(8)], 1, 1, 1, 2),         # a CPU-only node runs no GPU trial
    ([node(3), node(3)], 2, 0, 1, 2),                # trials do not span nodes: not 6 // 2 = 3
    ([node(3), node(3)], 1, 0, 2, 3),                # N workers: slots over nodes, then // N
    ([node(2, memory=4 * GIB)], 0.01, 0, 1, 4),      # 200 CPU fractions, memory for 4 processes
    ([node(2, memory=0.5 * GIB)], 1, 0, 1, 1),       # at least one trial
    ([], 1, 0, 1, 1),
])
def test_trials_that_fit(nodes, cpus, gpus, workers, expected):
    assert trials_that_fit(nodes, cpus, gpus, workers) == expected


def test_memory_is_counted_in_trial_processes():
    nodes = [node(64, memory=10 * TRIAL_PROCESS_MEMORY)]
    assert trials_that_fit(nodes, 1, 0) == 10
    assert trials_that_fit(nodes, 1, 0, process_memory=0.0) == 64


def test_fitting_trials_reads_the_connected_clusters_live_nodes(monkeypatch, capsys):
    """The cluster's nodes decide (an --address cluster is not the driver's machine), dead nodes
    do not count, and a limit set by memory is said once."""
    nodes = [{"Alive": True, "Resources": node(8, gpu=2)}, {"Alive": True, "Resources": node(8, gpu=2)},
             {"Alive": False, "Resources": node(64, gpu=8)}]
    monkeypatch.setattr(concurrency, "cluster_nodes",
                        lambda: [n["Resources"] for n in nodes if n["Alive"]])
    options = SimpleNamespace(cpus_per_trial=1.0, gpus_per_trial=1.0, workers_per_trial=1)
    assert concurrency.fitting_trials(options) == 4
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(concurrency, "cluster_nodes", lambda: [node(2, memory=3 * GIB)])
    fractional = SimpleNamespace(cpus_per_trial=0.01, gpus_per_trial=0.0, workers_per_trial=1)
    assert concurrency.fitting_trials(fractional) == 3
    assert concurrency.fitting_trials(fractional) == 3
    out = capsys.readouterr().out
    assert out.count("note: 3 trials at once, not the 200") == 1


def test_cluster_nodes_of_a_local_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        nodes = concurrency.cluster_nodes()
        assert len(nodes) >= 1 and all("CPU" in n and "memory" in n for n in nodes)
        if started:
            assert nodes[0]["CPU"] == 2.0
    finally:
        if started:
            ray.shutdown()
