"""``pcgrad`` — Projecting Conflicting Gradients (Yu et al., NeurIPS'20).

For each task i: g_i^PC ← g_i; for every other task j in a random order, if
⟨g_i^PC, g_j⟩ < 0 remove the conflicting component, g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩/‖g_j‖² g_j.
The update is Σ_i g_i^PC (``reduction="sum"``, the official default) or the mean.

Every g_i^PC stays a linear combination of the original gradients, so we run the
projections on coefficient vectors with the K×K Gram matrix (O(K³) instead of O(K²P))
and form the direction once: d = cᵀ G. The random order comes from the balancer's own
seeded generator (reproducible, saved in checkpoints). Task heads get the unweighted
sum of task gradients (docs/methods.md#pcgrad). A zero gradient g_j is never projected on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers.base import GradientBalancer


def pcgrad_coefficients(gram_matrix: Tensor, orders: list[list[int]], reduction: str = "sum") -> Tensor:
    """Coefficients c (K,) with d = Σ_j c_j g_j; ``orders[i]`` is the order for task i."""
    a = gram_matrix.double()
    k = a.shape[0]
    total = torch.zeros(k, dtype=a.dtype, device=a.device)
    for i in range(k):
        ci = torch.zeros(k, dtype=a.dtype, device=a.device)
        ci[i] = 1.0
        for j in orders[i]:
            if j == i or a[j, j] <= 0:
                continue
            dot = ci @ a[:, j]  # ⟨g_i^PC, g_j⟩
            if dot < 0:
                ci[j] -= dot / a[j, j]
        total += ci
    return total / k if reduction == "mean" else total


class PCGrad(GradientBalancer):
    """PCGrad (Yu et al., NeurIPS'20): project each task gradient off the others it
    conflicts with, in random order.

    Args:
        n_tasks: K, the number of tasks.
        reduction: ``"sum"`` (default) or ``"mean"`` of the projected gradients.
        seed: seed of the random task orders (int, default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "pcgrad"
    supports_gram = True  # every projected gradient is a combination of the originals (module docstring)

    def __init__(self, n_tasks: int, reduction: str = "sum", seed: int = 0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(int(seed))

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        orders = [torch.randperm(self.n_tasks, generator=self.generator).tolist() for _ in range(self.n_tasks)]
        return pcgrad_coefficients(gram_matrix, orders, self.reduction)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
