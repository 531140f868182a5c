"""Shared pieces of the ``amtl`` / ``amtlub`` / ``mgdaub`` kernels (Jacobian-based, K = 2).

* :func:`gram_entries`, :func:`eigvals2` — the Gram matrix and its eigenvalues with the
  balancer's bits (see there why that matters);
* :func:`aligned_coefficients` — the K = 2 closed form of
  :func:`mtl_tune.balancers.amtl.aligned_mtl_weights` (W p with W = σ V_r Λ_r^{-1/2} V_rᵀ).
* :class:`AlignedKernel` — the Aligned-MTL step; ``amtl`` and ``amtlub`` are the same rule on
  the toy (see its docstring).

Closed form of the alignment for M = G Gᵀ = [[a, b], [b, c]] (PSD), eigenvalues λ₁ ≥ λ₂:

    λ₁ = ½(a + c + √((a − c)² + 4b²)),   λ₂ = (a_max/λ₁)·a_min − (b/λ₁)·b   (LAPACK
    ``dlaev2``, bit for bit as the balancer's ``eigh``: see :func:`eigvals2`).

Rank (as the balancer): r = 0 if λ₁ ≤ 0; r = 1 if λ₂ ≤ λ₁·K·eps; else r = 2.

* r = 2: with s = √(λ₁λ₂) and t = √λ₁ + √λ₂, M^{1/2} = (M + sI)/t, hence
  M^{-1/2} = adj(M + sI)/(s t) and W p = σ/(s t) · [(c + s)p₁ − b p₂, (a + s)p₂ − b p₁].
  σ² = λ₂ for ``min`` (then σ/(s t) = 1/(√λ₁ t)) and for ``median`` (``torch.median`` of two
  values is the lower one), σ² = (λ₁ + λ₂)/2 for ``rmse``.
* r = 1: σ² = λ₁ for every mode and W = v₁v₁ᵀ, the spectral projector (M − λ₂I)/(λ₁ − λ₂).
* r = 0: W = 0.

No eigenvectors are formed, so there is no sign or ordering convention to match.
"""

from __future__ import annotations


import numpy as np

from ._base import Kernel, clip_rows


#: smallest normal float64: a floor that changes no normal number's quotient
_TINY = float(np.finfo(np.float64).tiny)


def gram_entries(jac: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a₁₁, a₁₂, a₂₂) of G Gᵀ for (B, 2, 2) Jacobians as x₁y₁ + x₂y₂ — the bits of the
    balancers' float64 ``gram`` (MKL's 2 × 2 product, no fused multiply-add; checked), and
    cheaper than reductions over the last axis."""
    g11, g12, g21, g22 = jac[:, 0, 0], jac[:, 0, 1], jac[:, 1, 0], jac[:, 1, 1]
    return g11 * g11 + g12 * g12, g11 * g21 + g12 * g22, g21 * g21 + g22 * g22


def eigvals2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (λ₁ ≥ λ₂) of the PSD matrix [[a, b], [b, c]] with LAPACK ``dlae2``'s arithmetic.

    torch.linalg.eigh (MKL ``syevd``) leaves a 2 × 2 matrix as its own tridiagonal form and
    solves it with ``dlaev2``: rt = max(|a − c|, |2b|)·√(1 + q²), q = min/max of the two,
    λ₁ = ½(a + c + rt), λ₂ = (max(a, c)/λ₁)·min(a, c) − (b/λ₁)·b (the accurate small
    eigenvalue). The same operations in the same order give the same bits (checked on 20 000
    random and nearly singular Gram matrices), which matters: the rank truncation
    λ₂ ≤ 2·eps·λ₁ is a jump of the update, and the toy's trajectories sit on it at the Pareto
    set, where the two gradients are anti-parallel. (a, c ≥ 0 lets max/min replace ``dlae2``'s
    comparisons of |a| and |c|; |a − c| = |2b| needs no branch: q = 1 gives its √2.)
    """
    adf, ab = np.abs(a - c), np.abs(b + b)
    big = np.maximum(adf, ab)
    q = np.minimum(adf, ab) / np.maximum(big, _TINY)    # M = aI: 0/0 → q = 0 (other bits unchanged)
    lam1 = 0.5 * (a + c + big * np.sqrt(1.0 + q * q))
    den = np.maximum(lam1, _TINY)                       # M = 0: λ₂ = 0 instead of 0/0
    lam2 = (np.maximum(a, c) / den) * np.minimum(a, c) - (b / den) * b
    return lam1, lam2


