"""PMGDA: MGDA in the tangent space of the preference constraint h (predict), an LP that decreases h
at rate σ‖∇h‖ while descending every loss as much as possible (correct)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtl_tune.balancers.pmgda as pmgda_module
from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.pmgda import CORRECT, PREDICT, constraint_rows, correct_lp, correct_two, predict_rows
from mtl_tune.registry import get_balancer

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)

S = 1 / math.sqrt(2)


def step(jac, losses, **hp):
    x = torch.zeros(np.shape(jac)[1], dtype=torch.float64, requires_grad=True)
    bal = get_balancer("pmgda", len(losses), max_norm=None, **hp)
    info = bal.backward(torch.as_tensor(jac, dtype=torch.float64) @ x + torch.as_tensor(losses, dtype=torch.float64),
                        [x])
    return x.grad.numpy(), info


def test_constraint_values_and_gradients_closed_form_and_numeric():
    # pbi, λ = (1, 1), ℓ = (1, 3): the residual to the ray is (−1, 1), h = √2, a = (−1, 1)/√2
    h, a, ok = constraint_rows(np.array([1.0, 3.0]), np.ones(2), "pbi")
    assert ok and h == pytest.approx(math.sqrt(2), rel=1e-15)
    np.testing.assert_allclose(a, [-S, S], rtol=1e-15)
    # cos: 1 − 4/(√10 √2); every kind's a against central differences (h is smooth off the ray)
    h, _, _ = constraint_rows(np.array([1.0, 3.0]), np.ones(2), "cos")
    assert h == pytest.approx(1 - 4 / math.sqrt(20), rel=1e-14)
    rng = np.random.default_rng(0)
    for kind in ("pbi", "cos", "cel"):
        for _ in range(5):
            ell, lam = rng.uniform(0.2, 2, 3), rng.uniform(0.2, 2, 3)
            _, a, _ = constraint_rows(ell, lam, kind)
            e = 1e-6 * np.eye(3)
            num = [(constraint_rows(ell + e[i], lam, kind)[0] - constraint_rows(ell - e[i], lam, kind)[0]) / 2e-6
                   for i in range(3)]
            np.testing.assert_allclose(a, num, rtol=1e-6, atol=1e-8)


def test_on_the_ray_it_is_mgda():
    """ℓ = λ: h = 0, a = 0, a predict step: plain MGDA. Orthogonal gradients of norms² (1, 4): the min-norm
    point γ = 4/5 on the first, weights K μ = (1.6, 0.4), and both losses decrease at rate 4/5."""
    jac = np.array([[1.0, 0.0], [0.0, 2.0]])
    d, info = step(jac, [1.0, 2.0], preferences=[1.0, 2.0])
    assert info.extras["pmgda_move"] == PREDICT and info.extras["pmgda_h"] == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(info.weights.numpy(), [1.6, 0.4], rtol=1e-14)
    np.testing.assert_allclose(jac @ d, [1.6, 1.6], rtol=1e-14)


def test_on_the_ray_up_to_rounding_a_is_zero():
    """ℓ ∝ λ in exact arithmetic but a residual of rounding noise (h ~ 1e-16, a random direction): a = 0,
    the step is plain MGDA (orthonormal gradients: μ = (½, ½), weights 1)."""
    for lam, ell in (((0.1, 0.3), (0.3, 0.9)), ((1.0, 3.0), (0.7, 2.1)), ((3.0, 7.0), (0.3, 0.7))):
        h, a, _ = constraint_rows(np.array(ell), np.array(lam), "pbi")
        assert 0 < h < 1e-15 and not a.any()
        _, info = step(np.eye(2), ell, preferences=list(lam))
        np.testing.assert_allclose(info.weights.numpy(), [1.0, 1.0], rtol=1e-15)


def test_near_the_ray_the_prediction_moves_along_it():
    """λ = (1, 2), ℓ = λ + δ (2, −1)/√5 (h = δ < ε), orthonormal gradients: a = (2, −1)/√5, the projected
    Gram matrix is b bᵀ with b = (1, 2)/√5, min-norm on the simplex μ = (1, 0), ν = −μ·a = −2/√5,
    c = μ + ν a = (1/5, 2/5): the losses move along λ (Cc ∝ λ, ∇h·d = 0). The official plain MGDA: c = (½, ½)."""
    delta = 1e-3
    losses = np.array([1.0, 2.0]) + delta * np.array([2.0, -1.0]) / math.sqrt(5)
    d, info = step(np.eye(2), losses, preferences=[1.0, 2.0])
    assert info.extras["pmgda_move"] == PREDICT and info.extras["pmgda_h"] == pytest.approx(delta, rel=1e-9)
    # a = r/h with the residual r ≈ 1e-3 a difference of O(1) numbers: relative error ~ eps·‖ℓ‖/h ≈ 5e-13
    np.testing.assert_allclose(info.weights.numpy(), [0.4, 0.8], rtol=1e-11)
    _, info = step(np.eye(2), losses, preferences=[1.0, 2.0], prediction="mgda")
    np.testing.assert_allclose(info.weights.numpy(), [1.0, 1.0], rtol=1e-14)


def test_far_off_the_ray_the_correction_moves_toward_it():
    """λ = (1, 1), ℓ = (1, 3), orthonormal g: h = √2, ∇h = (g₁ − g₀)/√2 (unit). With s = 1/√2 the LP over
    μ ∈ Δ² is max min(μ₀ − sμ₂, μ₁ + sμ₂) s.t. s(μ₁ − μ₀) + μ₂ ≥ σ. Equal descent (μ₀ − μ₁ = √2 μ₂) gives
    s(μ₁ − μ₀) + μ₂ = 0 < σ, so the first task is the worse one and the optimum is the constraint's vertex
    with μ₀ = 0: μ₁ = (1 − σ)/(1 − s), μ₂ = 1 − μ₁; c = (−sμ₂, μ₁ + sμ₂). The lagging task descends, the
    other is allowed to rise, and h decreases at exactly σ‖∇h‖."""
    sigma = 0.8
    d, info = step(np.eye(2), [1.0, 3.0], sigma=sigma)
    assert info.extras["pmgda_move"] == CORRECT and info.extras["pmgda_h"] == pytest.approx(math.sqrt(2))
    mu1 = (1 - sigma) / (1 - S)
    mu2 = 1 - mu1
    np.testing.assert_allclose(info.weights.numpy(), [-2 * S * mu2, 2 * (mu1 + S * mu2)], rtol=1e-9)
    _, a, _ = constraint_rows(np.array([1.0, 3.0]), np.ones(2), "pbi")
    assert a @ (d / 2) == pytest.approx(sigma, rel=1e-9)     # ∇h·d̃ = σ‖∇h‖ (d = K d̃)
    # first order: one small step moves ℓ toward the ray
    new = np.array([1.0, 3.0]) - 0.01 * d
    assert constraint_rows(new, np.ones(2), "pbi")[0] < math.sqrt(2) - 0.01


def test_tangent_prediction_satisfies_its_kkt_conditions():
    """KKT of min ‖Σ μᵢgᵢ + ν∇h‖ over μ ∈ Δ, ν ∈ ℝ at c = μ + νa: ∇h·d = 0 (stationarity in ν), and
    (Cc)ᵢ ≥ ‖d‖² for every i, with equality where μᵢ > 0 (the simplex)."""
    rng = np.random.default_rng(2)
    for k in (2, 3, 4):
        for _ in range(20):
            jac = rng.normal(size=(k, 6)) * rng.lognormal(0, 0.5, (k, 1))
            gram, a = jac @ jac.T, rng.normal(size=k)
            c, ok = predict_rows(gram, a, tangent=True)
            assert ok
            nu = (c.sum() - 1) / a.sum()          # c = μ + νa with Σμ = 1
            mu = c - nu * a
            assert mu.min() >= -1e-9 and mu.sum() == pytest.approx(1, abs=1e-12)
            cc, norm2 = gram @ c, c @ gram @ c
            assert abs(a @ cc) <= 1e-8 * np.trace(gram) * np.abs(a).sum()
            assert (cc >= norm2 - 1e-8 * np.trace(gram)).all()
            np.testing.assert_allclose(cc[mu > 1e-8], norm2, atol=1e-8 * np.trace(gram))


def test_correction_lp_is_feasible_and_optimal_on_random_cases():
    """The LP's μ meets ∇h·d̃ ≥ σ‖∇h‖, and no point of a dense random sample of the simplex that meets it
    has a larger worst descent minᵢ gᵢ·d̃ (HiGHS's tolerance 1e-7)."""
    rng = np.random.default_rng(3)
    for k in (2, 3):
        for _ in range(10):
            jac = rng.normal(size=(k, 5))
            gram, a = jac @ jac.T, rng.normal(size=k)
            c, msg = correct_lp(gram, a, 0.8)
            assert c is not None, msg
            gh = a @ jac
            vectors = np.vstack([jac, gh])
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
            d = c @ jac
            assert gh @ d >= 0.8 * np.linalg.norm(gh) - 1e-7
            best = (jac @ d).min()
            sample = rng.dirichlet(np.ones(k + 1), 20000)
            dirs = sample @ unit
            feasible = dirs @ gh >= 0.8 * np.linalg.norm(gh)
            assert feasible.any()
            assert (dirs[feasible] @ jac.T).min(1).max() <= best + 1e-7


def test_two_task_closed_form_matches_linprog():
    """correct_two against HiGHS on random rows (100 per σ): the same worst descent (the LP's value) and, on these generic
    rows (a unique optimum), the same c; also ∇h = 0 (a = 0: the constraint is 0 ≥ 0) and σ = 1."""
    rng = np.random.default_rng(4)
    jac = rng.normal(size=(100, 2, 3)) * rng.lognormal(0, 1, (100, 2, 1))
    gram, a = jac @ jac.transpose(0, 2, 1), rng.normal(size=(100, 2))
    a[:20] = 0.0
    for sigma in (0.8, 1.0, 0.1):
        got, solved = correct_two(gram, a, sigma)
        assert solved.all()
        for i in range(100):
            want, msg = correct_lp(gram[i], a[i], sigma)
            assert want is not None, msg
            value = lambda c: (gram[i] @ c).min()           # min_i g_i·d̃ = min_i (Cc)_i
            scale = np.abs(gram[i]).max() ** 0.5
            assert value(got[i]) == pytest.approx(value(want), abs=1e-7 * scale)
            if i >= 20:
                np.testing.assert_allclose(got[i], want, atol=1e-6 / np.sqrt(np.diag(gram[i])).min())


def test_solver_failures_are_counted(monkeypatch):
    # K = 2: the closed form always has the vertex μ = e_K (σ ≤ 1); only a non-finite Gram matrix leaves none
    bal = get_balancer("pmgda", 2)
    out = bal.weights_rows(np.array([[1.0, np.nan], [np.nan, 1.0]]), np.array([1.0, 3.0]))
    assert out.solver_failed and "closed-form LP (K = 2): no feasible vertex" in out.solver_message
    np.testing.assert_allclose(out.weights, [1.0, 1.0])
    class Failed:
        status, x, message = 2, None, "infeasible (test)"

    monkeypatch.setattr(pmgda_module, "linprog", lambda *a, **kw: Failed())
    with pytest.warns(RuntimeWarning, match="pmgda: solver failed .used equal weights .linprog .HiGHS. status 2"):
        _, info = step(np.eye(3), [1.0, 3.0, 2.0])
    np.testing.assert_allclose(info.weights.numpy(), [1.0, 1.0, 1.0])
    assert info.extras["solver_failures"] == 1
    monkeypatch.setattr(pmgda_module, "min_norm_weights",
                        lambda g: (np.full(g.shape[:-1], np.nan), np.zeros(g.shape[:-2], dtype=bool)))
    bal = get_balancer("pmgda", 3)
    out = bal.weights_rows(np.eye(3), np.ones(3))
    assert out.solver_failed and "min-norm" in out.solver_message
    np.testing.assert_allclose(out.weights, [1.0, 1.0, 1.0])


def test_undefined_constraints_fail_and_bad_arguments():
    with pytest.raises(BalancerError, match="'cos' needs finite, not all zero"):
        step(np.eye(2), [0.0, 0.0], constraint="cos")
    with pytest.raises(BalancerError, match="'cel' needs"):
        step(np.eye(2), [-1.0, 0.5], constraint="cel")
    _, info = step(np.eye(2), [-1.0, 0.5])          # pbi: any finite losses
    assert np.isfinite(info.weights.numpy()).all()
    for kw in ({"preferences": [1.0, 0.0]}, {"preferences": [1.0]}, {"h_eps": -1.0}, {"sigma": 0.0},
               {"sigma": 1.5}, {"constraint": "l2"}, {"prediction": "exact"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            get_balancer("pmgda", 2, **kw)


def test_rows_match_one_row_each():
    rng = np.random.default_rng(1)
    jac = rng.normal(size=(6, 3, 4))
    gram, losses = jac @ jac.transpose(0, 2, 1), rng.uniform(0.2, 2, (6, 3))
    losses[0] = [1.0, 2.0, 3.0]                      # on the ray: a predict row among correct rows
    bal = get_balancer("pmgda", 3, preferences=[1.0, 2.0, 3.0])
    rows = bal.weights_rows(gram, losses)
    assert rows.extras["pmgda_move"][0] == PREDICT and (rows.extras["pmgda_move"][1:] == CORRECT).all()
    for i in range(6):
        np.testing.assert_array_equal(rows.weights[i], bal.weights_rows(gram[i], losses[i]).weights)


@pytest.mark.parametrize("prediction", ["tangent", "mgda"])
@pytest.mark.parametrize("k", [2, 3])
def test_batches_of_one_move_and_mixed_batches_match_one_row_each(k, prediction):
    # all rows predicting (one solve on the rows as they are), all correcting, both, and with a row whose
    # losses are not finite (masked): each row's weights and move are those of the row alone. The
    # predicting rows are near the ray (∇h ≠ 0: projected) and on it (a = 0: not projected)
    rng = np.random.default_rng(10 + k)
    jac = rng.normal(size=(6, k, 4))
    gram, pref = jac @ jac.transpose(0, 2, 1), np.arange(1.0, k + 1)
    near = pref * (1 + 1e-3 * rng.normal(size=(6, k)))
    far = rng.uniform(0.2, 2, (6, k))
    mixed = far.copy()
    mixed[[0, 3]] = near[[0, 3]]
    mixed[4] = pref                                      # exactly on the ray: a = 0
    undefined = mixed.copy()
    undefined[2, 0] = np.nan
    bal = get_balancer("pmgda", k, preferences=pref.tolist(), prediction=prediction)
    for losses, moves in ((near, [PREDICT] * 6), (far, [CORRECT] * 6), (mixed, None), (undefined, None)):
        rows = bal.weights_rows(gram, losses)
        if moves is not None:
            assert rows.extras["pmgda_move"].tolist() == moves
        for i in range(6):
            one = bal.weights_rows(gram[i], losses[i])
            np.testing.assert_array_equal(rows.weights[i], one.weights)
            assert rows.extras["pmgda_move"][i] == one.extras["pmgda_move"] and rows.failed[i] == one.failed
    assert rows.failed.tolist() == [False, False, True, False, False, False] and np.isnan(rows.weights[2]).all()


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_pmgda_properties(case):
    # these losses are far from the ray of λ = 1 (h ≥ ε): correction steps. J → aJ scales the LP's
    # objective and constraint alike (its vectors are normalised): the same μ, d̃ unchanged (degree 0),
    # cᵢ = μᵢ/‖gᵢ‖ + … scales as 1/a. Permuting tasks permutes the LP; HiGHS's tolerance 1e-7.
    assert constraint_rows(case.losses.numpy(), np.ones(case.k), "pbi")[0] >= pmgda_module.H_EPS
    stepper = balancer_step("pmgda")
    assert_valid_step(*stepper(case.jac, case.losses), case)
    assert_permutation_equivariant(stepper, case, rtol=1e-7)
    assert_gradient_scaling(stepper, case, degree=0, weight_degree=-1, rtol=1e-7)
