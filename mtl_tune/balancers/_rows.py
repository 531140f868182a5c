"""Batch-first method rules: the one copy of a method's per-step math.

A *rule* is what a method does with one step's numbers, written for any number of rows at once:

* a gradient method (:class:`~mtl_tune.balancers.base.GradientBalancer`, and the
  representation-level ones) implements ``weights_rows(gram, losses)``: the float64 Gram
  matrices A = J Jᵀ (..., K, K) and the losses (..., K) give the coefficients c (..., K) of
  the update d = Σᵢ cᵢ gᵢ;
* a loss method (:class:`~mtl_tune.balancers.base.LossBalancer`) implements
  ``weights_rows(losses)``: the losses (..., K) give ∂f/∂ℓ (..., K), the weights of the
  objective's gradient;
* a gradient method whose update is not a combination of the task gradients (GradDrop's
  per-coordinate masks) implements ``direction_rows(jacobian, losses)`` on torch Jacobians
  (..., K, P) instead, and returns the direction (..., P) too — in torch, on the Jacobian's device
  (a K×P Jacobian must not cross to the host every step).

Rules compute in float64 NumPy on the host. Why not torch: the numbers are K or K×K per row,
where a torch call costs 2–8 µs of dispatch against NumPy's ~1 µs (a min-norm solve on 5 rows:
74 µs in torch, ~15 µs in NumPy), and the balancers' solvers (SLSQP, active sets, Newton) run
on the host anyway; the K×K Gram matrix or the K losses cross to the host once per step.

The leading shape ``...`` is empty when the balancer steps a model (its ``backward`` calls the
rule on the step's (K,) losses and (K, K) Gram matrix) and ``(B,)`` when the toy runs B rows of
one method variant in lockstep (its generic driver, ``toy/kernels/_rows.py``). Both run the
same function, so a method's math exists once. A rule reads the balancer's hyperparameters
and, for a stateless method, nothing else.

A method with a random stream (``rlw``'s weights, ``pcgrad``'s and ``gradvac``'s task orders, ``graddrop``'s
thresholds) draws row r's numbers from row r's own generator: the balancer's own for one row, and in
lockstep the generators :meth:`~mtl_tune.balancers.base.Balancer.start_rows` adopted from the rows'
balancers, a block of steps per call (:mod:`mtl_tune.balancers._random_rows`), so every row draws
exactly what its balancer would have drawn alone. What is computed from the draws is batched.

A rule returns a :class:`RowStep`: the coefficients, and per row whether the method cannot
step at all (``failed``: the balancer raises :class:`BalancerError` with ``reason``) or its
solver failed but produced usable coefficients (``solver_failed``: counted, warned, and fatal
after 20 in a row, as :class:`~mtl_tune.balancers.base.SolverFailureCounter`), and optionally
per-row diagnostics for the balancer's step extras.

A method with learnable parameters θ of its own, trained by the *training* optimizer (they are in
its ``param_groups``: UW's log-variances), also returns ∂f/∂θ (``param_grads``). Its balancer
makes autograd deliver exactly these to θ (e.g. backpropagating Σᵢ wᵢℓᵢ + Σⱼ gⱼθⱼ with w and g
detached: the linearisation of f at this step has f's gradients), and the toy's generic kernel
steps θ with the optimizer the training loop would use, after taking the step's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import BalancerError, SolverFailureCounter


@dataclass
class RowStep:
    """One step of a batch-first rule for rows of leading shape S.

    Attributes:
        weights: coefficients (S..., K) of the update (NaN where ``failed``).
        failed: bool (S...) rows the method cannot step, or None when none can fail.
        reason: why a failed row failed: ``reason(index)`` with the row's index into S (``()``
            when S is empty), or one string for every row.
        solver_failed: bool (S...) rows whose solver failed this step, or None.
        solver_message: the solver's message for those rows.
        direction: the update (..., P) of a ``direction_rows`` rule (its ``weights`` are then the
            reported effective weights; both torch tensors), else None.
        extras: per-row diagnostics (name → array of shape S...) the balancer reports in its step's
            extras (``amtl``'s rank and σ²); None when the method reports none.
        param_grads: ∂f/∂θ (S..., P) of the balancer's own learnable parameters θ (those of its
            ``param_groups``, trained by the training optimizer), every parameter's per-row
            entries flattened and concatenated in ``parameters()`` order; None for a method
            without such parameters.
    """

    weights: np.ndarray
    failed: np.ndarray | None = None
    reason: Callable[[tuple[int, ...]], str] | str = ""
    solver_failed: np.ndarray | None = None
    solver_message: str = ""
    direction: Any = None
    extras: dict[str, np.ndarray] | None = None
    param_grads: np.ndarray | None = None

    def reason_of(self, index: tuple[int, ...]) -> str:
        """The failure message of the row at ``index``."""
        return self.reason if isinstance(self.reason, str) else self.reason(index)


def one_row(out: RowStep, failures: SolverFailureCounter | None = None) -> np.ndarray:
    """The weights of a rule called with no leading dimension; raises :class:`BalancerError` if the
    row failed, and counts a solver failure into ``failures`` (which warns, and raises after its
    limit of failures in a row)."""
    if out.failed is not None and bool(out.failed):
        raise BalancerError(out.reason_of(()))
    if failures is not None:
        if out.solver_failed is not None and bool(out.solver_failed):
            failures.failure(out.solver_message)
        else:
            failures.success()
    return out.weights


def gram_rows(jacobian: np.ndarray) -> np.ndarray:
    """A = J Jᵀ (..., K, K) in float64 for Jacobians (..., K, P) of small P (the toy's).

    Summed products, not a matmul: for the toy's 2 × 2 Jacobians this is what torch's float64
    ``J @ Jᵀ`` (the balancer's Gram matrix) computes, bit for bit on 5 000 random cases, while
    NumPy's matmul differs in the last bit on ~half of them — a difference that dynamics near
    the front amplify into visibly different trajectories."""
    j = np.asarray(jacobian, dtype=np.float64)
    return (j[..., :, None, :] * j[..., None, :, :]).sum(-1)


def host(x: Tensor) -> np.ndarray:
    """``x`` detached, as a float64 NumPy array on the host (what rules take)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):  # NumPy's exact widening: ~1 µs, a torch cast ~4
        return x.detach().numpy().astype(np.float64)
    return x.detach().to(device="cpu", dtype=torch.float64).numpy()


class PerVersion:
    """What ``derive`` makes of a tensor, kept until the tensor changes: made again when another
    object is passed (``.to()`` and ``load_state_dict`` with ``assign=True`` replace a buffer) or the
    same one changed in place (any in-place op, ``load_state_dict``'s copy included, bumps its
    version). For the per-step host copies of a balancer's buffers (a fresh one costs ~4 µs).
    ``value`` is the last result; it is a new object exactly when it was made again."""

    __slots__ = ("_derive", "_tensor", "_version", "value")

    def __init__(self, derive: Callable[[Tensor], Any]) -> None:
        self._derive, self._tensor, self._version, self.value = derive, None, -1, None

    def __call__(self, tensor: Tensor) -> Any:
        if tensor is not self._tensor or tensor._version != self._version:
            self.value = self._derive(tensor)
            self._tensor, self._version = tensor, tensor._version
        return self.value
