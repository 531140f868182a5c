"""IMTL-L (imtll): learnable loss scales, L = Σ (e^{s_i} ℓ_i − s_i)."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.imtll import IMTLL
from mtl_tune.balancers.uw import Uncertainty

from ._helpers import make_problem, reference_grads, run_step
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_imtll_stationary_point_is_unit_scaled_losses():
    # constant losses: Adam on s converges to e^{s_i} ℓ_i = 1
    ell = torch.tensor([0.5, 4.0, 1.0])
    bal = IMTLL(3, lr=0.05)
    opt = torch.optim.Adam(bal.param_groups())
    assert opt.param_groups[0]["lr"] == 0.05
    for _ in range(1500):
        opt.zero_grad()
        leaf = ell.clone().requires_grad_(True)
        bal.backward(leaf, [leaf])
        opt.step()
    torch.testing.assert_close(torch.exp(bal.scales.detach()) * ell, torch.ones(3), rtol=2e-3, atol=0)


def test_imtll_model_gradient_weights_and_scale_gradient():
    theta, heads, losses = make_problem()
    bal = IMTLL(3)
    s = torch.tensor([0.0, 1.0, -2.0])
    with torch.no_grad():
        bal.scales.copy_(s)
    info, got = run_step(bal, theta, heads, losses)
    want_w = torch.exp(s.double())
    torch.testing.assert_close(info.weights, want_w)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w)
    ell = losses().detach().float()
    torch.testing.assert_close(bal.scales.grad, torch.exp(s) * ell - 1)   # ∂L/∂s_i = e^{s_i} ℓ_i − 1
    assert list(bal.parameters()) == [bal.scales]


def test_imtll_is_twice_uw_regression_at_the_negated_parameter():
    # Σ(e^{s}ℓ − s) = 2 · Σ ½(e^{−σ}ℓ + σ) at σ = −s: weights and parameter gradients both ×2 (the
    # parameter's sign flips, so its gradient too: ∂/∂s = −2 ∂/∂σ)
    ell = torch.tensor([0.3, 2.0, 7.0], dtype=torch.float64)
    s = torch.tensor([0.4, -1.0, 0.2])
    a, b = IMTLL(3), Uncertainty(3)
    with torch.no_grad():
        a.scales.copy_(s)
        b.log_vars.copy_(-s)
    wa, wb = a.weights_rows(ell.numpy()), b.weights_rows(ell.numpy())
    torch.testing.assert_close(torch.from_numpy(wa.weights), 2 * torch.from_numpy(wb.weights), rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.from_numpy(wa.param_grads), -2 * torch.from_numpy(wb.param_grads),
                               rtol=1e-15, atol=1e-15)


def test_imtll_parity_with_torchjd_imtll():
    """torchjd's IMTLL scalarizer (autograd through Σ e^{s}ℓ − s) and this balancer on the same
    model, from s = 0, over 20 SGD steps of model and scales: same parameters throughout. Both keep s
    in float32 and e^{s} is rounded there; the model is float64: agreement to float32 rounding of s."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    runs = []
    for which in ("ours", "torchjd"):
        theta, heads, losses = make_problem(k=3, seed=3)
        bal = IMTLL(3, lr=0.1) if which == "ours" else scalarization.IMTLL(3)
        opt = torch.optim.SGD([{"params": [theta, *heads]}, {"params": list(bal.parameters()), "lr": 0.1}], lr=0.01)
        for _ in range(20):
            opt.zero_grad()
            if which == "ours":
                bal.backward(losses(), [theta], [[h] for h in heads])
            else:
                bal(losses()).backward()
            opt.step()
        runs.append([theta.detach().clone(), *[h.detach().clone() for h in heads], *[p.detach().clone()
                                                                                     for p in bal.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_imtll_properties(case):
    # w_i = e^{s_i} with the same initial s_i for every task: linear in J, symmetric in the tasks
    step = balancer_step("imtll")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
