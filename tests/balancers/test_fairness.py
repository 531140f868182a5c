"""The shared FairGrad solver (mtl_tune/balancers/_fairness.py): α-fair weights, the
Pareto-stationarity test and failure counting, used by fairgrad, pivrg and consmtl."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mtl_tune.balancers._fairness import STATIONARY_HULL, fair_residual, pareto_gap, scaled_gram, solve_fair
from mtl_tune.balancers._simplex import min_norm_simplex
from mtl_tune.balancers.base import gram
from mtl_tune.balancers.pivrg import PIVRG

from ._helpers import linear_losses, near_stationary_gram, random_jacobian, two_task_gram
from ._properties import assert_gram_function_equivariant, property_cases


def _exact_errors(a: np.ndarray, x: np.ndarray, alpha: float,
                  p: np.ndarray | None = None) -> tuple[float, float, float]:
    """(relative residual max_i |(Ax)_i/rhs_i − 1|, backward error max_i |(Ax)_i − rhs_i|/(rhs_i + (|A|x)_i),
    condition max_i (|A|x)_i / rhs_i) with rhs_i = (p_i/x_i)^{1/α}, in 50-digit arithmetic on the float64
    inputs (near the front (Ax)_i cancels: its float64 evaluation carries an error ~1e-16/h of its own).
    The condition is what turns a float64 rounding of the terms of (Ax)_i into relative residual."""
    import mpmath as mp

    p = np.ones(len(x)) if p is None else p
    rel = bwd = cond = 0
    with mp.workdps(50):
        for i in range(len(x)):
            ax = mp.fsum(mp.mpf(float(a[i, j])) * mp.mpf(float(x[j])) for j in range(len(x)))
            size = mp.fsum(abs(mp.mpf(float(a[i, j]))) * mp.mpf(float(x[j])) for j in range(len(x)))
            rhs = (mp.mpf(float(p[i])) / mp.mpf(float(x[i]))) ** (1 / mp.mpf(alpha))
            rel, bwd = max(rel, abs(ax / rhs - 1)), max(bwd, abs(ax - rhs) / (rhs + size))
            cond = max(cond, size / rhs)
        return float(rel), float(bwd), float(cond)


def _exact_pair_solution(a: np.ndarray, alpha: float, p: np.ndarray | None = None) -> np.ndarray:
    """x of a K = 2 problem in 60-digit arithmetic on the float64 Gram entries. With x = x₁(1, t) the
    ratio of the two equations is f(t) = log(a₁₁ + a₁₂t) − log(a₁₂ + a₂₂t) − (log(p₁/p₂) + log t)/α = 0,
    bisected on the t where both (Ax)_i > 0; then x₁^{1+1/α}(a₁₁ + a₁₂t) = p₁^{1/α}."""
    import mpmath as mp

    p = np.ones(2) if p is None else p
    with mp.workdps(60):
        a11, a12, a22 = (mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        p1, p2, al = mp.mpf(float(p[0])), mp.mpf(float(p[1])), mp.mpf(alpha)

        def f(t):
            return mp.log(a11 + a12 * t) - mp.log(a12 + a22 * t) - (mp.log(p1 / p2) + mp.log(t)) / al

        lo, hi = (-a12 / a22, -a11 / a12) if a12 < 0 else (mp.mpf(10) ** -60, mp.mpf(10) ** 60)
        for _ in range(600):  # f runs from +∞ (or > 0) at lo to −∞ (or < 0) at hi
            mid = (lo + hi) / 2 if a12 < 0 else mp.sqrt(lo * hi)
            lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
        t = (lo + hi) / 2
        x1 = (p1 ** (1 / al) / (a11 + a12 * t)) ** (al / (al + 1))
        return np.array([float(x1), float(t * x1)])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k,p", [(2, 10), (3, 50), (11, 200), (40, 400)])
def test_fair_residual_vanishes_and_solvers_agree(alpha, k, p):
    for seed in range(3):
        a = gram(random_jacobian(k, p, seed + 10 * k)).numpy()
        sol = solve_fair(a, alpha)
        assert sol.converged, sol.message
        assert np.all(sol.x > 0)
        assert np.max(np.abs(fair_residual(a, sol.x, alpha))) < 1e-7
        ref = solve_fair(a, alpha, method="least_squares")
        assert ref.converged, ref.message
        np.testing.assert_allclose(sol.x, ref.x, rtol=1e-6)


def test_fair_orthogonal_unit_gradients_closed_form():
    # A = I: x_i · 1 = x_i^{-1/α} ⇒ x_i = 1 for every α (for α = 1: x·1 = 1/x)
    for alpha in (0.25, 1.0, 2.0, 10.0):
        sol = solve_fair(np.eye(3), alpha)
        np.testing.assert_allclose(sol.x, np.ones(3), rtol=1e-10)
    # A = diag(a): x_i = p_i^{1/(α+1)} a_i^{-α/(α+1)}
    a, p, alpha = np.array([4.0, 0.25, 9.0]), np.array([1.0, 2.0, 0.5]), 2.0
    sol = solve_fair(np.diag(a), alpha, p)
    np.testing.assert_allclose(sol.x, p ** (1 / 3) * a ** (-2 / 3), rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fair_scaling_law(alpha):
    # A → A/s ⇒ x → s^{α/(α+1)} x (the map the scaled formulation relies on)
    a = gram(random_jacobian(4, 30, 3)).numpy()
    for s in (1e-12, 1e-3, 1e6, 1e20):
        np.testing.assert_allclose(solve_fair(a / s, alpha).x, s ** (alpha / (alpha + 1)) * solve_fair(a, alpha).x,
                                   rtol=1e-8)


def test_fair_two_parallel_gradients():
    g = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # g2 = 2 g1
    sol = solve_fair(gram(g).numpy(), 1.0)
    assert sol.converged
    np.testing.assert_allclose(fair_residual(gram(g).numpy(), sol.x, 1.0), 0, atol=1e-9)


def test_fair_zero_gradient_task_is_dropped_exactly():
    jac = random_jacobian(3, 20, 1)
    jac[1] = 0.0
    sol = solve_fair(gram(jac).numpy(), 2.0)
    assert sol.converged and sol.zero_tasks == (1,) and sol.x[1] == 0
    reduced = solve_fair(gram(jac[[0, 2]]).numpy(), 2.0)
    np.testing.assert_allclose(sol.x[[0, 2]], reduced.x, rtol=1e-12)
    all_zero = solve_fair(np.zeros((3, 3)), 2.0)
    assert all_zero.converged and np.all(all_zero.x == 0)


def test_fair_solution_is_stationary_exactly_at_and_below_the_threshold():
    """Hull gap ≤ STATIONARY_HULL (here h = 0 … 0.5·threshold, and the threshold itself, whose
    computed gap rounds to either side): x = 0, converged, flagged — decided on the Gram matrix alone."""
    for alpha in (0.5, 1.0, 2.0, 5.0):
        for h in (0.0, 1e-12, 1e-8, 0.5 * STATIONARY_HULL, STATIONARY_HULL):
            a = two_task_gram(h, norms=(1.0, 7.0))
            gap = pareto_gap(scaled_gram(a)[0])
            sol = solve_fair(a, alpha)
            assert (sol.stationary, sol.converged) == (gap <= STATIONARY_HULL, True), (alpha, h, gap)
            assert sol.stationary or h == STATIONARY_HULL
            if sol.stationary:
                np.testing.assert_array_equal(sol.x, 0.0)
        for k in (3, 11):  # K > 2: through the exact active-set hull distance
            a = near_stationary_gram(k, 0.3 * STATIONARY_HULL, seed=k)
            sol = solve_fair(a, alpha)
            assert sol.stationary and sol.converged and not sol.x.any()


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 2.0, 5.0, 10.0])
def test_nearly_opposite_above_the_threshold_converge(alpha):
    """Just above the threshold the equation has a solution and Newton reaches it (the evidence
    behind STATIONARY_HULL), checked in exact arithmetic: K = 2 by the scalar solve (norms up to 50×
    apart: targets up to 50^{|1−α|/α} ≈ 1e5 apart at α = 0.25) to the exact weights; K = 3, 11, 40
    by the general Newton (log-norms with std 0.5, PIVRG-like priorities) to the 1e-6 relative
    residual or, where the targets are too far apart for float64 to resolve that, to the float64
    floor of the backward error (accepted and labelled as such)."""
    rng = np.random.default_rng(int(alpha * 100))
    for h in (1.5 * STATIONARY_HULL, 3 * STATIONARY_HULL, 30 * STATIONARY_HULL):
        for norms in ((1.0, 1.0), (1.0, 30.0), (0.02, 1.0)):
            a = two_task_gram(h, norms)
            for p in (None, np.array([1.0, 1.9])):
                sol = solve_fair(a, alpha, p)
                assert sol.converged and not sol.stationary, (alpha, h, norms, sol.message)
                # the weights to 1e-9 (the cosine's own rounding moves them by ~1e-16/h); the float64
                # residual of those weights is no test here: (Ax)_i cancels to ~1e-16·|A||x|, which
                # exceeds 1e-6 of the smaller target once the targets are ≳1e4 apart
                np.testing.assert_allclose(sol.x, _exact_pair_solution(a, alpha, p), rtol=1e-9)
        for k, seed in ((3, 0), (3, 1), (11, 2), (40, 3)):
            a = near_stationary_gram(k, 3 * h, seed=seed + int(h * 1e7), spread=0.5)
            p = np.exp(rng.uniform(-np.log(2), np.log(2), k))
            sol = solve_fair(a, alpha, p)
            assert sol.converged and not sol.stationary, (alpha, k, h, sol.message)
            rel, bwd, cond = _exact_errors(a, sol.x, alpha, p)
            # The solver accepts its own float64 relative residual <= 1e-6. That residual is computed
            # from (Ax)_i, whose float64 evaluation (a K-term dot product, plus the few roundings that
            # map the scaled weights back to x) errs by at most (K + 4)·eps·(|A|x)_i: relative to the
            # target, cond·(K + 4)·eps. So the exact residual is within 1e-6 plus that much — on any
            # BLAS kernel and thread count — or the solve stopped at the float64 floor of the backward
            # error and its message says so.
            slack = (k + 4) * np.finfo(np.float64).eps * cond
            at_floor = bwd <= 1e-13 and re.search(r"float64 (precision )?floor", sol.message)
            assert rel <= 1e-6 + slack or at_floor, (alpha, k, h, rel, bwd, cond, sol.message)


def test_pareto_gap_certificate_and_exact_agree():
    """K = 2: (1 + ρ)/2 is the min-norm value; K > 2: the certified lower bound never exceeds the
    exact value and the decision h ≤ tol is the same with and without hints."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = two_task_gram(float(rng.uniform(0, 1)), seed=int(rng.integers(1000)))
        a_hat = scaled_gram(a)[0]
        w, _ = min_norm_simplex(a_hat)
        assert pareto_gap(a_hat) == pytest.approx(float(w @ a_hat @ w), abs=1e-15)
    for k in (3, 11, 40):
        for seed in range(6):
            for h in (1e-3, 3 * STATIONARY_HULL, 0.5 * STATIONARY_HULL):
                a_hat = scaled_gram(near_stationary_gram(k, h, seed=seed, spread=1.0))[0]
                w, _ = min_norm_simplex(a_hat)
                exact = float(w @ a_hat @ w)
                hint = np.abs(rng.normal(size=k))
                for tol in (1e-9, STATIONARY_HULL, 1e-4):
                    for hints in ((), (hint,)):
                        got = pareto_gap(a_hat, tol, hints)
                        assert got <= exact * (1 + 1e-9) + 1e-15
                        assert (got <= tol) == (exact <= tol), (k, h, tol)


