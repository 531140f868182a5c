"""Numerical helpers for the two-task toy problem: fast losses + Jacobian, distances, grids.

The problem itself (formulas, :data:`INITS`, the exact Pareto set/front and
``pareto_distance``) lives in :mod:`mtl_tune.benchmarks.toy`; everything here is checked
against it in ``tests/test_toy_trajectories.py``.

Why an analytic Jacobian: one autograd pass through
:func:`mtl_tune.benchmarks.toy.toy_objectives` costs ~0.8 ms on a 2-core CPU (35 tiny
operators forward plus two backward passes), which at 35 000 iterations is ~30 s per run
of the trajectory engine — more than every cheap balancer together. The closed form
below is one vectorised NumPy pass (~0.1 ms for any number of points). Its derivative
conventions at the kinks copy PyTorch's, so it agrees with autograd everywhere:
``max(t, 0)`` (the gate) passes the gradient for ``t >= 0`` (docs/benchmarks.md#toy-losses: at
(0, 0) ∇f₁ = ∇f₂ = (0, 10.856)), ``|u|`` has derivative ``sign(u)`` (0 at 0) and
``max(a, ε)`` passes the gradient only for ``a > ε``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from mtl_tune.benchmarks.toy import LOWER, pareto_front, toy_objectives

#: unscaled single-task minimum of f₁ and f₂ (both −19.98943, docs/benchmarks.md#toy-pareto-set-and-front).
F_MIN = float(pareto_front(1.0, 3)[-1, 0])


def toy_value_and_jacobian(x: np.ndarray, scale: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Losses (…, 2) and Jacobian (…, 2 tasks, 2 coordinates) of (L₁, L₂) = (s·f₁, f₂).

    With c₁ = max(tanh(x₂/2), 0), c₂ = max(tanh(−x₂/2), 0) and the branches of
    docs/benchmarks.md#toy-losses (u₁ = ½(−x₁ − 7) − tanh(−x₂), u₂ = ½(−x₁ + 3) + tanh(−x₂) + 2,
    gᵢ = log max(|uᵢ|, ε) + 6, q₁,₂ = ((−x₁ ± 7)² + 0.1(−x₂ − 8)²)/10 − 20):

        ∂f₁/∂x₁ = c₁ ∂g₁/∂x₁ + c₂ (x₁ − 7)/5,   ∂f₂/∂x₁ = c₁ ∂g₂/∂x₁ + c₂ (x₁ + 7)/5,
        ∂fᵢ/∂x₂ = c₁' gᵢ + c₁ ∂gᵢ/∂x₂ + c₂' qᵢ + c₂ · 0.02 (x₂ + 8),

    ∂gᵢ/∂x₁ = −½ sign(uᵢ)/|uᵢ|, ∂g₁/∂x₂ = sign(u₁) sech²x₂/|u₁|, ∂g₂/∂x₂ = −sign(u₂) sech²x₂/|u₂|,
    c₁' = ½ sech²(x₂/2) on x₂ ≥ 0, c₂' = −½ sech²(x₂/2) on x₂ ≤ 0 (0 elsewhere).
    Only L₁ carries the factor ``scale``. Source of the problem: Navon et al., Nash-MTL
    (ICML'22), after Liu et al., CAGrad (NeurIPS'21).
    """
    x, x1, x2, col, ta, c1, c2, th, u, m, g, q, f = _forward(x)
    sech_half = 0.5 * (1 - ta * ta)
    dc1 = sech_half * (x2 >= 0)                           # the gate passes the gradient at t >= 0
    dc2 = -sech_half * (x2 <= 0)
    sech2 = 1 - th * th                   # d/dx₂ tanh(−x₂) = −sech²
    k = np.where(np.abs(u) > LOWER, np.sign(u) / m, 0.0)   # d log max(|u|, ε) / du
    # both tasks at once on (2, …) arrays: ∂fᵢ/∂x₁ and ∂fᵢ/∂x₂ (x₁ ∓ 7 and ±c₁kᵢ sech² per task; a − b
    # and a + (−b) are the same float, so every entry is the operations of the formula above)
    d1 = c1 * (-0.5 * k) + c2 * (x1 + _MINUS_PLUS_7.reshape(col)) / 5
    d2 = dc1 * g + c1 * k * sech2 * _PLUS_MINUS_1.reshape(col) + dc2 * q + c2 * (0.02 * (x2 + 8))
    jac = np.empty(x.shape[:-1] + (2, 2))
    np.multiply(scale, d1[0], out=jac[..., 0, 0])
    np.multiply(scale, d2[0], out=jac[..., 0, 1])
    jac[..., 1, 0] = d1[1]
    jac[..., 1, 1] = d2[1]
    return _losses(x, f, scale), jac


