"""Projection onto the dual cone of the task gradients, in the K×K Gramian (``upgrad``, ``dualproj``).

The dual cone of the rows g₁ … g_K of a Jacobian J is C = {x : gᵢᵀx ≥ 0 for every i}: the
directions that decrease no loss to first order. For x = Jᵀu (a combination of the gradients
with coefficients u) its Euclidean projection π_C(x) is again a combination, Jᵀv, and by
Proposition 1 of Quinton & Rey (2024, https://arxiv.org/abs/2406.16232)

    v = argmin_v vᵀ G v   subject to  v ≥ u          (G = J Jᵀ, componentwise ≥).

Why (Moreau's decomposition): the polar cone of C is {−Jᵀλ : λ ≥ 0}, so π_C(x) = x + Jᵀλ* with
λ* = argmin_{λ ≥ 0} ‖Jᵀ(u + λ)‖² — the problem above with v = u + λ. Its KKT conditions are

    λ ≥ 0,   G v ≥ 0  (i.e. Jᵀv ∈ C),   λᵢ (G v)ᵢ = 0,

sufficient as well as necessary (a convex problem). Jᵀv is unique; v itself is unique when G is
non-singular (for linearly dependent gradients many v give the same projection: we return one).

Solver: the problem is a non-negative least-squares problem in λ written with the Gramian only
(the normal-equations form of Lawson & Hanson's active-set method, as Bro & de Jong's "fast
NNLS"): λ grows one passive index at a time, each step solves G_PP λ_P = −(Gu)_P exactly
(least squares with a relative cut-off, so dependent gradients do not break it), and steps back
to the feasible set when an entry would turn negative. It terminates after finitely many steps
(at most 4K + 10 entering steps are allowed); the KKT conditions are checked at the end, and a projection that
fails them (or runs out of iterations) is reported as a solver failure with its feasible
iterate, never silently. K = 2 is solved in closed form on every row at once: of the four
active sets ∅, {1}, {2}, {1, 2} the first that satisfies the KKT conditions is the answer (the
common case, no zero gradient and ∅ or one index active, takes a shorter path to the same bits).

Conventions shared with TorchJD 0.18.0's ``QuadprogProjector`` (https://github.com/SimplexLab/TorchJD/tree/862baeda):
before solving, G is divided by its trace (the Frobenius norm² of J; the answer does not
change: v is invariant to a positive scaling of G) and ``reg_eps``·I is added; a trace below
``norm_eps`` makes G zero. TorchJD uses ``reg_eps = norm_eps = 1e-4`` because quadprog needs a
positive-definite matrix. Our solver needs neither, and both change the answer: the ridge
adds reg_eps·‖v‖² to the objective (relative to ‖J‖²_F, so it bends the projection most where G
is ill-conditioned), and the threshold makes the method the plain mean (v = u) whenever
‖J‖²_F < norm_eps, a test on the absolute size of the gradients. The project's default is
therefore ``reg_eps = norm_eps = 0`` (the exact projection of the paper); ``1e-4`` for both
reproduces TorchJD (tests/balancers/test_upgrad.py compares them).
"""

from __future__ import annotations

import numpy as np

#: relative cut-off of the least-squares solves on the passive set (singular values of G_PP)
RCOND = 1e-13
#: an index enters the passive set when −(G v)ᵢ exceeds this × ‖u‖∞ (G has trace 1)
ENTER_TOL = 1e-13
#: the KKT check: (G v)ᵢ ≥ −KKT_TOL × ‖u‖∞ for every i
KKT_TOL = 1e-9
#: K = 2: a candidate is feasible when −min(G v) ≤ this × ‖u‖∞ (below KKT_TOL: a feasible pick passes the check)
FEASIBLE_TOL = ENTER_TOL * 64
_TINY = np.finfo(np.float64).tiny


def normalized_gram(gram: np.ndarray, reg_eps: float = 0.0, norm_eps: float = 0.0) -> np.ndarray:
    """G / tr(G) + reg_eps·I (..., K, K), zero before the ridge where tr(G) < norm_eps or tr(G) = 0
    (TorchJD's ``normalize`` then ``regularize``; tr(G) = 0 means J = 0, where every v ≥ u is optimal)."""
    g = np.asarray(gram, dtype=np.float64)
    trace = np.trace(g, axis1=-2, axis2=-1)[..., None, None]
    low = trace.min(initial=np.inf)   # NaN propagates: the general branch below
    if low > 0.0 and low >= norm_eps:  # no zero row (every step of a real run): the plain quotient
        out = g / trace
    else:
        zero = (trace < norm_eps) | (trace <= 0.0)
        out = np.where(zero, 0.0, g / np.where(zero, 1.0, trace))
    if reg_eps:
        out = out + reg_eps * np.eye(g.shape[-1])
    return out


