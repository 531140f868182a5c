"""``cagrad`` — Conflict-Averse Gradient descent (Liu et al., NeurIPS'21).

With g_0 = mean_i g_i and A = G Gᵀ, solve the dual over the simplex
    w* = argmin_{w ∈ Δ}  wᵀ A b + c‖g_0‖ √(wᵀ A w + 1e-8),   b = 1/K · 1,
then d = g_0 + λ G w* with λ = c‖g_0‖ / ‖G w*‖. ``rescale`` 0/1/2 divides d by 1,
1 + c², 1 + c (the official benchmarks use 1). c = 0 is gradient descent on the mean.
The update is written at the scale of the summed loss (×K, as the official code does);
task heads receive the unweighted task gradients (docs/methods.md#cagrad).

Solver, K ≥ 3: SLSQP (as the official code) in float64 on the K×K Gram matrix, warm-started
at uniform weights. Unlike the official code we check ``res.success``: a failed solve is
counted (``solver_failures`` in the step extras), warned about, and raises after 20
consecutive failures; the failed step uses the best feasible iterate projected onto
the simplex, never a silent switch to another method.

Solver, K = 2: the exact minimiser in closed form (:func:`cagrad_dual_2`, derivation there),
which cannot fail. It replaced SLSQP there because SLSQP was most of the toy's CPU time:
~0.8 ms per ``cagrad_coefficients`` call on a 2-core CPU against ~40 µs (scalar NumPy), and
~7× less per lockstep step of the toy. ``cagrad_coefficients(..., solver="slsqp")`` still runs
SLSQP for K = 2: the tests check the closed form against a 50-digit minimisation (x to 1e-12)
and against SLSQP on random, nearly opposite, nearly parallel and very unequal gradients (same
minimiser to SLSQP's own accuracy, ~1e-6 in x; never a larger dual objective). The same
function serves the balancer and the toy's generic driver (:meth:`CAGrad.weights_rows`: any rows).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers._simplex import project_to_simplex
from mtl_tune.balancers.base import GradientBalancer, SolverFailureCounter

#: the dual's smoothing inside the square root, √(wᵀAw + EPS) (official code: 1e-8).
EPS = 1e-8
SOLVERS = ("auto", "slsqp")


def cagrad_dual_2(a11: np.ndarray, a12: np.ndarray, a22: np.ndarray, c: np.ndarray | float) -> np.ndarray:
    """Exact weight x of task 1 (w = (x, 1 − x)) solving the K = 2 dual; any broadcastable shapes.

    On the Gram matrix normalised by s = max(a₁₁, a₂₂) (same minimiser, O(1) numbers; ε = 1e-8/s,
    as in the SLSQP path) the dual is φ(x) = x·p + c₀ √(D x² + 2E x + F) + const with

        p = ½(a₁₁ − a₂₂)        (wᵀA b = ½(a₁₂ + a₂₂) + x p),
        D = a₁₁ − 2a₁₂ + a₂₂ = ‖g₁ − g₂‖²,  E = a₁₂ − a₂₂,  F = a₂₂ + ε   (wᵀAw + ε),
        c₀ = c √(bᵀA b + ε) = c‖g₀‖.

    φ is convex (√ of a positive convex quadratic), so the minimiser on [0, 1] is the clipped
    stationary point. With y = D x + E and M = DF − E² = a₁₁a₂₂ − a₁₂² + Dε > 0, the quadratic is
    y²/D + M/D and φ'(x) = p + c₀ y/√(y²/D + M/D), whose y-term increases from −c₀√D to c₀√D. So
    φ' = 0 at y/√(y²/D + M/D) = r := −p/c₀, which has the root y = r √(M/(D − r²)) when r² < D;
    otherwise φ' keeps the sign of −r on all of [0, 1] and x = 1 (r > 0) or 0 (r < 0):

        x* = clip((r √(M/(D − r²)) − E)/D, 0, 1)  if r² < D,   [r > 0]  otherwise.

    Degenerate cases, as the SLSQP path (warm-started at b) returns them: c = 0 (no dual term,
    w = b) and D = 0 (g₁ = g₂: φ is constant, SLSQP stays at b) give x = ½.
    """
    return _dual_2(np.asarray(a11, dtype=np.float64), np.asarray(a12, dtype=np.float64),
                   np.asarray(a22, dtype=np.float64), np.asarray(c, dtype=np.float64))[0]


def _dual_2(a11: np.ndarray, a12: np.ndarray, a22: np.ndarray, c: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cagrad_dual_2` on float64 arrays, also returning the pieces the coefficients
    reuse: (x, s, ‖g₀‖²/s + ε). Written with few NumPy operations: the toy kernel runs it every
    step for all rows at once."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.maximum(np.maximum(a11, a22), 1e-300)  # Gram diagonals are ≥ 0
        u, v, w, eps = a11 / s, a12 / s, a22 / s, EPS / s
        p2 = u - w                                # 2p
        e = v - w
        d = p2 - 2.0 * e                          # u − 2v + w
        g0sq = np.maximum(0.25 * d + v, 0.0) + eps    # ¼(u + 2v + w) + ε
        r = -0.5 * p2 / (c * np.sqrt(g0sq))       # ±inf or nan where c = 0 (masked below)
        m = np.maximum(u * w - v * v, 0.0) + d * eps  # > 0 where D > 0
        # r² ≥ D (no interior root): M/0 = inf sends x to the bound on r's side, which is right
        y = r * np.sqrt(m / np.maximum(d - r * r, 0.0))
        x = np.minimum(np.maximum((y - e) / d, 0.0), 1.0)
    x = np.where((c > 0) & (d > 0), x, 0.5)
    return x, s, g0sq


def rescale_divisor(c: np.ndarray | float, rescale: np.ndarray | int) -> np.ndarray:
    """What ``rescale`` 0/1/2 divides the direction by: 1, 1 + c², 1 + c."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(np.equal(rescale, 1), 1.0 + c * c, np.where(np.equal(rescale, 2), 1.0 + c, 1.0))