def test_stationarity_check_cost_is_small():
    """The extra cost of the test before each solve (K = 3, 11, 40, random well-posed problems) when
    the previous step's solution is at hand (every step after the first in a balancer): the
    O(K²) certificate, a small fraction of the solve (numbers in the module docstring)."""
    import time

    for k in (3, 11, 40):
        a = gram(random_jacobian(k, 4 * k, k)).numpy()
        a_hat, c, _ = scaled_gram(a)
        prev = solve_fair(gram(random_jacobian(k, 4 * k, k) + 1e-3 * random_jacobian(k, 4 * k, 99)).numpy(), 2.0).x
        t0 = time.perf_counter()
        for _ in range(50):
            gap = pareto_gap(a_hat, hints=(c * prev,))
        check = (time.perf_counter() - t0) / 50
        t0 = time.perf_counter()
        for _ in range(5):
            solve_fair(a, 2.0, hull_tol=-1.0)
        solve = (time.perf_counter() - t0) / 5
        assert gap > STATIONARY_HULL and check < 0.2 * solve, (k, check, solve)


def test_mocked_solver_failure_is_counted(monkeypatch):
    import mtl_tune.balancers._fairness as fair

    real = fair.solve_fair

    def failing(*args, **kw):
        sol = real(*args, **kw)
        sol.converged, sol.message = False, "mocked failure"
        return sol

    monkeypatch.setattr(fair, "solve_fair", failing)
    pv = PIVRG(3)
    theta, losses = linear_losses(random_jacobian(3, 5, 0))
    with pytest.warns(RuntimeWarning, match="mocked failure"):
        info = pv.backward(losses, [theta])
    assert info.extras["solver_failures"] == 1 and pv.failures.consecutive == 1


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("alpha", [0.5, 2.0])
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_solve_fair_properties(case, alpha):
    # A → A/s gives x → s^{α/(α+1)} x (test_fair_scaling_law): a²A gives a^{−2α/(α+1)} x;
    # Newton to relative residual 1e-10, hence 1e-8
    assert_gram_function_equivariant(lambda a: solve_fair(a, alpha).x, case, weight_degree=-2 * alpha / (alpha + 1),
                                     rtol=1e-8)
