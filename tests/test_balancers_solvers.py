"""Known-answer tests of the solver-based balancers: nashmtl, fairgrad, pivrg, consmtl, stgu.

Most tests use *linear* losses ℓ_i = g_iᵀθ + b_i, whose per-task gradients are exactly the
rows g_i of a chosen matrix G, so every written gradient has a closed form.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers._fairness import (STATIONARY_HULL, fair_residual, pareto_gap, scaled_gram,
                                          solve_fair)
from mtl_tune.balancers._simplex import min_norm_simplex
from mtl_tune.balancers.base import BalancerError, EpochInfo, ForwardOutput, gram
from mtl_tune.balancers.consmtl import ConsMTL
from mtl_tune.balancers.fairgrad import FairGrad
from mtl_tune.balancers.nashmtl import CCCPSolver, NashMTL, nash_weights
from mtl_tune.balancers.pivrg import PIVRG, performance_priorities
from mtl_tune.balancers.stgu import (STGU, PairGrouping, affinity_similarity, affinity_update, affinity_update_pairs,
                                     group_tasks, linear_quantile, propagate_groups)
from mtl_tune.registry import get_balancer

METHODS = ("nashmtl", "fairgrad", "pivrg", "consmtl", "stgu")


def random_jacobian(k: int, p: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """K×P Gaussian rows with log-normal norms (spread = std of log-norm)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=g, dtype=torch.float64)
    return rows * torch.exp(spread * torch.randn(k, 1, generator=g, dtype=torch.float64))


def linear_losses(jac: torch.Tensor):
    """θ = 0 (P,) and ℓ = Jθ + 1: per-task gradients are exactly the rows of ``jac``."""
    theta = torch.zeros(jac.shape[1], dtype=jac.dtype, requires_grad=True)
    return theta, jac @ theta + 1.0


def written_direction(balancer, jac: torch.Tensor) -> torch.Tensor:
    theta, losses = linear_losses(jac)
    balancer.backward(losses, [theta])
    return theta.grad.detach().clone()


# ---------------------------------------------------------------------------- FairGrad solver
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


# ---------------------------------------------------------------------------- FairGrad balancer
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


# ---------------------------------------------------------------------------- failures
def _two_task_gram(h: float, norms: tuple[float, float] = (1.0, 1.0), p: int = 4, seed: int = 0) -> np.ndarray:
    """Gram matrix of two gradients whose unit-gradient hull lies at squared distance h from 0
    (cosine ρ = 2h − 1), in a random orientation of R^p, with the given norms."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, 2)))
    rho = 2.0 * h - 1.0
    g = np.stack([q[:, 0], rho * q[:, 0] + math.sqrt(max(1.0 - rho * rho, 0.0)) * q[:, 1]])
    g *= np.asarray(norms)[:, None]
    return g @ g.T


def _near_stationary_gram(k: int, h_target: float, seed: int, spread: float = 1.0) -> np.ndarray:
    """K gradients (norms log-normal with std ``spread``) whose unit hull is ~``h_target`` from 0:
    random unit vectors shifted by −(1 − s)·m (m = their min-norm point), which puts the hull's
    nearest point at s·m, then renormalised; s is bisected until h is within 10 % of the target."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(k, 2 * k + 10))  # more dimensions than tasks: 0 is not in the hull to start with
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w, _ = min_norm_simplex(u @ u.T)
    m = w @ u
    norms = np.exp(spread * rng.normal(size=(k, 1)))

    def gram_at(s: float) -> np.ndarray:
        g = (u - (1.0 - s) * m) * norms
        return g @ g.T

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e3
        h = pareto_gap(scaled_gram(gram_at(mid))[0], tol=0.0)
        if abs(h / h_target - 1) < 0.1:
            return gram_at(mid)
        lo, hi = (mid, hi) if h < h_target else (lo, mid)
    raise AssertionError("could not place the hull")


