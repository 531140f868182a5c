"""``dbmtl`` — Dual-Balancing Multi-Task Learning (Lin et al., 2023, https://arxiv.org/abs/2308.12029;
docs/methods.md#dbmtl).

Two balancing steps per batch:

* **loss scale**: every task is trained on log(ℓ_i + ε) (ε = 1e-8), whose gradient
  ∇ℓ_i/(ℓ_i + ε) no longer depends on the loss's units;
* **gradient magnitude**: an exponential moving average ĝ_i of each task's log-loss gradient
  (over the shared parameters) is kept, and every task is rescaled to the largest average norm:

      ĝ_i ← h_i + (β / t^{β_σ}) (ĝ_i − h_i),   h_i = ∇_θ log(ℓ_i + ε) = g_i/(ℓ_i + ε),  ĝ_i = 0 at t = 0,
      α_i = max_j ‖ĝ_j‖ / (‖ĝ_i‖ + ε),          d = Σ_i α_i ĝ_i,

  t = 1, 2, … counting steps. There is no bias correction: at t = 1, ĝ = (1 − β) h.

The update is built from the moving averages, not from this step's gradients: it is no weighted
sum of the current task gradients, and the K × P average has to be kept. That is the method's
state, a tensor (K, P) on the Jacobian's device in its dtype (as large as the Jacobian itself;
LibMTL keeps the same buffer), created zero at the first step and saved in the checkpoint's extra
state; ``step_count`` is t − 1. The rule (:meth:`DBMTL.direction_rows`) is batch-first on torch
Jacobians (..., K, P) — one row (K, P) in a training step, the toy's B rows (B, K, P) in lockstep,
whose state :meth:`DBMTL.start_rows` makes (B, K, P) — and returns the direction with the α_i as
the reported weights. The Jacobian of the raw losses gives h_i by one division per row (chain
rule), so no second backward of the log-losses is needed.

Heads receive ∇ Σ_i log(ℓ_i + ε) = Σ_i ∇ℓ_i/(ℓ_i + ε): the plain log-loss gradients, as LibMTL's
per-task backward gives them (no average, no α). No ×K (the update is K times a largest-norm
gradient), no clipping.

Conventions and departures, against the official code (LibMTL ``DB_MTL``,
https://github.com/median-research-group/LibMTL/blob/7b0f56a7ee61f9fc17738dd221bb017d04999832/LibMTL/weighting/DB_MTL.py;
defaults β = 0.9, β_σ = 0 from LibMTL's ``config.py``):

* the logarithm: the losses may be shifted by ``min_losses`` ℓ* (default 0, as ``si``/``gls``), and a
  step with some ℓ_i − ℓ*_i ≤ 0 raises :class:`~mtl_tune.balancers.base.BalancerError` naming the
  losses; the official log(ℓ + 1e-8) is NaN for a loss below −1e-8 and gives a ×1e8 gradient for a
  loss of exactly 0. ε = 1e-8 is kept inside the logarithm and in α, as official.
* the average is updated as r·ĝ + (1 − r)·h (in place, no K × P temporary); the official
  h + r(ĝ − h) is the same number up to one rounding.
* a change of P between steps (the shared parameters changed) raises instead of mixing averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._log_losses import loss_floor, shifted
from mtl_tune.balancers._common import state_like, power_decay
from mtl_tune.balancers._rows import PerVersion, RowStep, host
from mtl_tune.balancers.base import Balancer, BalancerError, GradientBalancer

#: ε of the official code, inside the logarithm and in α's denominator
EPS = 1e-8


def _rescaled(norms: Tensor, average: Tensor) -> tuple[Tensor, Tensor]:
    """α = max_j ‖ĝ_j‖/(‖ĝ_i‖ + ε) (..., K) and d = Σ_i α_i ĝ_i (..., P) from the average's norms (..., K)."""
    alpha = norms.amax(-1, keepdim=True) / (norms + EPS)
    return alpha, (alpha.unsqueeze(-1) * average).sum(-2)


