"""``pmgda`` — preference-based multiple gradient descent (Zhang, Lin & Zhang, "PMGDA: A
Preference-based Multiple Gradient Descent Algorithm", 2024, arXiv:2402.09492,
https://arxiv.org/abs/2402.09492).

PMGDA turns "the losses follow the preference λ" into a constraint h(ℓ) = 0 on the loss vector and
alternates two moves (predict-and-correct). With gᵢ = ∇ℓᵢ, C = G Gᵀ the Gram matrix and
a = ∂h/∂ℓ, the constraint's gradient is ∇h = Σᵢ aᵢ gᵢ, so every inner product below is a function of
C and a: (Ca)ᵢ = gᵢ·∇h and aᵀCa = ‖∇h‖². The update is d = Σᵢ cᵢ gᵢ (parameters move along −d).

* h (``constraint``; the official code's choices, λ̂ = λ/‖λ‖):
  ``pbi`` (official default) h = ‖ℓ − (ℓ·λ̂) λ̂‖, the distance of ℓ to the preference ray;
  ``cos`` h = 1 − cos(ℓ, λ);
  ``cel`` h = Σ q log(q/p) + Σ p log(p/q) with q = max(ℓ/Σℓ, 10⁻³) and p = λ/Σλ.
  The target is ℓ ∝ λ (a larger preference allows a larger loss; EPO's r is the inverse).
* **predict** (h < ε, paper Eq. 8/11): the min-norm element of {Σ μᵢ gᵢ + ν ∇h : μ ∈ Δ, ν ∈ ℝ},
  i.e. MGDA in the tangent space of h. Eliminating ν (ν = −μᵀCa / aᵀCa) leaves MGDA's min-norm
  problem on the projected Gram matrix C − (Ca)(Ca)ᵀ / aᵀCa; c = μ + ν a.
  ``prediction="mgda"``: the official code's plain MGDA (c = μ, ∇h ignored).
* **correct** (h ≥ ε, paper Eq. 20, an LP): with the K + 1 vectors (g₁ … g_K, ∇h) normalised,
  ĝⱼ = gⱼ/‖gⱼ‖, and d̃ = Σⱼ μⱼ ĝⱼ over μ ∈ Δᴷ (K + 1 entries):
  maximise minᵢ gᵢ·d̃ subject to ∇h·d̃ ≥ σ‖∇h‖ — every loss descends as much as possible while h
  decreases at rate ≥ σ‖∇h‖. Back in task gradients: cᵢ = μᵢ/‖gᵢ‖ + μ_K aᵢ/‖∇h‖ (paper Eq. 18).
  σ ≤ 1 keeps it feasible (μ = e_K gives ∇h·d̃ = ‖∇h‖).

The weights are multiplied by K (as ``mgda`` and ``epo`` here: the update at the scale of the
summed loss; heads get the same weights). Official code: https://github.com/xzhang2523/libmoon at
commit a17f538edfeabfcca95d76ec73febdf1c9b28844 (``libmoon/solver/gradient/methods/pmgda_solver.py``,
whose solver reads h_eps and σ from ``libmoon/config/pmgda.json``: 0.01 and 0.8 at commit
495e08605099eccd7e5d0b9c84ab70954d56fd83, σ = 0.95 in another version of that file; the MTL
script ``core/core_pref_mtl.py`` defaults to 5e-3 and 0.8; the constructor's ``sigma=0.1,
h_tol=1e-3`` are unused). We take h_eps = 0.01, σ = 0.8; both are in the search space.

Departures: (1) the paper's tangent-space prediction is the default; the official code's plain
MGDA prediction is ``prediction="mgda"``. (2) The LP normalises exactly (official: ‖g‖ + 10⁻⁴ in
the LP, ‖g‖ in Eq. 18 — inconsistent, and infeasible when ‖∇h‖ ≲ 10⁻⁴·σ/(1−σ)); a zero vector
gets coefficient 0. (3) SciPy's ``linprog`` (HiGHS) instead of cvxopt; for K = 2 the LP in
closed form (:func:`correct_two`, all rows at once, tested equal to ``linprog``; a toy step
2.6 ms → 0.17 ms). (4) ×K (above). (5) ``cel`` normalises λ to sum 1 (official: λ as given, which libmoon keeps on the simplex).
A failed solve (LP not optimal, min-norm not converged) is a **solver failure** (counted, warned,
fatal after 20 in a row) with the equal weights 1 (×K/K); the official code has no failure path.

Degenerate cases: h = 0 with ``pbi`` (ℓ on the ray) has no gradient; we take a = 0 (the
predict step is then plain MGDA), also where h ≤ 64 eps‖ℓ‖ is rounding noise (the residual's
direction is then noise: ℓ = (0.3, 0.9), λ = (0.1, 0.3) gives h = 1.1e-16 and a = (0, 1)). ∇h = 0 (aᵀCa ≤ 10⁻¹²·tr C·‖a‖²) predicts without the tangent
projection. ``cos`` fails the step at ℓ = 0, ``cel`` when Σℓ ≤ 0; non-finite losses fail the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linprog

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers._simplex import min_norm_weights
from mtl_tune.balancers.base import GradientBalancer

#: official defaults (``libmoon/config/pmgda.json``): the predict/correct switch on h and the
#: correction's required decrease rate of h.
H_EPS = 0.01
SIGMA = 0.8
CONSTRAINTS = ("pbi", "cos", "cel")
PREDICTIONS = ("tangent", "mgda")
#: ``cel``'s floor on the normalised losses (official 1e-3).
CEL_FLOOR = 1e-3
#: ``pbi``: h ≤ ON_RAY·‖ℓ‖ is rounding noise of the residual (on the ray): a = 0 (as ``pbi``'s 64 eps).
ON_RAY = 64 * np.finfo(np.float64).eps
#: the move of a row, as reported in ``extras["pmgda_move"]``.
PREDICT, CORRECT = 0, 1


# Products are written as elementwise sums (not matmul/einsum) so that a row gives the same bits alone
# and in a batch (BLAS kernels differ with the batch shape).


def constraint_rows(losses: np.ndarray, preferences: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h (...), a = ∂h/∂ℓ (..., K), defined (...)) for losses (..., K); ``defined`` is False where h
    is undefined (``cos`` at ℓ = 0, ``cel`` at Σℓ ≤ 0, non-finite losses)."""
    ok = np.isfinite(losses).all(-1)
    ell = np.where(ok[..., None], losses, 1.0)
    if kind == "pbi":
        u = preferences / np.linalg.norm(preferences)
        r = ell - (ell * u).sum(-1)[..., None] * u
        h = np.linalg.norm(r, axis=-1)
        # on the ray, also when h is rounding noise (its direction then is noise too): a = 0
        off = h > ON_RAY * np.linalg.norm(ell, axis=-1)
        a = np.divide(r, h[..., None], out=np.zeros_like(r), where=off[..., None])
    elif kind == "cos":
        u = preferences / np.linalg.norm(preferences)
        n = np.linalg.norm(ell, axis=-1)
        ok &= n > 0
        n = np.where(n > 0, n, 1.0)[..., None]
        cos = (ell * u).sum(-1)[..., None] / n
        h = 1.0 - cos[..., 0]
        a = -(u - cos * ell / n) / n
    elif kind == "cel":
        p = preferences / preferences.sum()
        total = ell.sum(-1)
        ok &= total > 0
        total = np.where(total > 0, total, 1.0)[..., None]
        share = ell / total
        q = np.maximum(share, CEL_FLOOR)
        h = (q * np.log(q / p)).sum(-1) + (p * np.log(p / q)).sum(-1)
        dq = np.where(share >= CEL_FLOOR, np.log(q / p) + 1.0 - p / q, 0.0)
        a = (dq - (dq * share).sum(-1, keepdims=True)) / total
    else:
        raise ValueError(f"pmgda: unknown constraint {kind!r}")
    return h, a, ok


