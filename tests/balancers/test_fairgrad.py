"""FairGrad: the α-fair update d = K Σ x_i g_i."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers._fairness import solve_fair
from mtl_tune.balancers.base import gram
from mtl_tune.balancers.fairgrad import FairGrad
from mtl_tune.balancers.nashmtl import CCCPSolver, NashMTL

from ._helpers import near_stationary_gram, random_jacobian, written_direction
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_fairgrad_direction_is_k_times_gx_and_clipped():
    jac = random_jacobian(3, 8, 0)
    fg = FairGrad(3, alpha=2.0, max_norm=None)
    d = written_direction(fg, jac)
    x = solve_fair(gram(jac).numpy(), 2.0).x
    torch.testing.assert_close(d, 3 * torch.from_numpy(x) @ jac)
    clipped = written_direction(FairGrad(3, alpha=2.0), jac)  # default max_norm = 1.0
    # torch clips to max_norm/(‖g‖ + 1e-6), hence the tolerance
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0, dtype=clipped.dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), d / d.norm())


def test_fairgrad_alpha1_equals_nash_weights_from_official_cccp():
    # independent check: Newton (FairGrad α=1) vs the official sequential convex program
    checked = 0
    for seed in range(6):
        for k in (2, 3):
            a = gram(random_jacobian(k, 20, seed, spread=0.5)).numpy()
            alpha, ok, _, _ = CCCPSolver(k).solve(a, np.ones(k))
            if not ok:  # the official CCCP sometimes stalls; that is what the failure counter is for
                continue
            checked += 1
            np.testing.assert_allclose(solve_fair(a, 1.0).x, alpha, rtol=1e-4)
    assert checked >= 8


def test_fairgrad_alpha1_equals_nashmtl_balancer():
    jac = random_jacobian(3, 12, 7)
    fg = FairGrad(3, alpha=1.0)
    _, w = fg.combine(jac, torch.ones(3))
    nash = NashMTL(3)
    nash.solve(gram(jac))
    np.testing.assert_allclose(w.numpy() / 3, nash.alpha, rtol=1e-9)


def test_fairgrad_heads_get_unweighted_gradients():
    trunk, heads = nn.Linear(4, 3), nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    z = trunk(torch.randn(6, 4))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    expected = [torch.autograd.grad(losses[i], list(heads[i].parameters()), retain_graph=True) for i in range(2)]
    FairGrad(2).backward(losses, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    for i in range(2):
        for p, g in zip(heads[i].parameters(), expected[i]):
            torch.testing.assert_close(p.grad, g)


def test_stationary_step_ends_a_run_of_failures():
    fg = FairGrad(3, max_iter=1)
    a3 = torch.from_numpy(near_stationary_gram(3, 1e-3, seed=5, spread=2.0))
    hard = torch.linalg.cholesky(a3 + 1e-12 * torch.eye(3, dtype=torch.float64))
    opposite = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            for _ in range(15):
                written_direction(fg, hard)
            written_direction(fg, opposite)
    assert fg.failures.total == 45 and fg.stationary_steps == 3 and fg.failures.consecutive == 0


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("alpha", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_fairgrad_properties(case, alpha):
    # A → A/s gives x → s^{α/(α+1)} x (test_fair_scaling_law); J → aJ is s = a⁻²: x → a^{−2α/(α+1)} x
    # and d = K Σ x_i g_i → a^{(1−α)/(1+α)} d (α = 1: scale-invariant like Nash-MTL).
    # Newton to relative residual 1e-10 (the solver's tol): the weights move by ≲ cond·1e-10 with
    # cond ≲ 100 on these well-posed problems, hence 1e-8
    step = balancer_step("fairgrad", alpha=alpha)
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-8)
    assert_gradient_scaling(step, case, degree=(1 - alpha) / (1 + alpha), weight_degree=-2 * alpha / (alpha + 1),
                            rtol=1e-8)