def cagrad_coefficients_2(a11: np.ndarray, a12: np.ndarray, a22: np.ndarray, c: np.ndarray | float,
                          rescale: np.ndarray | int = 1) -> np.ndarray:
    """K = 2 coefficients γ (..., 2) with d = γ₁g₁ + γ₂g₂ (mean scale), batched over any shape.

    γ = (b + λ w*)/divisor with w* = (x, 1 − x) from :func:`cagrad_dual_2`, ‖g₀‖ = √(bᵀAb + 1e-8),
    λ = c‖g₀‖/(‖G w*‖ + 1e-8) — the SLSQP path's formulas around its solve (bᵀAb + 1e-8 =
    s(‖g₀‖²/s + ε) from the dual's pieces). ‖G w‖² = x²a₁₁ + (1 − x)(2x a₁₂ + (1 − x)a₂₂) keeps
    the weighted form: at x = 1 it is a₁₁ exactly, however small next to a₂₂.
    """
    c = np.asarray(c, dtype=np.float64)
    a11, a12, a22 = (np.asarray(v, dtype=np.float64) for v in (a11, a12, a22))
    x, s, g0sq = _dual_2(a11, a12, a22, c)
    xc = 1.0 - x
    gw_norm = np.sqrt(np.maximum(x * x * a11 + xc * (2.0 * x * a12 + xc * a22), 0.0))
    lam = c * np.sqrt(s * g0sq) / (gw_norm + EPS)
    div = rescale_divisor(c, rescale)
    return np.stack([0.5 + lam * x, 0.5 + lam * xc], axis=-1) / div[..., None]


def cagrad_dual_slsqp(gram_matrix: np.ndarray, c: float) -> tuple[np.ndarray, bool, str]:
    """The dual's minimiser w* (K,) by SLSQP, warm-started at b, plus (success, message).

    Solved on the Gram matrix normalised by its largest diagonal entry (same minimiser, O(1)
    numbers); the result is projected onto the simplex (SLSQP's equality is only met to its
    tolerance). c = 0 or K = 1: w* = b (the dual term vanishes).
    """
    a = np.asarray(gram_matrix, dtype=np.float64)
    k = a.shape[0]
    b = np.full(k, 1.0 / k)
    if c == 0 or k == 1:
        return b, True, "ok"
    scale = max(float(np.max(np.abs(np.diag(a)))), 1e-300)
    an = a / scale
    cn = c * float(np.sqrt(max(b @ an @ b, 0.0) + EPS / scale))
    ab = an @ b

    def obj(w: np.ndarray) -> float:
        return float(w @ ab + cn * np.sqrt(max(w @ an @ w, 0.0) + EPS / scale))

    res = minimize(obj, b, bounds=[(0.0, 1.0)] * k,
                   constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},), method="SLSQP",
                   options={"ftol": 1e-12, "maxiter": 200})
    return project_to_simplex(res.x), bool(res.success), str(res.message)


