"""The alignment shared by ``amtl`` and ``amtlub`` (Aligned-MTL, Senushkin et al., "Independent
Component Alignment for Multi-Task Learning", CVPR'23): the math and :class:`AlignedCombination`.

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
official code is gone from PyTorch; ``torch.linalg.eigh`` computes the same decomposition.
All-zero gradients (λ_max = 0) have rank 0: d = 0, weights 0 (the exact limit Ĝ = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers.base import gram

SCALE_MODES = ("min", "median", "rmse")
#: relative eigenvalue tolerance of the official code (``torch.finfo().eps`` of float32).
REL_TOL = float(torch.finfo(torch.float32).eps)


def alignment_matrix(gram_matrix: Tensor, scale_mode: str = "min", rel_tol: float = REL_TOL
                     ) -> tuple[Tensor, int, float]:
    """W = σ V_r Λ_r^{-1/2} V_rᵀ for the Gram matrix M = V Λ Vᵀ; returns ``(W, rank r, σ²)``.

    Eigenvalues at or below λ_max · K · ``rel_tol`` are treated as zero (rank truncation).
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"amtl: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    m = gram_matrix.detach().double().cpu()
    m = 0.5 * (m + m.T)  # exact symmetry: eigh only reads one triangle
    k = m.shape[0]
    lam, vec = torch.linalg.eigh(m)  # ascending
    lam_max = float(lam[-1])
    if not lam_max > 0.0:  # every gradient is zero
        return torch.zeros(k, k, dtype=torch.float64), 0, 0.0
    keep = lam > lam_max * k * rel_tol
    lam_r = lam[keep].flip(0)  # descending, as the official code
    vec_r = vec[:, keep].flip(1)
    if scale_mode == "min":
        sigma2 = lam_r[-1]
    elif scale_mode == "median":
        sigma2 = torch.median(lam_r)
    else:
        sigma2 = lam_r.mean()
    w = sigma2.sqrt() * (vec_r / lam_r.sqrt()) @ vec_r.T
    return w, int(keep.sum()), float(sigma2)


def aligned_mtl_weights(gram_matrix: Tensor, scale_mode: str = "min", preferences: Tensor | None = None,
                        rel_tol: float = REL_TOL) -> tuple[Tensor, int, float]:
    """Effective raw-gradient weights W p (K,), the rank and σ²; d = Σ_i (W p)_i g_i."""
    w, rank, sigma2 = alignment_matrix(gram_matrix, scale_mode, rel_tol)
    p = torch.ones(w.shape[0], dtype=w.dtype) if preferences is None else preferences.double().cpu()
    return w @ p, rank, sigma2


def check_preferences(preferences: Sequence[float] | None, n_tasks: int, method: str) -> Tensor | None:
    """Validate optional task preference weights (non-negative, finite, one per task)."""
    if preferences is None:
        return None
    p = torch.as_tensor(list(preferences), dtype=torch.float64)
    if p.shape != (n_tasks,) or not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"{method}: preferences must be {n_tasks} finite non-negative numbers, "
                         f"got {preferences!r}")
    return p


class AlignedCombination:
    """What Aligned-MTL and Aligned-MTL-UB share: validated settings and the alignment of a
    Jacobian (of the shared parameters, or of the shared representation for ``amtlub``)."""

    def _init_aligned(self, scale_mode: str, preferences: Sequence[float] | None, n_tasks: int) -> None:
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"{self.name}: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.preferences = check_preferences(preferences, n_tasks, self.name)
        self._last: dict[str, Any] = {}

    def _aligned_weights(self, gram_matrix: Tensor, grad_dtype: torch.dtype) -> Tensor:
        """Coefficients c with the aligned direction Σ cᵢ gᵢ; ``grad_dtype`` sets the rank cut-off."""
        coef, rank, sigma2 = aligned_mtl_weights(gram_matrix, self.scale_mode, self.preferences,
                                                 float(torch.finfo(grad_dtype).eps))
        self._last = {"rank": rank, "sigma2": sigma2}
        return coef.to(gram_matrix.device)

    def _aligned(self, jacobian: Tensor) -> tuple[Tensor, Tensor]:
        coef = self._aligned_weights(gram(jacobian), jacobian.dtype).to(jacobian.device)
        return coef.to(jacobian.dtype) @ jacobian, coef

    def _step_extras(self) -> dict[str, Any]:
        return dict(self._last)
