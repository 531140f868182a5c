"""Shared solver of the FairGrad family: x > 0 with (A x)_i = (p_i / x_i)^{1/α}.

FairGrad (Ban & Ji, ICML'24) maximises the α-fair utility Σ_i p_i U_α(g_iᵀd) of the per-task
directional derivatives under a norm bound; its optimality condition is d = G x with

    (A x)_i = (p_i / x_i)^{1/α},   x > 0,   A = G Gᵀ (K×K Gram of the task gradients).

p = 1 gives FairGrad; α = 1, p = 1 is the Nash-MTL condition A x = 1/x (Navon et al.,
ICML'22); α = 2 with performance weights p is PIVRG (Qin, Wang & Yan, CVPR'25).

**Convex formulation (why Newton is safe).** The roots are the stationary points of

    f(x) = ½ xᵀ A x − Σ_i φ_i(x_i),   φ_i(x) = p_i^{1/α} (x^β − 1)/β,  β = 1 − 1/α
    (φ_i = p_i log x for α = 1),

which is strictly convex on x > 0 (A ⪰ 0 and −φ_i'' > 0), so a root is unique when it
exists. It does not exist when 0 lies in the convex hull of the gradients (a Pareto-stationary
point: A has a non-negative null vector v and f decreases without bound along v), e.g. two
opposite gradients.

**Pareto stationarity is convergence, not failure.** Before solving, the squared distance from
0 to the convex hull of the *unit* gradients, h = min_{w ∈ Δ} wᵀÂw (scale-free; for K = 2 it is
(1 + ρ)/2 with ρ the gradients' cosine), is compared with :data:`STATIONARY_HULL` = 1e-6. Dual
reading: √h = max_{‖v‖=1} min_i ĝ_iᵀv, the best rate at which one unit direction can decrease
every task (relative to the task's own steepest rate). At h ≤ 1e-6 no direction improves every
task by more than 0.1 % of its steepest rate; the exact solution does not exist (h = 0) or runs
off to infinity (x ~ h^{−α/(α+1)}, its direction turning along the front), so the step is *Pareto
stationary*: x = 0, d = 0 for the shared parameters, reported as such (``stationary``), not as a
failure. The decision depends on Â alone — not on whether an iteration happened to converge —
so the batched K = 2 toy kernels reproduce it exactly.

Why 1e-6 (measured with the general Newton on ~7 000 problems, K ∈ {3, 11, 40}, α ∈ [0.25, 10],
p spread ≤ 25×, gradient norms spread up to e^{±6}): (Âz)_i is a cancellation of terms ~1/h times
larger than the targets, so float64 resolves the relative residual only to ~1e-16·r/h, with r =
(max p̃ / min p̃)^{1/α} the spread of the targets. Above h = 1e-6 Newton reached the 1e-6
acceptance on every problem with r < 1e4; below 1e-8 most problems reach only the float64 floor
of the backward error, whatever r. Below the threshold the answer is also meaningless as data:
ρ carries a rounding error ~1e-16, i.e. ~1e-16/h relative in every weight (1e-10 at 1e-6).
A solve that stops at that floor — backward error ≤ 1e-14: x exactly solves a problem within 1e-14
of the given one, and no float64 x does better, because the small targets are below the rounding
of (Ax)_i's terms — is accepted and its message says so (above the threshold this happens only
for r ≳ 1e4: norm ratios ≳ 1e3 at α far from 1, or extreme p). Genuine non-convergence (the
iteration limit, a stalled line search, non-finite iterates) stays a failure.

Cost of the test (2-core CPU, under load): K ≤ 2 free (closed form); K > 2 the certificate
h ≥ (min_i (Âu)_i)²/uᵀÂu with u = 1 or the previous solution, O(K²), ~10 µs, decides every step of
a balancer that has a previous solution and is not within a few orders of magnitude of the
threshold; otherwise the exact active-set solve (:func:`mtl_tune.balancers._simplex.min_norm_simplex`)
runs: 0.1 ms (K = 3), 3 ms (K = 11), 14 ms (K = 40) — against 0.75–2 ms for the Newton solve.

**K = 2** has its own vectorised solver, :mod:`mtl_tune.balancers._fair_pairs` (closed form for
equal targets, one scalar equation otherwise); :func:`solve_fair` uses it for two active tasks.

**Scaling (why it is well-posed numerically).** With c_i = ‖g_i‖ and the unit-diagonal
Â = C⁻¹ A C⁻¹, substituting z = C x gives the same kind of equation

    (Â z)_i = (p̃_i / z_i)^{1/α},   p̃_i = p_i c_i^{1−α},

and p̃ → p̃/m maps z → z·m^{1/(α+1)}. So gradients of norm 1e-12 or 1e12, or norms that differ
by many orders across tasks, are solved on a correlation matrix with p̃ ≤ 1 and mapped back
exactly: x = m^{1/(α+1)} z / c. (A global rescale A → A/s is the special case c_i = √s:
x scales by s^{−α/(α+1)}.)

**Zero gradients.** A task with g_i = 0 has the equation 0 = (p_i/x_i)^{1/α}: no finite root
(x_i → ∞, which is where scipy's least_squares in the official code drifts). Its column of A
is zero, so the other tasks' equations do not involve x_i and their exact solution is that of
the reduced system; the task's weight is reported as 0 (it contributes nothing to d) and its
index in ``zero_tasks``. Callers decide whether that is a failure (Nash-MTL, whose heads are
weighted by x, counts it as one) or not (FairGrad: heads are unweighted and d is exact).

Solvers: ``"newton"`` (default) — damped Newton on u = log z, the step solving
(Z Â Z + diag(z ⊙ rhs)/α) Δu = −z ⊙ r (the Newton step of the residual in x mapped to u,
a descent direction of f), Armijo backtracking, |Δu| ≤ 4 per step; ``"least_squares"`` —
scipy's trust-region-reflective least squares on r(z) = Âz − (p̃/z)^{1/α}, bounds z ≥ 0, as the
official code (on the scaled problem). Both are judged by the same criterion: the relative
residual max_i |(Ax)_i / (p_i/x_i)^{1/α} − 1| (iterate to ``tol`` = 1e-10, accept ≤ 1e-6, or
Newton's float64 floor as explained above). For K = 2 (after dropping zero-gradient tasks)
``"newton"`` means the K = 2 solve above (``max_iter`` caps its iterations, ``x0`` is not needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from mtl_tune.balancers._fair_pairs import (STATIONARY_HULL, ZERO_GRAD_RTOL, FairPairs, PairSolution,  # noqa: F401
                                             solve_fair_pairs)
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers._simplex import min_norm_simplex
from mtl_tune.balancers.base import Balancer, BalancerError, GradientBalancer, SolverFailureCounter, gram

SOLVERS = ("newton", "least_squares")
#: largest change of log z in one Newton step (a weight changes by at most e^4 ≈ 55×).
MAX_LOG_STEP = 4.0
#: backward error at which float64 cannot improve the solution any further.
BACKWARD_FLOOR = 1e-14
#: a warm-started K = 2 solve needs 1–2 Newton steps where a cold one needs up to ~6 (α = 5); below
#: this ``max_iter`` the count decides convergence, so every solve starts cold
WARM_START_MIN_ITER = 10



@dataclass
class FairSolution:
    """Result of :func:`solve_fair`. ``x``: weights (K,), 0 for zero-gradient tasks."""

    x: np.ndarray
    converged: bool
    iterations: int
    residual: float
    zero_tasks: tuple[int, ...] = ()
    message: str = "ok"
    extras: dict[str, Any] = field(default_factory=dict)
    #: Pareto-stationary step (x = 0 by definition; ``converged`` is True)
    stationary: bool = False
    #: h = min_{w ∈ Δ} wᵀÂw, or a certified lower bound of it above the threshold (K > 2)
    hull_gap: float = float("nan")


def fair_residual(gram_matrix: np.ndarray, x: np.ndarray, alpha: float, p: np.ndarray | None = None) -> np.ndarray:
    """Relative residual (A x)_i / (p_i/x_i)^{1/α} − 1 (zero at the FairGrad solution)."""
    a = np.asarray(gram_matrix, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    p = np.ones_like(x) if p is None else np.asarray(p, dtype=np.float64)
    return (a @ x) / (p / x) ** (1.0 / alpha) - 1.0


def _errors(a_hat: np.ndarray, z: np.ndarray, rhs: np.ndarray) -> tuple[float, float]:
    """(relative residual, backward error) of z for Âz = rhs.

    relative residual = max_i |r_i| / rhs_i: how far each task's directional derivative is
    from its target — what "solved" means. backward error = max_i |r_i| / (rhs_i + (|Â|z)_i):
    the residual relative to the terms (Âz)_i is computed from. When it reaches the float64
    floor no iteration can improve the relative residual any further: (Âz)_i is then a
    cancellation of much larger terms (the gradients nearly cancel, with targets spread so far
    apart that even a hull gap above :data:`STATIONARY_HULL` leaves the small ones unresolved).
    """
    r = np.abs(a_hat @ z - rhs)
    return float(np.max(r / rhs)), float(np.max(r / (rhs + np.abs(a_hat) @ z)))


def _potential(u: np.ndarray, a_hat: np.ndarray, q: np.ndarray, alpha: float) -> float:
    """f(e^u) = ½ zᵀÂz − Σ q_i (z_i^β − 1)/β with q = p̃^{1/α}, β = 1 − 1/α (log z for β = 0)."""
    z = np.exp(u)
    beta = 1.0 - 1.0 / alpha
    phi = q * u if abs(beta) < 1e-12 else q * np.expm1(beta * u) / beta
    return float(0.5 * z @ a_hat @ z - phi.sum())


def _newton_log(a_hat: np.ndarray, log_p: np.ndarray, alpha: float, u0: np.ndarray, tol: float,
                max_iter: int) -> tuple[np.ndarray, float, int, str]:
    """Damped Newton on u = log z for Âz = (p̃/z)^{1/α}; returns (best u, its relative residual, iterations, message).

    Stops at relative residual ≤ ``tol``, at the float64 floor of the backward error, or after
    ``max_iter`` steps. A step length t is accepted when it satisfies Armijo on the potential f
    (global convergence) *or* lowers the relative residual by the factor 1 − 1e-4·t: near the
    root the decrease of f is O(residual²) and drowns in f's own rounding, while the residual
    keeps converging quadratically.
    """
    q = np.exp(log_p / alpha)

    def evaluate(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        z = np.exp(u)
        rhs = np.exp((log_p - u) / alpha)
        return (z, rhs, *_errors(a_hat, z, rhs))

    u = u0.copy()
    z, rhs, rel, bwd = evaluate(u)
    best_u, best_rel = u.copy(), rel
    for it in range(max_iter + 1):
        if not np.isfinite(rel):
            return best_u, best_rel, it, "non-finite iterate"
        if rel < best_rel:
            best_u, best_rel = u.copy(), rel
        if rel <= tol:
            return u, rel, it, "ok"
        if bwd <= BACKWARD_FLOOR:
            return best_u, best_rel, it, "float64 precision floor reached"
        if it == max_iter:
            break
        r = a_hat @ z - rhs
        h = z[:, None] * a_hat * z[None, :] + np.diag(z * rhs / alpha)
        g = z * r
        d = np.sqrt(np.diag(h))  # Jacobi scaling keeps the solve accurate when z spans decades
        try:
            step = -np.linalg.solve(h / np.outer(d, d), g / d) / d
        except np.linalg.LinAlgError:
            return best_u, best_rel, it, "singular Newton system"
        big = np.max(np.abs(step))
        if big > MAX_LOG_STEP:  # trust region in log space: bounded relative change of any weight
            step *= MAX_LOG_STEP / big
        f0, slope, t = _potential(u, a_hat, q, alpha), float(g @ step), 1.0
        for _ in range(40):
            trial = evaluate(u + t * step)
            if trial[2] <= (1.0 - 1e-4 * t) * rel or _potential(u + t * step, a_hat, q, alpha) <= f0 + 1e-4 * t * slope:
                break
            t *= 0.5
        else:  # neither merit can decrease: we are at the floating-point floor
            return best_u, best_rel, it, "line search stalled"
        u = u + t * step
        z, rhs, rel, bwd = trial
    return best_u, best_rel, max_iter, f"no convergence in {max_iter} iterations"


def _least_squares(a_hat: np.ndarray, log_p: np.ndarray, alpha: float, u0: np.ndarray, tol: float,
                   max_iter: int) -> tuple[np.ndarray, float, int, str]:
    """scipy least_squares on r(z) = Âz − (p̃/z)^{1/α}, z ≥ 0 (the official FairGrad solver)."""
    q = np.exp(log_p / alpha)

    def resid(z: np.ndarray) -> np.ndarray:
        return a_hat @ z - q * np.maximum(z, 1e-300) ** (-1.0 / alpha)

    def jac(z: np.ndarray) -> np.ndarray:
        return a_hat + np.diag(q / alpha * np.maximum(z, 1e-300) ** (-1.0 / alpha - 1.0))

    sol = least_squares(resid, np.exp(u0), jac=jac, bounds=(0.0, np.inf), method="trf",
                        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=max(max_iter, 1) * 10)
    z = np.maximum(sol.x, 1e-300)
    rel, _ = _errors(a_hat, z, q * z ** (-1.0 / alpha))
    return np.log(z), rel, int(sol.nfev), "ok" if rel <= tol else f"least_squares: {sol.message}"


def _rescaled(a_hat: np.ndarray, log_p: np.ndarray, alpha: float, u: np.ndarray) -> np.ndarray:
    """Start point u + log τ with the best common scale τ for the direction e^u.

    Â(τz) = (p̃/(τz))^{1/α} gives log τ = (log rhs_i(z) − log (Âz)_i)/(1 + 1/α) per task; we take
    the mean over tasks with (Âz)_i > 0. This removes the global-scale part of the error in
    one shot (a warm start after the gradients shrank 1e6×, or the orthogonal guess for
    strongly correlated gradients), which Newton would otherwise walk off at ~1 per step in log
    space.
    """
    z = np.exp(u)
    az = a_hat @ z
    pos = az > 0
    if not np.any(pos):
        return u
    log_tau = np.mean((log_p[pos] - u[pos]) / alpha - np.log(az[pos])) / (1.0 + 1.0 / alpha)
    return u + log_tau


def pareto_gap(a_hat: np.ndarray, tol: float = STATIONARY_HULL, hints: tuple[np.ndarray, ...] = ()) -> float:
    """h = min_{w ∈ Δ} wᵀÂw for a unit-diagonal Gram Â, or a certified lower bound of h above ``tol``.

    h is the squared distance from 0 to the convex hull of the unit gradients; h ≤ ``tol`` is
    Pareto stationarity (module docstring). K = 2: h = (1 + ρ)/2 exactly (the K = 2 kernels use
    the same expression). K > 2: for any u ≥ 0, v = Ĝᵀu/‖Ĝᵀu‖ gives ‖Ĝᵀw‖ ≥ vᵀĜᵀw ≥
    min_i (Âu)_i/√(uᵀÂu) for every w ∈ Δ, so h ≥ (min_i (Âu)_i)²/uᵀÂu when min_i (Âu)_i > 0.
    u = 1 and the ``hints`` (e.g. the previous solution in Â's coordinates, whose (Âu)_i are the
    previous targets, all positive) are tried first, O(K²) each; only when none proves h > tol is
    the exact active-set solve run. The decision h ≤ tol is the same either way.
    """
    k = a_hat.shape[0]
    if k == 1:
        return 1.0
    if k == 2:
        return 0.5 * (1.0 + float(a_hat[0, 1]))
    for u in (np.ones(k), *hints):
        if not (u.shape == (k,) and np.all(np.isfinite(u)) and np.all(u >= 0)):
            continue
        au = a_hat @ u
        low, energy = float(au.min()), float(u @ au)
        if low > 0 and energy > 0 and low * low / energy > tol:
            return low * low / energy
    w, _ = min_norm_simplex(a_hat)
    return float(w @ a_hat @ w)


def scaled_gram(gram_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Â on the tasks with a non-zero gradient, their norms c, their indices) of a Gram matrix."""
    a = np.asarray(gram_matrix, dtype=np.float64)
    diag = np.clip(np.diag(a), 0.0, None)
    top = float(diag.max(initial=0.0))
    active = np.flatnonzero(diag > ZERO_GRAD_RTOL * top) if top > 0 else np.array([], dtype=int)
    c = np.sqrt(diag[active])
    a_hat = np.clip(a[np.ix_(active, active)] / np.outer(c, c), -1.0, 1.0)
    np.fill_diagonal(a_hat, 1.0)
    return a_hat, c, active


