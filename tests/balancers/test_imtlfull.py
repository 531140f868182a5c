"""IMTL (imtlfull): IMTL-L's learned scales s, then IMTL-G on the scaled losses' gradients e^{s_i} g_i."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.imtl import imtl_rows
from mtl_tune.balancers.imtlfull import IMTL
from mtl_tune.registry import get_balancer

from ._helpers import linear_losses, make_problem, random_jacobian, reference_grads, run_step, unit
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def with_scales(k: int, s, **kw) -> IMTL:
    bal = IMTL(k, max_norm=None, **kw)
    with torch.no_grad():
        bal.scales.copy_(torch.as_tensor(s))
    return bal


def test_imtlfull_with_zero_scales_is_imtl():
    # e^0 = 1 exactly: A' = A bit for bit, the same solver, the same shared update and weights.
    # Heads differ by design: imtl weights them by α (FAMO family), imtlfull gives them e^{s} = 1.
    theta, heads, losses = make_problem(k=4, seed=1)
    info_full, got_full = run_step(IMTL(4), theta, heads, losses)
    info_g, got_g = run_step(get_balancer("imtl", 4), theta, heads, losses)
    assert torch.equal(info_full.weights, info_g.weights)
    assert torch.equal(got_full[0], got_g[0])
    for g, w in zip(got_full[1:], reference_grads(theta, heads, losses, torch.ones(4, dtype=torch.float64))[1:]):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_imtlfull_is_imtl_g_direction_rescaled(k):
    """Unit gradients do not see the scales, so the equal-projection direction is IMTL-G's and only
    its length changes: c = α / Σ_j α_j e^{−s_j} (α: IMTL-G on the unscaled A). Two float64 solves of
    systems with the same cosine matrix (condition ≲ 1e3 here): agreement to ~1e-12, checked at 1e-10."""
    rng = np.random.default_rng(k)
    for _ in range(5):
        jac = random_jacobian(k, 9, seed=int(rng.integers(1 << 30))).numpy()
        a = jac @ jac.T
        s = rng.normal(size=k)
        losses = rng.uniform(0.5, 2.0, size=k)
        c = with_scales(k, s.astype(np.float32)).weights_rows(a, losses).weights
        e = np.exp(np.float32(s).astype(np.float64))
        alpha = imtl_rows(a)[0]
        np.testing.assert_allclose(c, alpha / (alpha / e).sum(), rtol=1e-10, atol=0)
        # and the update has equal projections on the unit gradients
        proj = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ (c @ jac)
        np.testing.assert_allclose(proj, np.full(k, proj[0]), rtol=1e-10)


def test_imtlfull_two_task_closed_form():
    # IMTL-G on e^{s_i} g_i: α'₁ = e₂n₂/(e₁n₁ + e₂n₂), c_i = α'_i e_i, so c = e₁e₂ (n₂, n₁)/(e₁n₁ + e₂n₂)
    g1, g2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    s = torch.tensor([0.5, -1.0])
    theta, losses = linear_losses(torch.stack([g1, g2]).double())
    info = with_scales(2, s).backward(losses, [theta])
    e1, e2 = math.exp(0.5), math.exp(-1.0)
    n1, n2 = 3.0, math.sqrt(2.0)
    want = torch.tensor([n2, n1], dtype=torch.float64) * e1 * e2 / (e1 * n1 + e2 * n2)
    torch.testing.assert_close(info.weights, want, rtol=1e-15, atol=0)
    d = want[0] * g1.double() + want[1] * g2.double()
    torch.testing.assert_close(theta.grad, d, rtol=1e-15, atol=0)
    torch.testing.assert_close(theta.grad, e1 * e2 * n1 * n2 / (e1 * n1 + e2 * n2) * (unit(g1.double()) + unit(g2.double())),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", ["jacobian", "gram"])
def test_imtlfull_heads_and_scale_gradients(path):
    theta, heads, losses = make_problem(k=3, seed=2)
    s = torch.tensor([0.3, -0.7, 1.1])
    bal = with_scales(3, s, gradient_path=path)
    info, got = run_step(bal, theta, heads, losses)
    ell = losses().detach()
    e = torch.exp(s.double())
    # heads: ∇ Σ e^{s_i} ℓ_i (the scaled losses' own gradients); s: e^{s_i} ℓ_i − 1 (float32 as s)
    for g, w in zip(got[1:], reference_grads(theta, heads, losses, e)[1:]):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)
    torch.testing.assert_close(bal.scales.grad, (e * ell - 1).float())
    # shared: Σ c_i g_i with the reported c
    torch.testing.assert_close(got[0], reference_grads(theta, heads, losses, info.weights)[0], rtol=1e-13, atol=1e-15)
    assert list(bal.parameters()) == [bal.scales] and bal.param_groups()[0]["lr"] == 0.025


def test_imtlfull_scales_reach_the_imtll_stationary_point():
    # s is trained on IMTL-L's objective alone: with constant losses e^{s_i} ℓ_i → 1
    jac = random_jacobian(3, 6, seed=4)
    ell = torch.tensor([0.5, 4.0, 1.0], dtype=torch.float64)
    bal = IMTL(3, lr=0.05)
    opt = torch.optim.Adam(bal.param_groups())
    for _ in range(1500):
        opt.zero_grad()
        theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        bal.backward(jac @ theta + ell, [theta])
        opt.step()
    torch.testing.assert_close(torch.exp(bal.scales.detach().double()) * ell, torch.ones(3, dtype=torch.float64),
                               rtol=2e-3, atol=0)


def test_imtlfull_undefined_case_raises():
    # g₃ = (g₁ + g₂)/2 with g₁ ⟂ g₂ of equal norms: only d = 0 has equal projections (imtl's case);
    # scaling the gradients keeps them affinely dependent up to the scales — use s = 0 to keep it exact
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    theta, losses = linear_losses(jac)
    with pytest.raises(BalancerError, match="imtlfull"):
        IMTL(3).backward(losses, [theta])


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_imtlfull_properties(case):
    # IMTL-G's α ignores the overall size of the gradients (cosines and norm ratios), s starts equal
    # for every task: d is linear in J, symmetric in the tasks. Least-squares solves in float64 of
    # condition ≲ 1e3: 1e-10 (the tolerance test_imtl.py uses for the same solver)
    step = balancer_step("imtlfull")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)
