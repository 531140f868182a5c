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


def unit_preference(preferences: np.ndarray) -> np.ndarray:
    """λ̂ = λ/‖λ‖, the direction ``pbi`` and ``cos`` measure against."""
    return preferences / np.linalg.norm(preferences)


def constraint_rows(losses: np.ndarray, preferences: np.ndarray, kind: str,
                    unit: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h (...), a = ∂h/∂ℓ (..., K), defined (...)) for losses (..., K); ``defined`` is False where h
    is undefined (``cos`` at ℓ = 0, ``cel`` at Σℓ ≤ 0, non-finite losses). ``unit``: λ̂ when the
    caller has it (:func:`unit_preference`), else computed here."""
    ok = np.isfinite(losses).all(-1)
    ell = np.where(ok[..., None], losses, 1.0)
    if kind == "pbi":
        u = unit_preference(preferences) if unit is None else unit
        r = ell - (ell * u).sum(-1)[..., None] * u
        # ‖·‖ along the last axis as np.linalg.norm computes it (√Σx²), without its wrapper
        h = np.sqrt((r * r).sum(-1))
        # on the ray, also when h is rounding noise (its direction then is noise too): a = 0
        off = h > ON_RAY * np.sqrt((ell * ell).sum(-1))
        a = np.divide(r, h[..., None], out=np.zeros(r.shape, r.dtype), where=off[..., None])
    elif kind == "cos":
        u = unit_preference(preferences) if unit is None else unit
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
    trace = gram.trace(axis1=-2, axis2=-1)
    active = aca > 1e-12 * trace * (a * a).sum(-1)
    if active.all():   # the common case: every row projects (the general lines below with nothing masked)
        mu, ok = min_norm_weights(gram - ca[..., :, None] * ca[..., None, :] / aca[..., None, None])
        return mu + (-(mu * ca).sum(-1) / aca)[..., None] * a, ok
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
    # np.clip(x, 0, None) is np.maximum(x, 0) (NumPy's clip calls it); the diagonal as a strided view
    norms = np.sqrt(np.maximum(full.reshape(*full.shape[:-2], -1)[..., ::k + 2], 0.0))
    inv = np.divide(1.0, norms, out=np.zeros(norms.shape, norms.dtype), where=norms > 0)
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


def _pair_systems() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each pair's 3×3 system [line p; line q; Σμ = 1] (10, 3, 3) and right-hand side (10, 3) with what
    is the same on every row filled in: lines 0–2 (μ_i = 0: unit normal e_i, level 0), Σμ = 1, and
    line 4's level 0 (g₀·d̃ = g₁·d̃); and where the per-row lines go: the (pair, row) slots of lines 3
    and 4 with each slot's line, (8,) each, and the slots of line 3 (the level σ‖∇h‖), (4,) each."""
    systems, rhs = np.ones((len(_PAIRS), 3, 3)), np.ones((len(_PAIRS), 3))
    slots = []
    for pair, lines in enumerate(_PAIRS):
        for row, line in enumerate(lines):
            rhs[pair, row] = 0.0   # line 3's level is written per row
            if line < 3:
                systems[pair, row] = np.eye(3)[line]
            else:
                slots.append((pair, row, line))
    slot_pair, slot_row, slot_line = (np.array(v) for v in zip(*slots))
    return systems, rhs, np.stack([slot_pair, slot_row]), slot_line, np.stack([slot_pair, slot_row])[:, slot_line == 3]


_SYSTEMS, _RHS, _SLOTS, _SLOT_LINE, _H_SLOTS = _pair_systems()
_EYE = np.eye(3)


