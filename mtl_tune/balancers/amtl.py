"""``amtl`` — Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
Learning", CVPR'23): the task gradients made orthogonal and of equal norm, then summed.

The update rule, its rank cut-off and scale modes are derived in :mod:`mtl_tune.balancers._aligned`
(shared with ``amtlub``, which aligns the gradients w.r.t. the shared representation instead),
where the batch-first rule ``weights_rows`` (Gram matrices → W p) lives: the balancer's Jacobian
and Gram paths and the toy's generic driver all call it.
Conventions (docs/methods.md#amtl): no ×K, no clipping, heads get their unweighted task gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtl_tune.balancers._aligned import SCALE_MODES, AlignedCombination, aligned_mtl_weights, alignment_matrix
from mtl_tune.balancers.base import GradientBalancer

__all__ = ["SCALE_MODES", "AlignedMTL", "aligned_mtl_weights", "alignment_matrix"]


class AlignedMTL(AlignedCombination, GradientBalancer):
    """Aligned-MTL (Senushkin et al., CVPR'23): the per-task gradients are made orthogonal
    and of equal norm (condition number 1), then summed.

    Args:
        n_tasks: K, the number of tasks.
        scale_mode: which eigenvalue of the K×K Gram matrix sets the scale of the aligned
            gradients: ``"min"`` (default, as the official code), ``"median"`` or ``"rmse"``.
        preferences: K non-negative task preference weights p replacing the ones vector, used as
            given (d = Σᵢ (W p)ᵢ gᵢ, not rescaled); ``None`` = all ones (paper).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "amtl"
    supports_gram = True

    def __init__(self, n_tasks: int, scale_mode: str = "min", preferences: Sequence[float] | None = None,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        self._init_aligned(scale_mode, preferences, n_tasks)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        return self._aligned(jacobian, losses)

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        # the gradients share the losses' dtype (both come from the same float32/64 model)
        return self._step_weights(gram_matrix, losses, losses.dtype)
