import os
import random

# scikit-learn's bundled OpenMP busy-waits by default and then slows torch's own threads
# ~20× on 2 cores; it must be set before torch and sklearn load
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _local_ray():
    """A 2-CPU local Ray cluster with Ray's defaults (token authentication stays on)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


@pytest.fixture
def ray_local():
    """A fresh local Ray cluster for one test."""
    ray = _local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local_module():
    """One local Ray cluster shared by a module's tests."""
    ray = _local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def faulty_cluster(tmp_path, monkeypatch):
    """A local Ray cluster whose trial workers kill themselves once after epoch 1
    (mtl_tune.training's fault hook); yields the folder of markers, one per kill."""
    markers = tmp_path / "markers"
    markers.mkdir()
    # set before ray.init so that every worker process inherits it
    monkeypatch.setenv("MTL_TUNE_FAULT_KILL_AT_EPOCH", "1")
    monkeypatch.setenv("MTL_TUNE_FAULT_DIR", str(markers))
    ray = _local_ray()
    yield markers
    ray.shutdown()


# With pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) the tests that start Ray
# clusters, Ray Tune searches or torch process groups run one after another on one worker: two
# clusters at once on a 2-core machine would double every trial's time and push the kill/resume
# and cluster tests toward their timeouts. Everything else is spread over the workers.
_ONE_AT_A_TIME_FILES = {
    "test_analysis_report.py", "test_api_docs.py", "test_data_parallel.py", "test_distributed.py",
    "test_examples.py", "test_failure_classes.py", "test_optuna_storage.py", "test_packaging.py",
    "test_reliability.py", "test_search.py", "test_search_cluster.py", "test_search_resume.py",
    "test_search_samplers.py", "test_search_validation.py", "test_security.py",
}
_CLUSTER_FIXTURES = {"ray_local", "ray_local_module", "faulty_cluster", "ray_start_cluster"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in _ONE_AT_A_TIME_FILES or _CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("cluster"))
