"""Scale-invariant loss (si): Σ log ℓ_i, i.e. weights 1/ℓ_i."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.si import ScaleInvariant

from ._helpers import make_problem, reference_grads, run_step
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_si_gradient_is_ls_with_inverse_loss_weights():
    theta, heads, losses = make_problem()
    ell = losses().detach()
    info, got = run_step(ScaleInvariant(3), theta, heads, losses)
    want = reference_grads(theta, heads, losses, 1.0 / ell)
    torch.testing.assert_close(info.weights, 1.0 / ell)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_si_invariant_to_rescaling_a_loss():
    theta, heads, losses = make_problem()
    _, plain = run_step(ScaleInvariant(3), theta, heads, losses)
    scale = torch.tensor([37.0, 1.0, 0.01], dtype=torch.float64)
    _, scaled = run_step(ScaleInvariant(3), theta, heads, losses, scale)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b)
    # the Samsung log1p variant is *not* scale invariant
    _, p1 = run_step(ScaleInvariant(3, form="log1p"), theta, heads, losses)
    _, s1 = run_step(ScaleInvariant(3, form="log1p"), theta, heads, losses, scale)
    assert not torch.allclose(p1[0], s1[0])


def test_si_log1p_weights():
    bal = ScaleInvariant(2, form="log1p")
    _, w = bal.objective(torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(w, torch.tensor([1 / 1.5, 1 / 4.0]))


def test_si_rejects_non_positive_loss_and_shift_fixes_it():
    losses = torch.tensor([-1.5, 2.0], requires_grad=True)
    with pytest.raises(BalancerError, match="min_losses"):
        ScaleInvariant(2).backward(losses, [losses])
    bal = ScaleInvariant(2, min_losses=[-2.0, -21.0])
    info = bal.backward(losses, [losses])
    torch.testing.assert_close(info.weights, torch.tensor([1 / 0.5, 1 / 23.0]))
    torch.testing.assert_close(losses.grad, torch.tensor([1 / 0.5, 1 / 23.0]))
    with pytest.raises(ValueError):
        ScaleInvariant(2, min_losses=[0.0])
    with pytest.raises(ValueError):
        ScaleInvariant(2, form="log2")


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_si_properties(case):
    # w_i = 1/ℓ_i depends on the losses only, which J → aJ keeps: d is linear in J.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("si")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