@pytest.mark.parametrize("method", ["fairgrad", "pivrg", "nashmtl", "consmtl"])
def test_opposite_gradients_are_pareto_stationary_not_failures(method):
    """Exactly opposite gradients: no update of the shared parameters, counted as stationary,
    no warning, no failure — for 30 steps in a row (the 20-failures rule must not fire). Heads
    still learn: unweighted for the FairGrad family, with the last α for Nash-MTL (initial 1)."""
    jac = torch.tensor([[1.0, 2.0, 0.0], [-3.0, -6.0, 0.0]], dtype=torch.float64)
    kw = {"lambda_": 0.0} if method == "consmtl" else {}
    bal = get_balancer(method, 2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for step in range(30):
            theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            heads = [torch.tensor([0.5 * (i + 1)], dtype=torch.float64, requires_grad=True) for i in range(2)]
            losses = jac @ theta + torch.cat([h ** 2 for h in heads])
            info = bal.backward(losses, [theta], [[h] for h in heads])
            assert torch.count_nonzero(theta.grad) == 0, step
            for h in heads:  # ∂(h²)/∂h = 2h, times α = 1 (Nash's initial α, kept) or unweighted
                torch.testing.assert_close(h.grad, 2 * h.detach())
            assert info.extras["stationary_steps"] == step + 1 and info.extras["solver_failures"] == 0
            assert torch.count_nonzero(info.weights) == 0


def test_fair_solution_is_stationary_exactly_at_and_below_the_threshold():
    """Hull gap ≤ STATIONARY_HULL (here h = 0 … 0.5·threshold, and the threshold itself, whose
    computed gap rounds to either side): x = 0, converged, flagged — decided on the Gram matrix alone."""
    for alpha in (0.5, 1.0, 2.0, 5.0):
        for h in (0.0, 1e-12, 1e-8, 0.5 * STATIONARY_HULL, STATIONARY_HULL):
            a = _two_task_gram(h, norms=(1.0, 7.0))
            gap = pareto_gap(scaled_gram(a)[0])
            sol = solve_fair(a, alpha)
            assert (sol.stationary, sol.converged) == (gap <= STATIONARY_HULL, True), (alpha, h, gap)
            assert sol.stationary or h == STATIONARY_HULL
            if sol.stationary:
                np.testing.assert_array_equal(sol.x, 0.0)
        for k in (3, 11):  # K > 2: through the exact active-set hull distance
            a = _near_stationary_gram(k, 0.3 * STATIONARY_HULL, seed=k)
            sol = solve_fair(a, alpha)
            assert sol.stationary and sol.converged and not sol.x.any()


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
            a = _two_task_gram(h, norms)
            for p in (None, np.array([1.0, 1.9])):
                sol = solve_fair(a, alpha, p)
                assert sol.converged and not sol.stationary, (alpha, h, norms, sol.message)
                # the weights to 1e-9 (the cosine's own rounding moves them by ~1e-16/h); the float64
                # residual of those weights is no test here: (Ax)_i cancels to ~1e-16·|A||x|, which
                # exceeds 1e-6 of the smaller target once the targets are ≳1e4 apart
                np.testing.assert_allclose(sol.x, _exact_pair_solution(a, alpha, p), rtol=1e-9)
        for k, seed in ((3, 0), (3, 1), (11, 2), (40, 3)):
            a = _near_stationary_gram(k, 3 * h, seed=seed + int(h * 1e7), spread=0.5)
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


def test_genuine_non_convergence_still_fails_then_raises():
    """Not stationary (hull gap 1e-3) but the solver is cut off after one iteration: a failure,
    warned, and the 20th in a row raises — for FairGrad (K = 3 general Newton, and K = 2 with
    max_iter = 0 on targets 1e3 apart) and Nash-MTL (optim_niter = 1)."""
    a3 = torch.from_numpy(_near_stationary_gram(3, 1e-3, seed=5, spread=2.0))
    jac3 = torch.linalg.cholesky(a3 + 1e-12 * torch.eye(3, dtype=torch.float64))  # rows with Gram a3
    jac2 = torch.from_numpy(np.linalg.cholesky(_two_task_gram(1e-3, norms=(1.0, 1e3)))).contiguous()
    for bal, jac in ((FairGrad(3, max_iter=1), jac3), (FairGrad(2, alpha=5.0, max_iter=0), jac2),
                     (NashMTL(3, optim_niter=1), jac3)):
        for i in range(19):
            with pytest.warns(RuntimeWarning, match="solver failed"):
                d = written_direction(bal, jac)
            assert torch.isfinite(d).all() and bal.failures.total == i + 1 and bal.stationary_steps == 0
        with pytest.warns(RuntimeWarning), pytest.raises(BalancerError, match="20 times in a row"):
            written_direction(bal, jac)


def test_stationary_step_ends_a_run_of_failures():
    fg = FairGrad(3, max_iter=1)
    a3 = torch.from_numpy(_near_stationary_gram(3, 1e-3, seed=5, spread=2.0))
    hard = torch.linalg.cholesky(a3 + 1e-12 * torch.eye(3, dtype=torch.float64))
    opposite = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            for _ in range(15):
                written_direction(fg, hard)
            written_direction(fg, opposite)
    assert fg.failures.total == 45 and fg.stationary_steps == 3 and fg.failures.consecutive == 0


def test_pareto_gap_certificate_and_exact_agree():
    """K = 2: (1 + ρ)/2 is the min-norm value; K > 2: the certified lower bound never exceeds the
    exact value and the decision h ≤ tol is the same with and without hints."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = _two_task_gram(float(rng.uniform(0, 1)), seed=int(rng.integers(1000)))
        a_hat = scaled_gram(a)[0]
        w, _ = min_norm_simplex(a_hat)
        assert pareto_gap(a_hat) == pytest.approx(float(w @ a_hat @ w), abs=1e-15)
    for k in (3, 11, 40):
        for seed in range(6):
            for h in (1e-3, 3 * STATIONARY_HULL, 0.5 * STATIONARY_HULL):
                a_hat = scaled_gram(_near_stationary_gram(k, h, seed=seed, spread=1.0))[0]
                w, _ = min_norm_simplex(a_hat)
                exact = float(w @ a_hat @ w)
                hint = np.abs(rng.normal(size=k))
                for tol in (1e-9, STATIONARY_HULL, 1e-4):
                    for hints in ((), (hint,)):
                        got = pareto_gap(a_hat, tol, hints)
                        assert got <= exact * (1 + 1e-9) + 1e-15
                        assert (got <= tol) == (exact <= tol), (k, h, tol)


def test_fair_pairs_agree_with_the_general_newton():
    """The K = 2 scalar solve (vectorised) against the general damped Newton, on random, nearly
    opposite, nearly parallel and unequal-norm pairs, with priorities; and the batched call
    equals the row-by-row calls."""
    from mtl_tune.balancers._fairness import _newton_log, _rescaled, solve_fair_pairs

    rng = np.random.default_rng(3)
    rows = []
    for trial in range(400):
        g1 = rng.normal(size=5)
        g2 = [rng.normal(size=5), -g1 * np.exp(rng.normal()) + 10 ** rng.uniform(-2.5, -1) * rng.normal(size=5),
              g1 * np.exp(rng.normal()) + 10 ** rng.uniform(-6, -1) * rng.normal(size=5),
              rng.normal(size=5) * 10 ** rng.uniform(-3, 3)][trial % 4]
        g = np.stack([g1, g2]) * 10 ** rng.uniform(-6, 6)
        rows.append((g @ g.T, float(rng.choice([0.25, 0.5, 1.0, 2.0, 5.0, 10.0])), np.exp(rng.uniform(-1, 1, 2))))
    a = np.stack([r[0] for r in rows])
    alpha = np.array([r[1] for r in rows])
    p = np.stack([r[2] for r in rows])
    batch = solve_fair_pairs(a[:, 0, 0], a[:, 0, 1], a[:, 1, 1], alpha, p)
    assert batch.converged.all() and batch.iterations.max() <= 8
    for i, (ai, al, pi) in enumerate(rows):
        one = solve_fair_pairs(ai[0, 0:1], ai[0, 1:2], ai[1, 1:2], al, pi[None])
        np.testing.assert_allclose(one.x[0], batch.x[i], rtol=1e-14)
        if batch.stationary[i]:
            continue
        a_hat, c, _ = scaled_gram(ai)
        log_p = np.log(pi) + (1 - al) * np.log(c)
        shift = log_p.max()
        lp = log_p - shift
        u, rel, _, _ = _newton_log(a_hat, lp, al, _rescaled(a_hat, lp, al, lp / (al + 1)), 1e-13, 200)
        if rel < 1e-10:  # the reference converged: both are the same root (ill-conditioned when ρ → 1: α·tol)
            np.testing.assert_allclose(batch.x[i], np.exp(u + shift / (al + 1)) / c, rtol=2e-9)
        assert np.max(np.abs(fair_residual(ai, batch.x[i], al, pi))) <= 1e-6


def test_fair_pairs_newton_variable_is_concave_where_the_proof_needs_it():
    """FairPairs' monotone-convergence argument: G(y) − D is odd and concave for y > 0 in its
    variable y (s = W·tanh(y/2)), checked by second differences on a grid of ρ and α."""
    from mtl_tune.balancers._fair_pairs import FairPairs

    for rho in np.concatenate([-(1 - np.logspace(-6, -0.01, 25)), -np.logspace(-8, -0.01, 12), [0.0],
                               np.logspace(-8, -1e-6, 12)]):
        for alpha in (0.1, 0.25, 1.0, 4.0, 100.0):
            k = 1 + 1 / alpha
            y = np.linspace(1e-3, 40, 4001)
            if rho < 0:
                big_l = -math.log(-rho)
                a, b = 2 * big_l / (1 + np.exp(-y)), 2 * big_l / (1 + np.exp(y))
                s = big_l * np.tanh(y / 2)
                g = k * s + np.log(-np.expm1(-a)) - np.log(-np.expm1(-b))
            else:
                for d in (0.1, 3.0):  # W = 2α|D| + 1 for two sizes of D
                    s = (2 * alpha * d + 1) * np.tanh(y / 2)
                    g = k * s + np.log1p(rho * np.exp(-s)) - np.log1p(rho * np.exp(s))
                    assert (np.diff(g, 2) <= 1e-13 * (1 + np.abs(g[2:]))).all(), (rho, alpha, d)
                continue
            assert (np.diff(g, 2) <= 1e-13 * (1 + np.abs(g[2:]))).all(), (rho, alpha)
    # and the solver's own iterates from the cold start approach the root monotonically
    for h, norms in ((1e-4, (1.0, 40.0)), (0.3, (1.0, 1e3)), (0.9, (50.0, 1.0))):
        a = _two_task_gram(h, norms)
        for alpha in (0.25, 5.0):
            residuals = [float(FairPairs(alpha, tol=0.0, max_iter=cap).solve(a[0, 0:1], a[0, 1:2], a[1, 1:2])
                               .residual[0]) for cap in range(8)]
            assert all(r1 <= r0 or r1 < 1e-14 for r0, r1 in zip(residuals, residuals[1:])), (h, alpha, residuals)
            assert residuals[-1] < 1e-12


def test_fair_pairs_warm_start_reaches_the_same_root():
    """A warm start (the previous problem's solution, or any start on the root's side, or a bad one
    beyond it) changes the iteration count, not the answer beyond tol."""
    from mtl_tune.balancers._fair_pairs import FairPairs

    rng = np.random.default_rng(5)
    b = 200
    g1 = rng.normal(size=(b, 3))
    g2 = -g1 * np.exp(rng.normal(size=(b, 1))) + 10 ** rng.uniform(-3, 0, (b, 1)) * rng.normal(size=(b, 3))
    g2[::3] = rng.normal(size=(b // 3 + 1, 3))[: len(g2[::3])]  # some positive cosines too
    a11, a12, a22 = (g1 * g1).sum(1), (g1 * g2).sum(1), (g2 * g2).sum(1)
    alpha = rng.choice([0.5, 2.0, 5.0], size=b)
    solver = FairPairs(alpha)
    cold = solver.solve(a11, a12, a22)
    assert cold.converged.all()
    for start in (cold.start, (cold.start[0] * 3.0, cold.start[1]), (-cold.start[0], cold.start[1]),
                  (rng.normal(size=b) * 5, cold.start[1]), (cold.start[0], ~cold.start[1])):
        warm = solver.solve(a11 * 1.001, a12, a22, start=start)
        ref = solver.solve(a11 * 1.001, a12, a22)
        assert warm.converged.all()
        np.testing.assert_allclose(warm.x, ref.x, rtol=1e-8)
    again = solver.solve(a11, a12, a22, start=cold.start)
    assert again.iterations.max() == 0  # the same problem: its own solution is converged already


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


# ---------------------------------------------------------------------------- Nash-MTL
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


# ---------------------------------------------------------------------------- PIVRG
def test_pivrg_equal_scores_equals_fairgrad_alpha2():
    jac = random_jacobian(3, 10, 6)
    pv = PIVRG(3, bound=1.8, mintemp=20.0)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([7.0, 7.0, 7.0])))
    torch.testing.assert_close(written_direction(pv, jac), written_direction(FairGrad(3, alpha=2.0), jac))


def test_pivrg_priorities_respect_bound():
    rng = np.random.default_rng(0)
    for bound in (1.1, 1.8, 2.0, 5.0):
        for spread in (0.1, 10.0, 1e3):
            s = rng.normal(size=6) * spread
            p = performance_priorities(s, bound, mintemp=1.0)
            assert math.isclose(p.sum(), 6.0, rel_tol=1e-12)
            assert p.max() / p.min() <= bound * (1 + 1e-12)
            assert np.argmax(p) == np.argmax(s)  # the task furthest behind STL gets the most weight
    # a large spread saturates the bound exactly; a small one is tempered by mintemp (T = 10)
    p = performance_priorities(np.array([0.0, 100.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], 2.0)
    p = performance_priorities(np.array([0.0, 1.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], math.exp(0.1))


def test_pivrg_solution_uses_priorities():
    # orthogonal unit gradients: x_i = sqrt(p_i / x_i) ⇒ x_i = p_i^{1/3}
    pv = PIVRG(2, bound=2.0, mintemp=1.0, max_norm=None)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([0.0, 50.0])))
    _, w = pv.combine(torch.eye(2, dtype=torch.float64), torch.ones(2))
    np.testing.assert_allclose(w.numpy() / 2, pv.task_priorities() ** (1 / 3), rtol=1e-9)


def test_pivrg_validation_and_state():
    with pytest.raises(ValueError, match="bound"):
        PIVRG(3, bound=1.0)
    pv = PIVRG(3)
    with pytest.raises(BalancerError):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([1.0, float("nan"), 0.0])))
    with pytest.warns(RuntimeWarning, match="no per-task scores"):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=None))
    pv.on_epoch_end(EpochInfo(epoch=1, scores=torch.tensor([3.0, -2.0, 10.0])))
    other = PIVRG(3)
    other.load_state_dict(pv.state_dict())
    np.testing.assert_array_equal(other.task_priorities(), pv.task_priorities())


# ---------------------------------------------------------------------------- ConsMTL
def _linear_heads_problem(k=2, n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Linear(4, d).double()
    with torch.no_grad():
        trunk.weight.copy_(torch.randn(d, 4, generator=g, dtype=torch.float64))
    heads = [torch.randn(d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(k)]
    inputs = torch.randn(n, 4, generator=g, dtype=torch.float64)
    targets = torch.randn(k, n, generator=g, dtype=torch.float64)

    def forward():
        z = trunk(inputs)
        losses = torch.stack([0.5 * ((z @ heads[i] - targets[i]) ** 2).mean() for i in range(k)])
        return z, losses

    forward.targets = targets
    return trunk, heads, forward


def test_consmtl_lambda0_equals_fairgrad_and_plain_heads():
    trunk, heads, forward = _linear_heads_problem()
    z, losses = forward()
    ConsMTL(2, lambda_=0.0).backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    cons_shared = [p.grad.clone() for p in trunk.parameters()]
    cons_heads = [h.grad.clone() for h in heads]
    for p in [*trunk.parameters(), *heads]:
        p.grad = None
    z, losses = forward()
    FairGrad(2, alpha=2.0).backward(losses, list(trunk.parameters()), [[h] for h in heads])
    for a, p in zip(cons_shared, trunk.parameters()):
        torch.testing.assert_close(a, p.grad)
    for a, h in zip(cons_heads, heads):
        torch.testing.assert_close(a, h.grad)


@pytest.mark.parametrize("tilt", [0.0, 0.5])
def test_consmtl_pareto_stationary_step_gives_heads_no_consistency_term(tilt):
    """ℓ₁ = mean(z)·h₁ + 10, ℓ₂ = −mean(z)·h₂ + 10 with h₂ = h₁ (tilt 0): the shared gradients are
    exactly opposite, the step is Pareto-stationary (x = 0, d = 0), Δ = 0 and each head gets its
    plain gradient ±mean(z). Tilting h₂ leaves the stationary set: then the consistency term acts."""
    g = torch.Generator().manual_seed(3)
    trunk = nn.Linear(4, 3).double()
    inputs = torch.randn(6, 4, generator=g, dtype=torch.float64)
    h1 = torch.randn(3, generator=g, dtype=torch.float64)
    heads = [h1.clone().requires_grad_(), (h1 + tilt * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
             .requires_grad_()]
    z = trunk(inputs)
    losses = torch.stack([z.mean(0) @ heads[0] + 10, -(z.mean(0) @ heads[1]) + 10])
    info = ConsMTL(2, lambda_=5.0, head_clip=1e6).backward(losses, list(trunk.parameters()),
                                                            [[h] for h in heads], z)
    if tilt == 0.0:
        assert info.extras["stationary_steps"] == 1 and torch.all(info.weights == 0)
        torch.testing.assert_close(info.extras["head_extra_norm"], torch.zeros(2, dtype=torch.float64))
        mean_z = z.detach().mean(0)
        torch.testing.assert_close(heads[0].grad, mean_z)
        torch.testing.assert_close(heads[1].grad, -mean_z)
        for p in trunk.parameters():
            assert p.grad is None or torch.all(p.grad == 0)
    else:
        assert info.extras["stationary_steps"] == 0 and bool((info.extras["head_extra_norm"] > 0).all())


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_consmtl_head_gradient_matches_hand_derivation(clip):
    # ℓ_i = ½ mean_b (z_b·w_i − y_ib)²: δ_i = r_i w_iᵀ / n and
    # ∇_{w_i}(−λ⟨δ_i, Δ⟩) = −λ/n Σ_b [z_b (w_iᵀΔ_b) + r_ib Δ_b]
    lam, n = 3.0, 5
    trunk, heads, forward = _linear_heads_problem(n=n)
    z, losses = forward()
    cons = ConsMTL(2, lambda_=lam, head_clip=clip, max_norm=None)
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    x = info.weights.numpy() / 2
    with torch.no_grad():
        r = [z @ heads[i] - forward.targets[i] for i in range(2)]
        deltas = [torch.outer(r[i], heads[i]) / n for i in range(2)]
        joint = x[0] * deltas[0] + x[1] * deltas[1]
        for i in range(2):
            g1 = (r[i][:, None] * z).mean(0)
            g2 = -lam / n * ((z * (joint @ heads[i])[:, None]).sum(0) + (r[i][:, None] * joint).sum(0))
            g2 = g2 * min(1.0, clip * float(g1.norm()) / float(g2.norm()))
            torch.testing.assert_close(heads[i].grad, g1 + g2)


def test_consmtl_per_task_representations_and_contract_errors():
    trunk, heads, forward = _linear_heads_problem()
    z, losses = forward()
    cons = ConsMTL(2, head_clip=[0.05, 0.0])
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], [z, z])
    assert float(info.extras["head_extra_norm"][1]) == 0.0  # c = 0: no extra gradient for task 1
    assert float(info.extras["head_extra_norm"][0]) > 0.0
    z, losses = forward()
    with pytest.raises(BalancerError, match="representation"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], None)
    with pytest.raises(BalancerError, match="task_params"):
        cons.backward(losses, list(trunk.parameters()), None, z)
    with pytest.raises(BalancerError, match="does not require grad"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z.detach())
    with pytest.raises(ValueError, match="head_clip"):
        ConsMTL(2, head_clip=[0.1, 0.1, 0.1])


# ---------------------------------------------------------------------------- degenerate inputs
DEGENERATE = {
    "zero": lambda: torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]),
    "parallel": lambda: torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [-1.0, 0.0, 3.0]]),
    "opposite": lambda: torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    "tiny": lambda: 1e-12 * random_jacobian(3, 6, 0).float(),
    "huge": lambda: 1e12 * random_jacobian(3, 6, 0).float(),
    "mixed": lambda: torch.cat([1e-12 * random_jacobian(1, 6, 1), 1e12 * random_jacobian(2, 6, 2)]).float(),
    "k1": lambda: torch.tensor([[3.0, -4.0]]),
    "k40": lambda: random_jacobian(40, 100, 9).float(),
}


@pytest.mark.parametrize("method", ["fairgrad", "pivrg", "nashmtl"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_inputs_give_finite_output_or_clear_error(method, case):
    jac = DEGENERATE[case]()
    bal = get_balancer(method, jac.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failures are allowed here, silence is not
        try:
            d = written_direction(bal, jac)
        except BalancerError as err:
            assert str(err)
            return
    assert torch.isfinite(d).all()
    if case == "opposite":  # 0 = ½g₁ + ½g₂ is in the hull: Pareto-stationary, no update, no failure
        assert bal.failures.total == 0 and bal.stationary_steps == 1
        assert torch.count_nonzero(d) == 0
    elif case in ("zero", "mixed"):  # mixed: a norm ratio of 1e-24 counts as an exactly zero gradient
        # exact for the FairGrad family (d does not involve x_i); α_i undefined for Nash
        assert bal.failures.total == (1 if method == "nashmtl" else 0)
        if method != "nashmtl":
            assert bal._step_extras()["zero_grad_tasks"] == 1
    else:
        assert bal.failures.total == 0
    if case == "k1":  # one task: d ∥ g (FairGrad: x = ‖g‖^{-2α/(α+1)}; Nash: d = g/‖g‖ before the clip)
        torch.testing.assert_close(d / d.norm(), jac[0].to(d) / jac[0].norm())


def test_k1_consmtl_and_stgu():
    trunk, heads, forward = _linear_heads_problem(k=1)
    z, losses = forward()
    info = ConsMTL(1).backward(losses, list(trunk.parameters()), [[heads[0]]], z)
    assert torch.isfinite(info.weights).all() and info.extras["solver_failures"] == 0
    script = _Script([[1.0]])
    opt = _CountingSGD([script.param])
    STGU(1, prepos=0).train_step(script, opt, [script.param])
    assert opt.steps == 2  # the single group, stepped twice as in the official code


# ---------------------------------------------------------------------------- STGU
def test_stgu_affinity_update_matches_formula():
    aff = np.full((3, 3), 0.1)
    before, after = np.array([2.0, 4.0, 1.0]), np.array([1.0, 5.0, 0.5])  # a = (0.5, −0.25, 0.5)/|g|
    out = affinity_update(aff, [0, 1], before, after, decay=0.2)
    a = np.array([0.5, -0.25, 0.5]) / 2
    exp = aff.copy()
    exp[0, 0] = 0.8 * 0.1 + 0.2 * a[0]            # self, a ≥ 0
    exp[0, 1] = 0.8 * 0.1 + 0.2 * -max(a[1], a[0])  # intra-group, opposite signs
    exp[0, 2] = 0.8 * 0.1 + 0.2 * a[2]            # outside the group
    exp[1, 0] = 0.8 * 0.1 + 0.2 * -max(a[0], a[1])
    exp[1, 1] = 0.1                               # self with a < 0: not updated
    exp[1, 2] = 0.8 * 0.1 + 0.2 * a[2]
    np.testing.assert_allclose(out, exp)
    skipped = affinity_update(aff, [2], np.array([np.nan, 1.0, 1.0]), np.array([1.0, 0.5, 0.5]), 0.5)
    assert skipped[2, 0] == 0.1  # target without a previous loss: skipped
    with pytest.raises(BalancerError, match="positive"):
        affinity_update(aff, [0], np.array([-1.0, 1.0, 1.0]), np.ones(3), 0.1)


def test_stgu_block_diagonal_affinity_gives_blocks():
    # three pairs: the median similarity (official preference) is the between-block value
    aff = np.full((6, 6), -0.2)
    for block in ([0, 3], [1, 4], [2, 5]):
        aff[np.ix_(block, block)] = 0.6
    np.fill_diagonal(aff, 1.0)
    assert group_tasks(affinity_similarity(aff)) == [[0, 3], [1, 4], [2, 5]]
    assert group_tasks(affinity_similarity(0.01 * aff)) == [[0, 3], [1, 4], [2, 5]]  # column-normalised
    # blocks covering most entries put the median inside a block: a lower quantile recovers them
    aff = np.full((5, 5), -0.5)
    for block in ([0, 2], [1, 3, 4]):
        aff[np.ix_(block, block)] = 0.8
    np.fill_diagonal(aff, 1.0)
    assert sorted(group_tasks(affinity_similarity(aff), preference_quantile=0.3)) == [[0, 2], [1, 3, 4]]
    assert group_tasks(np.ones((1, 1))) == [[0]]


def test_stgu_zero_diagonal_guard():
    aff = np.array([[0.0, 0.3], [0.2, 0.0]])
    s = affinity_similarity(aff)
    assert np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1.0)
    assert np.all(affinity_similarity(np.zeros((3, 3))) == 0)


def _pair_similarities() -> list[np.ndarray]:
    """2 × 2 similarities where the K = 2 closed form could go wrong: affinities of every sign and
    magnitude (zero diagonals → the guard), and S[0, 1] tied with or one ulp from a diagonal
    entry (the quantile's interpolation rounds there), ±0, subnormals, huge values."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(150):
        a = rng.normal(size=(2, 2)) * 10.0 ** rng.uniform(-300, 300, size=(2, 2))
        a[[0, 1], [0, 1]] = np.abs(np.diag(a)) * (rng.random(2) < 0.8)
        out.append(affinity_similarity(a))
    for d in (1.0, 0.0, 1e-300, 3.0, 1.0 + 2.0 ** -52, 0.7):
        below = np.nextafter(d, -np.inf)
        for s in (d, below, np.nextafter(below, -np.inf), np.nextafter(d, np.inf), -d, -0.0, 5e-324, -1e308):
            for other in (1.0, d, s):
                out.append(np.array([[d, s], [s, other]]))
                out.append(np.array([[other, s], [s, d]]))
    return out


PAIR_QUANTILES = (0.0, 0.1, 0.25, 1 / 3, 0.34, 0.5, 0.6, 2 / 3, 0.9, 1.0)


def test_stgu_linear_quantile_is_numpys_bit_for_bit():
    rng = np.random.default_rng(3)
    for n in (1, 2, 4, 5):
        values = np.round(rng.normal(size=(400, n)) * 10.0 ** rng.integers(-3, 4, size=(400, 1)), 2)  # ties
        q = np.concatenate([np.array(PAIR_QUANTILES), rng.random(390)])
        expected = np.array([np.quantile(v, qq) for v, qq in zip(values, q)])
        np.testing.assert_array_equal(linear_quantile(values, q), expected)


def test_stgu_two_task_grouping_is_sklearns_answer():
    """K = 2: the closed form (sklearn's equal-similarities branch) against AffinityPropagation."""
    sims = _pair_similarities()
    seen = set()
    for q in PAIR_QUANTILES:
        batched = PairGrouping(np.full(len(sims), q)).split(np.stack(sims))
        for s, two in zip(sims, batched):
            expected = propagate_groups(s, float(np.quantile(s, q)))
            assert group_tasks(s, q) == expected == ([[0], [1]] if two else [[0, 1]]), (s, q)
            seen.add(len(expected))
    assert seen == {1, 2}  # both outcomes occur, ties included
    with pytest.raises(ValueError), warnings.catch_warnings():  # sklearn's input check decides non-finite S
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's quantile of inf − inf
        group_tasks(np.array([[1.0, np.inf], [np.inf, 1.0]]))


def test_stgu_batched_affinity_update_is_the_loop_bit_for_bit():
    rng = np.random.default_rng(5)
    groups = ([0], [1], [0, 1])
    b = 300
    aff = rng.normal(size=(b, 2, 2))
    decay = rng.uniform(1e-4, 1.0, size=b)
    choice = rng.integers(0, 3, size=(2, b))
    members = np.zeros((2, b, 2), dtype=bool)
    for n in range(2):
        for r in range(b):
            members[n, r, groups[choice[n, r]]] = True
    before = rng.uniform(0.1, 5.0, size=(2, b, 2))
    # ratios around 1 on both sides: sign disagreements, a = 0, negative self-affinity updates
    after = before * rng.choice([0.5, 0.9, 1.0, 1.1, 2.0], size=(2, b, 2))
    one = affinity_update_pairs(aff, members[0], before[0], after[0], decay)
    two = affinity_update_pairs(aff, members, before, after, decay)
    for r in range(b):
        first = affinity_update(aff[r], groups[choice[0, r]], before[0, r], after[0, r], decay[r])
        np.testing.assert_array_equal(one[r], first)
        np.testing.assert_array_equal(
            two[r], affinity_update(first, groups[choice[1, r]], before[1, r], after[1, r], decay[r]))
    skip = members.copy()
    skip[1, ::2] = False  # a row without members is left alone by that update
    np.testing.assert_array_equal(affinity_update_pairs(aff, skip, before, after, decay)[::2], one[::2])


def test_stgu_batched_similarity_is_the_per_matrix_one():
    rng = np.random.default_rng(9)
    aff = rng.normal(size=(50, 3, 3))
    aff[::3, 0, 0] = 0.0  # the zero-diagonal guard
    batched = affinity_similarity(aff)
    for a, s in zip(aff, batched):
        np.testing.assert_array_equal(s, affinity_similarity(a))


class _Script:
    """A forward that returns scripted losses (via a dummy parameter) and counts calls."""

    def __init__(self, rows):
        self.rows, self.calls = [torch.tensor(r) for r in rows], 0
        self.param = nn.Parameter(torch.zeros(()))

    def __call__(self):
        row = self.rows[min(self.calls, len(self.rows) - 1)]
        self.calls += 1
        return ForwardOutput(losses=row + 0.0 * self.param)


class _CountingSGD(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_attribution_on_scripted_losses(attribution):
    rows = [[2.0, 2.0], [1.0, 3.0], [1.5, 1.5]]  # before g0, after g0 / before g1, after g1
    script = _Script(rows)
    st = STGU(2, affin_decay=0.5, prepos=10, attribution=attribution)
    st._plan = lambda: [[0], [1]]
    st.train_step(script, _CountingSGD([script.param]), [script.param])
    zero = np.zeros((2, 2))
    r = [np.array(x) for x in rows]
    if attribution == "paper":  # each group credited with its own step's effect, plus a lookahead forward
        expected = affinity_update(affinity_update(zero, [0], r[0], r[1], 0.5), [1], r[1], r[2], 0.5)
        assert script.calls == 3
    else:  # the change before g1's forward is credited to g1; g0 is never measured
        expected = affinity_update(zero, [1], r[0], r[1], 0.5)
        assert script.calls == 2
    np.testing.assert_allclose(st.affinity, expected)


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_one_group_takes_two_optimizer_steps(attribution):
    script = _Script([[1.0, 1.0]])
    opt = _CountingSGD([script.param])
    st = STGU(2, prepos=0, attribution=attribution)
    st.next_groups = lambda: [[0, 1]]
    losses, info = st.train_step(script, opt, [script.param])
    assert opt.steps == 2 and info.extras["group_steps"] == 2
    torch.testing.assert_close(info.weights, torch.tensor([2.0, 2.0]))
    single = STGU(2, prepos=0, repeat_single_group=False)
    single.next_groups = lambda: [[0, 1]]
    opt = _CountingSGD([script.param])
    single.train_step(script, opt, [script.param])
    assert opt.steps == 1


@pytest.mark.parametrize("prepos", [0, 2])
def test_stgu_warm_up_lasts_prepos_plus_one_batches(prepos):
    """As the official loop (``iter_count <= prepos``, iter_count from 0): prepos + 1 batches with
    every task alone. prepos = 0: the first batch trains each task alone (2 single-task steps,
    weights e_0 and e_1), not one all-task group twice from clustering the all-zero affinity."""
    script = _Script([[2.0, 2.0], [1.0, 3.0], [1.5, 1.5], [1.2, 1.4]])
    st = STGU(2, affin_decay=0.5, prepos=prepos)
    seen = []
    real = st.next_groups
    st.next_groups = lambda: seen.append((st.batches, real())) or seen[-1][1]
    for _ in range(prepos + 2):
        _, info = st.train_step(script, _CountingSGD([script.param]), [script.param])
        if len(seen) <= prepos + 1:   # warm-up batch: each task its own group, one step each
            assert info.extras["n_groups"] == 2 and info.extras["group_steps"] == 2
            torch.testing.assert_close(info.weights, torch.ones(2))
    assert [groups for _, groups in seen[:prepos + 1]] == [[[0], [1]]] * (prepos + 1)
    assert [b for b, _ in seen] == list(range(1, prepos + 3))
    # the first grouping (batch prepos + 2) sees an affinity updated by every warm-up batch
    assert np.any(st.affinity != 0)
    warm = STGU(2, prepos=prepos)
    warm.batches = prepos + 1
    assert warm.next_groups() == [[0], [1]]
    warm.batches = prepos + 2           # all-zero affinity: S = 0 everywhere → one group
    assert warm.next_groups() == [[0, 1]]


def test_stgu_official_similarity_is_the_official_in_place_normalisation():
    """similarity="official" = the official ``X[:, i] /= X[i, i]`` run literally on a torch tensor
    (below-diagonal entries not normalised); the default normalises every entry."""
    rng = np.random.default_rng(5)
    for k in (2, 3, 5):
        a = rng.normal(size=(k, k)) * 0.01
        np.fill_diagonal(a, rng.uniform(0.001, 0.02, size=k))
        x = torch.tensor(a)
        for i in range(k):
            x[:, i] /= x[i, i]
        np.testing.assert_allclose(affinity_similarity(a, official=True), ((x + x.T) / 2).numpy(), rtol=1e-15)
        np.testing.assert_allclose(affinity_similarity(a), (a / np.diag(a) + (a / np.diag(a)).T) / 2, rtol=1e-15)
        assert not np.allclose(affinity_similarity(a, official=True), affinity_similarity(a))
    batch = np.stack([a, a])
    np.testing.assert_array_equal(affinity_similarity(batch, official=np.array([True, False])),
                                  np.stack([affinity_similarity(a, official=True), affinity_similarity(a)]))
    st = STGU(3, prepos=0, similarity="official")
    st.affinity, st.batches = np.array([[1.0, 0.2, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]]) * 1e-3, 2
    assert st.next_groups() == group_tasks(affinity_similarity(st.affinity, official=True))
    with pytest.raises(ValueError, match="similarity"):
        STGU(2, similarity="paper")


def test_stgu_trains_a_small_model_and_round_trips_state():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    data = torch.randn(16, 4)
    targets = torch.stack([data.sum(1), data[:, 0], -data[:, 1]])
    params = [*trunk.parameters(), *heads.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def forward():
        z = torch.relu(trunk(data))
        return ForwardOutput(torch.stack([((h(z).squeeze(1) - targets[i]) ** 2).mean() + 0.01
                                          for i, h in enumerate(heads)]))

    st = STGU(3, prepos=3, affin_decay=0.1)
    first, _ = st.train_step(forward, opt, list(trunk.parameters()))
    for _ in range(9):
        last, info = st.train_step(forward, opt, list(trunk.parameters()))
    assert float(last.sum()) < float(first.sum())
    assert np.any(st.affinity != 0) and 1 <= info.extras["n_groups"] <= 3
    other = STGU(3, prepos=3, affin_decay=0.1)
    other.load_state_dict(st.state_dict())
    np.testing.assert_array_equal(other.affinity, st.affinity)
    assert other._plan() == st._plan()  # same groups and same shuffled order
    with pytest.raises(BalancerError, match="train_step"):
        st.backward(first, list(trunk.parameters()))


# ---------------------------------------------------------------------------- search spaces
@pytest.mark.parametrize("method", METHODS)
def test_search_space_params_build_the_method(method):
    from mtl_tune.spaces import load_space

    for bench, k in ((None, 3), ("nyuv2", 3), ("cityscapes", 2), ("celeba", 40), ("qm9", 11)):
        space = load_space(method, bench)
        values = {p.name: p.default for p in space.params if p.default is not None}
        bal = get_balancer(method, k, **values)
        for name, value in values.items():
            if name != "max_norm":
                assert getattr(bal, name) == value or getattr(bal, name) == [value] * k


# ---------------------------------------------------------------------------- CAGrad K = 2 closed form
def _cagrad_two_task_grams() -> list[tuple[str, np.ndarray]]:
    """2-task Gram matrices of the hard kinds: random, nearly opposite / parallel, exactly
    parallel, norms 1e-4…1e4 apart, overall scales 1e-12…1e12."""
    rng = np.random.default_rng(11)
    out = []
    for kind in ("random", "opposite", "parallel", "exactly-parallel", "unequal"):
        for _ in range(12):
            g1 = rng.normal(size=6)
            g2 = {"random": lambda: rng.normal(size=6),
                  "opposite": lambda: -g1 * np.exp(rng.normal()) + 1e-5 * rng.normal(size=6),
                  "parallel": lambda: g1 * np.exp(rng.normal()) + 1e-5 * rng.normal(size=6),
                  "exactly-parallel": lambda: g1 * 3.0,
                  "unequal": lambda: rng.normal(size=6) * 10.0 ** rng.choice([-4, -2, 2, 4])}[kind]()
            g = np.stack([g1, g2]) * 10.0 ** rng.uniform(-6, 6)
            out.append((kind, g @ g.T))
    return out


CAGRAD_CS = (0.0, 0.1, 0.4, 0.9, 3.0, 50.0, 900.0)


def _cagrad_dual_mp(a: np.ndarray, c: float, x):
    """The K = 2 dual φ(x) = wᵀAb + c‖g₀‖√(wᵀAw + 1e-8) in 50-digit arithmetic (exact inputs)."""
    import mpmath as mp

    with mp.workdps(50):
        a11, a12, a22 = (mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        x = mp.mpf(x)
        wab = (x * (a11 + a12) + (1 - x) * (a12 + a22)) / 2
        g0 = mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))
        return wab + mp.mpf(c) * g0 * mp.sqrt(x * x * a11 + 2 * x * (1 - x) * a12 + (1 - x) ** 2 * a22
                                              + mp.mpf(1e-8))


def _cagrad_exact_x(a: np.ndarray, c: float) -> float:
    """argmin_{x ∈ [0,1]} φ by bisection on φ' (differentiated term by term, not the closed
    form's reparametrisation) in 50-digit arithmetic: φ' is increasing (φ is convex)."""
    import mpmath as mp

    with mp.workdps(50):
        a11, a12, a22 = (mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        c0 = mp.mpf(c) * mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))

        def slope(x):
            q = x * x * a11 + 2 * x * (1 - x) * a12 + (1 - x) ** 2 * a22 + mp.mpf(1e-8)
            dq = 2 * x * a11 + 2 * (1 - 2 * x) * a12 - 2 * (1 - x) * a22
            return (a11 - a22) / 2 + c0 * dq / (2 * mp.sqrt(q))

        if slope(mp.mpf(0)) >= 0:
            return 0.0
        if slope(mp.mpf(1)) <= 0:
            return 1.0
        lo, hi = mp.mpf(0), mp.mpf(1)
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if slope(mid) > 0 else (mid, hi)
        return float((lo + hi) / 2)


def _cagrad_root_condition(a: np.ndarray, c: float, x: float) -> float:
    """Condition of the interior minimiser x* (φ'(x*) = 0) under relative perturbations of the
    Gram entries: Σ_ij |∂φ'/∂a_ij · a_ij| / φ''(x*), in 50-digit arithmetic. Entries known to a
    few ulp (they come from a float64 matrix product, whose rounding differs between BLAS
    kernels and thread counts) move x* by up to ~eps times this."""
    import mpmath as mp

    if x in (0.0, 1.0):
        return 0.0
    with mp.workdps(50):
        def slope(t, a11, a12, a22):
            c0 = mp.mpf(c) * mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))
            q = t * t * a11 + 2 * t * (1 - t) * a12 + (1 - t) ** 2 * a22 + mp.mpf(1e-8)
            dq = 2 * t * a11 + 2 * (1 - 2 * t) * a12 - 2 * (1 - t) * a22
            return (a11 - a22) / 2 + c0 * dq / (2 * mp.sqrt(q))

        entries, xm = [mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1])], mp.mpf(x)
        curvature = mp.diff(lambda t: slope(t, *entries), xm)
        sensitivity = mp.fsum(abs(mp.diff(lambda v, i=i: slope(xm, *(entries[:i] + [v] + entries[i + 1:])),
                                          entries[i]) * entries[i]) for i in range(3))
        return float(sensitivity / curvature)


