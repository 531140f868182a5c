"""GradDrop: sign-purity dropout of gradient coordinates."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.graddrop import GradDrop, graddrop_multipliers, purity

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_graddrop_purity_and_masks_known_answer():
    jac = torch.tensor([[1.0], [-3.0]])
    assert purity(jac).item() == pytest.approx(0.25)
    keep_pos = graddrop_multipliers(jac, torch.tensor([0.2]))
    keep_neg = graddrop_multipliers(jac, torch.tensor([0.3]))
    assert (keep_pos * jac).sum().item() == 1.0 and (keep_neg * jac).sum().item() == -3.0
    leaky = graddrop_multipliers(jac, torch.tensor([0.2]), leak=0.5)
    assert (leaky * jac).sum().item() == pytest.approx(1.0 - 1.5)


def test_graddrop_expectation():
    """E[d] = P·Σ(positive) + (1 − P)·Σ(negative) = 0.25·1 + 0.75·(−3) = −2 per coordinate."""
    jac = torch.tensor([[1.0], [-3.0]]).repeat(1, 20000)
    d, w = GradDrop(2, seed=3).combine(jac, torch.ones(2))
    assert d.mean().item() == pytest.approx(-2.0, abs=0.05)
    assert w[0].item() == pytest.approx(0.25, abs=0.02) and w[1].item() == pytest.approx(0.75, abs=0.02)


def test_graddrop_leak_one_is_plain_sum():
    jac = torch.randn(4, 100)
    d, w = GradDrop(4, leak=1.0).combine(jac, torch.ones(4))
    assert torch.allclose(d, jac.sum(0)) and torch.allclose(w, torch.ones(4))


@pytest.mark.parametrize("seed", range(5))
def test_graddrop_same_signs_keep_everything(seed):
    signs = torch.where(torch.rand(1, 500) < 0.5, -1.0, 1.0)
    jac = torch.rand(3, 500) * signs  # every coordinate has one sign across tasks
    jac[1, :10] = 0.0
    d, w = GradDrop(3, seed=seed).combine(jac, torch.ones(3))
    assert torch.equal(d, jac.sum(0)) and torch.allclose(w, torch.ones(3))


def test_graddrop_state_round_trip_reproduces_draws():
    jac = torch.randn(3, 50)
    a = GradDrop(3, seed=7)
    a.combine(jac, torch.ones(3))
    state = a.state_dict()
    first = a.combine(jac, torch.ones(3))[0]
    b = GradDrop(3, seed=123)
    b.load_state_dict(state)
    assert torch.equal(b.combine(jac, torch.ones(3))[0], first)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_graddrop_properties(case):
    # purity P = ½(1 + Σg/Σ|g|) per coordinate is scale-free and symmetric in the tasks, and the
    # uniform draws are per coordinate, not per task: equivariant and (same seed) linear.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("graddrop")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
