"""GradVac: PCGrad with adaptive cosine-similarity targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import gram
from mtl_tune.balancers.gradvac import GradVac, gradvac_coefficients, vaccine_step
from mtl_tune.balancers.pcgrad import PCGrad, pcgrad_coefficients

from ._helpers import unit
from ._properties import assert_gradient_scaling, assert_valid_step, balancer_step, property_cases


def conflicting_jacobian(k: int = 4, p: int = 12) -> torch.Tensor:
    jac = torch.randn(k, p, dtype=torch.float64)
    jac[1] = -0.7 * jac[0] + 0.3 * jac[1]  # make sure some pairs conflict
    return jac


def test_gradvac_zero_targets_beta_zero_is_pcgrad():
    jac = conflicting_jacobian()
    orders = [torch.randperm(4).tolist() for _ in range(4)]
    coef, targets = gradvac_coefficients(gram(jac).numpy(), np.zeros((4, 4)), orders, beta=0.0)
    expected = pcgrad_coefficients(gram(jac), orders).numpy()
    assert np.allclose(coef, expected, atol=1e-12) and not np.allclose(coef, np.ones(4))
    assert np.all(targets == 0.0)
    d_vac = GradVac(4, beta=0.0, seed=5).combine(jac, torch.ones(4))[0]
    d_pc = PCGrad(4, seed=5).combine(jac, torch.ones(4))[0]
    assert torch.allclose(d_vac, d_pc, atol=1e-12)


def test_gradvac_correction_reaches_target_and_ema():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    jac = torch.stack([g1, g2])
    targets = np.array([[0.0, 0.5], [0.5, 0.0]])
    coef, new = gradvac_coefficients(gram(jac).numpy(), targets, [[1], []], beta=0.1)
    g1_new = g1 + (coef[1] - 1.0) * g2  # coef = c_1 + c_2 and task 2 is untouched (empty order): c_2 = e_2
    assert coef[0] == 1.0
    assert float(unit(g1_new) @ unit(g2)) == pytest.approx(0.5, abs=1e-12)
    assert new[0, 1] == pytest.approx(0.9 * 0.5 + 0.1 * 0.0) and new[1, 0] == 0.5


def test_gradvac_paper_vs_official_target_update():
    jac = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # cos = 0.6 ≥ target 0: no correction
    orders = [[0, 1], [1, 0]]
    coef_p, paper = gradvac_coefficients(gram(jac).numpy(), np.zeros((2, 2)), orders, 0.5, "paper")
    coef_o, official = gradvac_coefficients(gram(jac).numpy(), np.zeros((2, 2)), orders, 0.5, "official")
    assert np.allclose(coef_p, [1, 1]) and np.allclose(coef_o, [1, 1])
    assert np.allclose(paper, [[0, 0.3], [0.3, 0]]) and np.all(official == 0.0)


def test_gradvac_official_targets_never_rise_and_state_round_trip():
    bal = GradVac(3, beta=0.3, target_update="official", seed=1)
    for _ in range(10):
        bal.combine(torch.randn(3, 9), torch.ones(3))
    assert bool((bal.targets <= 0).all()) and bool((bal.targets < 0).any())
    state = bal.state_dict()
    jac = torch.randn(3, 9)
    expected = bal.combine(jac, torch.ones(3))[0]
    other = GradVac(3, beta=0.3, target_update="official", seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.combine(jac, torch.ones(3))[0], expected)
    assert torch.equal(other.targets, bal.targets)


def test_gradvac_extreme_targets_stay_finite():
    g = torch.randn(8, dtype=torch.float64)
    bal = GradVac(2, beta=1.0)
    for jac in (torch.stack([g, 3 * g]), torch.stack([g, -g]), torch.stack([g, 3 * g])):
        d, _ = bal.combine(jac, torch.ones(2))
        assert torch.isfinite(d).all()
    assert float(bal.targets.max()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_gradvac_properties(case):
    # the corrections depend on cosines and norm ratios only (targets start at 0); same seed.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("gradvac")
    assert_valid_step(*step(case.jac, case.losses), case)
    # not permutation-equivariant: the random projection order is drawn per task index
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


def test_masked_vaccine_step_is_the_where_of_the_step():
    """``where=``: the last division masked, 0 elsewhere: bit for bit np.where(mask, step, 0.0), also
    where the unmasked step would divide by zero."""
    rng = np.random.default_rng(0)
    gi, gj = rng.random(200) * 3.0, rng.random(200) * 3.0
    gj[::7] = 0.0
    phi, target = rng.uniform(-1.0, 1.0, 200), rng.uniform(-0.99, 0.99, 200)
    mask = (rng.random(200) < 0.5) & (gj != 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(mask, vaccine_step(gi, gj, phi, target), 0.0)
    assert np.array_equal(vaccine_step(gi, gj, phi, target, where=mask), want)


@pytest.mark.parametrize("k", [2, 3])
def test_gradvac_leaves_its_inputs_as_they_are(k):
    """One visit per task (K = 2) reads A's columns without a copy of its own, more visits (K = 3) update a
    copy: the caller's Gram matrices (here a transposed view, whose columns are its memory) and targets
    stay as they were."""
    rng = np.random.default_rng(k)
    j = rng.normal(size=(4, k, 3))
    j[:, 1] = -0.8 * j[:, 0] + 0.2 * j[:, 1]                  # conflicting: the corrections fire
    a = np.swapaxes(j @ np.swapaxes(j, -1, -2), -1, -2)
    targets = np.full((4, k, k), 0.3)
    a_before, targets_before = a.copy(), targets.copy()
    orders = np.broadcast_to(np.arange(k), (4, k, k))
    coef, new = gradvac_coefficients(a, targets, orders, 0.5)
    assert np.array_equal(a, a_before) and np.array_equal(targets, targets_before)
    assert not np.array_equal(coef, np.ones((4, k))) and not np.array_equal(new, targets)
