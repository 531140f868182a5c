"""Small exact solvers on the probability simplex (float64; K is tiny)."""

from __future__ import annotations

import itertools

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
    diagonal entry, as :func:`min_norm_simplex`); 3 ≤ K ≤ ``SMALL_SUPPORT_MAX_K`` first tries every
    support of at most three tasks for all rows at once (:func:`_small_supports`, kept only where
    checked optimal); larger K and the rows whose minimiser needs four or more tasks run the
    active-set :func:`min_norm_simplex` row by row.
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
    rows = np.asarray(gram, dtype=np.float64).reshape(-1, k, k)
    if k <= SMALL_SUPPORT_MAX_K:
        out, ok = _small_supports(rows)
    else:
        out, ok = np.full((len(rows), k), np.nan), np.zeros(len(rows), dtype=bool)
    finite = np.isfinite(rows).all((-2, -1))   # a non-finite row has no answer: NaN, not converged
    for r in np.flatnonzero(~ok & finite):   # K > SMALL_SUPPORT_MAX_K, or a support of four or more
        try:
            out[r], _ = min_norm_simplex(rows[r])
            ok[r] = True
        except RuntimeError:  # did not converge: NaN weights, the caller fails the row
            out[r] = np.nan
    return out.reshape(*shape, k), ok.reshape(shape)


#: the largest K whose rows first try the supports of at most three indices (:func:`_small_supports`)
SMALL_SUPPORT_MAX_K = 8
#: tolerance of the optimality check (Aw)_j ≥ wᵀAw − tol on A scaled to a unit largest diagonal entry
KKT_TOL = 1e-12
_CANDIDATES: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {}


