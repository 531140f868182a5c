"""Two-task solver of the FairGrad family, vectorised over many problems (rows).

**K = 2 (closed form / one scalar equation).** With t = z₂/z₁, s = log t and q_i = p̃_i^{1/α} the
ratio of the two equations is G(s) = D + s(1 + 1/α) + log(1 + ρe^{−s}) − log(1 + ρe^{s}) = 0,
D = log(q₁/q₂), strictly increasing in s; then z₁^{1+1/α} = q₁/(1 + ρt) and z₂ = t z₁. Equal
targets (Nash-MTL; FairGrad with α = 1) give D = 0, s = 0 and the closed form
z₁ = z₂ = (1 + ρ)^{−1/2}; otherwise :class:`FairPairs` runs a Newton iteration on s (on
log((s + L)/(L − s)), L = −log|ρ|, when ρ < 0) that converges monotonically from its start
(proof sketch in the class docstring), vectorised over many problems: the toy kernels call it on
all their rows every step, the balancers with one row, so both compute the same numbers. Its
residual uses the factored forms (Âz)₁ = z₁(1 + ρt), (Âz)₂ = z₂(1 + ρ/t), free of the
cancellation of the summed (Âz)_i near the front, so there it is it is limited only by the iteration, not by float64.

Used by :func:`mtl_tune.balancers._fairness.solve_fair` for two active tasks (so the balancers
of 2-task benchmarks skip the general Newton) and by the toy kernels on all their rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: a task whose squared gradient norm is below this fraction of the largest (a norm ratio
#: below 1e-15) is treated as exactly zero: in float32 it is 1e8× below the rounding of the
#: other tasks' gradients, so it cannot carry information about a direction.
ZERO_GRAD_RTOL = 1e-30
#: Pareto stationarity: h = min_{w ∈ Δ} wᵀÂw ≤ this (0 within 1e-3 of the hull of the unit
#: gradients) means x = 0, d = 0 — see the module docstring for the measurements behind it.
STATIONARY_HULL = 1e-6


@dataclass
class PairSolution:
    """Result of :func:`solve_fair_pairs` for B two-task problems (one row each)."""

    x: np.ndarray           # (B, 2) weights; 0 for zero-gradient tasks and on stationary rows
    converged: np.ndarray   # (B,) relative residual ≤ accept_tol, or stationary, or exact
    stationary: np.ndarray  # (B,) Pareto-stationary rows (x = 0)
    residual: np.ndarray    # (B,) relative residual max_i |(Âz)_i / rhs_i − 1| (0 where exact)
    iterations: np.ndarray  # (B,) Newton steps
    zero: np.ndarray        # (B, 2) zero-gradient tasks
    start: tuple[np.ndarray, np.ndarray]  # (final Newton variable, ρ < 0): a warm start for :meth:`FairPairs.solve`


class FairPairs:
    """:func:`solve_fair` for K = 2, vectorised over B problems (rows) that share their settings.

    ``alpha``, ``tol`` and ``max_iter`` are scalars or (B,) arrays fixed at construction (the
    constants derived from them are computed once: the toy kernels call :meth:`solve` every
    step on all their rows; the balancers build one row per step). Same scaling, zero-gradient
    rule, stationarity test and acceptance as :func:`solve_fair`.

    The solve is the scalar equation G(s) = D + s(1 + 1/α) + log(1 + ρe^{−s}) − log(1 + ρe^{s}) = 0
    of the module docstring, iterated while |G| > ``tol``: |e^G − 1| *is* the relative residual of
    the second equation (the first holds by construction of z₁). The logs' arguments are
    1 + ρe^{∓s} = 1 ± e^{−a}, 1 ± e^{−b} with a = s + L, b = L − s, L = −log|ρ| (sign of ρ);
    for ρ < 0 the root lies in |s| < L, and near ρ = −1 or for targets far apart a or b is a tiny
    fraction of L, which s ≈ ∓L cannot resolve. So Newton runs on y with s = W·tanh(y/2):

    * ρ < 0: W = L, so a = 2Lσ(y) and b = 2Lσ(−y), both computed directly (−expm1 keeps 1 − e^{−a}
      accurate);
    * ρ ≥ 0: no singularity; W = 2α|D| + 1 > 2|s*| (the root satisfies |s*| ≤ α|D|), so tanh
      stays in its near-linear part, and a = (L − W) + 2Wσ(y), b = (L − W) + 2Wσ(−y).

    One formula for every row, no branches. G − D is odd in y, increasing, and concave for y > 0
    (ρ ≥ 0: h'(s) = (1 − ρ²)e^s/((ρ + e^s)(1 + ρe^s)) is largest at s = 0, and tanh is concave there;
    ρ < 0: checked numerically to rounding on a grid of ρ ∈ (−1, 0), α ∈ [0.1, 100], and tested).
    Newton started at the root of the linearisation at y = 0 (exact for ρ = 0 and in the limit
    ρ → −1) therefore lies between 0 and the root and converges monotonically towards it: no step
    can overshoot, no safeguard needed.

    ``start`` (a previous solution's :attr:`PairSolution.start`, for problems that change little
    between calls — the toy kernels' consecutive steps) replaces that start where the sign of ρ is
    unchanged and it lies on the root's side of 0. From beyond the
    root a Newton step lands short of it (concavity), so monotone convergence resumes unless the
    step crosses 0, where the cold start is taken instead. Same root to ``tol``, fewer iterations
    (the balancers start cold).
    """

    def __init__(self, alpha: np.ndarray | float, tol: np.ndarray | float = 1e-10,
                 max_iter: np.ndarray | int = 100, accept_tol: float = 1e-6,
                 hull_tol: float = STATIONARY_HULL) -> None:
        self.alpha = np.asarray(alpha, dtype=np.float64)
        self.one_minus_alpha = 1.0 - self.alpha
        self.inv_alpha = 1.0 / self.alpha
        self.k = 1.0 + self.inv_alpha
        self.inv_alpha1 = 1.0 / (self.alpha + 1.0)
        self.four_alpha = 4.0 * self.alpha   # of 2W = 4α|D| + 2 (ρ ≥ 0): hoisted out of every solve
        self.tol = np.asarray(tol, dtype=np.float64)
        self.max_iter = np.asarray(max_iter, dtype=np.int64)
        self.rounds = int(self.max_iter.max(initial=0))
        self.uniform_limit = bool(np.all(self.max_iter == self.rounds))
        self.accept_tol, self.hull_tol = float(accept_tol), float(hull_tol)
        #: α = 1 on every row: with equal priorities D = 0, s = 0 and z₁ = z₂ = 1/√(1 + ρ) (Nash-MTL)
        self.nash = bool(np.all(self.alpha == 1.0))

    def solve(self, a11: np.ndarray, a12: np.ndarray, a22: np.ndarray, p: np.ndarray | None = None,
              start: tuple[np.ndarray, np.ndarray] | None = None) -> PairSolution:
        """Solve the B problems with finite Gram entries a11, a12, a22 (B,) and priorities p (B, 2) or
        None; ``start``: an optional warm start (see the class docstring)."""
        with np.errstate(all="ignore"):  # zero-gradient and stationary rows are overwritten at the end
            lone = ~(np.minimum(a11, a22) > ZERO_GRAD_RTOL * np.maximum(a11, a22))   # a zero gradient
            c1, c2 = np.sqrt(a11), np.sqrt(a22)
            rho = np.minimum(np.maximum(a12 / (c1 * c2), -1.0), 1.0)
            one_rho = 1.0 + rho
            stationary = 0.5 * one_rho <= self.hull_tol
            if self.nash and p is None:
                return self._closed_form(a11, a22, c1, c2, rho, lone, stationary)
            # log p̃_i = log p_i + (1 − α) log c_i; solve_fair's shift to max log p̃ = 0 cancels for K = 2
            log_p1 = self.one_minus_alpha * np.log(c1)
            log_p2 = self.one_minus_alpha * np.log(c2)
            if p is not None:
                log_q = np.log(p)
                log_p1 = log_q[:, 0] + log_p1
                log_p2 = log_q[:, 1] + log_p2
            d = (log_p1 - log_p2) * self.inv_alpha
            neg = rho < 0
            ell = np.log(np.abs(rho))                      # −L (−∞ at ρ = 0)
            two_w = np.where(neg, -2.0 * ell, self.four_alpha * np.abs(d) + 2.0)   # 2W
            off = -ell - 0.5 * two_w                       # L − W (exactly 0 for ρ < 0)
            slope0 = self.inv_alpha + (1.0 - rho) / one_rho   # dG/ds at s = 0; ds/dy = W/2 there
            v0 = -4.0 * d / (two_w * slope0)
            side = np.sign(v0)
            v = v0 if start is None else np.where((start[1] == neg) & (np.sign(start[0]) == side), start[0], v0)
            live = ~(stationary | lone)
            iters = np.zeros(rho.shape, dtype=np.int64)
            if not live.any():
                # every row is stationary or has a zero gradient (most steps of a toy run on the front):
                # the iteration would stop at once and _finish overwrites its x and residual on every
                # row; only the Newton variable (the next call's warm start) is kept
                zeros = np.zeros(rho.shape)
                return self._finish(a11, a22, c1, c2, log_p1, log_p2, np.zeros(rho.shape + (2,)), zeros, iters,
                                    lone, stationary, (v, neg))
            sgn = np.where(neg, -1.0, 1.0)                 # 1 + ρe^{−a+L} = 1 + sgn·e^{−a}
            one_sgn = 1.0 + sgn
            for it in range(self.rounds + 1):
                e = np.exp(v)
                r = 1.0 / (1.0 + e)
                wr = two_w * r                              # 2Wσ(−y)
                wre = wr * e                                # 2Wσ(y)
                a, b = off + wre, off + wr                  # s + L, L − s
                s = 0.5 * wr * np.expm1(v)                  # W·tanh(y/2)
                ma, mb = np.expm1(-a), np.expm1(-b)
                u1, u2 = one_sgn + sgn * ma, one_sgn + sgn * mb   # 1 + ρe^{−s}, 1 + ρe^{s}
                log_u2 = np.log(u2)
                g = d + self.k * s + np.log(u1) - log_u2
                moving = live & (np.abs(g) > self.tol)
                if not self.uniform_limit:
                    moving &= iters < self.max_iter
                if it == self.rounds or not moving.any():
                    break
                # dG/dy = dG/ds · ds/dy, ds/dy = 2Wσ(y)σ(−y)
                slope = (self.k - sgn * ((ma + 1.0) / u1 + (mb + 1.0) / u2)) * (wre * r)
                step = v - g / slope
                if start is not None:  # from beyond the root: crossing 0 → the cold start instead
                    step = np.where(np.sign(step) == side, step, v0)
                v = np.where(moving, step, v)
                iters += moving
            # z₁^{1+1/α} = q₁/(1 + ρt), z₂ = t z₁ (x = z e^{shift/(α+1)}/c: the shift folds back in)
            log_x1 = (log_p1 - self.alpha * log_u2) * self.inv_alpha1
            x = np.empty(rho.shape + (2,))
            np.divide(np.exp(log_x1), c1, out=x[:, 0])
            np.divide(np.exp(log_x1 + s), c2, out=x[:, 1])
            residual = np.abs(np.expm1(g))   # (Âz)₂/rhs₂ = e^G; the first equation holds by construction
            return self._finish(a11, a22, c1, c2, log_p1, log_p2, x, residual, iters, lone, stationary, (v, neg))

    def _closed_form(self, a11: np.ndarray, a22: np.ndarray, c1: np.ndarray, c2: np.ndarray, rho: np.ndarray,
                     lone: np.ndarray, stationary: np.ndarray) -> PairSolution:
        """α = 1, p = 1: x_i = 1/(c_i √(1 + ρ)) (both equations hold exactly: z(1 + ρ)z = 1)."""
        root = np.sqrt(1.0 + rho)
        x = np.empty(rho.shape + (2,))
        np.divide(1.0, c1 * root, out=x[:, 0])
        np.divide(1.0, c2 * root, out=x[:, 1])
        zeros = np.zeros(rho.shape)
        return self._finish(a11, a22, c1, c2, zeros, zeros, x, zeros, zeros.astype(np.int64), lone, stationary,
                            (zeros, rho < 0))

    def _finish(self, a11: np.ndarray, a22: np.ndarray, c1: np.ndarray, c2: np.ndarray, log_p1: np.ndarray,
                log_p2: np.ndarray, x: np.ndarray, residual: np.ndarray, iters: np.ndarray, lone: np.ndarray,
                stationary: np.ndarray, start: tuple[np.ndarray, np.ndarray]) -> PairSolution:
        """Zero-gradient rows (the other task alone: z = 1 on its own scaled problem, x = e^{log p̃/(α+1)}/c),
        stationary rows (x = 0), and the acceptance test."""
        zero = np.zeros(x.shape, dtype=bool)
        if lone.any():
            with np.errstate(all="ignore"):
                top = np.maximum(a11, a22)
                zero = np.stack([~(a11 > ZERO_GRAD_RTOL * top), ~(a22 > ZERO_GRAD_RTOL * top)], axis=-1)
                single = np.stack([np.exp(log_p1 * self.inv_alpha1) / c1, np.exp(log_p2 * self.inv_alpha1) / c2], -1)
            x = np.where(lone[:, None], np.where(zero, 0.0, single), x)
            residual = np.where(lone, 0.0, residual)
            stationary = stationary & ~lone
        if stationary.any():
            x = np.where(stationary[:, None], 0.0, x)
            residual = np.where(stationary, 0.0, residual)
        converged = stationary | lone | (residual <= self.accept_tol)   # NaN residual: not converged
        return PairSolution(x, converged, stationary, residual, iters, zero, start)


def solve_fair_pairs(a11: np.ndarray, a12: np.ndarray, a22: np.ndarray, alpha: np.ndarray | float,
                     p: np.ndarray | None = None, tol: np.ndarray | float = 1e-10, max_iter: np.ndarray | int = 100,
                     accept_tol: float = 1e-6, hull_tol: float = STATIONARY_HULL) -> PairSolution:
    """One-off :class:`FairPairs` solve of B two-task problems (Gram entries (B,), ``p`` (B, 2) or None)."""
    return FairPairs(alpha, tol, max_iter, accept_tol, hull_tol).solve(
        np.asarray(a11, dtype=np.float64), np.asarray(a12, dtype=np.float64), np.asarray(a22, dtype=np.float64), p)
