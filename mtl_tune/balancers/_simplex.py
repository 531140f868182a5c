"""Small exact solvers on the probability simplex (float64; K is tiny)."""

from __future__ import annotations

import numpy as np


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of ``v`` onto {w ≥ 0, Σw = 1} (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def min_norm_simplex(gram: np.ndarray, max_iter: int = 200, tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """argmin_{w ∈ Δ} wᵀ A w for a PSD Gram matrix ``A`` by a primal active-set method.

    The equality-constrained problem on the active support S is solved exactly from its
    KKT system ``[[A_SS, 1], [1ᵀ, 0]]``; indices enter when their KKT multiplier is
    negative and leave when the step would make a weight negative. Finite termination
    (at most a few K iterations in practice). Returns ``(w, iterations)``; raises
    ``RuntimeError`` if it does not converge within ``max_iter``.
    """
    a = np.asarray(gram, dtype=np.float64)
    k = a.shape[0]
    if k == 1:
        return np.ones(1), 0
    scale = max(float(np.max(np.abs(np.diag(a)))), 1e-300)
    a = a / scale  # the solution is invariant to a positive scaling of A
    if k == 2:
        return _two_task(a), 0
    w = np.zeros(k)
    start = int(np.argmin(np.diag(a)))
    w[start] = 1.0
    active = [start]
    for it in range(1, max_iter + 1):
        sub = a[np.ix_(active, active)]
        n = len(active)
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = sub
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        rhs = np.zeros(n + 1)
        rhs[n] = 1.0
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
        target = np.zeros(k)
        target[active] = sol[:n]
        if np.all(target[active] >= -1e-15):
            w = np.maximum(target, 0.0)
            w /= w.sum()
            grad = a @ w
            obj = float(w @ grad)
            inactive = [j for j in range(k) if j not in active]
            if not inactive:
                return w, it
            j = min(inactive, key=lambda i: grad[i])
            if grad[j] >= obj - tol:  # KKT: every inactive direction is non-improving
                return w, it
            active.append(j)
        else:  # move toward the target until the first weight hits zero, drop it
            direction = target - w
            neg = [i for i in active if direction[i] < 0]
            step = min(1.0, min(-w[i] / direction[i] for i in neg))
            w = w + step * direction
            drop = [i for i in active if w[i] <= 1e-15]
            w[drop] = 0.0
            active = [i for i in active if i not in drop] or [int(np.argmax(w))]
            w /= w.sum()
    raise RuntimeError(f"min-norm solver did not converge in {max_iter} iterations")


def _two_task(a: np.ndarray) -> np.ndarray:
    """Closed form for K = 2: γ = (a22 − a12)/(a11 + a22 − 2a12) clipped to [0, 1]."""
    denom = a[0, 0] + a[1, 1] - 2 * a[0, 1]
    if denom <= 1e-300:  # identical gradients: any point is optimal, take the midpoint
        return np.array([0.5, 0.5])
    gamma = float(np.clip((a[1, 1] - a[0, 1]) / denom, 0.0, 1.0))
    return np.array([gamma, 1.0 - gamma])


def min_norm_weights(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch-first min-norm simplex weights: argmin_{w ∈ Δ} wᵀ A w for float64 Gram matrices
    (..., K, K). Returns ``(w (..., K), converged (...))``; w is NaN where the solver did not converge.

    K = 2 is the closed form of :func:`_two_task` on every row at once (on A scaled by its largest
    diagonal entry, as :func:`min_norm_simplex`); K ≥ 3 runs :func:`min_norm_simplex` row by row.
    """
    k = gram.shape[-1]
    shape = gram.shape[:-2]
    if k == 1:
        return np.ones((*shape, 1)), np.ones(shape, dtype=bool)
    if k == 2:
        a11, a12, a22 = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
        scale = np.maximum(np.maximum(np.abs(a11), np.abs(a22)), 1e-300)
        a11, a12, a22 = a11 / scale, a12 / scale, a22 / scale
        denom = a11 + a22 - 2 * a12
        flat = denom <= 1e-300  # identical gradients: any point is optimal, take the midpoint
        gamma = np.where(flat, 0.5, np.clip((a22 - a12) / np.where(flat, 1.0, denom), 0.0, 1.0))
        return np.stack([gamma, 1.0 - gamma], axis=-1), np.ones(shape, dtype=bool)
    rows = gram.reshape(-1, k, k)
    out = np.full((len(rows), k), np.nan)
    ok = np.zeros(len(rows), dtype=bool)
    for r, a in enumerate(rows):
        try:
            out[r], _ = min_norm_simplex(a)
            ok[r] = True
        except RuntimeError:  # did not converge: NaN weights, the caller fails the row
            pass
    return out.reshape(*shape, k), ok.reshape(shape)


def project_to_simplex_rows(v: np.ndarray) -> np.ndarray:
    """Batch-first :func:`project_to_simplex`: the Euclidean projection of every row of ``v`` (..., K)
    onto {w ≥ 0, Σw = 1}, with the same operations per row (sort, cumulative sums, the last index
    ρ with u_ρ − (Σ_{j≤ρ} u_j − 1)/(ρ + 1) > 0, threshold θ)."""
    v = np.asarray(v, dtype=np.float64)
    k = v.shape[-1]
    u = -np.sort(-v, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    positive = u - css / np.arange(1, k + 1) > 0
    rho = k - 1 - np.argmax(positive[..., ::-1], axis=-1)   # the last index where it holds (index 0 always does)
    theta = np.take_along_axis(css, rho[..., None], axis=-1) / (rho[..., None] + 1.0)
    return np.maximum(v - theta, 0.0)