def _candidate_indices(k: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """For range(k): the flat indices into a K×K matrix of the entries each candidate support needs
    — per pair (i, j): a_ii, a_jj, a_ij; per triple (x, y, z): a_xx, a_yy, a_zz, a_xy, a_xz, a_yz,
    pairs and triples in lexicographic order, grouped entry by entry — the candidates' three task
    indices (K + C(K,2) + C(K,3), 3): vertices (i, i, i), edges (i, j, j), triangles (x, y, z), the
    order in which ties go (the smaller support first); and the numbers of pairs and triples."""
    if k not in _CANDIDATES:
        pairs = np.array(list(itertools.combinations(range(k), 2)), dtype=np.int64).reshape(-1, 2)
        triples = np.array(list(itertools.combinations(range(k), 3)), dtype=np.int64).reshape(-1, 3)
        i, j = pairs.T
        x, y, z = triples.T
        flat = np.concatenate([i * (k + 1), j * (k + 1), i * k + j,
                               x * (k + 1), y * (k + 1), z * (k + 1), x * k + y, x * k + z, y * k + z])
        vertices = np.repeat(np.arange(k, dtype=np.int64)[:, None], 3, axis=1)
        members = np.concatenate([vertices, np.concatenate([pairs, pairs[:, 1:]], axis=1), triples])
        _CANDIDATES[k] = (flat, members, len(pairs), len(triples))
    return _CANDIDATES[k]


def _small_supports(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min-norm simplex weights of Gram matrices (n, K, K) whose minimiser has at most three
    non-zero weights, all rows at once; ``ok`` is False for the other rows (the caller solves them).

    The minimiser lies in the relative interior of some face of the simplex, its support S, where it
    is the KKT point of [[A_SS, 1], [1ᵀ, 0]], w_S ∝ adj(A_SS) 1 (A_SS⁻¹1 up to det(A_SS); for a
    singular A_SS of rank |S| − 1 the same formula gives the affine weights of the origin, which then
    lies in the face). Every support of one, two (γ = (a_jj − a_ij)/(a_ii + a_jj − 2a_ij)) and three
    indices (explicit cofactors) is evaluated; those with w > 0 on the support are feasible points,
    and the one with the smallest objective wᵀAw — computed from the point itself, so rounding cannot
    report a value the point does not reach; ties go to the smaller support — is kept only if it
    passes the simplex QP's optimality condition (Aw)_j ≥ wᵀAw − tol for every j. Whenever the true
    support has at most three indices (every K = 3 problem, every problem whose gradients span at most
    two dimensions, as on the toy) the check passes. Each row's arithmetic is its own (elementwise,
    reductions over the last axis): a row gives the same bits alone and among many.
    """
    n, k = rows.shape[0], rows.shape[-1]
    diag = np.diagonal(rows, axis1=-2, axis2=-1)
    scale = np.maximum(np.abs(diag).max(-1), 1e-300)
    with np.errstate(all="ignore"):   # a non-finite row gives NaN candidates and ok = False, quietly
        a = rows / scale[:, None, None]   # as min_norm_simplex: the solution is invariant to a positive scaling
        d = diag / scale[:, None]
    flat, members, n_pairs, n_triples = _candidate_indices(k)
    entries = a.reshape(n, k * k)[:, flat]
    m, o = n_pairs, 3 * n_pairs
    aii, ajj, aij = entries[:, :m], entries[:, m:2 * m], entries[:, 2 * m:o]
    m = n_triples
    p_, s_, u_, q_, r_, t_ = (entries[:, o + i * m:o + (i + 1) * m] for i in range(6))
    nan = np.nan
    with np.errstate(all="ignore"):
        # edges: the closed form on each (interior points only: the ends are vertices)
        gamma = (ajj - aij) / (aii + ajj - 2.0 * aij)
        gamma = np.where((gamma > 0) & (gamma < 1), gamma, nan)             # NaN: not a feasible point
        rest = 1.0 - gamma
        edge_obj = aii * gamma * gamma + 2.0 * aij * gamma * rest + ajj * rest * rest
        # triangles: w ∝ adj(B)·1 for B = A_SS = [[p, q, r], [q, s, t], [r, t, u]]
        c_xy, c_xz, c_yz = r_ * t_ - q_ * u_, q_ * t_ - r_ * s_, q_ * r_ - p_ * t_
        wx = (s_ * u_ - t_ * t_) + c_xy + c_xz
        wy = c_xy + (p_ * u_ - r_ * r_) + c_yz
        wz = c_xz + c_yz + (p_ * s_ - q_ * q_)
        total = wx + wy + wz
        wx, wy, wz = wx / total, wy / total, wz / total
        inside = (wx > 0) & (wy > 0) & (wz > 0)
        wx, wy, wz = np.where(inside, wx, nan), np.where(inside, wy, nan), np.where(inside, wz, nan)
        tri_obj = (p_ * wx * wx + s_ * wy * wy + u_ * wz * wz
                   + 2.0 * (q_ * wx * wy + r_ * wx * wz + t_ * wy * wz))
    obj = np.concatenate([d, edge_obj, tri_obj], axis=1)                    # (n, candidates)
    best = np.argmin(np.where(np.isnan(obj), np.inf, obj), axis=1)
    # the chosen candidate's three weights (a vertex: 1, 0, 0; an edge: γ, 1 − γ, 0)
    zeros = np.zeros((n, k))
    chosen = np.arange(n)
    first = np.concatenate([zeros + 1.0, gamma, wx], axis=1)[chosen, best]
    second = np.concatenate([zeros, rest, wy], axis=1)[chosen, best]
    third = np.concatenate([zeros, 0.0 * gamma, wz], axis=1)[chosen, best]
    w_best = zeros
    # a vertex's and an edge's repeated member comes last, with weight 0: written first
    for col, value in ((2, third), (1, second), (0, first)):
        w_best[chosen, members[best, col]] = value
    obj_best = obj[chosen, best]
    grad = (a * w_best[:, None, :]).sum(-1)
    ok = np.isfinite(obj_best) & (grad >= obj_best[:, None] - KKT_TOL).all(-1)
    return np.where(ok[:, None], w_best, np.nan), ok


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