def aligned_coefficients(a: np.ndarray, b: np.ndarray, c: np.ndarray, lam1: np.ndarray, lam2: np.ndarray,
                         prefs: np.ndarray | None, rmse: np.ndarray | None, rel_tol: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Raw-gradient weights W p as two (B,) arrays, for Gram entries a, b, c and eigenvalues λ₁ ≥ λ₂.

    ``prefs`` (B, 2) the preference vectors p (None: ones), ``rmse`` (B,) bool: σ² = mean(λ)
    instead of λ_min (None: no such row; ``min`` and ``median`` coincide for K = 2),
    ``rel_tol``: eps of the Jacobian's dtype. W p = α X p with X symmetric: rank 2
    X = adj(M + sI), α = σ/(s t); rank 1 X = M − λ₂I, α = 1/(λ₁ − λ₂); rank 0 α = 0.
    """
    full = lam2 > lam1 * (2 * rel_tol)       # rank 2 (K = 2); False where λ₁ = 0 or NaN
    if full.all():                           # the usual step: no rank truncation in any row
        r1, r2 = np.sqrt(lam1), np.sqrt(lam2)
        s, t = r1 * r2, r1 + r2
        alpha = 1.0 / (r1 * t)
        if rmse is not None:
            alpha = np.where(rmse, np.sqrt(0.5 * (lam1 + lam2)) / (s * t), alpha)
        x11, x22, x12 = c + s, a + s, -b
    else:
        pos = lam1 > 0.0                     # rank ≥ 1 (all-zero gradients: rank 0)
        lam1 = np.where(pos, lam1, 1.0)
        lam2 = np.where(pos, lam2, 0.0)
        r1 = np.sqrt(lam1)
        r2 = np.sqrt(np.where(full, lam2, 0.0))
        s, t = r1 * r2, r1 + r2
        alpha = 1.0 / (r1 * t)
        if rmse is not None:
            alpha = np.where(rmse, np.sqrt(0.5 * (lam1 + lam2)) / np.where(full, s * t, 1.0), alpha)
        alpha = np.where(full, alpha, np.where(pos, 1.0 / np.where(full, 1.0, lam1 - lam2), 0.0))
        x11 = np.where(full, c + s, a - lam2)
        x22 = np.where(full, a + s, c - lam2)
        x12 = np.where(full, -b, b)
    if prefs is None:
        return (x11 + x12) * alpha, (x12 + x22) * alpha
    p1, p2 = prefs[:, 0], prefs[:, 1]
    return (x11 * p1 + x12 * p2) * alpha, (x12 * p1 + x22 * p2) * alpha


class AlignedKernel(Kernel):
    """Aligned-MTL on the toy's 2 × 2 Jacobian: x.grad = clip(Σ_i (W p)_i ∇ℓ_i), no ×K.

    ``amtl`` aligns the Jacobian w.r.t. the shared parameters, ``amtlub`` the one w.r.t. the
    representation z; on the toy z = x (identity encoder: the lockstep path passes the proxy
    leaf p as ``representation``), so J_z = J and the one ``backward(z, d_z)`` writes d_z
    itself into x.grad — the two methods give the same update here.
    """

    #: amtl (GradientBalancer) rejects a non-finite J; amtlub fails later, on its NaN d_z
    jacobian_error = "non-finite per-task gradient"

    def setup(self) -> None:
        rmse = np.array([b.scale_mode == "rmse" for b in self.balancers])
        self.rmse = rmse if rmse.any() else None
        # the balancers' validated float64 preferences; None on every row = ones (official code)
        prefs = [b.preferences for b in self.balancers]
        self.prefs = None if all(p is None for p in prefs) else np.stack(
            [np.ones(2) if p is None else p.double().numpy() for p in prefs])
        self.weights = np.zeros((self.rows, 2))
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        a, b, c = gram_entries(jac)
        lam1, lam2 = eigvals2(a, b, c)
        self.fail_bad_inputs(step, losses, jac, self.jacobian_error)
        w1, w2 = aligned_coefficients(a, b, c, lam1, lam2, self.prefs, self.rmse, float(np.finfo(jac.dtype).eps))
        self.weights[:, 0], self.weights[:, 1] = w1, w2
        d = w1[:, None] * jac[:, 0] + w2[:, None] * jac[:, 1]
        return clip_rows(d, self.max_norm) if self.clip else d