def predict_rows(gram: np.ndarray, a: np.ndarray, tangent: bool) -> tuple[np.ndarray, np.ndarray]:
    """The predict step's c (..., K) (sum of μ = 1, before ×K) and whether the min-norm solve converged."""
    if not tangent:
        return min_norm_weights(gram)
    ca = (gram * a[..., None, :]).sum(-1)
    aca = (a * ca).sum(-1)
    trace = np.trace(gram, axis1=-2, axis2=-1)
    active = aca > 1e-12 * trace * (a * a).sum(-1)
    safe = np.where(active, aca, 1.0)
    projected = gram - np.where(active[..., None, None], ca[..., :, None] * ca[..., None, :] / safe[..., None, None], 0.0)
    mu, ok = min_norm_weights(projected)
    nu = np.where(active, -(mu * ca).sum(-1) / safe, 0.0)
    return mu + nu[..., None] * a, ok


def lp_data(gram: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows (..., K, K), (..., K): (inner (..., K+1, K+1) with inner[i, j] = vᵢ·v̂ⱼ for the vectors
    v = (g₁ … g_K, ∇h); 1/‖vⱼ‖ (..., K+1), 0 for a zero vector; ‖∇h‖ (...))."""
    k = a.shape[-1]
    ca = (gram * a[..., None, :]).sum(-1)
    full = np.empty((*a.shape[:-1], k + 1, k + 1))
    full[..., :k, :k], full[..., :k, k], full[..., k, :k] = gram, ca, ca
    full[..., k, k] = (a * ca).sum(-1)
    norms = np.sqrt(np.clip(np.diagonal(full, axis1=-2, axis2=-1), 0.0, None))
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return full * inv[..., None, :], inv, norms[..., k]


def coefficients(mu: np.ndarray, inv: np.ndarray, a: np.ndarray) -> np.ndarray:
    """cᵢ = μᵢ/‖gᵢ‖ + μ_K aᵢ/‖∇h‖ (paper Eq. 18): d̃ = Σⱼ μⱼ v̂ⱼ in task gradients."""
    k = a.shape[-1]
    return mu[..., :k] * inv[..., :k] + (mu[..., k] * inv[..., k])[..., None] * a


def correct_lp(gram: np.ndarray, a: np.ndarray, sigma: float) -> tuple[np.ndarray | None, str]:
    """One row's correction (module docstring) by SciPy's ``linprog`` (HiGHS): c (K,) (before ×K), or
    None and HiGHS's message."""
    k = len(a)
    inner, inv, norm_h = lp_data(gram, a)
    # x = (μ₀ … μ_K, γ): minimise γ s.t. gᵢ·d̃ + γ ≥ 0 (i < K), ∇h·d̃ ≥ σ‖∇h‖, μ ∈ Δ, γ free
    a_ub = np.zeros((k + 1, k + 2))
    a_ub[:, :k + 1] = -inner
    a_ub[:k, k + 1] = -1.0
    b_ub = np.zeros(k + 1)
    b_ub[k] = -sigma * norm_h
    a_eq = np.ones((1, k + 2))
    a_eq[0, k + 1] = 0.0
    cost = np.zeros(k + 2)
    cost[k + 1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * (k + 1) + [(None, None)], method="highs")
    if res.status != 0 or res.x is None:
        return None, f"linprog (HiGHS) status {res.status}: {res.message}"
    mu = np.clip(res.x[:k + 1], 0.0, None)
    return coefficients(mu / mu.sum(), inv, a), ""


#: the five lines of the K = 2 correction in the plane Σμ = 1: μ₀ = 0, μ₁ = 0, μ₂ = 0, the h constraint
#: tight, g₀·d̃ = g₁·d̃; every pair of them
_PAIRS = np.array([(p, q) for p in range(5) for q in range(p + 1, 5)])


def correct_two(gram: np.ndarray, a: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The correction LP for K = 2 in closed form, on rows (n, 2, 2), (n, 2): (c (n, 2), solved (n)).

    maxmin(g₀·d̃, g₁·d̃) is concave and piecewise linear on the polygon {μ ∈ Δ², ∇h·d̃ ≥ σ‖∇h‖}; its
    maximum is at a vertex of the polygon cut by the line g₀·d̃ = g₁·d̃, i.e. at an intersection of
    two of the five lines above. All ten intersections are formed (3×3 systems with Σμ = 1), the
    feasible ones (tolerance 1e-12 relative) evaluated, the best taken (the first in pair order on a
    tie: where the LP has several optima HiGHS may return another vertex of the same value)."""
    n = len(a)
    inner, inv, norm_h = lp_data(gram, a)
    vectors = np.empty((n, 5, 3))
    vectors[:, :3] = np.eye(3)
    vectors[:, 3], vectors[:, 4] = inner[:, 2], inner[:, 0] - inner[:, 1]
    values = np.zeros((n, 5))
    values[:, 3] = sigma * norm_h
    size = np.linalg.norm(vectors, axis=-1)
    unit = np.divide(vectors, size[..., None], out=np.zeros_like(vectors), where=size[..., None] > 0)
    values = np.divide(values, size, out=np.zeros_like(values), where=size > 0)
    systems = np.ones((n, len(_PAIRS), 3, 3))
    systems[:, :, 0], systems[:, :, 1] = unit[:, _PAIRS[:, 0]], unit[:, _PAIRS[:, 1]]
    rhs = np.ones((n, len(_PAIRS), 3))
    rhs[:, :, 0], rhs[:, :, 1] = values[:, _PAIRS[:, 0]], values[:, _PAIRS[:, 1]]
    regular = np.abs(np.linalg.det(systems)) > 1e-12
    systems[~regular] = np.eye(3)
    points = np.linalg.solve(systems, rhs[..., None])[..., 0]          # (n, 10, 3)
    scale = np.maximum(np.abs(inner).max(axis=(-2, -1)), 1e-300)[:, None]
    along = (points[:, :, None, :] * inner[:, None, :, :]).sum(-1)                    # vᵢ·d̃ at each point
    feasible = regular & (points >= -1e-12).all(-1) & (along[..., 2] >= sigma * norm_h[:, None] - 1e-12 * scale)
    worst = np.where(feasible, along[..., :2].min(-1), -np.inf)
    best = worst.argmax(-1)
    mu = np.clip(points[np.arange(n), best], 0.0, None)
    mu /= np.where(mu.sum(-1, keepdims=True) > 0, mu.sum(-1, keepdims=True), 1.0)
    return coefficients(mu, inv, a), feasible.any(-1)


class PMGDA(GradientBalancer):
    """PMGDA (Zhang, Lin & Zhang, 2024): MGDA in the tangent space of a preference constraint
    h(ℓ) = 0 while h < ε (predict), an LP that decreases h at rate σ‖∇h‖ while descending every
    loss as much as possible otherwise (correct).

    Args:
        n_tasks: K, the number of tasks.
        preferences: K positive preferences λ (default all ones); PMGDA aims at ℓ ∝ λ.
        constraint: h: ``"pbi"`` (official default), ``"cos"`` or ``"cel"`` (module docstring).
        h_eps: the h below which a step predicts (official 0.01).
        sigma: the correction's required decrease rate of h, in (0, 1] (official 0.8).
        prediction: ``"tangent"`` (the paper) or ``"mgda"`` (the official code's plain MGDA).

    Common keyword arguments ``max_norm``, ``jacobian_engine`` and ``gradient_path``: see
    :class:`~mtl_tune.balancers.base.GradientBalancer`. ``StepInfo.weights`` are the effective
    task weights K c (K,).
    """

    name = "pmgda"
    weighted_heads = True
    supports_gram = True

    def __init__(self, n_tasks: int, preferences: Sequence[float] | None = None, constraint: str = "pbi",
                 h_eps: float = H_EPS, sigma: float = SIGMA, prediction: str = "tangent", **kw) -> None:
        super().__init__(n_tasks, **kw)
        r = np.ones(n_tasks) if preferences is None else np.asarray(list(preferences), dtype=np.float64)
        if r.shape != (n_tasks,) or not np.isfinite(r).all() or (r <= 0).any():
            raise ValueError(f"pmgda: preferences must be {n_tasks} finite positive numbers, got {preferences!r}")
        if constraint not in CONSTRAINTS:
            raise ValueError(f"pmgda: constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"pmgda: prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if isinstance(h_eps, bool) or not isinstance(h_eps, (int, float)) or not h_eps >= 0:
            raise ValueError(f"pmgda: h_eps must be a non-negative number, got {h_eps!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
            raise ValueError(f"pmgda: sigma must be in (0, 1], got {sigma!r}")
        self.preferences, self.constraint, self.prediction = r, constraint, prediction
        self.h_eps, self.sigma = float(h_eps), float(sigma)
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """K c (..., K): the predict rows at once, an LP per correct row; a failed solve gives 1s and a
        solver failure."""
        k = self.n_tasks
        shape = losses.shape[:-1]
        flat_g, flat_l = gram.reshape(-1, k, k), losses.reshape(-1, k)
        h, a, defined = constraint_rows(flat_l, self.preferences, self.constraint)
        a = np.where(defined[..., None], a, 0.0)
        correct = defined & (h >= self.h_eps)
        # the predict solve only where the row predicts (a correct row's weights come from its LP)
        weights, ok = np.full((len(flat_l), k), np.nan), np.ones(len(flat_l), dtype=bool)
        if (~correct).any():
            weights[~correct], ok[~correct] = predict_rows(flat_g[~correct], a[~correct], self.prediction == "tangent")
        messages: list[str] = [] if ok[~correct & defined].all() else ["min-norm solver did not converge"]
        solver_failed = ~ok & ~correct & defined
        if k == 2 and correct.any():
            c, solved = correct_two(flat_g[correct], a[correct], self.sigma)
            weights[correct] = c
            solver_failed[correct] = ~solved
            if not solved.all():
                messages.append("closed-form LP (K = 2): no feasible vertex")
        for i in np.flatnonzero(correct) if k > 2 else ():
            c, msg = correct_lp(flat_g[i], a[i], self.sigma)
            solver_failed[i] = c is None
            if c is None:
                messages.append(msg)
            else:
                weights[i] = c
        weights = np.where(solver_failed[..., None], 1.0 / k, weights)
        weights[~defined] = np.nan
        moves = correct.astype(np.int64)
        if not shape:
            self._last = {"pmgda_move": int(moves[0]), "pmgda_h": float(h[0])}

        def reason(index: tuple[int, ...]) -> str:
            need = {"pbi": "finite", "cos": "finite, not all zero,", "cel": "finite, positive-sum"}
            return f"pmgda: constraint {self.constraint!r} needs {need[self.constraint]} losses, got {losses[index].tolist()}"

        return RowStep(k * weights.reshape(*shape, k), failed=~defined.reshape(shape), reason=reason,
                       solver_failed=solver_failed.reshape(shape),
                       solver_message=f"used equal weights ({messages[0]})" if messages else "",
                       extras={"pmgda_move": moves.reshape(shape), "pmgda_h": h.reshape(shape)})

    def _step_extras(self) -> dict[str, Any]:
        return {**self._last, "solver_failures": self.failures.total}

    def extra_repr(self) -> str:
        return (f"n_tasks={self.n_tasks}, preferences={self.preferences.tolist()}, constraint={self.constraint!r}, "
                f"prediction={self.prediction!r}")
