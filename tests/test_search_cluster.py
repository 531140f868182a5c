"""Multi-node scheduling and fractional GPUs, on one machine with Ray's own cluster utilities."""

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
