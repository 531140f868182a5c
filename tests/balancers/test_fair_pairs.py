"""The K = 2 α-fair solve (mtl_tune/balancers/_fair_pairs.py, vectorised scalar Newton)."""

from __future__ import annotations

import math

import numpy as np

from mtl_tune.balancers._fairness import fair_residual, scaled_gram

from ._helpers import two_task_gram


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
        a = two_task_gram(h, norms)
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


def test_fair_pairs_without_live_rows_skip_the_iteration_exactly():
    """A call whose rows are all Pareto-stationary or have a zero gradient returns before the Newton
    loop; each of its rows must equal, bit for bit, the same row solved next to a live row (which
    runs the loop): x, residual, flags, iterations and the warm start it hands on."""
    from mtl_tune.balancers._fair_pairs import FairPairs

    rng = np.random.default_rng(11)
    g1 = rng.normal(size=(4, 3))
    g2 = -g1 * np.exp(rng.normal(size=(4, 1))) + 1e-5 * rng.normal(size=(4, 3))   # stationary: nearly opposite
    g2[3] = 0.0                                                                      # a zero gradient
    live = rng.normal(size=(2, 3))
    a11 = np.concatenate([(g1 * g1).sum(1), [live[0] @ live[0]]])
    a12 = np.concatenate([(g1 * g2).sum(1), [live[0] @ live[1]]])
    a22 = np.concatenate([(g2 * g2).sum(1), [live[1] @ live[1]]])
    for alpha, p in ((2.0, None), (0.5, np.exp(rng.normal(size=(5, 2)))), (1.0, None)):
        solver = FairPairs(alpha)
        cold = solver.solve(a11, a12, a22, p).start
        for start in (None, (1.5 * cold[0], cold[1]), (rng.normal(size=5), rng.normal(size=5) < 0)):
            both = solver.solve(a11, a12, a22, p, start)
            assert not (both.stationary | both.zero.any(-1))[4]   # the last row is live: the loop runs
            dead = solver.solve(a11[:4], a12[:4], a22[:4], None if p is None else p[:4],
                                None if start is None else (start[0][:4], start[1][:4]))
            assert (dead.stationary | dead.zero.any(-1)).all() and dead.stationary[:3].all()
            for name in ("x", "converged", "stationary", "residual", "iterations", "zero"):
                assert np.array_equal(getattr(dead, name), getattr(both, name)[:4]), name
            # (the Newton variable of a stationary row may be NaN: ρ = −1 makes 2W = 0)
            assert np.array_equal(dead.start[0], both.start[0][:4], equal_nan=True)
            assert np.array_equal(dead.start[1], both.start[1][:4])
