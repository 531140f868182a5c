"""``mgdaub`` — MGDA-UB: MGDA on representation gradients (Sener & Koltun, NeurIPS'18, §3.3).

Sener & Koltun bound the min-norm objective over shared parameters by one over the shared
representation z = f(x; θ_s): ‖Σ w_i ∇_θ ℓ_i‖ ≤ ‖∂z/∂θ‖ · ‖Σ w_i ∇_z ℓ_i‖, and minimise the
cheap upper bound instead,

    w* = argmin_{w ∈ Δ} ‖Σ_i w_i ∇_z ℓ_i‖² = argmin_{w ∈ Δ} wᵀ A_z w,   A_z = J_z J_zᵀ,

where J_z is the K×numel(z) Jacobian of the losses w.r.t. z (batch and spatial positions
included, so A_z scales with batch size — harmless, the simplex solution is scale-free).
The encoder receives the single vector-Jacobian product ∂z/∂θ_sᵀ (Σ_i w*_i ∇_z ℓ_i): one
backward through the trunk instead of K.

Conventions (docs/methods.md#mgdaub; the only official code is SamsungLabs/MTL):
* heads get their **unweighted** task gradients ∇_{θ_i} ℓ_i (Samsung runs the decoders on a
  detached copy of z, so only the encoder sees the weights);
* the weights sum to 1 — **no ×K** (Samsung convention), unlike our ``mgda``;
* ``normalization`` as in ``mgda`` (none / loss / loss+ / norm), applied to the z-gradients.

:class:`RepresentationBalancer` (also used by ``amtlub``) holds the contract and the
back-propagation; subclasses only map the representation Jacobian to a z-direction.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers.base import (Balancer, BalancerError, StepInfo, _as_param_list, check_losses,
                                     gram)
from mtl_tune.balancers.mgda import NORMALIZATIONS, gradient_normalizers, mgda_weights

_CONTRACT = ("the model's forward must return ForwardOutput(losses, representation=z) where z is ONE "
             "tensor (non-leaf, requires grad) computed from the shared parameters and consumed by every "
             "task head, and every head may reach the shared parameters only through z")


def check_representation(representation: Tensor | Sequence[Tensor] | None, method: str) -> Tensor:
    """Return the shared representation z or raise :class:`BalancerError` explaining the contract."""
    if representation is None:
        raise BalancerError(f"{method}: needs the shared representation but got None; {_CONTRACT}")
    if not isinstance(representation, Tensor):
        n = len(representation) if isinstance(representation, Sequence) else "?"
        raise BalancerError(f"{method}: got a sequence of {n} per-task representations; representation-level "
                            f"methods need the single shared tensor instead: {_CONTRACT}")
    if not representation.requires_grad:
        raise BalancerError(f"{method}: the representation does not require grad (detached?); {_CONTRACT}")
    return representation


class RepresentationBalancer(Balancer):
    """Base of methods that combine the K gradients w.r.t. the shared representation z.

    Step: J_z = ∂ℓ/∂z (K×numel(z), batched by the Jacobian engine through the heads only);
    ``(d_z, weights) = combine_representation(J_z, losses)``; heads get ∇ Σ_i ℓ_i
    (unweighted); the encoder gets ∂z/∂θ_sᵀ d_z via one ``autograd.backward(z, d_z)``.
    """

    needs_representation = True
    supports_distributed = False  # the representation Jacobian has one column per local sample

    @abc.abstractmethod
    def combine_representation(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(d_z (numel(z),), effective weights (K,))`` for the K×numel(z) ``jacobian``."""

    def backward(self, losses: Tensor, shared_params: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None,
                 representation: Tensor | Sequence[Tensor] | None = None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name)
        self._sync_group()  # raises under an active process group
        z = check_representation(representation, self.name)
        shared = [p for p in _as_param_list(shared_params) if p.requires_grad]
        heads = [p for p in _as_param_list(task_params) if p.requires_grad]
        if not shared:
            raise BalancerError(f"{self.name}: no shared parameter requires grad")
        jac = self.engine.jacobian(losses, [z], retain_graph=True)
        d_z, weights = self.combine_representation(jac, losses.detach())
        if not bool(torch.isfinite(d_z).all()):
            raise BalancerError(f"{self.name}: produced a non-finite representation gradient")
        if heads:  # heads see the plain sum of task losses (Samsung: decoders on a detached z)
            torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
        torch.autograd.backward(z, grad_tensors=d_z.view_as(z).to(z.dtype), inputs=shared)
        self._clip(shared)
        self.step_count += 1
        return StepInfo(weights=weights.detach(), extras=self._step_extras())

    def _step_extras(self) -> dict[str, Any]:
        return {}


def mgdaub_coefficients(gram_matrix: Tensor, losses: Tensor, normalization: str = "none") -> Tensor:
    """Raw-gradient coefficients c (K,) with d_z = Σ_i c_i ∇_z ℓ_i.

    c_i = w*_i / n_i where w* is the min-norm simplex point of the normalised Gram matrix
    A_ij / (n_i n_j) and n the ``normalization`` divisors (all ones for ``"none"``, so Σc = 1).
    """
    n = gradient_normalizers(gram_matrix, losses, normalization)
    try:
        w = mgda_weights(gram_matrix / torch.outer(n, n))
    except RuntimeError as err:  # the active-set solver did not converge: report, do not guess
        raise BalancerError(f"mgdaub: min-norm solver failed: {err}") from err
    return w / n


class MGDAUB(RepresentationBalancer):
    """MGDA-UB (Sener & Koltun, NeurIPS'18): MGDA's weights from the gradients w.r.t. the
    shared representation z (needs ``representation``).

    Args:
        n_tasks: K, the number of tasks.
        normalization: as in :class:`~mtl_tune.balancers.mgda.MGDA`.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "mgdaub"

    def __init__(self, n_tasks: int, normalization: str = "none", **kw) -> None:
        super().__init__(n_tasks, **kw)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgdaub: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def combine_representation(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        coef = mgdaub_coefficients(gram(jacobian), losses, self.normalization)
        return coef.to(jacobian.dtype) @ jacobian, coef
