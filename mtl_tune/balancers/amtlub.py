"""``amtlub`` — Aligned-MTL-UB (Senushkin et al., CVPR'23, §4.3 "upper bound").

Aligned-MTL (:mod:`mtl_tune.balancers.amtl`) applied to the K gradients w.r.t. the shared
representation z instead of the shared parameters: with J_z = ∂ℓ/∂z (K×numel(z)),
M_z = J_z J_zᵀ = V Λ Vᵀ and W = σ V_r Λ_r^{-1/2} V_rᵀ,

    d_z = J_zᵀ (W p),   then one backward  ∂z/∂θ_sᵀ d_z  through the encoder.

As for MGDA-UB the trick costs K backward passes through the (small) heads plus one
through the encoder; memory K × numel(z). Conventions follow SamsungLabs/MTL
``AlignedMTLUBBalancer`` (docs/methods.md#amtlub): heads get their unweighted task gradients
(the decoders run on a detached z there), no ×K, no clipping; ``scale_decoder_grad`` of the
official code (off by default, and crashing when on) is not offered. See
:class:`mtl_tune.balancers._representation.RepresentationBalancer` for the representation contract.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mtl_tune.balancers._aligned import AlignedCombination
from mtl_tune.balancers._representation import RepresentationBalancer


class AlignedMTLUB(AlignedCombination, RepresentationBalancer):
    """Aligned-MTL-UB: Aligned-MTL on the gradients w.r.t. the shared representation z
    (one backward through the encoder; needs ``representation``).

    Args:
        n_tasks: K, the number of tasks.
        scale_mode: as in :class:`~mtl_tune.balancers.amtl.AlignedMTL`.
        preferences: as in :class:`~mtl_tune.balancers.amtl.AlignedMTL`.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "amtlub"

    def __init__(self, n_tasks: int, scale_mode: str = "min", preferences: Sequence[float] | None = None,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        self._init_aligned(scale_mode, preferences, n_tasks)

    def combine_representation(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        return self._aligned(jacobian, losses)