def cagrad_coefficients(gram_matrix: np.ndarray, c: float, rescale: int = 1,
                        solver: str = "auto") -> tuple[np.ndarray, bool, str]:
    """Coefficients γ (K,) with d = Σ γ_i g_i (mean scale), plus (solver success, message).

    ``solver="auto"``: the exact K = 2 closed form (:func:`cagrad_coefficients_2`), SLSQP for K ≥ 3;
    ``"slsqp"``: SLSQP for every K ≥ 2 (kept to check the closed form against).
    """
    if solver not in SOLVERS:
        raise ValueError(f"cagrad: solver must be one of {SOLVERS}, got {solver!r}")
    a = np.asarray(gram_matrix, dtype=np.float64)
    k = a.shape[0]
    if k == 2 and solver == "auto":
        return cagrad_coefficients_2(a[0, 0], a[0, 1], a[1, 1], c, rescale), True, "closed form"
    b = np.full(k, 1.0 / k)
    w, ok, msg = cagrad_dual_slsqp(a, c)
    g0_norm = float(np.sqrt(max(b @ a @ b, 0.0) + EPS))
    gw_norm = float(np.sqrt(max(w @ a @ w, 0.0)))
    lam = c * g0_norm / (gw_norm + EPS)
    coef = b + lam * w
    if rescale == 1:
        coef = coef / (1 + c ** 2)
    elif rescale == 2:
        coef = coef / (1 + c)
    return coef, ok, msg


class CAGrad(GradientBalancer):
    """CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS'21): the update
    maximises the worst task's improvement inside a ball around the mean gradient g_0.

    Args:
        n_tasks: K, the number of tasks.
        c: radius of that ball relative to ‖g_0‖ (float ≥ 0, default 0.4); ``c = 0`` is the
            mean gradient, larger ``c`` lets the update move further towards the
            worst-off task.
        rescale: 0, 1 or 2: divide the direction by 1, 1 + c² (default, official code) or
            1 + c.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "cagrad"
    supports_gram = True  # d = Σ γᵢ gᵢ: g₀ + λ G w* is linear in the gᵢ

    def __init__(self, n_tasks: int, c: float = 0.4, rescale: int = 1, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not (0.0 <= c < 1e3):
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale = float(c), int(rescale)
        self.failures = SolverFailureCounter(self.name)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """K × the coefficients γ (..., K): the K = 2 closed form on every row at once, SLSQP row by row
        for K ≥ 3 (a failed solve keeps its projected iterate and is counted)."""
        a = gram
        k = a.shape[-1]
        if k == 2:
            coef = cagrad_coefficients_2(a[..., 0, 0], a[..., 0, 1], a[..., 1, 1], self.c, self.rescale)
            failed, message = None, ""
        else:
            rows = a.reshape(-1, k, k)
            coef, ok, message = np.empty((len(rows), k)), np.ones(len(rows), dtype=bool), ""
            for r, row in enumerate(rows):
                coef[r], ok[r], msg = cagrad_coefficients(row, self.c, self.rescale)
                message = message if ok[r] else msg
            coef, failed = coef.reshape(a.shape[:-1]), ~ok.reshape(a.shape[:-2])
        return RowStep(coef * self.n_tasks, solver_failed=failed,
                       solver_message=message)

    def _step_extras(self) -> dict[str, Any]:
        return {"solver_failures": self.failures.total}

    def _extra_state(self) -> dict[str, Any]:
        return {"failures": self.failures.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.failures.load_state_dict(state["failures"])
