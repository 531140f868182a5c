"""PBI: distance along the preference ray plus θ times the distance off it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.pbi import pbi_rows
from mtl_tune.registry import get_balancer

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_on_the_ray_the_weights_are_the_direction():
    p, z = np.array([1.0, 2.0, 2.0]), np.array([-1.0, 0.5, 0.0])
    direction = p / 3.0
    ell = z + 2.5 * direction
    w = pbi_rows(ell, p, 5.0, z)
    np.testing.assert_allclose(w, direction, rtol=1e-15, atol=2e-15)  # d₂ is rounding-size; its subgradient 0
    exactly = pbi_rows(np.array([2.0, 2.0]), np.ones(2), 5.0, np.zeros(2))  # r ∥ p exactly: d₂ = 0
    assert exactly.tolist() == [1 / math.sqrt(2)] * 2


def test_two_task_closed_form_and_negative_weight():
    # z = 0, p = (1, 1), ℓ = (1, 3): d₁ = 4/√2, off = (−1, 1), d₂ = √2 → w = (1 − θ, 1 + θ)/√2
    bal = get_balancer("pbi", 2, theta=5.0)
    x = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    info = bal.backward(x * 1.0, [x])
    np.testing.assert_allclose(info.weights.numpy(), np.array([-4.0, 6.0]) / math.sqrt(2), rtol=1e-15)
    assert torch.equal(x.grad, info.weights)


def test_theta_zero_is_the_weighted_sum_along_the_direction():
    rows = np.random.default_rng(1).uniform(0, 3, (6, 3))
    p = np.array([3.0, 1.0, 2.0])
    np.testing.assert_allclose(pbi_rows(rows, p, 0.0, np.zeros(3)), np.broadcast_to(p / np.linalg.norm(p), rows.shape),
                               rtol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_torchjd_pbi(seed):
    """TorchJD's ``PBI`` scalariser differentiated by autograd, on identical inputs off the ray. It adds
    1e-12 under the square root of d₂²: its gradient's off-ray part is ours times d₂/√(d₂² + 1e-12), a
    relative 5e-13/d₂²; with d₂ ≥ 0.05 here that is ≤ 2e-10."""
    tj = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(seed)
    k = 2 + seed % 3
    ell, p, z = rng.uniform(0.5, 3, k), rng.dirichlet(np.ones(k)), rng.uniform(-1, 0.4, k)
    theta = float(rng.choice([0.5, 5.0, 20.0]))
    direction = p / np.linalg.norm(p)
    assert np.linalg.norm((ell - z) - ((ell - z) @ direction) * direction) > 0.05
    x = torch.tensor(ell, requires_grad=True)
    tj.PBI(theta, weights=torch.tensor(p), reference=torch.tensor(z))(x).backward()
    np.testing.assert_allclose(pbi_rows(ell, p, theta, z), x.grad.numpy(), rtol=2e-10, atol=1e-14)


def test_defaults_and_bad_arguments():
    bal = get_balancer("pbi", 3)
    assert bal.theta == 5.0 and bal.ideal.tolist() == [0.0] * 3 and bal.preferences.tolist() == [1.0] * 3
    for kw in ({"theta": -1.0}, {"preferences": [0.0, 0.0, 0.0]}, {"preferences": [1.0, -1.0, 1.0]},
               {"ideal": [0.0]}):
        with pytest.raises(ValueError):
            get_balancer("pbi", 3, **kw)


def test_rows_match_one_row_each():
    bal = get_balancer("pbi", 3, theta=2.0, preferences=[1.0, 2.0, 0.5], ideal=[0.0, 0.1, -0.2])
    rows = np.random.default_rng(0).uniform(0.2, 3, (4, 5, 3))
    np.testing.assert_array_equal(bal.weights_rows(rows).weights,
                                  np.stack([[bal.weights_rows(r).weights for r in b] for b in rows]))


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_pbi_properties(case):
    # a function of the losses only (w independent of J, d linear in J); with p = 1 and z = 0 symmetric
    # in the tasks: equivariant up to the rounding of K-term sums (1e-12)
    step = balancer_step("pbi")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
