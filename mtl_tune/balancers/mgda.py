"""``mgda`` — Multiple-Gradient Descent Algorithm (Sener & Koltun, NeurIPS'18).

Find the min-norm point of the convex hull of the task gradients,
w* = argmin_{w ∈ Δ} ‖Σ_i w_i g_i‖² = argmin_{w ∈ Δ} wᵀ A w with A = G Gᵀ, and descend
along Σ_i w*_i g_i — a direction that decreases every task whose gradient is not zero.

We solve the simplex QP exactly on the K×K Gram matrix
(:func:`mtl_tune.balancers._simplex.min_norm_weights`, batch-first: closed form for K = 2; every
support of at most three tasks at once, kept where it passes the optimality check, for K ≤ 8; an
active-set method otherwise) instead of Sener's Frank–Wolfe loop, whose iteration guard is dead code
in the official copy.
As in the FAMO-family code the weights are multiplied by K (the update is at the scale
of the summed loss) and task heads receive the same weights (docs/methods.md#mgda).
``normalization``: gradients divided by 1 (``none``), ℓ_i (``loss``), ℓ_i‖g_i‖ (``loss+``)
or ‖g_i‖ (``norm``) before solving; the weights are mapped back to raw-gradient weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers._simplex import min_norm_weights
from mtl_tune.balancers.base import GradientBalancer

NORMALIZATIONS = ("none", "loss", "loss+", "norm")


def gradient_normalizers(gram_matrix: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """Per-task divisors n_i (..., K) (gradients are used as g_i / n_i), for Gram matrices (..., K, K)."""
    norms = np.sqrt(np.maximum(np.diagonal(gram_matrix, axis1=-2, axis2=-1), 0.0))
    if normalization == "none":
        return np.ones_like(norms)
    if normalization == "loss":
        n = np.abs(losses)
    elif normalization == "loss+":
        n = np.abs(losses) * norms
    elif normalization == "norm":
        n = norms
    else:
        raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    # a zero divisor (zero gradient or zero loss) leaves that task unnormalised
    return np.where(n > 0, n, 1.0)


def mgda_weights(gram_matrix: Tensor) -> Tensor:
    """Min-norm simplex weights (K,) for a K×K Gram matrix (sum to 1); raises RuntimeError when the
    active-set solver, where it runs (K ≥ 3), does not converge."""
    w, ok = min_norm_weights(host(gram_matrix))
    if not bool(ok.all()):
        raise RuntimeError("min-norm solver did not converge")
    return torch.from_numpy(w).to(gram_matrix.device)


def normalized_min_norm(gram: np.ndarray, losses: np.ndarray, normalization: str, method: str) -> RowStep:
    """Batch-first rule shared by ``mgda`` and ``mgdaub``: raw-gradient coefficients c = w*/n, with w* the
    min-norm simplex point of A_ij/(n_i n_j) and n the ``normalization`` divisors (Σc = 1 for ``none``)."""
    if normalization == "none":  # n = 1: skip the divisions (the toy runs this every step)
        w, ok = min_norm_weights(gram)
    else:
        n = gradient_normalizers(gram, losses, normalization)
        w, ok = min_norm_weights(gram / (n[..., :, None] * n[..., None, :]))
        w = w / n
    return RowStep(w, failed=~ok, reason=f"{method}: min-norm solver did not converge")


class MGDA(GradientBalancer):
    """MGDA (Sener & Koltun, NeurIPS'18): the min-norm point of the convex hull of the
    task gradients.

    Args:
        n_tasks: K, the number of tasks.
        normalization: per-task gradient normalisation before the min-norm solve:
            ``"none"`` (default), ``"loss"``, ``"loss+"`` or ``"norm"``.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "mgda"
    weighted_heads = True
    supports_gram = True

    def __init__(self, n_tasks: int, normalization: str = "none", **kw) -> None:
        super().__init__(n_tasks, **kw)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        out = normalized_min_norm(gram, losses, self.normalization, self.name)
        out.weights = self.n_tasks * out.weights  # ×K: the update at the scale of the summed loss
        return out
