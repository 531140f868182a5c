"""``ls`` — linear scalarization: L = Σ_i w_i ℓ_i with fixed weights (default all ones).

The baseline every paper compares against (docs/methods.md#ls). With ``task_weights`` on the
simplex (scaled to sum K) it is also the canonical Pareto-front sweep: every point of a
convex front is the optimum of some weighting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import LossBalancer


def weighted_sum(losses: Tensor, weights: Tensor) -> Tensor:
    """Σ_i w_i ℓ_i."""
    return (losses * weights.to(losses)).sum()


class LinearScalarization(LossBalancer):
    """Linear scalarisation: backpropagate Σ_i w_i ℓ_i.

    Args:
        n_tasks: K, the number of tasks.
        task_weights: K finite non-negative weights (default all ones, the plain sum).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "ls"
    checks_finite_losses = False  # no host read in its step: a NaN loss shows in .grad (sum().backward())

    def __init__(self, n_tasks: int, task_weights: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        w = torch.ones(n_tasks) if task_weights is None else torch.as_tensor(list(task_weights), dtype=torch.float32)
        if w.shape != (n_tasks,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"ls: task_weights must be {n_tasks} finite non-negative numbers, got {task_weights!r}")
        self.register_buffer("task_weights", w)

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = self.task_weights.to(losses.device)
        return weighted_sum(losses, w), w

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """The fixed ``task_weights`` on every row (float32 as stored, so 0.1 means the same number)."""
        w = host(self.task_weights)
        return RowStep(w if losses.ndim == 1 else np.repeat(w[None], losses.size // len(w), 0).reshape(losses.shape))