@pytest.mark.parametrize("c", [c for c in CAGRAD_CS if c > 0])
def test_cagrad_two_task_closed_form_is_the_exact_minimiser(c):
    from mtl_tune.balancers.cagrad import cagrad_dual_2

    eps = np.finfo(np.float64).eps
    for kind, a in _cagrad_two_task_grams():
        x = float(cagrad_dual_2(a[0, 0], a[0, 1], a[1, 1], c))
        exact = _cagrad_exact_x(a, c)
        # 1e-12, plus what a few-ulp change of the entries does to x* (near-opposite gradients make
        # x* ill-conditioned: the combined gradient almost vanishes there)
        tol = 1e-12 + 8 * eps * _cagrad_root_condition(a, c, exact)
        assert abs(x - exact) <= tol, (kind, c, a.tolist(), tol)


@pytest.mark.parametrize("c", CAGRAD_CS)
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_two_task_closed_form_agrees_with_slsqp(c, rescale):
    """Same dual minimiser as SLSQP to SLSQP's own accuracy (ftol 1e-12 on a flat objective:
    ~1e-6 in x), never a worse objective in exact arithmetic, and the same direction: the
    difference of the two updates is ≤ 1e-4 × Σ|γᵢ|‖gᵢ‖ (the observed worst is ~3e-5, at
    c = 900 with norms 1e4 apart; 1e-8 where SLSQP's iterate is exact, e.g. parallel gradients)."""
    import mpmath

    from mtl_tune.balancers.cagrad import cagrad_coefficients, cagrad_dual_2, cagrad_dual_slsqp

    for kind, a in _cagrad_two_task_grams():
        where = (kind, c, rescale, a.tolist())
        closed, ok_c, _ = cagrad_coefficients(a, c, rescale)
        slsqp, ok_s, msg = cagrad_coefficients(a, c, rescale, solver="slsqp")
        assert ok_c and ok_s, (msg, where)
        x = float(cagrad_dual_2(a[0, 0], a[0, 1], a[1, 1], c))
        w_s = cagrad_dual_slsqp(a, c)[0]
        assert abs(x - w_s[0]) <= 1e-5, where
        if c > 0:
            # x carries float64 rounding (φ excess ~ φ''·1e-32); SLSQP's x is ~1e-7 off
            with mpmath.workdps(50):
                excess = float(_cagrad_dual_mp(a, c, x) - _cagrad_dual_mp(a, c, w_s[0]))
            assert excess <= 1e-24 * abs(a).max(), where
        diff = closed - slsqp
        terms = float(np.abs(slsqp) @ np.sqrt(np.diag(a)))
        assert math.sqrt(max(diff @ a @ diff, 0.0)) <= 1e-4 * terms, where
        if c == 0:  # no dual term: both give the mean exactly
            np.testing.assert_allclose(closed, [0.5, 0.5], rtol=1e-15)
            np.testing.assert_allclose(slsqp, [0.5, 0.5], rtol=1e-15)