def project_weights(gram: np.ndarray, u: np.ndarray, reg_eps: float = 0.0, norm_eps: float = 0.0,
                    max_iter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients v (..., M, K) of the projections Jᵀv = π_C(Jᵀu) of M vectors per row onto the dual
    cone, for Gram matrices (..., K, K) and coefficients u (..., M, K) (broadcast against each other).

    Returns ``(v, ok (...))``: ``ok`` is False on a row where some projection failed the KKT check
    or ran out of iterations (its v is then the solver's last iterate: feasible in λ ≥ 0, not
    necessarily in the cone)."""
    g = normalized_gram(gram, reg_eps, norm_eps)
    k = g.shape[-1]
    u = np.asarray(u, dtype=np.float64)
    if k == 2:
        fast = _project_2_regular(g, u)
        if fast is not None:
            return fast
    shape = np.broadcast_shapes(g.shape[:-2], u.shape[:-2])
    g = np.broadcast_to(g, (*shape, k, k))
    m = u.shape[-2]
    u = np.broadcast_to(u, (*shape, m, k))
    if k == 2:
        v, ok = _project_2(g, u)
        return v, ok.all(-1)
    rows_g, rows_u = g.reshape(-1, k, k), u.reshape(-1, m, k)
    v = np.empty(rows_u.shape)
    ok = np.ones(len(rows_g), dtype=bool)
    limit = max_iter if max_iter is not None else 4 * k + 10
    for r in range(len(rows_g)):
        for i in range(m):
            v[r, i], good = project_one(rows_g[r], rows_u[r, i], limit)
            ok[r] &= good
    return v.reshape(*shape, m, k), ok.reshape(shape)


def kkt_ok(g: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether v (..., K) satisfies the KKT conditions of the projection of u for the normalised G:
    v ≥ u, G v ≥ 0 and (v − u)ᵢ (G v)ᵢ = 0, each to the tolerances of this module."""
    scale = np.maximum(np.abs(u).max(-1), np.finfo(np.float64).tiny)
    gv = (g @ v[..., None])[..., 0]
    lam = v - u
    return ((lam >= 0.0).all(-1) & (gv >= -KKT_TOL * scale[..., None]).all(-1)
            & (np.abs(lam * gv) <= KKT_TOL * scale[..., None] * np.maximum(np.abs(v), 1.0)).all(-1))


def project_one(g: np.ndarray, u: np.ndarray, max_iter: int) -> tuple[np.ndarray, bool]:
    """One projection (K,) for a normalised Gram matrix (K, K) by the Gram-form active-set NNLS of the
    module docstring; returns ``(v, ok)``."""
    k = len(u)
    p = g @ u
    scale = max(float(np.abs(u).max()), np.finfo(np.float64).tiny)
    lam = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    blocked = np.zeros(k, dtype=bool)       # entered without effect (dependent gradients): skip until λ moves
    w = -p                                   # −∇ of ½λᵀGλ + λᵀp, i.e. −G v
    for _ in range(max_iter):
        candidates = ~passive & ~blocked & (w > ENTER_TOL * scale)
        if not candidates.any():
            v = u + lam
            return v, bool(kkt_ok(g, u, v))
        j = int(np.argmax(np.where(candidates, w, -np.inf)))
        passive[j] = True
        s = _passive_solve(g, p, passive)
        if s[j] <= 0.0:                      # cannot happen in exact arithmetic unless g_j is dependent
            passive[j], blocked[j] = False, True
            continue
        while not (s[passive] > 0.0).all():  # step back to the feasible set, drop the index that hits 0
            neg = np.flatnonzero(passive & (s <= 0.0))
            ratios = lam[neg] / (lam[neg] - s[neg])
            hit = neg[int(np.argmin(ratios))]
            lam = lam + float(ratios.min()) * (s - lam)
            lam[hit] = 0.0
            passive &= lam > 0.0
            lam[~passive] = 0.0
            s = _passive_solve(g, p, passive)
        lam = s
        blocked[:] = False
        w = -(g @ lam + p)
    return u + lam, False


def _passive_solve(g: np.ndarray, p: np.ndarray, passive: np.ndarray) -> np.ndarray:
    """s with s_P the least-squares solution of G_PP s_P = −p_P (relative cut-off :data:`RCOND`), s_R = 0."""
    idx = np.flatnonzero(passive)
    s = np.zeros(len(p))
    s[idx] = np.linalg.lstsq(g[np.ix_(idx, idx)], -p[idx], rcond=RCOND)[0]
    return s


def _project_2(g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K = 2 in closed form for normalised G (..., 2, 2) and u (..., M, 2): (v (..., M, 2), ok (..., M)).

    With G = [[a, b], [b, c]] and p = G u, the candidates (one per active set) are λ = 0;
    λ = (−p₁/a, 0) ((G v)₁ = 0); λ = (0, −p₂/c); λ = −u (v = 0, only where u ≤ 0). Each has λ ≥ 0 and
    complementarity by construction, so the first with G v ≥ 0 (within rounding) is the projection."""
    a, b, c = g[..., 0, 0][..., None], g[..., 0, 1][..., None], g[..., 1, 1][..., None]
    u1, u2 = u[..., 0], u[..., 1]
    p1, p2 = a * u1 + b * u2, b * u1 + c * u2
    a_pos, c_pos = a > 0, c > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        l1 = np.where(a_pos & (p1 < 0), -p1 / np.where(a_pos, a, 1.0), 0.0)
        l2 = np.where(c_pos & (p2 < 0), -p2 / np.where(c_pos, c, 1.0), 0.0)
    scale = np.maximum(np.maximum(np.abs(u1), np.abs(u2)), _TINY)
    # −min(G v) of each candidate, relative to ‖u‖∞ (written out: G v for v = u + λ is p + G λ)
    violation = np.empty((4,) + u1.shape)
    np.maximum(-np.minimum(p1, p2), 0.0, out=violation[0])
    np.maximum(-np.minimum(p1 + a * l1, p2 + b * l1), 0.0, out=violation[1])
    np.maximum(-np.minimum(p1 + b * l2, p2 + c * l2), 0.0, out=violation[2])
    violation[3] = np.where((u1 <= 0.0) & (u2 <= 0.0), 0.0, np.inf)
    violation /= scale                                                               # (4, ..., M)
    feasible = violation <= FEASIBLE_TOL
    pick = np.where(feasible.any(0), np.argmax(feasible, 0), np.argmin(violation, 0))
    v = np.empty(u.shape)
    v[..., 0] = np.choose(pick, (u1, u1 + l1, u1, 0.0))
    v[..., 1] = np.choose(pick, (u2, u2, u2 + l2, 0.0))
    ok = np.choose(pick, violation) <= KKT_TOL
    return v, ok


def _project_2_regular(g: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_project_2` for the common case, in a third of its NumPy calls: ``(v, ok (...))`` as
    :func:`project_weights` returns them, bit for bit, or None when a problem needs the general path.

    The common case: every G has a₁₁, a₂₂ > 0 (no zero gradient), and every projection either has
    λ = 0 feasible or exactly one pᵢ < 0 with the candidate λᵢ = −pᵢ/aᵢᵢ (other entry 0) feasible. The
    candidate of the other index then has λ = 0 (:func:`_project_2`'s ``where`` gives it 0), so its
    G v, and its feasibility, are those of λ = 0: the first feasible candidate in :func:`_project_2`'s
    order is λ = 0 or this one, and it passes the KKT check (FEASIBLE_TOL < KKT_TOL). The two
    coordinates are handled as one (..., M, 2) array: p = G u written as u₁·(a, b) + u₂·(b, c), the
    products and sums of :func:`_project_2` in its order."""
    diag = g.diagonal(0, -2, -1)[..., None, :]                    # (a, c): (..., 1, 2)
    if not diag.min(initial=np.inf) > 0.0:  # a zero gradient (or NaN): λᵢ = −pᵢ/aᵢᵢ is not defined
        return None
    row, col = g[..., None, 0, :], g[..., None, :, 1]             # (a, b) and (b, c), b = g₁₂ in both
    p = u[..., :1] * row + u[..., 1:] * col                        # (p₁, p₂) (..., M, 2)
    neg = p < 0
    lam = np.where(neg, -p / diag, 0.0)                            # (λ₁, λ₂): at most one non-zero (checked)
    # G v of the candidate: p + λ₁·(a, b) + λ₂·(b, c), where adding the zero λ's term changes no value
    gv = p + row * lam[..., :1] + col * lam[..., 1:]
    scale = np.maximum(np.abs(u).max(-1), _TINY)                   # ‖u‖∞
    # violation ≤ tol ⟺ min(G v) / ‖u‖∞ ≥ −tol (−x/s = −(x/s) exactly; NaN fails both)
    keep = p.min(-1) / scale >= -FEASIBLE_TOL                      # λ = 0 is feasible: v = u
    moved = gv.min(-1) / scale >= -FEASIBLE_TOL
    if not (keep | (moved & ~neg.all(-1))).all():
        return None
    v = np.where(neg & ~keep[..., None], u + lam, u)
    return v, np.ones(v.shape[:-2], dtype=bool)
