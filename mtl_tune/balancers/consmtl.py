"""``consmtl`` — consistency-aware MTL (Qin, Wang & Yan, CVPR'25; arXiv 2503.06193).

A bi-level update (docs/methods.md#consmtl):

* **Upper level (shared parameters)** — FairGrad with α = 2: x > 0 with (A x)_i = x_i^{−1/2},
  shared grad ← K·G x, clipped to ``max_norm`` = 1.0 (official effective behaviour).
* **Lower level (task heads)** — with z_i the input of head i and δ_i = ∂ℓ_i/∂z_i, the joint
  representation direction Δ = Σ_j x_j δ_j (detached) and the consistency loss

      L_i = −λ ⟨δ_i, Δ⟩,

  head i receives g1 + clip(g2) with g1 = ∂ℓ_i/∂θ_i and g2 = ∂L_i/∂θ_i (double backprop
  through the head: δ_i depends on θ_i), g2 rescaled to norm ≤ c_i‖g1‖ (``head_clip``). The
  extra gradient turns each head so that its representation gradient agrees with the joint one.

**Pareto-stationary steps: no consistency term.** When the task gradients on the shared
parameters are Pareto-stationary (0 in their convex hull), FairGrad's system has no solution and
the project's solver reports the step as ``stationary`` with x = 0 and d = 0 (convergence, not a
failure: :mod:`mtl_tune.balancers._fairness`). Then the joint direction Δ = Σ_j x_j δ_j is 0, so
L_i = 0 and g2 = 0: every head gets its plain task gradient g1 = ∂ℓ_i/∂θ_i and nothing pulls
the heads together on that step (the double backward is skipped). The official code has no such
test: its ``least_squares`` returns some x of an unsolvable system, and the heads get a
consistency term toward that Δ.

``head_clip``: one ratio for every task (official 0.1) or K ratios — the official Cityscapes
run edits the code to [0.05, 0] (seg 0.05, depth 0: no extra gradient for depth). Clipping is
exact, g2·min(1, c‖g1‖/‖g2‖), where torch's ``clip_grad_norm_`` in the official code divides by
‖g2‖ + 1e-6 (a relative difference below 1e-6·/‖g2‖).

Contract (checked, :class:`BalancerError` otherwise): ``task_params`` is one list of head
parameters per task; ``representation`` is either one tensor that every head reads (QM9,
CelebA: the official code must be edited for that case, docs/methods.md#consmtl) or a list of K
per-task head inputs (MTAN's attention-decoder outputs), all of the same shape (Δ sums them),
each in the autograd graph of its task's loss. λ = 0 (or c_i = 0) skips the double backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers._common import weighted_rows
from mtl_tune.balancers._fairness import FairBalancer
from mtl_tune.balancers.base import (BalancerError, StepInfo, _as_param_list, accumulate_grad, check_losses,
                                     gram, trainable_split)


def representation_gradient(loss: Tensor, rep: Tensor, task: int) -> Tensor:
    """δ = ∂ℓ/∂z with ``create_graph=True`` (so that δ stays differentiable w.r.t. the head)."""
    if not rep.requires_grad:
        raise BalancerError(f"consmtl: representation of task {task} does not require grad "
                            "(it must be the head input inside the autograd graph, not a detached copy)")
    (delta,) = torch.autograd.grad(loss, rep, create_graph=True, retain_graph=True, allow_unused=True)
    if delta is None:
        raise BalancerError(f"consmtl: loss {task} does not depend on its representation")
    return delta


def clip_to_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Rescale a list of tensors to global norm ≤ ``max_norm`` (unchanged if already within)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else torch.zeros(())
    scale = 1.0 if float(norm) <= max_norm else max_norm / float(norm)
    return [g * scale for g in grads]


def consistency_head_gradient(loss: Tensor, delta: Tensor | None, joint: Tensor | None, params: Sequence[Tensor],
                              lam: float, clip_ratio: float) -> tuple[list[Tensor], list[Tensor]]:
    """(g1, clipped g2) for one head: g1 = ∇_θ ℓ, g2 = ∇_θ(−λ⟨δ, Δ⟩) with ‖g2‖ ≤ c‖g1‖.

    ``delta`` must carry its graph (``create_graph=True``); ``joint`` is the detached Δ. With
    λ = 0, c = 0 or no δ the second term is zero and no double backward is run.
    """
    g1 = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    g1 = [torch.zeros_like(p) if g is None else g for g, p in zip(g1, params)]
    if lam == 0 or clip_ratio == 0 or delta is None or joint is None:
        return g1, [torch.zeros_like(p) for p in params]
    extra = -lam * (delta * joint).sum()
    g2 = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
    g2 = [torch.zeros_like(p) if g is None else g for g, p in zip(g2, params)]
    g1_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g1)))
    return g1, clip_to_norm(g2, clip_ratio * g1_norm)


def _task_groups(task_params: Any, k: int) -> list[list[Tensor]]:
    """One list of head parameters per task, from any iterable of K groups — each a tensor, a list,
    or an iterable such as ``head.parameters()`` (a generator is read once, here)."""
    if task_params is None or isinstance(task_params, Tensor) or not isinstance(task_params, Iterable):
        raise BalancerError(f"consmtl: task_params must be one list of head parameters per task ({k} lists)")
    # (a flat list of exactly K tensors is read as one parameter tensor per head)
    given = [g if isinstance(g, (Tensor, str, bytes)) else list(g) if isinstance(g, Iterable) else g
             for g in task_params]
    if len(given) != k or any(not isinstance(g, (Tensor, list)) for g in given):
        raise BalancerError(f"consmtl: task_params must be one list of head parameters per task ({k} lists), "
                            f"got {len(given)} groups")
    groups = [_as_param_list(g) for g in given]
    groups = [[p for p in g if p.requires_grad] for g in groups]
    if any(not g for g in groups):
        raise BalancerError("consmtl: every task needs at least one trainable head parameter")
    return groups


def _representations(representation: Any, k: int) -> list[Tensor]:
    if isinstance(representation, Tensor):
        return [representation] * k
    if isinstance(representation, Sequence) and len(representation) == k and \
            all(isinstance(r, Tensor) for r in representation):
        shapes = {tuple(r.shape) for r in representation}
        if len(shapes) != 1:
            raise BalancerError(f"consmtl: per-task representations must share one shape (Δ sums them), got {shapes}")
        return list(representation)
    raise BalancerError(f"consmtl: representation must be one tensor read by every head or a list of {k} "
                        f"per-task head inputs, got {type(representation).__name__}")


class ConsMTL(FairBalancer):
    """ConsMTL (Qin, Wang & Yan, CVPR'25): FairGrad(α = 2) on the shared parameters plus a
    head consistency gradient on the task heads.

    Args:
        n_tasks: K, the number of tasks.
        lambda_: weight λ of the head consistency loss (float ≥ 0, default 1).
        head_clip: the extra head gradient is clipped to ``head_clip``·‖∇ℓ_i‖ (one float for
            every task, or K floats; default 0.1).
        solver: ``"newton"`` (default) or ``"least_squares"`` (scipy) for the α-fair system.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "consmtl"

    @classmethod
    def has_rows_rule(cls) -> bool:
        # its update adds per-task representation terms to the fair direction (backward below):
        # the inherited FairGrad rule is only a part of it
        return False
    needs_representation = True
    # its heads' extra consistency gradients are written per rank from rank-local representations
    supports_distributed = False

    def __init__(self, n_tasks: int, lambda_: float = 1.0, head_clip: float | Sequence[float] = 0.1,
                 solver: str = "newton", **kw: Any) -> None:
        super().__init__(n_tasks, alpha=2.0, solver=solver, **kw)
        if not (isinstance(lambda_, (int, float)) and math.isfinite(lambda_) and lambda_ >= 0):
            raise ValueError(f"consmtl: lambda_ must be a finite number >= 0, got {lambda_!r}")
        clips = [head_clip] * n_tasks if isinstance(head_clip, (int, float)) else list(head_clip)
        if len(clips) != n_tasks or any(not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0)
                                        for c in clips):
            raise ValueError(f"consmtl: head_clip must be one number >= 0 or {n_tasks} of them, got {head_clip!r}")
        self.lambda_, self.head_clip = float(lambda_), [float(c) for c in clips]

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        k = self.n_tasks
        check_losses(losses, k, self.name, graph=True)
        self._sync_group()  # refuses an active process group (supports_distributed)
        heads = _task_groups(task_params, k)
        shared, _ = trainable_split(self.name, shared_params, heads)
        needs_extra = self.lambda_ > 0 and any(c > 0 for c in self.head_clip)
        deltas: list[Tensor] = []
        if needs_extra:
            reps = _representations(representation, k)
            deltas = [representation_gradient(losses[i], reps[i], i) for i in range(k)]
        if self.path_for(losses, shared) == "gram":  # d = K·Σ xᵢ gᵢ by one backward (heads handled below)
            a = self.engine.gram(losses, shared)
            if not bool(torch.isfinite(a).all()):
                raise BalancerError(f"{self.name}: non-finite per-task gradient")
            x = self.fair_weights(a)
            coef = k * x
            if not bool(torch.isfinite(coef).all()):
                raise BalancerError(f"{self.name}: produced a non-finite update direction")
            (losses * coef.detach().to(losses)).sum().backward(inputs=shared, retain_graph=True)
        else:
            jac = self.engine.jacobian(losses, shared, retain_graph=True, reuse=True)
            x = self.fair_weights(gram(jac))
            coef = k * x
            direction = weighted_rows(coef, jac)
            if not bool(torch.isfinite(direction).all()):
                raise BalancerError(f"{self.name}: produced a non-finite update direction")
            accumulate_grad(shared, direction)
        # Pareto-stationary step: x = 0, so Δ = 0 and the consistency term vanishes (module docstring)
        stationary = not bool(torch.any(x != 0))
        joint = sum(float(x[j]) * deltas[j].detach() for j in range(k)) if needs_extra and not stationary else None
        extra_norms = []
        for i in range(k):
            g1, g2 = consistency_head_gradient(losses[i], deltas[i] if needs_extra else None, joint, heads[i],
                                               self.lambda_, self.head_clip[i])
            extra_norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in g2)))
            for p, a, b in zip(heads[i], g1, g2):
                g = (a + b).to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self._clip(shared)
        self.step_count += 1
        return StepInfo(weights=coef.detach(),
                        extras={**self._step_extras(), "head_extra_norm": torch.stack(extra_norms).detach()})