def _rescaled_host(norms: Tensor, average: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_rescaled` for K = 2 and float64 CPU tensors, in NumPy on their memory: the same maximum,
    sum, quotient and products, which round the same in either library, and a sum of two terms (one
    addition in either); ~6 µs less than torch's calls on the toy's rows. Larger K stays in torch,
    whose sum over K may add in another order."""
    norms_np = norms.numpy()
    alpha = norms_np.max(-1, keepdims=True) / (norms_np + EPS)
    return torch.from_numpy(alpha), torch.from_numpy((alpha[..., None] * average.numpy()).sum(-2))


class DBMTL(GradientBalancer):
    """DB-MTL (Lin et al., 2023): log-losses, and every task's moving-average gradient rescaled to the
    largest average norm.

    Args:
        n_tasks: K, the number of tasks.
        beta: β, the moving average's weight on the past (0 ≤ β < 1; default 0.9, official).
        beta_sigma: β_σ ≥ 0, the decay of that weight with the step count t, β/t^{β_σ} (default 0, official).
        min_losses: K lower bounds ℓ* of the losses (default zeros); the logarithms are taken of ℓ − ℓ*.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer` (the update needs the Jacobian: no Gram path).
    Call :meth:`backward` (or :meth:`train_step`) once per batch; the returned ``StepInfo.weights``
    are the factors α_i (K,) applied to the moving averages.
    """

    name = "dbmtl"

    float32_state = ("min_losses",)  # the floor keeps its value under model.half() (Balancer.float32_state)

    def __init__(self, n_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0,
                 min_losses: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{self.name}: beta must be in [0, 1), got {beta}")
        if not beta_sigma >= 0.0:
            raise ValueError(f"{self.name}: beta_sigma must be >= 0, got {beta_sigma}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("min_losses", loss_floor(self.name, n_tasks, min_losses))
        #: ĝ, (..., K, P) once the first step has set P; None before it
        self.average: Tensor | None = None
        self._floor = PerVersion(host)  # ℓ* on the host, made again when min_losses changes

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # every toy row starts from a fresh balancer: its average is created (B, K, P) at the first step
        if any(b.average is not None for b in rows):
            raise ValueError(f"{self.name}: lockstep rows must start before their first step")
        self.average = None

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule on Jacobians (..., K, P) of the raw losses (..., K): updates the moving
        average and returns d (..., P) with the weights α (..., K), torch tensors on the Jacobian's
        device; a row with some ℓ_i − ℓ*_i ≤ 0 fails (one row: before the average changes).

        The common case takes fewer calls, with the same operations on the same numbers: no failed
        row (:func:`~mtl_tune.balancers._log_losses.shifted` finds it with two reductions) skips the
        placeholders of failed rows; and for K = 2 on a float64 CPU Jacobian, α and d are formed from the torch norms and average in NumPy
        (a maximum, a sum, a quotient, products and a sum of two terms round the same in either)."""
        d, bad, reason = shifted(self.name, host(losses), self._floor(self.min_losses))
        if jacobian.dim() == 2 and bool(bad):
            return RowStep(torch.full_like(losses, float("nan")), failed=bad, reason=reason)
        if not bad.any():
            bad = None
        average = state_like(self.average, jacobian, self.name, "moving average")
        self.average = average
        rate = power_decay(self.beta, float(self.step_count + 1), self.beta_sigma)
        # h_i = g_i/(D_i + ε); ĝ ← r ĝ + (1 − r) h, in place (failed rows: finite placeholders, never read)
        factor = (1.0 - rate) / ((d if bad is None else np.where(bad[..., None], 1.0, d)) + EPS)
        factor_t = torch.from_numpy(factor[..., None])
        average.mul_(rate).addcmul_(jacobian, factor_t if factor_t.dtype == jacobian.dtype and jacobian.is_cpu
                                    else factor_t.to(jacobian))
        norms = torch.linalg.vector_norm(average, dim=-1)
        if average.shape[-2] == 2 and average.is_cpu and average.dtype == torch.float64 and not average.requires_grad:
            alpha, direction = _rescaled_host(norms, average)
        else:
            alpha, direction = _rescaled(norms, average)
        return RowStep(alpha, failed=bad, reason=reason, direction=direction)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        if out.failed is not None and bool(out.failed):
            raise BalancerError(out.reason_of(()))
        return out.direction, out.weights

    def head_weights(self, weights: Tensor, losses: Tensor) -> Tensor:
        """1/(ℓ_i − ℓ*_i + ε): the heads get the log-losses' gradients."""
        shift = losses.detach() - self.min_losses.to(losses)
        return 1.0 / (shift + EPS)

    def _extra_state(self) -> dict[str, Any]:
        return {"average": None if self.average is None else self.average.detach().clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        self.average = None if average is None else average.clone()
