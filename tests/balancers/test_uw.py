"""Uncertainty weighting (uw): learnable log-variances."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.uw import Uncertainty

from ._helpers import make_problem, reference_grads, run_step
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


@pytest.mark.parametrize("form,factor", [("regression", 1.0), ("classification", 2.0)])
def test_uw_fixed_point(form, factor):
    ell = torch.tensor([0.5, 4.0, 1.0])
    bal = Uncertainty(3, lr=0.05, form=form)
    opt = torch.optim.Adam(bal.param_groups())
    assert opt.param_groups[0]["lr"] == 0.05
    for _ in range(1500):
        opt.zero_grad()
        leaf = ell.clone().requires_grad_(True)
        bal.backward(leaf, [leaf])
        opt.step()
    torch.testing.assert_close(torch.exp(-bal.log_vars.detach()), 1 / (factor * ell), rtol=2e-3, atol=0)


def test_uw_model_gradient_and_weights():
    theta, heads, losses = make_problem()
    bal = Uncertainty(3, init=0.0)
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.0, 1.0, -2.0]))
    info, got = run_step(bal, theta, heads, losses)
    want_w = 0.5 * torch.exp(-torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(info.weights, want_w)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w)
    # ∂L/∂s_i = ½(1 − e^{−s_i} ℓ_i)
    ell = losses().detach().float()
    torch.testing.assert_close(bal.log_vars.grad, 0.5 * (1 - torch.exp(-bal.log_vars.detach()) * ell))
    assert list(bal.parameters()) == [bal.log_vars]


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_uw_properties(case):
    # w_i = ½e^{−s_i} with the same initial s_i for every task: linear in J, symmetric in the tasks.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("uw")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
