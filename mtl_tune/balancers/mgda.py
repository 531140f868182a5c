"""``mgda`` — Multiple-Gradient Descent Algorithm (Sener & Koltun, NeurIPS'18).

Find the min-norm point of the convex hull of the task gradients,
w* = argmin_{w ∈ Δ} ‖Σ_i w_i g_i‖² = argmin_{w ∈ Δ} wᵀ A w with A = G Gᵀ, and descend
along Σ_i w*_i g_i — a direction that decreases every task whose gradient is not zero.

We solve the simplex QP exactly with an active-set method on the K×K Gram matrix
(:func:`mtl_tune.balancers._simplex.min_norm_simplex`; closed form for K = 2) instead of
Sener's Frank–Wolfe loop, whose iteration guard is dead code in the official copy.
As in the FAMO-family code the weights are multiplied by K (the update is at the scale
of the summed loss) and task heads receive the same weights (docs/methods.md#mgda).
``normalization``: gradients divided by 1 (``none``), ℓ_i (``loss``), ℓ_i‖g_i‖ (``loss+``)
or ‖g_i‖ (``norm``) before solving; the weights are mapped back to raw-gradient weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._simplex import min_norm_simplex
from mtl_tune.balancers.base import GradientBalancer

NORMALIZATIONS = ("none", "loss", "loss+", "norm")


def gradient_normalizers(gram_matrix: Tensor, losses: Tensor, normalization: str) -> Tensor:
    """Per-task divisors n_i (gradients are used as g_i / n_i)."""
    norms = gram_matrix.diagonal().clamp_min(0).sqrt()
    if normalization == "none":
        n = torch.ones_like(norms)
    elif normalization == "loss":
        n = losses.to(norms).abs()
    elif normalization == "loss+":
        n = losses.to(norms).abs() * norms
    elif normalization == "norm":
        n = norms
    else:
        raise ValueError(f"mgda: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    # a zero divisor (zero gradient or zero loss) leaves that task unnormalised
    return torch.where(n > 0, n, torch.ones_like(n))


def mgda_weights(gram_matrix: Tensor) -> Tensor:
    """Min-norm simplex weights for a K×K Gram matrix (sum to 1)."""
    w, _ = min_norm_simplex(gram_matrix.detach().cpu().double().numpy())
    return torch.from_numpy(np.ascontiguousarray(w)).to(gram_matrix.device)


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

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        a = gram_matrix
        n = gradient_normalizers(a, losses, self.normalization)
        w = mgda_weights(a / torch.outer(n, n))
        return self.n_tasks * w / n  # weights on the raw gradients, ×K
