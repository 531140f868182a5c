"""Nash-MTL: the bargaining solution G Gᵀ α = 1/α."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import BalancerError, gram
from mtl_tune.balancers.nashmtl import NashMTL, nash_weights

from ._helpers import random_jacobian, written_direction
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)


def test_nash_stationary_steps_and_reuse_steps():
    """Nash-MTL at a stationary point: shared gradient 0 on the solve step and on the reuse steps
    after it, heads with the previous α, weights 0; the state round trip keeps the decision."""
    nash = NashMTL(2, update_weights_every=3, max_norm=None)
    good = torch.tensor([[1.0, 0.5], [0.2, 1.0]], dtype=torch.float64)
    opposite = torch.tensor([[1.0, 0.5], [-2.0, -1.0]], dtype=torch.float64)

    def step(jac):
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        heads = [torch.tensor([1.0], dtype=torch.float64, requires_grad=True) for _ in range(2)]
        losses = jac @ theta + torch.cat([h ** 2 for h in heads])
        info = nash.backward(losses, [theta], [[h] for h in heads])
        return theta.grad.clone(), [h.grad.item() for h in heads], info

    d, heads, info = step(good)                      # step 0: solve
    alpha = nash.alpha.copy()
    assert torch.count_nonzero(d) > 0 and np.allclose(heads, 2 * alpha)
    step(good), step(good)                           # steps 1, 2: reuse
    d, heads, info = step(opposite)                  # step 3: solve → stationary
    assert torch.count_nonzero(d) == 0 and np.allclose(heads, 2 * alpha) and torch.count_nonzero(info.weights) == 0
    np.testing.assert_array_equal(nash.alpha, alpha)
    other = NashMTL(2, update_weights_every=3, max_norm=None)
    other.load_state_dict(nash.state_dict())
    for bal in (nash, other):                        # step 4: reuse of a stationary decision, even on `good`
        theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        info = bal.backward(good @ theta + 1.0, [theta])
        assert torch.count_nonzero(theta.grad) == 0 and info.extras["stationary_steps"] == 2
    assert nash.failures.total == 0


def test_nash_zero_gradient_task_counts_failure_keeps_previous_alpha():
    jac = random_jacobian(3, 10, 2)
    nash = NashMTL(3, max_norm=None)
    nash.solve(gram(jac))
    before = nash.alpha.copy()
    jac0 = jac.clone()
    jac0[2] = 0.0
    with pytest.warns(RuntimeWarning, match="zero gradient"):
        alpha = nash.solve(gram(jac0))
    assert nash.failures.total == 1
    assert alpha[2] == before[2]  # no finite solution: keeps its previous weight
    exact = nash_weights(gram(jac0[:2]).numpy())[0]
    np.testing.assert_allclose(alpha[:2], exact, rtol=1e-9)  # the others: exact reduced solution
    for _ in range(18):
        with pytest.warns(RuntimeWarning):
            nash.solve(gram(jac0))
    with pytest.warns(RuntimeWarning), pytest.raises(BalancerError):
        nash.solve(gram(jac0))


def test_nash_solution_satisfies_bargaining_equation():
    for k in (1, 2, 3, 11, 40):
        jac = random_jacobian(k, 3 * k + 5, k)
        nash = NashMTL(k)
        alpha = nash.solve(gram(jac))
        a = gram(jac).numpy()
        np.testing.assert_allclose(a @ alpha, 1.0 / alpha, rtol=1e-8)
        assert nash.failures.total == 0


def test_nash_invariant_to_per_task_gradient_scaling():
    jac = random_jacobian(3, 15, 4)
    c = torch.tensor([1e-3, 1.0, 250.0], dtype=torch.float64)
    d1 = written_direction(NashMTL(3, max_norm=None), jac)
    d2 = written_direction(NashMTL(3, max_norm=None), c[:, None] * jac)
    torch.testing.assert_close(d1, d2, rtol=1e-7, atol=1e-10)
    a1, a2 = NashMTL(3), NashMTL(3)
    np.testing.assert_allclose(a2.solve(gram(c[:, None] * jac)), a1.solve(gram(jac)) / c.numpy(), rtol=1e-8)


def test_nash_heads_weighted_and_clip_default():
    trunk, heads = nn.Linear(4, 3), nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    z = trunk(torch.randn(6, 4))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    plain = [torch.autograd.grad(losses[i], list(heads[i].parameters()), retain_graph=True) for i in range(2)]
    nash = NashMTL(2)
    info = nash.backward(losses, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    for i in range(2):
        for p, g in zip(heads[i].parameters(), plain[i]):
            torch.testing.assert_close(p.grad, float(info.weights[i]) * g)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trunk.parameters()))
    assert float(norm) <= 1.0 + 1e-6


def test_nash_update_every_reuses_alpha_without_jacobian():
    jac = random_jacobian(2, 6, 5)
    nash = NashMTL(2, update_weights_every=3, max_norm=None)
    calls = []
    real = nash.engine.jacobian
    nash.engine.jacobian = lambda *a, **k: calls.append(1) or real(*a, **k)
    dirs = [written_direction(nash, jac) for _ in range(4)]
    assert len(calls) == 2  # steps 0 and 3
    for d in dirs[1:]:
        torch.testing.assert_close(d, dirs[0])


def test_nash_cccp_solver_option_matches_newton():
    jac = random_jacobian(2, 8, 1, spread=0.3)
    cccp = NashMTL(2, solver="cccp")
    alpha = cccp.solve(gram(jac))
    assert cccp.failures.total == 0
    np.testing.assert_allclose(alpha, NashMTL(2).solve(gram(jac)), rtol=1e-4)


def test_nash_state_round_trip_and_warm_start():
    jac = random_jacobian(3, 9, 3)
    a = NashMTL(3)
    a.solve(gram(jac))
    b = NashMTL(3)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.alpha, b.alpha)
    # warm start from the saved α: the same problem converges immediately
    b.solve(gram(jac))
    assert b._iterations <= 1


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_nashmtl_properties(case):
    # Aα = 1/α: A → a²A gives α → α/a, so d = Σ α_i g_i is scale-invariant (degree 0).
    # Newton to relative residual 1e-10 (the solver's tol): the weights move by ≲ cond·1e-10 with
    # cond ≲ 100 on these well-posed problems, hence 1e-8
    step = balancer_step("nashmtl")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-8)
    assert_gradient_scaling(step, case, degree=0, weight_degree=-1, rtol=1e-8)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_nash_weights_properties(case):
    # A α = 1/α: a²A gives α/a (weight degree −1); Newton to relative residual 1e-10, hence 1e-8
    assert_gram_function_equivariant(lambda a: nash_weights(a)[0], case, weight_degree=-1, rtol=1e-8)