def test_cagrad_closed_form_is_batched_and_matches_scalar_calls():
    from mtl_tune.balancers.cagrad import cagrad_coefficients_2

    grams = np.stack([a for _, a in _cagrad_two_task_grams()])
    n = len(grams)
    c = np.resize(np.array(CAGRAD_CS), n)
    rescale = np.resize(np.array([0, 1, 2]), n)
    batched = cagrad_coefficients_2(grams[:, 0, 0], grams[:, 0, 1], grams[:, 1, 1], c, rescale)
    assert batched.shape == (n, 2)
    for i in range(n):
        one = cagrad_coefficients_2(grams[i, 0, 0], grams[i, 0, 1], grams[i, 1, 1], c[i], int(rescale[i]))
        assert one.shape == (2,)
        np.testing.assert_array_equal(one, batched[i])
    # a (2, 3) grid of problems keeps its shape
    grid = cagrad_coefficients_2(grams[:6, 0, 0].reshape(2, 3), grams[:6, 0, 1].reshape(2, 3),
                                 grams[:6, 1, 1].reshape(2, 3), 0.4)
    np.testing.assert_array_equal(grid.reshape(6, 2), cagrad_coefficients_2(grams[:6, 0, 0], grams[:6, 0, 1],
                                                                         grams[:6, 1, 1], 0.4))


