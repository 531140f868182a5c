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

