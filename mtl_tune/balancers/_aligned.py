"""The alignment shared by ``amtl`` and ``amtlub`` (Aligned-MTL, Senushkin et al., "Independent
Component Alignment for Multi-Task Learning", CVPR'23): the math, as a batch-first rule
(:mod:`mtl_tune.balancers._rows`), and :class:`AlignedCombination`.

Aligned-MTL replaces the task gradients G (rows g_i, K×P) by the closest matrix (in the
Procrustes sense) whose rows are orthogonal and of equal norm, so the combined update has
condition number 1. With the K×K Gram matrix M = G Gᵀ = V Λ Vᵀ (eigh, float64):

* drop eigenvalues λ ≤ λ_max · K · eps (rank r). The official code uses eps of float32;
  we use eps of the Jacobian's dtype (the same for float32 gradients, finer for float64).
  By Weyl's inequality a Gram eigenvalue below eps·λ_max is indistinguishable from 0 given
  gradients known to relative precision eps — but note what it implies: in float32 a
  gradient component whose singular value is below ≈ √(K·eps) (≈ 1/1700 for K = 3) of
  the largest is truncated (a task whose independent gradient is 2000× smaller gets weight 0);
* σ² = λ_r (``scale_mode="min"``, official default), the median of the kept λ
  (``"median"``, lower median as ``torch.median``) or their mean (``"rmse"``: σ is then the
  RMS of the singular values);
* W = σ · V_r Λ_r^{-1/2} V_rᵀ (K×K, symmetric); aligned gradients Ĝ = W G.

With the thin SVD G = V Λ^{1/2} Qᵀ (Q: P×r orthonormal), Ĝ = σ V_r Qᵀ, hence Ĝ Ĝᵀ = σ² I on
full rank (rows orthogonal, equal norm σ). The update is d = Ĝᵀ p = Gᵀ (W p) with p = 1
(official) or task preference weights (paper §4); the effective raw-gradient weights are
W p (they may be negative). Every aligned gradient gets the projection ⟨d, ĝ_i⟩ = σ² p_i
(equal for p = 1) whatever the individual gradient norms — the scale invariance the paper
claims; for mutually orthogonal gradients the update direction Σ_i p_i g_i/‖g_i‖ does not
change at all when a gradient is rescaled.

Conventions (docs/methods.md#amtl, SamsungLabs/MTL ``ProcrustesSolver``): no ×K (the update is
d itself), no clipping, heads get their unweighted task gradients. ``torch.symeig`` of the
official code is gone from PyTorch; ``np.linalg.eigh`` (LAPACK ``syevd``, on any number of
Gram matrices at once) computes the same decomposition. All-zero gradients (λ_max = 0) have
rank 0: d = 0, weights 0 (the exact limit Ĝ = 0). A Gram matrix with a non-finite entry gives
non-finite weights (the balancer then reports a non-finite update).

The rule (:meth:`AlignedCombination.weights_rows`) is what the balancers' ``backward`` and the
toy's generic driver (``toy/kernels/_rows.py``) both call: for K = 2 the alignment in closed form
(:func:`_aligned_2`, a few elementwise operations on all rows at once: the toy runs it every
step), for other K one eigendecomposition per row, batched by ``np.linalg.eigh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import weighted_rows
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import gram

SCALE_MODES = ("min", "median", "rmse")
#: relative eigenvalue tolerance of the official code (``torch.finfo().eps`` of float32).
REL_TOL = float(np.finfo(np.float32).eps)
#: the tolerance of float64 gradients (what the rule assumes of its float64 inputs by default).
REL_TOL64 = float(np.finfo(np.float64).eps)


def _check_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"amtl: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")


def _spectrum(gram_matrix: np.ndarray, scale_mode: str, rel_tol: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pieces of W = V diag(s) Vᵀ for Gram matrices (..., K, K) (lower triangles): ``(V (..., K, K),
    s (..., K), rank (...), σ² (...))`` with s = σ/√λ on the kept eigenvalues and 0 on the dropped ones
    (NaN on a row with a non-finite entry)."""
    _check_mode(scale_mode)
    a = np.asarray(gram_matrix, dtype=np.float64)
    k = a.shape[-1]
    bad = None
    if not np.isfinite(a).all():  # one reduction on the usual step; LAPACK never sees a NaN/inf
        bad = ~np.isfinite(a).all(axis=(-2, -1))
        a = np.where(bad[..., None, None], 0.0, a)
    lam, vec = np.linalg.eigh(a)  # ascending; reads the lower triangle
    # rank truncation; nothing is kept where λ_max ≤ 0 (all-zero gradients: rank 0)
    keep = lam > lam[..., -1:] * (k * rel_tol)
    rank = keep.sum(-1)
    if scale_mode == "rmse":
        sigma2 = np.where(keep, lam, 0.0).sum(-1) / np.maximum(rank, 1)
    else:  # the kept eigenvalues are the top r of the ascending λ: λ_{K−r} (min) or their lower median
        first = k - rank
        at = first + (rank - 1) // 2 if scale_mode == "median" else first
        sigma2 = np.take_along_axis(lam, np.minimum(at, k - 1)[..., None], -1)[..., 0]
        sigma2 = np.where(rank > 0, sigma2, 0.0)
    s = np.where(keep, np.sqrt(sigma2)[..., None] / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    if bad is not None:
        s = np.where(bad[..., None], np.nan, s)
        sigma2 = np.where(bad, np.nan, sigma2)
    return vec, s, rank, sigma2


def _aligned_2(m: np.ndarray, scale_mode: str, preferences: np.ndarray | None, rel_tol: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K = 2 in closed form, no eigenvectors: :func:`aligned_mtl_weights` on Gram matrices (..., 2, 2).

    For M = [[a, b], [b, c]] with eigenvalues λ₁ ≥ λ₂ (``np.linalg.eigvalsh``: LAPACK's ``dlae2``,
    the very bits of the eigendecomposition path's — and of ``torch.linalg.eigh`` — so the rank
    truncation, a jump of the update that the toy's trajectories sit on at the Pareto set, where
    the two gradients are anti-parallel, switches at the same steps; tested), the rank is 0 if
    λ₁ ≤ 0, 1 if λ₂ ≤ λ₁·2·eps, else 2, and W p = α X p with X symmetric:

    * r = 2: with s = √(λ₁λ₂) and t = √λ₁ + √λ₂, M^{1/2} = (M + sI)/t, hence
      M^{-1/2} = adj(M + sI)/(s t): X = adj(M + sI), α = σ/(s t). σ² = λ₂ for ``min`` (then
      α = 1/(√λ₁ t)) and for ``median`` (the lower median of two values), (λ₁ + λ₂)/2 for ``rmse``;
    * r = 1: σ² = λ₁ for every mode and W = v₁v₁ᵀ, the spectral projector: X = M − λ₂I,
      α = 1/(λ₁ − λ₂);
    * r = 0: α = 0.

    A non-finite entry of M gives non-finite weights (not necessarily NaN in every entry).
    """
    b = m[..., 1, 0]
    ca = m.reshape(m.shape[:-2] + (4,))[..., ::-3]  # (c, a): entries 3 and 0 of the flattened 2 × 2
    lam = np.linalg.eigvalsh(m)              # ascending; reads the lower triangle, as b
    lam1, lam2 = lam[..., 1], lam[..., 0]
    full = lam2 > lam1 * (2 * rel_tol)       # rank 2; False where λ₁ = 0 or NaN
    if full.all():                           # the usual step: no rank truncation in any row
        r1, r2 = np.sqrt(lam1), np.sqrt(lam2)
        s, t = r1 * r2, r1 + r2
        if scale_mode == "rmse":
            sigma2 = 0.5 * (lam1 + lam2)
            alpha = np.sqrt(sigma2) / (s * t)
        else:
            sigma2, alpha = lam2, 1.0 / (r1 * t)
        rank = 2 * full
        xd = ca + s[..., None]               # X = adj(M + sI): (x₁₁, x₂₂) = (c + s, a + s), x₁₂ = −b
        if preferences is None:              # W 1 = α (x₁₁ + x₁₂, x₂₂ + x₁₂): _weights_2's bits, one op less
            return (xd - b[..., None]) * alpha[..., None], rank, sigma2
        x12 = -b
        return _weights_2(xd, x12, alpha, preferences), rank, sigma2
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # NaN/inf rows come here (full is False)
        pos = lam1 > 0.0                     # rank ≥ 1 (all-zero gradients: rank 0)
        rank = full + pos.astype(np.int64)
        lam1 = np.where(pos, lam1, 1.0)
        lam2 = np.where(pos, lam2, 0.0)
        r1 = np.sqrt(lam1)
        r2 = np.sqrt(np.where(full, lam2, 0.0))
        s, t = r1 * r2, r1 + r2
        if scale_mode == "rmse":
            sigma2 = np.where(full, 0.5 * (lam1 + lam2), lam1)
            alpha = np.sqrt(sigma2) / np.where(full, s * t, 1.0)
        else:
            sigma2, alpha = np.where(full, lam2, lam1), 1.0 / (r1 * t)
        sigma2 = np.where(pos, sigma2, 0.0)
        alpha = np.where(full, alpha, np.where(pos, 1.0 / np.where(full, 1.0, lam1 - lam2), 0.0))
        # rank 2: X = adj(M + sI); rank 1: X = M − λ₂I, (x₁₁, x₂₂) = (a − λ₂, c − λ₂), x₁₂ = b
        xd = np.where(full[..., None], ca + s[..., None], ca[..., ::-1] - lam2[..., None])
        x12 = np.where(full, -b, b)
        # a non-finite entry of M reaches X (a, b or c), hence non-finite weights
        return _weights_2(xd, x12, alpha, preferences), rank, sigma2


def _weights_2(xd: np.ndarray, x12: np.ndarray, alpha: np.ndarray, preferences: np.ndarray | None) -> np.ndarray:
    """W p = α X p for X = [[x₁₁, x₁₂], [x₁₂, x₂₂]], xd = (x₁₁, x₂₂) (..., 2)."""
    if preferences is None:
        return (xd + x12[..., None]) * alpha[..., None]
    p = np.asarray(preferences, dtype=np.float64)
    return (xd * p + x12[..., None] * p[..., ::-1]) * alpha[..., None]


def alignment_matrix(gram_matrix: np.ndarray, scale_mode: str = "min", rel_tol: float = REL_TOL
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W = σ V_r Λ_r^{-1/2} V_rᵀ (..., K, K) for Gram matrices M = V Λ Vᵀ (..., K, K) (lower triangles
    read); returns ``(W, rank r (...), σ² (...))``.

    Eigenvalues at or below λ_max · K · ``rel_tol`` are treated as zero (rank truncation).
    """
    vec, s, rank, sigma2 = _spectrum(gram_matrix, scale_mode, rel_tol)
    return (vec * s[..., None, :]) @ vec.swapaxes(-1, -2), rank, sigma2


def aligned_mtl_weights(gram_matrix: np.ndarray, scale_mode: str = "min", preferences: np.ndarray | None = None,
                        rel_tol: float = REL_TOL, closed_form: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Effective raw-gradient weights W p (..., K), the rank (...) and σ² (...) for Gram matrices
    (..., K, K); d = Σ_i (W p)_i g_i. ``preferences`` p: (K,) or (..., K), None = ones. As LAPACK's
    ``syevd``, only the lower triangle of each (symmetric) Gram matrix is read.

    K = 2 is solved in closed form (:func:`_aligned_2`: the toy runs it every step) unless
    ``closed_form=False``; every other K, by a batched eigendecomposition.
    """
    m = np.asarray(gram_matrix, dtype=np.float64)
    if m.shape[-1] == 2 and closed_form:
        _check_mode(scale_mode)
        return _aligned_2(m, scale_mode, preferences, rel_tol)
    vec, s, rank, sigma2 = _spectrum(m, scale_mode, rel_tol)
    if preferences is None:
        vtp = vec.sum(-2)  # Vᵀ1
    else:
        vtp = (np.asarray(preferences, dtype=np.float64)[..., None, :] @ vec)[..., 0, :]
    return (vec @ (s * vtp)[..., None])[..., 0], rank, sigma2


def check_preferences(preferences: Sequence[float] | None, n_tasks: int, method: str) -> np.ndarray | None:
    """Validate optional task preference weights (non-negative, finite, one per task, not all 0 — all
    zero weights every task's contribution by 0: a zero update on every step); float64 (K,)."""
    if preferences is None:
        return None
    p = np.asarray(list(preferences), dtype=np.float64)
    if p.shape != (n_tasks,) or not np.isfinite(p).all() or (p < 0).any() or not p.any():
        raise ValueError(f"{method}: preferences must be {n_tasks} finite non-negative numbers, not all 0, "
                         f"got {preferences!r}")
    return p


class AlignedCombination:
    """What Aligned-MTL and Aligned-MTL-UB share: validated settings, the batch-first rule, and
    its call on one step (of the shared parameters' Gram matrix, or the representation's for
    ``amtlub``) with the rank cut-off of the gradients' dtype."""

    name: str
    n_tasks: int

    def _init_aligned(self, scale_mode: str, preferences: Sequence[float] | None, n_tasks: int) -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"{self.name}: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.preferences = check_preferences(preferences, n_tasks, self.name)
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray, rel_tol: float = REL_TOL64) -> RowStep:
        """W p (..., K) for Gram matrices (..., K, K); ``extras`` holds the rank and σ² per row.

        ``rel_tol``: eps of the dtype the gradients were computed in (the rank cut-off). The rule's
        inputs are float64, hence the default, float64's eps (the toy's gradients); the balancer
        passes its gradients' eps (float32's for a float32 model, as the official code)."""
        w, rank, sigma2 = aligned_mtl_weights(gram, self.scale_mode, self.preferences, rel_tol)
        return RowStep(w, extras={"rank": rank, "sigma2": sigma2})

    def _step_weights(self, gram_matrix: Tensor, losses: Tensor, grad_dtype: torch.dtype) -> Tensor:
        """The rule on this step's K×K Gram matrix; ``grad_dtype`` (the gradients') sets the cut-off."""
        a = host(gram_matrix)
        a = 0.5 * (a + a.T)  # the triangles of a matmul may differ in rounding; the rule reads the lower one
        out = self.weights_rows(a, host(losses), float(torch.finfo(grad_dtype).eps))
        self._last = {"rank": int(out.extras["rank"]), "sigma2": float(out.extras["sigma2"])}
        return torch.from_numpy(one_row(out)).to(gram_matrix.device)

    def _aligned(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ cᵢ gᵢ, c) for the K×P ``jacobian``; its dtype sets the cut-off."""
        coef = self._step_weights(gram(jacobian), losses, jacobian.dtype).to(jacobian.device)
        return weighted_rows(coef, jacobian), coef

    def _step_extras(self) -> dict[str, Any]:
        return dict(self._last)
