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