def correct_two(gram: np.ndarray, a: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The correction LP for K = 2 in closed form, on rows (n, 2, 2), (n, 2): (c (n, 2), solved (n)).

    maxmin(g₀·d̃, g₁·d̃) is concave and piecewise linear on the polygon {μ ∈ Δ², ∇h·d̃ ≥ σ‖∇h‖}; its
    maximum is at a vertex of the polygon cut by the line g₀·d̃ = g₁·d̃, i.e. at an intersection of
    two of the five lines above. All ten intersections are formed (3×3 systems with Σμ = 1), the
    feasible ones (tolerance 1e-12 relative) evaluated, the best taken (the first in pair order on a
    tie: where the LP has several optima HiGHS may return another vertex of the same value).

    Every line is normalised (normal and level divided by the normal's length, where not zero); lines
    0–2 are μ_i = 0 with unit normals e_i, so only lines 3 and 4 are computed per row (:func:`_pair_systems`)."""
    n = len(a)
    inner, inv, norm_h = lp_data(gram, a)
    normals = np.empty((n, 2, 3))          # lines 3 (∇h·d̃ = σ‖∇h‖) and 4 ((g₀ − g₁)·d̃ = 0)
    normals[:, 0] = inner[:, 2]
    np.subtract(inner[:, 0], inner[:, 1], out=normals[:, 1])
    size = np.sqrt((normals * normals).sum(-1))                        # as np.linalg.norm(…, axis=-1)
    unit = np.divide(normals, size[..., None], out=np.zeros(normals.shape), where=size[..., None] > 0)
    level = np.divide(sigma * norm_h, size[:, 0], out=np.zeros(n), where=size[:, 0] > 0)   # line 4's is 0
    systems = _SYSTEMS[None].repeat(n, 0)
    systems[:, _SLOTS[0], _SLOTS[1]] = unit[:, _SLOT_LINE - 3]
    rhs = _RHS[None].repeat(n, 0)
    rhs[:, _H_SLOTS[0], _H_SLOTS[1]] = level[:, None]
    regular = np.abs(np.linalg.det(systems)) > 1e-12
    # parallel lines (on the toy lines 3 and 4 always are): no intersection, solved as the identity, never feasible
    np.copyto(systems, _EYE, where=~regular[..., None, None])
    points = np.linalg.solve(systems, rhs[..., None])[..., 0]          # (n, 10, 3)
    scale = np.maximum(np.abs(inner).max(axis=(-2, -1)), 1e-300)[:, None]
    along = (points[:, :, None, :] * inner[:, None, :, :]).sum(-1)                    # vᵢ·d̃ at each point
    feasible = regular & (points >= -1e-12).all(-1) & (along[..., 2] >= sigma * norm_h[:, None] - 1e-12 * scale)
    worst = np.where(feasible, along[..., :2].min(-1), -np.inf)
    best = worst.argmax(-1)
    mu = np.maximum(points[np.arange(n), best], 0.0)                   # np.clip(…, 0, None)
    total = mu.sum(-1, keepdims=True)
    mu /= np.where(total > 0, total, 1.0)
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
        #: λ̂ (``pbi``, ``cos``), made once
        self._unit = unit_preference(r)
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """K c (..., K): the predict rows at once, an LP per correct row; a failed solve gives 1s and a
        solver failure."""
        k = self.n_tasks
        shape = losses.shape[:-1]
        flat_g, flat_l = gram.reshape(-1, k, k), losses.reshape(-1, k)
        n = len(flat_l)
        h, a, defined = constraint_rows(flat_l, self.preferences, self.constraint, self._unit)
        all_defined = bool(defined.all())
        if all_defined:   # the common case: no row to mask
            correct = h >= self.h_eps
        else:
            a = np.where(defined[..., None], a, 0.0)
            correct = defined & (h >= self.h_eps)
        predict = ~correct
        n_correct = int(np.count_nonzero(correct))
        # the predict solve only where the row predicts (a correct row's weights come from its LP); when
        # every row takes the same move, on all rows as they are
        if n_correct == 0:
            weights, ok = predict_rows(flat_g, a, self.prediction == "tangent")
            weights = weights.astype(np.float64, copy=False)   # as if written into a float64 array
        else:
            weights, ok = np.full((n, k), np.nan), np.ones(n, dtype=bool)
            if n_correct < n:
                weights[predict], ok[predict] = predict_rows(flat_g[predict], a[predict], self.prediction == "tangent")
        solver_failed = ~ok & predict if all_defined else ~ok & predict & defined
        messages: list[str] = ["min-norm solver did not converge"] if solver_failed.any() else []
        if k == 2 and n_correct:
            if n_correct == n:
                weights, solved = correct_two(flat_g, a, self.sigma)
                solver_failed = ~solved
            else:
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
        if messages:   # (a failed row always leaves a message)
            weights = np.where(solver_failed[..., None], 1.0 / k, weights)
        if not all_defined:
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
