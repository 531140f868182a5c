"""The base of representation-level methods (``mgdaub``, ``amtlub``): balancing the K gradients
w.r.t. the shared representation z instead of the shared parameters.

Sener & Koltun (NeurIPS'18, §3.3) bound ‖Σ w_i ∇_θ ℓ_i‖ ≤ ‖∂z/∂θ‖ · ‖Σ w_i ∇_z ℓ_i‖: a method
may choose its weights from J_z = ∂ℓ/∂z (K×numel(z), K backward passes through the heads
only) and send the encoder the single vector-Jacobian product ∂z/∂θ_sᵀ d_z (one backward
through the trunk instead of K). :class:`RepresentationBalancer` holds that contract (which
tensor z must be, checked with a message that says how to fix the model) and the
back-propagation; a subclass only maps J_z to a z-direction in ``combine_representation``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import weighted_rows
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import Balancer, BalancerError, StepInfo, check_losses, gram, trainable_split

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


def _depends_on(losses: Tensor, z: Tensor) -> bool:
    """Whether ``z`` is in the autograd graph of ``losses`` (a walk of the graph from the losses; the
    engine reads an unused z as zero gradients, which would leave the encoder without an update)."""
    target = z.grad_fn
    stack, seen = [losses.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node is target or (target is None and getattr(node, "variable", None) is z):
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class RepresentationBalancer(Balancer):
    """Base of methods that combine the K gradients w.r.t. the shared representation z.

    Step: J_z = ∂ℓ/∂z (K×numel(z), batched by the Jacobian engine through the heads only);
    ``(d_z, weights) = combine_representation(J_z, losses)``; heads get ∇ Σ_i ℓ_i
    (unweighted); the encoder gets ∂z/∂θ_sᵀ d_z via one ``autograd.backward(z, d_z)``.
    """

    needs_representation = True
    supports_distributed = False  # the representation Jacobian has one column per local sample

    def combine_representation(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(d_z (numel(z),), effective weights (K,))`` for the K×numel(z) ``jacobian``.

        Default: d_z = Σᵢ cᵢ ∇_z ℓᵢ with c from the batch-first rule :meth:`weights_rows` on one row."""
        if not self.has_rows_rule():
            raise NotImplementedError(f"{self.name}: implement combine_representation() or weights_rows()")
        w = torch.from_numpy(one_row(self.weights_rows(host(gram(jacobian)), host(losses)), self.failures))
        return weighted_rows(w, jacobian), w.to(jacobian.device)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """Batch-first rule: coefficients (..., K) on the gradients w.r.t. z, from their float64 Gram
        matrices (..., K, K) and the losses (..., K) (see :mod:`mtl_tune.balancers._rows`)."""
        raise NotImplementedError(f"{self.name} has no batch-first rule")

    @classmethod
    def has_rows_rule(cls) -> bool:
        return cls.weights_rows is not RepresentationBalancer.weights_rows

    def backward(self, losses: Tensor, shared_params: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None,
                 representation: Tensor | Sequence[Tensor] | None = None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name, graph=True)
        self._sync_group()  # raises under an active process group
        z = check_representation(representation, self.name)
        shared, heads = trainable_split(self.name, shared_params, task_params)
        if not shared:
            raise BalancerError(f"{self.name}: no shared parameter requires grad")
        jac = self.engine.jacobian(losses, [z], retain_graph=True)
        if not bool(jac.any(-1).all()) and not _depends_on(losses, z):  # (a zero row alone can be genuine)
            raise BalancerError(f"{self.name}: the losses do not depend on the representation given (a tensor "
                                f"from another forward pass, or not the heads' input?); {_CONTRACT}")
        d_z, weights = self.combine_representation(jac, losses.detach())
        if not bool(torch.isfinite(d_z).all()):
            raise BalancerError(f"{self.name}: produced a non-finite representation gradient")
        if heads:  # heads see the plain sum of task losses (Samsung: decoders on a detached z)
            torch.autograd.backward(losses.sum(), inputs=heads, retain_graph=True)
        torch.autograd.backward(z, grad_tensors=d_z.view_as(z).to(z.dtype), inputs=shared)
        self._clip(shared)
        self.step_count += 1
        return StepInfo(weights=weights.detach(), extras=self._step_extras())

