"""GO4Align: group-wise loss scales from 1-D k-means on the loss ratios."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.go4align import GO4Align, kmeans_1d

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def brute_force_sse(x, m):
    best = math.inf
    for labels in itertools.product(range(m), repeat=len(x)):
        lab = np.array(labels)
        if len(set(labels)) < m:
            continue
        best = min(best, sum(((x[lab == g] - x[lab == g].mean()) ** 2).sum() for g in range(m)))
    return best


def test_kmeans_1d_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 7))
        m = int(rng.integers(1, n + 1))
        x = rng.exponential(size=n) if rng.random() < 0.5 else rng.normal(size=n).round(1)  # ties too
        labels, centres, sse = kmeans_1d(x, m)
        assert sse == pytest.approx(brute_force_sse(x, m), abs=1e-10)
        assert sorted(set(labels.tolist())) == list(range(m))
        assert np.all(np.diff(centres) >= 0)
        assert sum(((x[labels == g] - centres[g]) ** 2).sum() for g in range(m)) == pytest.approx(sse, abs=1e-10)
    labels, centres, _ = kmeans_1d(np.array([10.0, 1.0, 11.0, 1.1]), 2)
    assert labels.tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(centres, [1.05, 10.5])
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), 4)


def test_go4align_first_step_limits():
    ell = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    gamma = (ell.mean() / ell) / 3    # Q_1 = uniform when β = 0
    w_k = GO4Align(3, num_groups=3, beta=0.0).objective(ell)[1]
    torch.testing.assert_close(w_k, gamma)                       # M = K: every task its own group
    w_1 = GO4Align(3, num_groups=1, beta=0.0).objective(ell)[1]
    torch.testing.assert_close(w_1, gamma.mean().expand(3))      # M = 1: one global scale
    w_sum = GO4Align(3, num_groups=3, beta=0.0, scale="sum").objective(ell)[1]
    torch.testing.assert_close(w_sum, 3 * gamma)                 # official code: K× the paper
    w_2 = GO4Align(3, num_groups=2, beta=0.0).objective(ell)[1]  # γ ∝ [4, 2, 1]: {2,1} vs {4}
    torch.testing.assert_close(w_2, torch.stack([gamma[0], (gamma[1] + gamma[2]) / 2, (gamma[1] + gamma[2]) / 2]))


def test_go4align_q_smoothing_and_errors():
    bal = GO4Align(2, num_groups=2, beta=0.1)
    seq = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])]
    for ell in seq:
        leaf = ell.clone().requires_grad_(True)
        bal.backward(leaf, [leaf])
    q = torch.softmax(-0.1 * torch.stack(seq).sum(0).double(), 0)
    torch.testing.assert_close(bal.log_q.exp(), q)
    w = bal.objective(torch.tensor([1.0, 1.0], dtype=torch.float64))[1]
    torch.testing.assert_close(w, torch.softmax(-0.1 * (torch.stack(seq).sum(0).double() + 1), 0))
    with pytest.raises(ValueError, match="1..2"):
        GO4Align(2, num_groups=3)
    with pytest.raises(ValueError):
        GO4Align(2, num_groups=0)
    with pytest.raises(BalancerError, match="positive"):
        bal.objective(torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_go4align_properties(case):
    # group scales from the losses only (1-D k-means on distinct values: no ties): linear in J.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("go4align")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