def test_cagrad_closed_form_known_answers_and_degenerate_inputs():
    from mtl_tune.balancers.cagrad import cagrad_coefficients_2, cagrad_dual_2

    # orthogonal equal norms: symmetric, x = ½; λ = c‖g₀‖/‖g_w‖ = c (up to the 1e-8 terms)
    assert float(cagrad_dual_2(1.0, 0.0, 1.0, 0.5)) == 0.5
    np.testing.assert_allclose(cagrad_coefficients_2(1.0, 0.0, 1.0, 0.5, 0), [0.75, 0.75], rtol=1e-7)
    # small c: the dual's linear term wins and all weight goes to the smaller gradient (x = 1)
    assert float(cagrad_dual_2(1.0, 0.0, 4.0, 0.1)) == 1.0
    assert float(cagrad_dual_2(4.0, 0.0, 1.0, 0.1)) == 0.0
    # identical gradients (D = 0): any x, SLSQP stays at b; c = 0: w = b
    assert float(cagrad_dual_2(2.0, 2.0, 2.0, 0.4)) == 0.5
    assert float(cagrad_dual_2(1.0, -0.3, 4.0, 0.0)) == 0.5
    # zero gradients: finite, the mean (λ = c·1e-4/1e-8 multiplies w, but g_w = 0: d = 0 anyway)
    coef = cagrad_coefficients_2(0.0, 0.0, 0.0, 0.4)
    assert np.isfinite(coef).all()
    # one zero gradient: x = 1 puts the dual on it; finite
    assert np.isfinite(cagrad_coefficients_2(0.0, 0.0, 1.0, 0.4)).all()


def test_cagrad_balancer_uses_the_closed_form_for_two_tasks(monkeypatch):
    import mtl_tune.balancers.cagrad as cagrad_mod
    from mtl_tune.balancers.cagrad import CAGrad, cagrad_coefficients

    def no_slsqp(*args, **kw):
        raise AssertionError("SLSQP called for K = 2")

    monkeypatch.setattr(cagrad_mod, "minimize", no_slsqp)
    jac = torch.tensor([[1.0, 0.2, -0.5], [-0.8, 0.1, 0.4]], dtype=torch.float64)
    bal = CAGrad(2, c=0.7, rescale=2)
    got = written_direction(bal, jac)
    coef, ok, msg = cagrad_coefficients(gram(jac).numpy(), 0.7, 2)
    assert ok and msg == "closed form"
    np.testing.assert_allclose(got.numpy(), 2 * coef @ jac.numpy(), rtol=1e-14)
    with pytest.raises(AssertionError, match="SLSQP called"):  # K = 3 still goes through SLSQP
        written_direction(CAGrad(3), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="solver"):
        cagrad_coefficients(np.eye(2), 0.4, solver="newton")
