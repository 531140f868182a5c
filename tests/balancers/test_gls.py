"""Geometric loss strategy (gls): L = (Π ℓ_i)^{1/K}, weights ∂L/∂ℓ_i = L/(K ℓ_i)."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.gls import GeometricLoss

from ._helpers import make_problem, reference_grads, run_step
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_gls_weights_are_the_geometric_mean_over_k_loss():
    # K = 2 by hand: L = √(ℓ₁ℓ₂), ∂L/∂ℓ₁ = ½√(ℓ₂/ℓ₁), ∂L/∂ℓ₂ = ½√(ℓ₁/ℓ₂)
    leaf = torch.tensor([0.5, 8.0], dtype=torch.float64, requires_grad=True)
    info = GeometricLoss(2).backward(leaf, [leaf])
    want = torch.tensor([0.5 * math.sqrt(16.0), 0.5 * math.sqrt(1 / 16.0)], dtype=torch.float64)
    torch.testing.assert_close(info.weights, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(leaf.grad, want, rtol=1e-15, atol=0)


def test_gls_step_is_the_gradient_of_the_geometric_mean():
    # independent: autograd through the product form on the model, heads included (heads weighted)
    theta, heads, losses = make_problem(k=3)
    ell = losses().detach()
    info, got = run_step(GeometricLoss(3), theta, heads, losses)
    want_w = ell.prod() ** (1 / 3) / (3 * ell)
    torch.testing.assert_close(info.weights, want_w, rtol=1e-13, atol=0)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-15)
    for p in [theta, *heads]:
        p.grad = None
    (losses().prod() ** (1 / 3)).backward()
    for g, p in zip(got, [theta, *heads]):
        torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)


def test_gls_parity_with_torchjd_geometric_mean():
    """torchjd's GeometricMean scalarizer (exp of the mean log) on the same losses: same gradients.
    Float64, the same function evaluated in the same log domain: agreement to rounding (1e-13)."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    for seed in range(3):
        theta, heads, losses = make_problem(k=4, seed=seed)
        _, got = run_step(GeometricLoss(4), theta, heads, losses)
        for p in [theta, *heads]:
            p.grad = None
        scalarization.GeometricMean()(losses()).backward()
        for g, p in zip(got, [theta, *heads]):
            torch.testing.assert_close(g, p.grad, rtol=1e-13, atol=1e-15)


def test_gls_direction_is_scale_invariant_and_step_follows_the_geometric_mean():
    # ℓ_i → c_i ℓ_i (and its gradient with it): every weight times (Π c)^{1/K}/c_i, so the update
    # is (Π c)^{1/K} times the unscaled one
    theta, heads, losses = make_problem()
    scale = torch.tensor([37.0, 1.0, 0.01], dtype=torch.float64)
    _, plain = run_step(GeometricLoss(3), theta, heads, losses)
    _, scaled = run_step(GeometricLoss(3), theta, heads, losses, scale)
    torch.testing.assert_close(scaled[0], plain[0] * scale.prod() ** (1 / 3), rtol=1e-13, atol=0)


def test_gls_many_small_losses_do_not_underflow():
    # 40 losses of 1e-9: the product 1e-360 underflows to 0 in float64 (the product form's weights
    # and gradient vanish); in the log domain L = 1e-9 and every weight is L/(40·1e-9) = 1/40
    leaf = torch.full((40,), 1e-9, dtype=torch.float64, requires_grad=True)
    assert float(leaf.detach().prod()) == 0.0
    info = GeometricLoss(40).backward(leaf, [leaf])
    torch.testing.assert_close(info.weights, torch.full((40,), 1 / 40, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.5])
def test_gls_non_positive_loss_raises_never_nan(bad):
    leaf = torch.tensor([bad, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(BalancerError, match="min_losses"):
        GeometricLoss(2).backward(leaf, [leaf])
    assert leaf.grad is None  # nothing written
    # torchjd's scalarizer at a zero loss: log 0 = −inf, exp(−inf) = 0, and 0·inf = NaN in the backward
    scalarization = pytest.importorskip("torchjd.scalarization")
    if bad == 0.0:
        scalarization.GeometricMean()(leaf).backward()
        assert bool(torch.isnan(leaf.grad).any())


def test_gls_min_losses_shift():
    leaf = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    info = GeometricLoss(2, min_losses=[-2.0, -21.0]).backward(leaf, [leaf])
    d = torch.tensor([0.5, 23.0], dtype=torch.float64)
    torch.testing.assert_close(info.weights, d.prod().sqrt() / (2 * d), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="min_losses"):
        GeometricLoss(2, min_losses=[0.0])
    with pytest.raises(ValueError, match="min_losses"):
        GeometricLoss(2, min_losses=[0.0, float("nan")])


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_gls_properties(case):
    # the weights depend on the losses only, which J → aJ keeps: d is linear in J.
    # closed form in float64 (a mean of K logs, one exp): rounding of a few eps; 1e-12 leaves a wide margin
    step = balancer_step("gls")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
