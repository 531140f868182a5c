"""``autol`` — Auto-λ (Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022; arXiv 2202.03091; official code
https://github.com/lorenmt/auto-lambda/tree/0fc8431936201889e4b8dd487625b772de5c7ce0, files
``auto_lambda.py`` and ``trainer_dense.py``).

Task weights λ (K,) are learned by a one-step look-ahead meta objective. The training step is plain
weighting, L = Σᵢ λᵢ ℓᵢ(θ) on the training batch. Before it, on a second training batch (the official
trainers draw it from a second, independently shuffled loader over the *training* set; the trainer
gives it through :meth:`meta_step`, ``needs_meta_batch``):

    θ′ = θ − α (∇_θ Σᵢ λᵢ ℓᵢ(θ) + wd·θ + μ·m)       a virtual SGD step on the training batch
    d  = ∇_θ Σ_{i ∈ primary} ℓᵢᵐᵉᵗᵃ(θ′)                  the meta batch's loss at θ′ (all tasks primary)
    ∂L_meta/∂λᵢ = −α ∇_θ ℓᵢ(θ)ᵀ d
               ≈ −α (ℓᵢ(θ + ε d) − ℓᵢ(θ − ε d)) / (2ε),   ε = 0.01 / ‖d‖
    λ ← Adam(λ, grad = ∂L_meta/∂λ)                       (lr ``meta_lr``)

over all model parameters θ (shared and heads); α and wd are the learning rate and weight decay of
the model optimizer's group that holds the shared parameters, μ·m its SGD momentum term (the
momentum buffer times the momentum, 0 for Adam or before the first step), as in the official
``virtual_step``. The central difference is the official ``compute_hessian``: ∇_λ Σλℓ = ℓ, so the two
perturbed forwards need no graph. Cost per step: three forwards with a graph (θ, θ′ and the step's
own), two without (θ ± εd), two backward passes more than ``ls``.

Departures from the official code, and why:
  * θ is restored by copying the saved values back, not by adding ε d, subtracting 2ε d and adding
    ε d again (which leaves rounding residue in θ every step).
  * BatchNorm running statistics: the official extra forwards (at θ, θ + εd, θ − εd) run in training
    mode and move the model's running statistics three more times per step, at parameters the model
    never takes. The trainer (:class:`mtl_tune.training.loop.Trainer`) restores the model's buffers
    after :meth:`meta_step`, so only the training step moves them, as for every other method.
  * The second stream is the benchmark's own training order for another epoch index
    (``loop.META_EPOCH_OFFSET``), fixed by the trial seed, so runs and resumed runs are repeatable.
  * Only the multi-task setting (every task primary, the official ``--task all``); the auxiliary-task
    setting (a subset of primary tasks) is not offered.

λ is not clamped or normalised (as the official code; it may leave [0, 1] or turn negative). The
official defaults: ``weight_init`` 0.1 (``--autol_init``), ``meta_lr`` 1e-4 (``--autol_lr``, dense
trainer). Degenerate cases: α = 0 (a finished cosine schedule) makes θ′ = θ and the λ gradient
exactly 0 — the extra forwards are skipped and Adam steps on a zero gradient (λ does not move from a
fresh state); d = 0 (the meta loss is stationary at θ′) makes the gradient exactly 0 as well (the
official ε = 0.01/0 gives NaN); a non-finite loss or d raises :class:`BalancerError`.
Not data-parallel (one process): the meta step's perturbations are not synchronised across ranks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._adam import adam_step
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import (Balancer, BalancerError, ForwardOutput, LossBalancer, StepInfo,
                                     _as_param_list, check_losses, rebind_private_optimizer)

#: the official finite-difference radius: ε = FD_RADIUS / ‖d‖ (``compute_hessian``)
FD_RADIUS = 0.01


def step_hyperparameters(optimizer: torch.optim.Optimizer, first: Tensor) -> tuple[float, float, float]:
    """(lr α, weight decay, momentum μ) of the optimizer group holding ``first`` (else group 0)."""
    group = next((g for g in optimizer.param_groups if any(p is first for p in g["params"])),
                 optimizer.param_groups[0])
    return float(group["lr"]), float(group.get("weight_decay", 0.0) or 0.0), float(group.get("momentum", 0.0) or 0.0)


def central_difference(plus: Any, minus: Any, eps: Any, alpha: float) -> Any:
    """∂L_meta/∂λ ≈ −α (ℓ(θ + εd) − ℓ(θ − εd)) / (2ε), for torch tensors or NumPy arrays alike (the same
    operations in the same order, so both give the same bits)."""
    return -alpha * (plus - minus) / (2.0 * eps)


def finite_difference_hypergradient(losses_at: Callable[[list[Tensor]], Tensor], params: list[Tensor],
                                    direction: list[Tensor], alpha: float, n_tasks: int) -> Tensor:
    """−α (ℓ(θ + εd) − ℓ(θ − εd)) / (2ε) with ε = 0.01/‖d‖ (float64, shape (K,)); ``losses_at(params)``
    evaluates the training losses at the parameters' current values. The parameters are left exactly
    as they were. d = 0 gives zeros (the exact hypergradient −α ∇ℓᵢᵀ d)."""
    norm = float(torch.stack([d.detach().double().pow(2).sum() for d in direction]).sum().sqrt())  # one host sync
    if not math.isfinite(norm):
        raise BalancerError(f"autol: non-finite meta gradient (norm {norm})")
    if norm == 0.0:
        return torch.zeros(n_tasks, dtype=torch.float64)
    eps = FD_RADIUS / norm
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=eps)
            plus = losses_at(params).double()
            for p, old, d in zip(params, saved, direction):
                p.copy_(old).add_(d, alpha=-eps)
            minus = losses_at(params).double()
    finally:
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
    return central_difference(plus, minus, eps, alpha).cpu()


class AutoLambda(LossBalancer):
    """Auto-λ (Liu et al., TMLR'22): task weights λ learned by a one-step look-ahead on a second
    training batch (see the module docstring); the step itself trains on Σᵢ λᵢ ℓᵢ.

    Args:
        n_tasks: K, the number of tasks.
        weight_init: initial value of every λᵢ (finite, default 0.1 as the official ``--autol_init``).
        meta_lr: Adam learning rate of λ (> 0, default 1e-4 as the official dense trainer).

    The trainer calls :meth:`meta_step` before every training step (``needs_meta_batch``); without
    it λ stays at ``weight_init`` (the plain weighting). Common keyword arguments ``max_norm`` and
    ``jacobian_engine``: see :class:`~mtl_tune.balancers.base.Balancer`.
    """

    name = "autol"
    needs_meta_batch = True
    supports_distributed = False  # the meta step perturbs θ on one process

    def __init__(self, n_tasks: int, weight_init: float = 0.1, meta_lr: float = 1e-4, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if isinstance(weight_init, bool) or not isinstance(weight_init, (int, float)) or not math.isfinite(weight_init):
            raise ValueError(f"autol: weight_init must be a finite number, got {weight_init!r}")
        if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)) or not (meta_lr > 0 and math.isfinite(meta_lr)):
            raise ValueError(f"autol: meta_lr must be a positive finite number, got {meta_lr!r}")
        self.weight_init, self.meta_lr = float(weight_init), float(meta_lr)
        # a buffer, not a Parameter: λ follows its own meta update, never the training optimizer
        self.register_buffer("lambdas", torch.full((n_tasks,), self.weight_init))
        self.meta_optimizer = torch.optim.Adam([self.lambdas], lr=self.meta_lr)
        self._meta_stepped = self._warned_unlearned = False

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        """The step on Σᵢ λᵢ ℓᵢ; warns (once) when no :meth:`meta_step` came before it — a loop that
        never calls it trains with λ fixed at ``weight_init``, which is not Auto-λ."""
        if not self._meta_stepped and not self._warned_unlearned:
            self._warned_unlearned = True
            warnings.warn("autol: backward without a meta_step before it: λ is not learned on such steps (call "
                          "balancer.meta_step(forward, meta_forward, optimizer, shared, task_params) before every "
                          "backward when balancer.needs_meta_batch, as mtl_tune's trainer does)", RuntimeWarning,
                          stacklevel=2)
        self._meta_stepped = False
        return super().backward(losses, shared_params, task_params, representation)

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.lambdas.detach().to(device=losses.device, dtype=losses.dtype)
        return (losses * lam).sum(), lam.clone()

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂L/∂ℓ = λ per row (the step's plain weighting; :meth:`meta_rows` moves λ before it)."""
        lam = host(self.lambdas)
        return RowStep(np.broadcast_to(lam, np.shape(losses)).copy())

    def meta_rows(self, landscape: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray,
                  losses: np.ndarray, jacobian: np.ndarray, alpha: float,
                  losses_at: Callable[[np.ndarray], np.ndarray] | None = None) -> RowStep:
        """The meta step of every row, batch-first, for a problem whose parameters are x (..., P) and
        whose losses and Jacobians at any point ``landscape(points)`` gives ((..., K), (..., K, P)) —
        the toy, which has no data, so the meta batch's losses are the training batch's. ``losses``
        and ``jacobian``: at x; ``losses_at(points)``: ``landscape(points)[0]`` alone, where the problem
        has a cheaper way (the two finite-difference evaluations need no Jacobian); it gets both
        points in one call, stacked as (2, ..., P) (x + εd first), so it must evaluate each point of
        a leading dimension it has not seen on its own. The model optimizer is taken to be plain (no
        weight decay, no SGD momentum: the toy's Adam), with step size ``alpha``. The arithmetic of
        :meth:`meta_step`:

            θ′ = x − α Σᵢ λᵢ ∇ℓᵢ(x),  d = Σᵢ ∇ℓᵢ(θ′),  ε = 0.01 / ‖d‖,
            ∂L_meta/∂λ = −α (ℓ(x + εd) − ℓ(x − εd)) / (2ε)   (0 where d = 0),

        then one step of λ's Adam (each row its own entries); the returned weights are λ after it
        (what :meth:`weights_rows` gives the training step). Rows whose losses at x or θ′ or whose d
        are not finite fail, with :meth:`meta_step`'s message; their λ entries step on a zero gradient.

        Each check is one reduction in the common case (every row finite and moving); the rows are
        looked at one by one only when it fails."""
        lam = host(self.lambdas)
        failed = np.zeros(np.shape(losses)[:-1], dtype=bool)
        hyper: np.ndarray | None = None   # None: zero for every row
        messages: dict[tuple[int, ...], str] = {}

        def fail(bad: np.ndarray, message: Callable[[tuple[int, ...]], str]) -> None:
            """Rows in ``bad`` not failed yet fail with ``message(index)`` (the first check a row fails)."""
            if not bad.any():
                return
            for index in map(tuple, np.argwhere(bad & ~failed)):
                messages[index] = message(index)
            failed[...] |= bad

        if not np.isfinite(np.sum(losses)):  # (a finite sum: every loss finite)
            fail(~np.isfinite(losses).all(-1), lambda i: f"{self.name}: non-finite task loss {losses[i].tolist()}")
        if alpha != 0.0:
            theta = x - alpha * (lam[..., :, None] * jacobian).sum(-2)
            meta_losses, meta_jacobian = landscape(theta)
            if not np.isfinite(meta_losses.sum()):
                fail(~np.isfinite(meta_losses).all(-1),
                     lambda i: f"{self.name}: non-finite task loss {meta_losses[i].tolist()}")
            d = meta_jacobian.sum(-2)
            norm = np.sqrt((d * d).sum(-1))
            if not np.isfinite(norm.sum()):
                fail(~np.isfinite(norm), lambda i: f"{self.name}: non-finite meta gradient (norm {norm[i]})")
            if failed.any() or not (norm > 0).all():
                moving = ~failed & (norm > 0)
                divisor = np.where(moving, norm, 1.0) if moving.any() else None
            else:   # the common case: every row moves (the same divisions, no masks)
                moving, divisor = None, norm
            if divisor is not None:
                eps = (FD_RADIUS / divisor)[..., None]
                step = eps * d
                if losses_at is not None:   # both points in one evaluation
                    points = np.empty((2,) + np.shape(x))
                    np.add(x, step, out=points[0])
                    np.subtract(x, step, out=points[1])
                    plus, minus = losses_at(points)
                else:
                    plus, minus = landscape(x + step)[0], landscape(x - step)[0]
                hyper = central_difference(plus, minus, eps, alpha)
                if moving is not None:
                    hyper = np.where(moving[..., None], hyper, 0.0)
        grad = np.zeros(np.shape(losses), dtype=np.float32) if hyper is None else hyper.astype(np.float32)
        self.lambdas.grad = torch.from_numpy(grad).to(self.lambdas)
        adam_step(self.meta_optimizer)
        self.lambdas.grad = None
        return RowStep(host(self.lambdas), failed=failed,
                       reason=lambda index: messages.get(tuple(int(i) for i in index), ""))

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.lambdas = torch.stack([b.lambdas.detach().clone() for b in rows])
        self.meta_optimizer = torch.optim.Adam([self.lambdas], lr=self.meta_lr)

    def meta_step(self, forward: Callable[[], ForwardOutput], meta_forward: Callable[[], ForwardOutput],
                  optimizer: torch.optim.Optimizer, shared_params: Sequence[Tensor],
                  task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None) -> None:
        """One Adam step of λ on the finite-difference hypergradient (module docstring)."""
        self._sync_group()  # raises under an active process group
        params: list[Tensor] = []
        for p in _as_param_list(shared_params) + _as_param_list(task_params):
            if p.requires_grad and all(p is not q for q in params):
                params.append(p)
        if not params:
            raise BalancerError("autol: meta_step needs at least one trainable parameter")
        alpha, wd, momentum = step_hyperparameters(optimizer, params[0])
        self.lambdas.grad = self._hypergradient(forward, meta_forward, optimizer, params, alpha, wd, momentum
                                                ).to(self.lambdas)
        self.meta_optimizer.step()
        self.lambdas.grad = None
        self._meta_stepped = True

    def _hypergradient(self, forward: Callable[[], ForwardOutput], meta_forward: Callable[[], ForwardOutput],
                       optimizer: torch.optim.Optimizer, params: list[Tensor], alpha: float, wd: float,
                       momentum: float) -> Tensor:
        if alpha == 0.0:  # θ′ = θ does not depend on λ
            return torch.zeros(self.n_tasks, dtype=torch.float64)
        losses = forward().losses
        check_losses(losses, self.n_tasks, self.name)
        lam = self.lambdas.detach().to(device=losses.device, dtype=losses.dtype)
        grads = torch.autograd.grad((losses * lam).sum(), params, allow_unused=True)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():   # θ′ = θ − α (g + wd θ + μ m)
                for p, g in zip(params, grads):
                    step = p.detach() * wd if g is None else g + p.detach() * wd
                    buf = optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
                    if buf is not None:
                        step = step + momentum * buf
                    p.sub_(step, alpha=alpha)
            meta_losses = meta_forward().losses
            check_losses(meta_losses, self.n_tasks, self.name)
            direction = torch.autograd.grad(meta_losses.sum(), params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
        direction = [torch.zeros_like(p) if d is None else d for p, d in zip(params, direction)]

        def losses_at(_: list[Tensor]) -> Tensor:
            out = forward().losses
            check_losses(out, self.n_tasks, self.name)
            return out

        return finite_difference_hypergradient(losses_at, params, direction, alpha, self.n_tasks)

    # ------------------------------------------------------------------ state
    float32_state = ("lambdas",)

    def _after_move(self) -> None:
        self.meta_optimizer = rebind_private_optimizer(self.meta_optimizer, [self.lambdas])

    def _extra_state(self) -> dict[str, Any]:
        return {"meta_optimizer": self.meta_optimizer.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
