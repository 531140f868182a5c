"""Small exact solvers on the probability simplex (float64; K is tiny)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

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
        magnitude = np.abs(gram)
        scale = np.maximum(np.maximum(magnitude[..., 0, 0], magnitude[..., 1, 1]), 1e-300)
        a = gram / scale[..., None, None]   # one division for the three entries used (and a21)
        a11, a12, a22 = a[..., 0, 0], a[..., 0, 1], a[..., 1, 1]
        denom = a11 + a22 - 2 * a12
        flat = denom <= 1e-300  # identical gradients: any point is optimal, take the midpoint
        if flat.any():
            gamma = np.where(flat, 0.5, np.clip((a22 - a12) / np.where(flat, 1.0, denom), 0.0, 1.0))
        else:   # the common case: no row to guard, the same division and clip
            gamma = ((a22 - a12) / denom).clip(0.0, 1.0)
        w = np.empty((*shape, 2), dtype=gamma.dtype)
        w[..., 0] = gamma
        np.subtract(1.0, gamma, out=w[..., 1])
        return w, np.ones(shape, dtype=bool)
    rows = np.asarray(gram, dtype=np.float64).reshape(-1, k, k)
    if k <= SMALL_SUPPORT_MAX_K:
        out, ok = _small_supports(rows)
        if ok.all():   # the common case: every row answered, no row for the active-set solver
            return out.reshape(*shape, k), ok.reshape(shape)
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


class _Candidates(NamedTuple):
    """The candidate supports of :func:`_small_supports` for one K (pairs (i, j) and triples (x, y, z)
    in lexicographic order, M pairs and T triples), as index tables built once per K."""

    #: flat indices into a row's K×K matrix, gathered in one call: the diagonal (K); per pair a_ii, a_ij,
    #: a_jj (3 × M); per triple the operands of the cofactor products (2 × 2 × 3 × 3 × T: ``_W_TERMS``,
    #: ``_DIFFERENCES``) and the entries of the objective's products (6 × T: ``_OBJECTIVE``)
    gather: np.ndarray
    n_pairs: int
    n_triples: int
    #: (C, K), C = K + M + T candidates (vertices, edges, triangles: the order ties go in): each one's
    #: weights before the per-row ones are written in (a vertex: 1 on its task; an edge, a triangle: 0)
    table: np.ndarray
    #: the edges' candidate rows in ``table`` (2, M) and their tasks (i; j) (2, M)
    edge_rows: np.ndarray
    edge_tasks: np.ndarray
    #: the triangles' candidate rows in ``table`` (3, T) and their tasks (x; y; z) (3, T)
    tri_rows: np.ndarray
    tri_tasks: np.ndarray


# A triangle's B = A_SS = [[p, q, r], [q, s, t], [r, t, u]] by entry name: its (row, column) in (x, y, z).
_ENTRY = {"p": (0, 0), "s": (1, 1), "u": (2, 2), "q": (0, 1), "r": (0, 2), "t": (1, 2)}
# The cofactor sums w_x = (c_xy + d_x) + c_xz, w_y = (c_xy + d_y) + c_yz, w_z = (c_xz + c_yz) + d_z (in the
# formulas' order) by their three terms, each a difference of two products of entries (c_xy = rt − qu, …).
_W_TERMS = {"x": ("c_xy", "d_x", "c_xz"), "y": ("c_xy", "d_y", "c_yz"), "z": ("c_xz", "c_yz", "d_z")}
_DIFFERENCES = {"c_xy": ("rt", "qu"), "c_xz": ("qt", "rs"), "c_yz": ("qr", "pt"),
                "d_x": ("su", "tt"), "d_y": ("pu", "rr"), "d_z": ("ps", "qq")}
# The objective (pw_xw_x + sw_yw_y + uw_zw_z) + 2(qw_xw_y + rw_xw_z + tw_yw_z) product by product, laid out
# so that [0:2] + [2:4] + [4:6] adds up (the diagonal terms, the off-diagonal terms) in that order: the
# entries, and the weights of the first and of the second factor.
_OBJECTIVE = ("pqsrut", "xxyxzy", "xyyzzz")
# The objective's first and second weight factors as indices into (w_x, w_y, w_z).
_W1, _W2 = (np.array(["xyz".index(c) for c in letters]) for letters in _OBJECTIVE[1:])
# The edges' entries (a_ii, a_ij, a_jj) times these: a_ii, 2a_ij (the 2.0·a_ij of the formulas), a_jj.
_EDGE_FACTORS = np.array([1.0, 2.0, 1.0])[:, None, None]
_CANDIDATES: dict[int, _Candidates] = {}


def _candidates(k: int) -> _Candidates:
    """The :class:`_Candidates` of range(k) (cached)."""
    if k not in _CANDIDATES:
        pairs = np.array(list(itertools.combinations(range(k), 2)), dtype=np.int64).reshape(-1, 2)
        triples = np.array(list(itertools.combinations(range(k), 3)), dtype=np.int64).reshape(-1, 3)
        i, j = pairs.T

        def entry(name: str) -> np.ndarray:   # the flat index of every triple's entry ``name``
            row, col = _ENTRY[name]
            return triples[:, row] * k + triples[:, col]

        # the cofactor products' operands (operand, first/second product, term, w_x/w_y/w_z): 2 × 2 × 3 × 3
        operands = [entry(_DIFFERENCES[_W_TERMS[lane][term]][product][operand])
                    for operand in range(2) for product in range(2) for term in range(3) for lane in "xyz"]
        gather = np.concatenate([np.arange(k) * (k + 1), i * (k + 1), i * k + j, j * (k + 1), *operands,
                                 *(entry(name) for name in _OBJECTIVE[0])])
        m, t = len(pairs), len(triples)
        table = np.zeros((k + m + t, k))
        table[np.arange(k), np.arange(k)] = 1.0
        _CANDIDATES[k] = _Candidates(gather, m, t, table, np.broadcast_to(k + np.arange(m), (2, m)), pairs.T.copy(),
                                     np.broadcast_to(k + m + np.arange(t), (3, t)), triples.T.copy())
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
    reductions within the row): a row gives the same bits alone and among many.

    At this size the cost is the number of NumPy calls, not arithmetic: the entries are gathered in
    one call, lane-major (:class:`_Candidates`), laid out so that like operations (the edges' three
    products, the triangles' cofactor products, their differences and sums, the objective's products)
    are one call each on contiguous blocks; every element still goes through the same operations in the
    same order as the formulas above (tested against them written out).
    """
    n, k = rows.shape[0], rows.shape[-1]
    cand = _candidates(k)
    m, t = cand.n_pairs, cand.n_triples
    nan = np.nan
    with np.errstate(all="ignore"):   # a non-finite row gives NaN candidates and ok = False, quietly
        scale = np.maximum(np.abs(rows.reshape(n, k * k)[:, ::k + 1]).max(-1), 1e-300)
        a = rows / scale[:, None, None]   # as min_norm_simplex: the solution is invariant to a positive scaling
        # the entries lane-major (lanes, n): every slice below is a contiguous block (fast ufunc loops)
        entries = a.reshape(n, k * k).T[cand.gather]
        d = entries[:k]                                                     # the vertices' objectives a_ii
        o = k + 3 * m
        # edges: the closed form on each (interior points only: the ends are vertices)
        coef = entries[k:o].reshape(3, m, n) * _EDGE_FACTORS                 # a_ii, 2a_ij, a_jj
        # γ = (a_jj − a_ij)/(a_ii + a_jj − 2a_ij)
        gamma = (coef[2] - entries[k + m:k + 2 * m]) / (coef[0] + coef[2] - coef[1])
        gamma = np.where((gamma > 0) & (gamma < 1), gamma, nan)             # NaN: not a feasible point
        ends = np.empty((4, m, n))                                          # γ, γ, 1 − γ, 1 − γ
        ends[:2] = gamma
        np.subtract(1.0, ends[:2], out=ends[2:])
        # a_ii γ γ + 2a_ij γ (1 − γ) + a_jj (1 − γ)(1 − γ), the three products in one call each
        edge_terms = coef * ends[:3] * ends[1:]
        edge_obj = edge_terms[0] + edge_terms[1] + edge_terms[2]
        # triangles: w ∝ adj(B)·1 for B = A_SS = [[p, q, r], [q, s, t], [r, t, u]]
        factors = entries[o:o + 36 * t].reshape(2, 2, 3, 3, t, n)
        products = factors[0] * factors[1]
        terms = products[0] - products[1]
        w = terms[0] + terms[1]
        w += terms[2]                                                       # (3, T, n): w_x, w_y, w_z
        total = w[0] + w[1]
        total += w[2]
        w /= total
        w = np.where((w > 0).all(0), w, nan)
        obj_terms = entries[o + 36 * t:].reshape(6, t, n) * w[_W1] * w[_W2]
        sums = obj_terms[0:2] + obj_terms[2:4]
        sums += obj_terms[4:6]                        # (pw_x² + sw_y² + uw_z², qw_xw_y + rw_xw_z + tw_yw_z)
        tri_obj = sums[0] + 2.0 * sums[1]
        obj = np.concatenate([d, edge_obj, tri_obj])                        # (candidates, n)
        best = np.argmin(np.where(np.isnan(obj), np.inf, obj), axis=0)
        # every candidate's weights (candidates, n, K), then the chosen one's
        weights = cand.table[:, None].repeat(n, 1)
        weights[cand.edge_rows, :, cand.edge_tasks] = ends[1:3]
        weights[cand.tri_rows, :, cand.tri_tasks] = w
        chosen = np.arange(n)
        w_best, obj_best = weights[best, chosen], obj[best, chosen]
        grad = (a * w_best[:, None, :]).sum(-1)   # (an infinite entry times a weight 0: NaN, quietly too)
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