def toy_values(x: np.ndarray, scale: float = 0.1) -> np.ndarray:
    """The losses (…, 2) of :func:`toy_value_and_jacobian` alone (the same floats, about half the
    operations): for evaluations whose Jacobian nobody reads (Auto-λ's finite difference)."""
    x, *_, f = _forward(x)
    return _losses(x, f, scale)


_PLUS_MINUS_7 = np.array([7.0, -7.0])
_MINUS_PLUS_7 = np.array([-7.0, 7.0])
_PLUS_MINUS_1 = np.array([1.0, -1.0])


def _forward(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """The unscaled forward of both tasks and the pieces the Jacobian reuses; per-task pieces as
    (2, …) arrays (task 1 first): u, m = max(|u|, ε), g = log m + 6, q, f = c₁g + c₂q."""
    x = np.asarray(x, dtype=np.float64)
    x1, x2 = x[..., 0], x[..., 1]
    col = (2,) + (1,) * x1.ndim            # the shape of a per-task constant against (2, …) arrays
    nx1 = -x1
    # the gates' tanh(±x₂/2) are odd images of one tanh
    ta = np.tanh(x2 / 2)
    c1, c2 = np.maximum(ta, 0.0), np.maximum(-ta, 0.0)   # torch.clamp(·, 0) of tanh(±x₂/2)
    th = np.tanh(-x2)
    u = np.empty((2,) + x1.shape)
    np.subtract(0.5 * (nx1 - 7), th, out=u[0, ...])
    np.add(0.5 * (nx1 + 3) + th, 2, out=u[1, ...])
    m = np.maximum(np.abs(u), LOWER)
    g = np.log(m) + 6
    r = 0.1 * np.square(-x2 - 8)
    q = (np.square(nx1 + _PLUS_MINUS_7.reshape(col)) + r) / 10 - 20   # q₁, q₂: (−x₁ ± 7)
    f = c1 * g + c2 * q
    return x, x1, x2, col, ta, c1, c2, th, u, m, g, q, f


def _losses(x: np.ndarray, f: np.ndarray, scale: float) -> np.ndarray:
    vals = np.empty(x.shape[:-1] + (2,))
    np.multiply(scale, f[0], out=vals[..., 0])
    vals[..., 1] = f[1]
    return vals


class FrontDistance:
    """Distance in objective space to the sampled true front, for long trajectories.

    Same definition as :func:`mtl_tune.benchmarks.toy.pareto_distance` (Euclidean distance
    to the nearest of ``n`` front points) but through a k-d tree, so 35 000 × 5 points
    need O(N log n) time and no N × n matrix (which would be ~1 GB here).
    """

    def __init__(self, scale: float = 0.1, n: int = 2001) -> None:
        self.front = pareto_front(scale, n)
        self._tree = cKDTree(self.front)

    def __call__(self, losses: np.ndarray) -> np.ndarray:
        """Distances; inf for a point with a non-finite loss (a diverged run: the tree refuses it)."""
        pts = np.asarray(losses, dtype=np.float64).reshape(-1, 2)
        finite = np.isfinite(pts).all(axis=1)
        if finite.all():
            d, _ = self._tree.query(pts)
        else:
            d = np.full(len(pts), np.inf)
            if finite.any():
                d[finite] = self._tree.query(pts[finite])[0]
        return d.reshape(np.shape(losses)[:-1])

    def first_within(self, losses: np.ndarray, tol: float, chunk: int = 4096) -> int | None:
        """``first_within(self(losses), tol)`` for (T, 2) losses, without measuring every point: the
        points go to the tree in chunks until one lies within ``tol``, each query bounded at 2·tol
        (farther points stop early and come back as inf; nearer ones get the same distance as an
        unbounded query). A run that reaches the front at step 8 000 of 35 000 measures 8 192 points."""
        pts = np.asarray(losses, dtype=np.float64).reshape(-1, 2)
        bound = 2.0 * tol if tol > 0 else np.inf   # tol ≤ 0 (API only; the CLI refuses it): unbounded
        for start in range(0, len(pts), chunk):
            part = pts[start:start + chunk]
            finite = np.isfinite(part).all(axis=1)
            if finite.all():
                d, _ = self._tree.query(part, distance_upper_bound=bound)
            else:  # a diverged run's non-finite losses are never within tol
                d = np.full(len(part), np.inf)
                if finite.any():
                    d[finite] = self._tree.query(part[finite], distance_upper_bound=bound)[0]
            hit = first_within(d, tol)
            if hit is not None:
                return start + hit
        return None


def first_within(distances: np.ndarray, tol: float) -> int | None:
    """Index of the first entry ≤ ``tol`` (the iteration count to reach the front), or None."""
    hits = np.flatnonzero(np.asarray(distances) <= tol)
    return int(hits[0]) if hits.size else None


def single_task_minima(scale: float = 0.1) -> np.ndarray:
    """(L₁*, L₂*) = (s·min f₁, min f₂): each task's best attainable loss."""
    return np.array([scale * F_MIN, F_MIN])


def gap_scores(mean_losses: np.ndarray, scale: float = 0.1) -> np.ndarray:
    """Per-task performance gaps in percent, the toy's stand-in for PIVRG's STL scores.

    sᵢ = 100 (Lᵢ − Lᵢ*)/|Lᵢ*| with Lᵢ* the single-task minimum: 0 at a task's own optimum,
    positive = worse, the sign convention of :class:`mtl_tune.balancers.base.EpochInfo`.
    The toy has no data and no single-task-learning baseline, so the best attainable
    loss plays the baseline's role (same formula as the papers' relative drop).
    """
    best = single_task_minima(scale)
    return 100.0 * (np.asarray(mean_losses, dtype=np.float64) - best) / np.abs(best)


def loss_grid(lim: float = 10.0, n: int = 300, scale: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid (X₁, X₂) on [−lim, lim]² and the scaled losses there, shape (n, n, 2)."""
    ax = np.linspace(-lim, lim, n)
    g1, g2 = np.meshgrid(ax, ax)
    with torch.no_grad():
        losses = toy_objectives(torch.from_numpy(np.stack([g1, g2], axis=-1)), scale).numpy()
    return g1, g2, losses


class ToyLosses(torch.autograd.Function):
    """(L₁, L₂) of one point x (2,) with the analytic Jacobian as its backward.

    Same values and first derivatives as :func:`mtl_tune.benchmarks.toy.toy_objectives`
    (tested) at a fraction of the cost: one NumPy pass forward, one 2×2 product backward,
    instead of autograd through 35 operators. Used as the forward of training-loop methods
    (STGU), which call the forward several times per step. No second derivatives (the
    backward's Jacobian is a constant), which no method here needs.
    """

    generate_vmap_rule = True  # the Jacobian engine vmaps the backward over the K tasks

    @staticmethod
    def forward(x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        vals, jac = toy_value_and_jacobian(x.detach().cpu().numpy(), scale)
        return torch.from_numpy(vals).to(x), torch.from_numpy(jac).to(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor, _grad_jac: torch.Tensor):  # type: ignore[override]
        (jac,) = ctx.saved_tensors
        return grad_losses @ jac, None


def toy_losses(x: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """Differentiable (L₁, L₂) of one point through :class:`ToyLosses`."""
    return ToyLosses.apply(x, scale)[0]
