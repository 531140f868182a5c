"""Per-task gradients: the K×P Jacobian of the task losses w.r.t. the shared parameters.

Two ways to compute it, which must agree (tested):

* ``"batched"``: one call of ``torch.autograd.grad`` with ``is_grads_batched=True`` and the
  K×K identity as ``grad_outputs`` — autograd vmaps the backward pass over the K rows,
  so the trunk's backward graph is walked once with a batch of K cotangents.
* ``"loop"``: K calls of ``torch.autograd.grad(retain_graph=True)`` — always works.

``"auto"`` (default) tries the batched path and falls back to the loop when an operator
has no batching rule; the fallback is remembered and announced once with a warning.
Parameters that a task does not reach get zeros in its row (not ``None``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["auto", "batched", "loop"]


class JacobianEngine:
    """Computes per-task gradients of shared parameters; see the module docstring."""

    def __init__(self, mode: Mode = "auto") -> None:
        if mode not in ("auto", "batched", "loop"):
            raise ValueError(f"jacobian mode must be 'auto', 'batched' or 'loop', got {mode!r}")
        self.mode: Mode = mode
        self._batched_failed = False

    @property
    def effective_mode(self) -> str:
        if self.mode == "auto":
            return "loop" if self._batched_failed else "batched"
        return self.mode

    def jacobian(self, losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
        """Return the (K, P) matrix whose row i is the flattened ∇_params ℓ_i."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("jacobian: no shared parameter requires grad")
        if self.effective_mode == "batched":
            try:
                return jacobian_batched(losses, params, retain_graph=retain_graph)
            except RuntimeError as err:  # an op without a vmap rule: fall back, but say so
                if self.mode == "batched":
                    raise
                self._batched_failed = True
                warnings.warn(f"batched Jacobian unavailable for this model ({err!s:.200}); "
                              "using the per-task loop from now on", RuntimeWarning, stacklevel=2)
        return jacobian_loop(losses, params, retain_graph=retain_graph)


def _flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor], lead: tuple[int, ...]) -> Tensor:
    parts = [
        (g if g is not None else torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)).reshape(*lead, -1)
        for g, p in zip(grads, params)
    ]
    return torch.cat(parts, dim=-1)


def jacobian_loop(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    rows = []
    k = losses.shape[0]
    for i in range(k):
        keep = retain_graph or i < k - 1
        grads = torch.autograd.grad(losses[i], params, retain_graph=keep, allow_unused=True)
        rows.append(_flatten(grads, params, ()))
    return torch.stack(rows)


def jacobian_batched(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    k = losses.shape[0]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                retain_graph=retain_graph, allow_unused=True)
    return _flatten(grads, params, (k,))
