"""EPO: one LP per step that balances r ⊙ ℓ, then descends keeping the balance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.epo import (BALANCE, DESCENT, adjustments, epo_lp, epo_lps, simplex_lp, simplex_lp_two,
                                   simplex_lp_two_rows)
from mtl_tune.registry import get_balancer

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def step(jac, losses, **hp):
    x = torch.zeros(jac.shape[1], dtype=torch.float64, requires_grad=True)
    bal = get_balancer("epo", len(losses), max_norm=None, **hp)
    info = bal.backward(torch.as_tensor(jac, dtype=torch.float64) @ x + torch.as_tensor(losses, dtype=torch.float64),
                        [x])
    return x.grad.numpy(), info


def test_adjustments_closed_form():
    # r ⊙ ℓ = (1, 3): l̂ = (¼, ¾), μ = ¼ log ½ + ¾ log 3/2, a = log(2 l̂) − μ
    rl, mu, a = adjustments(np.array([1.0, 3.0]), np.ones(2))
    want_mu = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert mu == pytest.approx(want_mu, rel=1e-15)
    np.testing.assert_allclose(a, [math.log(0.5) - want_mu, math.log(1.5) - want_mu], rtol=1e-15)


def test_on_the_preference_ray_it_is_pure_descent():
    """r ⊙ ℓ uniform: μ = 0, a = 0, a descent step: max Σⱼ (Cα)ⱼ with Cα ≥ 0 — for orthogonal gradients
    of norms² (1, 4) all weight on the larger one, and every loss decreases to first order."""
    r = np.array([1.0, 2.0])
    losses = 3.0 / r                       # r ⊙ ℓ = (3, 3)
    d, info = step(np.array([[1.0, 0.0], [0.0, 2.0]]), losses, preferences=r.tolist())
    assert info.extras["epo_move"] == DESCENT and info.extras["epo_mu"] == 0.0
    np.testing.assert_allclose(info.weights.numpy(), [0.0, 2.0], atol=1e-15)   # K α, α = (0, 1)
    # acute gradients: the LP's optimum keeps both directional derivatives ≥ 0
    jac = np.array([[1.0, 0.2, 0.0], [0.4, 1.0, 0.3]])
    d, info = step(jac, losses, preferences=r.tolist())
    assert info.extras["epo_move"] == DESCENT
    assert (jac @ d >= -1e-12).all()


def test_balance_step_helps_the_task_of_largest_relative_loss():
    """r = 1, ℓ = (1, 3), orthonormal gradients: Ca = a = (−0.82, 0.27); J = {1} = J*, so the LP maximises
    αᵀa s.t. α₀ ≥ a₀ (always) and α₁ ≥ 0: α = (0, 1), the whole step on the lagging task."""
    d, info = step(np.eye(2), [1.0, 3.0])
    assert info.extras["epo_move"] == BALANCE
    np.testing.assert_allclose(info.weights.numpy(), [0.0, 2.0], atol=1e-15)


def test_two_task_closed_form_matches_linprog():
    """The K = 2 closed-form LP against SciPy's HiGHS on the LPs EPO builds, random cases (a third of them
    within 1e-3 of the ray, i.e. descent steps); HiGHS's feasibility tolerance is 1e-7. All rows in one
    call of the closed form, each LP alone through linprog."""
    rng = np.random.default_rng(0)
    grams, losses, prefs = [], [], []
    for i in range(300):
        jac, r = rng.normal(size=(2, 3)), rng.uniform(0.2, 2, 2)
        grams.append(jac @ jac.T)
        losses.append(1 / r * rng.uniform(1, 1 + 1e-3) if i % 3 == 0 else rng.uniform(0.1, 3, 2))
        prefs.append(r)
    lps = [epo_lps(g[None], ell[None], r) for g, ell, r in zip(grams, losses, prefs)]
    assert {int(lp["move"][0]) for lp in lps} == {BALANCE, DESCENT}
    objective, lhs, rhs, present = (np.concatenate([lp[key] for lp in lps])
                                    for key in ("objective", "lhs", "rhs", "present"))
    got, messages = simplex_lp_two_rows(objective, lhs, rhs, present)
    for i in range(300):
        want, _ = simplex_lp(objective[i], lhs[i][present[i]], rhs[i][present[i]])
        assert (want is None) == bool(messages[i])
        if want is not None:
            np.testing.assert_allclose(got[i], want, atol=1e-7)
        one, msg = simplex_lp_two(objective[i], lhs[i][present[i]], rhs[i][present[i]])
        assert msg == messages[i] and (one is None or np.array_equal(one, got[i]))


def test_three_task_linprog_constraints_hold():
    rng = np.random.default_rng(3)
    for _ in range(20):
        jac, losses = rng.normal(size=(3, 5)), rng.uniform(0.2, 2, 3)
        gram = jac @ jac.T
        alpha, move, mu, msg = epo_lp(gram, losses, np.ones(3))
        assert alpha is not None, msg
        assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1, abs=1e-12)
        if move == BALANCE:
            worst = losses == losses.max()
            assert (gram[worst] @ alpha >= -1e-7).all()   # the lagging task does not get worse


def test_zero_relative_loss_is_a_counted_solver_failure():
    with pytest.warns(RuntimeWarning, match="epo: solver failed .LP failed, used α = r/Σr"):
        _, info = step(np.eye(2), [0.0, 1.0], preferences=[1.0, 3.0])
    np.testing.assert_allclose(info.weights.numpy(), [0.5, 1.5])   # K r/Σr, the official fallback
    assert info.extras["solver_failures"] == 1


def test_infeasible_lp_is_reported():
    # a constraint independent of α violated: 0·t ≥ 1
    alpha, msg = simplex_lp_two(np.ones(2), np.array([[1.0, 1.0]]), np.array([2.0]))
    assert alpha is None and "infeasible" in msg
    alpha, msg = simplex_lp(np.ones(3), np.ones((1, 3)), np.array([2.0]))
    assert alpha is None and "HiGHS" in msg


def test_negative_losses_fail_and_bad_arguments():
    with pytest.raises(BalancerError, match="non-negative losses"):
        step(np.eye(2), [1.0, -0.5])
    for kw in ({"preferences": [1.0, 0.0]}, {"preferences": [1.0]}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            get_balancer("epo", 2, **kw)


def test_rows_match_one_row_each():
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(6, 2, 3))
    gram, losses = jac @ jac.transpose(0, 2, 1), rng.uniform(0.2, 2, (6, 2))
    bal = get_balancer("epo", 2, preferences=[1.0, 2.0])
    rows = bal.weights_rows(gram, losses)
    for i in range(6):
        np.testing.assert_array_equal(rows.weights[i], bal.weights_rows(gram[i], losses[i]).weights)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_epo_properties(case):
    # J → aJ scales C by a², which scales the LP's objective and constraints alike: the same α (degree 0);
    # permuting the tasks permutes the LP. K = 2: closed form (1e-12); K ≥ 3: HiGHS's vertex, whose
    # feasibility tolerance is 1e-7
    rtol = 1e-12 if case.k == 2 else 1e-7
    stepper = balancer_step("epo")
    assert_valid_step(*stepper(case.jac, case.losses), case)
    assert_permutation_equivariant(stepper, case, rtol=rtol)
    assert_gradient_scaling(stepper, case, degree=1, weight_degree=0, rtol=rtol)


@pytest.mark.parametrize("k", [2, 3])
def test_rows_with_a_failing_lp_among_them(k):
    # one row whose relative loss is 0 (a solver failure, K r/Σr) and one with a negative loss (a failed
    # row) among ordinary rows: each row's outcome is its own, equal to that row alone
    rng = np.random.default_rng(k)
    jac = rng.normal(size=(5, k, 4))
    gram, losses = jac @ jac.transpose(0, 2, 1), rng.uniform(0.2, 2, (5, k))
    losses[1, 0], losses[3, -1] = 0.0, -1.0
    bal = get_balancer("epo", k)
    rows = bal.weights_rows(gram, losses)
    assert rows.solver_failed.tolist() == [False, True, False, False, False]
    assert rows.failed.tolist() == [False, False, False, True, False]
    np.testing.assert_allclose(rows.weights[1], np.ones(k))          # K r/Σr with r = 1
    assert "relative loss is 0" in rows.solver_message
    for i in (0, 2, 4):
        np.testing.assert_array_equal(rows.weights[i], bal.weights_rows(gram[i], losses[i]).weights)


@pytest.mark.parametrize("k", [2, 3])
def test_rows_with_zero_losses_among_them_match_one_row_each(k):
    # a row with every loss 0 (Σ r⊙ℓ = 0: μ = 0, a = 0, masked) among ordinary rows, and the ordinary rows
    # alone (nothing masked, no unsolvable row): each row's weights, move and μ are those of the row alone
    rng = np.random.default_rng(20 + k)
    jac = rng.normal(size=(5, k, 4))
    gram, losses = jac @ jac.transpose(0, 2, 1), rng.uniform(0.2, 2, (5, k))
    losses[2] = 0.0
    bal = get_balancer("epo", k, preferences=list(np.arange(1.0, k + 1)))
    for sel in ([0, 1, 2, 3, 4], [0, 1, 3, 4]):
        rows = bal.weights_rows(gram[sel], losses[sel])
        assert not rows.failed.any() and not rows.solver_failed.any()
        for i, j in enumerate(sel):
            one = bal.weights_rows(gram[j], losses[j])
            np.testing.assert_array_equal(rows.weights[i], one.weights)
            assert rows.extras["epo_move"][i] == one.extras["epo_move"]
            assert rows.extras["epo_mu"][i] == one.extras["epo_mu"]
    assert bal.weights_rows(gram[2], losses[2]).extras["epo_move"] == DESCENT