def pareto_stationary(gram_matrix: np.ndarray, tol: float = STATIONARY_HULL,
                      hint: np.ndarray | None = None) -> tuple[bool, float]:
    """(stationary, h) for a Gram matrix, judged on its tasks with non-zero gradients.

    ``hint``: positive weights x of a previous solution (any scale), a cheap certificate for K > 2.
    """
    a_hat, c, active = scaled_gram(gram_matrix)
    if active.size < 2:
        return False, 1.0
    hints = () if hint is None else (c * np.asarray(hint, dtype=np.float64)[active],)
    gap = pareto_gap(a_hat, tol, hints)
    return gap <= tol, gap


def solve_fair(gram_matrix: np.ndarray, alpha: float, p: np.ndarray | None = None, x0: np.ndarray | None = None,
               tol: float = 1e-10, max_iter: int = 100, method: str = "newton",
               accept_tol: float = 1e-6, hull_tol: float = STATIONARY_HULL,
               hint: np.ndarray | None = None) -> FairSolution:
    """Solve (A x)_i = (p_i/x_i)^{1/α}, x > 0 (see the module docstring for the maths).

    First the Pareto-stationarity test on the tasks with non-zero gradients: h ≤ ``hull_tol``
    returns x = 0, ``stationary`` and ``converged`` True (no solve). ``hint``: weights of a previous
    solve, only used to certify h > ``hull_tol`` cheaply (K > 2; the decision does not depend on it).
    ``x0``: optional warm start (previous solution, any positive finite vector; also a hint). Without
    it the start is the exact solution for orthogonal gradients, z_i = p̃_i^{1/(α+1)}. Two tasks
    with ``method="newton"``: :func:`solve_fair_pairs` (x0 unused). Iterates until the relative
    residual is ≤ ``tol``; the result counts as converged when it is ≤ ``accept_tol`` (every
    task's directional derivative within 1e-6 of its target). Never raises for a non-convergent
    problem: ``converged`` is False and ``x`` is the best iterate found.
    """
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if method not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {method!r}")
    a = np.asarray(gram_matrix, dtype=np.float64)
    k = a.shape[0]
    equal = p is None  # (the K = 2 path has a closed form for α = 1 with equal priorities)
    p = np.ones(k) if p is None else np.asarray(p, dtype=np.float64)
    if a.shape != (k, k) or p.shape != (k,):
        raise ValueError(f"gram must be K×K and p of length K, got {a.shape} and {p.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(p)) and np.all(p > 0)):
        raise ValueError("gram must be finite and p finite and positive")
    a_hat, c, active = scaled_gram(a)
    zero = tuple(int(i) for i in np.setdiff1d(np.arange(k), active))
    x = np.zeros(k)
    if active.size == 0:  # every gradient is zero: d = 0 whatever x is
        return FairSolution(x, True, 0, 0.0, zero, "all gradients are zero")
    hints = tuple(c * np.asarray(h, dtype=np.float64)[active] for h in (x0, hint) if h is not None)
    gap = pareto_gap(a_hat, hull_tol, hints)
    if gap <= hull_tol:
        return FairSolution(x, True, 0, 0.0, zero, f"Pareto-stationary (hull gap {gap:.1e} <= {hull_tol:.0e}): d = 0",
                            stationary=True, hull_gap=gap)
    if active.size == 2 and method == "newton":
        i, j = active
        pair = solve_fair_pairs(a[i, i:i + 1], a[i, j:j + 1], a[j, j:j + 1], alpha, None if equal else p[active][None],
                                tol=tol, max_iter=max_iter, accept_tol=accept_tol, hull_tol=hull_tol)
        x[active] = pair.x[0]
        rel, ok = float(pair.residual[0]), bool(pair.converged[0])
        msg = "ok" if ok else f"K = 2 solve stopped at relative residual {rel:.1e} > {accept_tol:.0e}"
        return FairSolution(x, ok, int(pair.iterations[0]), rel, zero, msg, hull_gap=gap)
    log_p = np.log(p[active]) + (1.0 - alpha) * np.log(c)
    shift = float(log_p.max())
    log_p = log_p - shift  # p̃ ≤ 1; z maps back by e^{shift/(α+1)}
    back = shift / (alpha + 1.0)
    starts = [log_p / (alpha + 1.0)]
    if x0 is not None and np.all(np.isfinite(x0[active])) and np.all(x0[active] > 0):
        starts.append(np.log(c * x0[active]) - back)
    u0 = min((_rescaled(a_hat, log_p, alpha, u) for u in starts),
             key=lambda u: _errors(a_hat, np.exp(u), np.exp((log_p - u) / alpha))[0])
    run = _newton_log if method == "newton" else _least_squares
    u, rel, iters, msg = run(a_hat, log_p, alpha, u0, tol, max_iter)
    x[active] = np.exp(u + back) / c
    ok = bool(np.isfinite(rel) and rel <= accept_tol)
    if ok:
        msg = "ok" if msg == "ok" else f"ok ({msg}, relative residual {rel:.1e})"
    elif msg == "float64 precision floor reached" and np.isfinite(rel):
        # backward error ≤ 1e-14: x solves a problem within 1e-14 of this one, and no float64 x does
        # better — the small targets are below the rounding of (Ax)_i's terms (see the module docstring)
        ok, msg = True, f"ok at the float64 floor (relative residual {rel:.1e}, hull gap {gap:.1e})"
    return FairSolution(x, ok, iters, rel, zero, msg, hull_gap=gap)


class FairBalancer(GradientBalancer):
    """Base of FairGrad / PIVRG / ConsMTL: d = K · G x with x from :func:`solve_fair`.

    The ×K puts the update at the scale of the summed loss, and ``max_norm`` defaults to 1.0:
    both are what the official FairGrad/MTLlib code effectively does (docs/methods.md#update-scale,
    docs/methods.md#gradient-clipping).
    Heads receive the unweighted task gradients (official per-task ``backward``,
    docs/methods.md#what-the-task-heads-receive).
    A non-converged solve is counted (``solver_failures`` in every step's extras), warned
    about, and raises :class:`BalancerError` after 20 in a row; that step uses the solver's
    best iterate (smallest relative residual), as the official least_squares would return
    its last iterate — never equal weights. Zero-gradient tasks get weight 0 (exact, see the
    module docstring) and are counted in ``zero_grad_tasks``, not as failures.

    A Pareto-stationary step (hull gap ≤ :data:`STATIONARY_HULL`, module docstring) is no failure:
    x = 0, so the shared parameters get d = 0 and ``StepInfo.weights`` = 0 (what was applied);
    heads keep their unweighted task gradients; it is counted in ``stationary_steps`` and ends a
    run of failures (the solver did not fail). The previous solution is passed as a hint that
    only makes the stationarity test cheaper for K > 2 (it never changes the decision).
    """

    default_max_norm: ClassVar[float | None] = 1.0
    supports_gram: ClassVar[bool] = True

    def __init__(self, n_tasks: int, alpha: float = 2.0, solver: str = "newton", tol: float = 1e-10,
                 max_iter: int = 100, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"{self.name}: alpha must be a positive number, got {alpha!r}")
        if solver not in SOLVERS:
            raise ValueError(f"{self.name}: solver must be one of {SOLVERS}, got {solver!r}")
        if not (isinstance(tol, (int, float)) and 0 <= tol < math.inf):
            raise ValueError(f"{self.name}: tol must be a finite number >= 0, got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"{self.name}: max_iter must be an integer >= 0, got {max_iter!r}")
        self.alpha, self.solver, self.tol, self.max_iter = float(alpha), solver, float(tol), int(max_iter)
        self.failures = SolverFailureCounter(self.name)
        self.stationary_steps = 0
        self._pairs = FairPairs(self.alpha, self.tol, self.max_iter)
        self._pair_starts: tuple[tuple[np.ndarray, np.ndarray], ...] = ()  # warm starts of the K = 2 solve
        self._warm = False
        self._hints: np.ndarray | None = None   # the previous x (K > 2): a stationarity hint
        self.stationary_rows: np.ndarray = np.zeros((), dtype=bool)
        self.last_solve: dict[str, np.ndarray] | None = None

    def task_priorities(self) -> np.ndarray | None:
        """The p of the fairness equation, (..., K) for the rows' leading shape (None = all ones);
        PIVRG overrides this."""
        return None

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # warm starts only for rows in lockstep: a training step starts cold, so that a checkpoint
        # (which does not hold the Newton variable) continues bit for bit
        self._pair_starts, self._warm = (), self.max_iter >= WARM_START_MIN_ITER

    def fair_rows(self, gram: np.ndarray) -> RowStep:
        """Batch-first solve for x (..., K) on Gram matrices (..., K, K) (no ×K; see :func:`solve_fair`).

        Two tasks with the Newton solver: :class:`FairPairs` on every row at once; after
        :meth:`start_rows` warm-started from the previous call's solution extrapolated linearly (the
        root is the same to ``tol``; a consecutive step needs 1–2 Newton steps instead of up to ~6)
        unless ``max_iter`` < :data:`WARM_START_MIN_ITER` (then the iteration count decides
        convergence, so every solve starts cold). Otherwise :func:`solve_fair` row by row, with the
        previous solution as its stationarity hint. Sets :attr:`stationary_rows` and
        :attr:`last_solve` (iterations, residual, zero-gradient tasks per row).
        """
        k, shape = gram.shape[-1], gram.shape[:-2]
        rows = gram.reshape(-1, k, k)
        p = self.task_priorities()
        if p is not None:  # (PIVRG's priorities already have the rows' shape after start_rows)
            p = p.reshape(-1, k) if p.shape == (*shape, k) else np.broadcast_to(p, (*shape, k)).reshape(-1, k)
        if k == 2 and self.solver == "newton":
            starts = self._pair_starts if self._warm else ()
            start = None
            if starts and starts[-1][0].shape == (len(rows),):
                start = starts[-1]
                if len(starts) == 2:  # the trajectory moves smoothly: extrapolate the Newton variable
                    (v0, neg0), (v1, neg1) = starts
                    start = (np.where(neg1 == neg0, 2.0 * v1 - v0, v1), neg1)
            sol = self._pairs.solve(rows[:, 0, 0], rows[:, 0, 1], rows[:, 1, 1], p, start)
            if self._warm:
                self._pair_starts = (*self._pair_starts[-1:], sol.start) if start is not None else (sol.start,)
            x, ok, stationary, residual = sol.x, sol.converged, sol.stationary, sol.residual
            iterations, zero = sol.iterations, sol.zero.sum(-1)
            message = "" if ok.all() else f"K = 2 solve stopped at relative residual {float(residual[~ok].max()):.1e} > 1e-06"
        else:
            x, ok, stationary = np.empty((len(rows), k)), np.empty(len(rows), bool), np.empty(len(rows), bool)
            residual, iterations, zero = np.empty(len(rows)), np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
            hints = self._hints if self._hints is not None and self._hints.shape == (len(rows), k) else None
            message = ""
            for r, a in enumerate(rows):
                hint = None if hints is None or not np.all(hints[r] > 0) else hints[r]
                sol = solve_fair(a, self.alpha, None if p is None else p[r], tol=self.tol, max_iter=self.max_iter,
                                 method=self.solver, hint=hint)
                x[r], ok[r], stationary[r], residual[r] = sol.x, sol.converged, sol.stationary, sol.residual
                iterations[r], zero[r] = sol.iterations, len(sol.zero_tasks)
                if not sol.converged:
                    message = f"{sol.message}; relative residual {sol.residual:.2e}"
            self._hints = np.where(stationary[:, None], np.nan, x)
        self.stationary_rows = stationary.reshape(shape)
        self.last_solve = {"solver_iterations": iterations.reshape(shape), "solver_residual": residual.reshape(shape),
                           "zero_grad_tasks": zero.reshape(shape)}
        finite = np.isfinite(x).all(-1)
        return RowStep(x.reshape(*shape, k), failed=~finite.reshape(shape),
                       reason=f"{self.name}: solver produced non-finite weights",
                       solver_failed=(~ok & finite).reshape(shape), solver_message=message)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        out = self.fair_rows(gram)
        out.weights = self.n_tasks * out.weights  # ×K; 0 on stationary rows
        return out

    def fair_weights(self, gram_matrix: Tensor) -> Tensor:
        """x (K,) float64 for this step's Gram matrix (:meth:`fair_rows` on one row), with failure accounting."""
        x = one_row(self.fair_rows(host(gram_matrix)), self.failures)
        self.stationary_steps += int(self.stationary_rows)
        return torch.from_numpy(x).to(gram_matrix.device)

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        return self.n_tasks * self.fair_weights(gram_matrix)

    def _step_extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {"solver_failures": self.failures.total, "stationary_steps": self.stationary_steps}
        if self.last_solve is not None and np.ndim(self.last_solve["solver_iterations"]) == 0:
            out.update({key: value.item() for key, value in self.last_solve.items()})
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {"failures": self.failures.state_dict(), "stationary_steps": self.stationary_steps}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.failures.load_state_dict(state["failures"])
        self.stationary_steps = int(state.get("stationary_steps", 0))  # absent in older checkpoints
