"""``stch`` — smooth Tchebycheff scalarisation (Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth
Tchebycheff Scalarization for Multi-Objective Optimization", ICML'24, https://arxiv.org/abs/2402.19078).

The Tchebycheff scalarisation max_i pᵢ(hᵢ − zᵢ) (preferences p, ideal point z) reaches every
Pareto-optimal point, also on a non-convex front, but is not smooth. The paper replaces the max by
its log-sum-exp smoothing with smoothing parameter μ > 0 (its Eq. 7):

    f(ℓ) = K · μ log Σᵢ exp(pᵢ(hᵢ − zᵢ)/μ),       ∂f/∂ℓᵢ = K σᵢ pᵢ h′ᵢ,   σ = softmax(p(h − z)/μ),

so a step is a weighted sum of the task gradients with weights K σᵢ pᵢ h′ᵢ; μ → 0 gives the
Tchebycheff subgradient (all weight K pᵢ on the argmax task), μ → ∞ the weighted sum K pᵢ/K·h′ᵢ.
The ×K is the official code's (``* self.task_num``): Σσ = 1, so ×K puts the step at the scale
of the plain sum of K losses.

Two forms, chosen by ``ideal``:

* ``ideal=None`` (default) — the official multi-task form (https://github.com/Xi-L/STCH at
  commit 73898cc12eec, ``STCH_MTL/LibMTL/weighting/STCH.py``; the same rule in LibMTL's ``weighting/STCH.py``):
  hᵢ = log ℓᵢ, and the point subtracted is log nᵢ with n a *nadir* vector estimated during a
  warm-up: for epochs 0 … ``warmup_epochs`` (``STCH_warmup_epoch``, default 4 in the argument
  parser of the official code and of LibMTL: five epochs) the objective is Σᵢ log ℓᵢ (weights 1/ℓᵢ, no preferences), and
  n is the mean training loss of the last of those epochs (epoch ``warmup_epochs``, averaged over
  its batches, as the official code does). From then on f = K μ log Σ exp(pᵢ log(ℓᵢ/nᵢ)/μ) with
  weights K σᵢ pᵢ/ℓᵢ. Epochs are counted by :meth:`on_epoch_end`.
* ``ideal=z`` (a K-vector) — the paper's general form on the raw losses, hᵢ = ℓᵢ with the
  given ideal (utopia) point z, no warm-up: weights K σᵢ pᵢ. z must lie below every attainable
  loss (the paper: the minimum of each objective minus a small margin); with z above a loss the
  Tchebycheff picture (preference ray from z) no longer holds. Used for preference sweeps
  where the single-task minima are known (the toy: docs/toy.md#preference-fronts).

``preferences`` p (default all ones, the official code has none) multiply each task's term;
they are used as given (``--preferences`` passes simplex points scaled to sum K).

Departures from the official code, all without effect on the step except the last:
the official log(ℓ/n + 1e-20) becomes log(ℓ/n) and a non-positive loss fails the step with a
reason (the official log returns −46 or NaN there); the max-subtraction inside the log-sum-exp
is a numerical device (a constant with no gradient) that we apply as a stable softmax; the
official nadir is a running sum updated every batch of epoch ``warmup_epoch`` — here the same
mean, taken from the epoch's mean losses at :meth:`on_epoch_end` (the trainer's
``EpochInfo.train_losses``, or the mean of the losses this balancer saw during the epoch).
Degenerate cases: ties in the max share σ equally (softmax); with μ very small σ is one-hot up to
rounding (exp underflows to 0 for the others; the stable softmax never overflows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers._common import check_epoch_info
from mtl_tune.balancers.base import Balancer, BalancerError, EpochInfo, LossBalancer


def softmax_rows(s: np.ndarray) -> np.ndarray:
    """softmax over the last axis, shifted by the row maximum (no overflow for any μ)."""
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def stch_rows(losses: np.ndarray, preferences: np.ndarray, mu: float, ideal: np.ndarray | None = None,
              nadir: np.ndarray | None = None) -> np.ndarray:
    """∂f/∂ℓ (..., K) of the smooth Tchebycheff objective for losses (..., K).

    ``ideal`` given: f = K μ log Σ exp(pᵢ(ℓᵢ − zᵢ)/μ), weights K σᵢ pᵢ. Else ``nadir`` n (..., K)
    given: f = K μ log Σ exp(pᵢ log(ℓᵢ/nᵢ)/μ), weights K σᵢ pᵢ/ℓᵢ (the caller checks ℓ > 0)."""
    k = losses.shape[-1]
    if ideal is not None:
        sigma = softmax_rows(preferences * (losses - ideal) / mu)
        return k * sigma * preferences
    sigma = softmax_rows(preferences * np.log(losses / nadir) / mu)
    return k * sigma * preferences / losses


class SmoothTchebycheff(LossBalancer):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML'24): the log-sum-exp smoothing of
    max_i pᵢ(hᵢ − zᵢ), a preference-driven scalarisation that reaches non-convex parts of a front.

    Args:
        n_tasks: K, the number of tasks.
        mu: smoothing parameter μ > 0 (→ 0: Tchebycheff; official default 1).
        preferences: K non-negative preferences p, not all 0 (default all ones), used as given; a
            zero pᵢ removes task i from the max (its term is the constant exp(0)).
        warmup_epochs: the official ``STCH_warmup_epoch`` w (default 4): epochs 0 … w minimise
            Σ log ℓᵢ and the mean losses of epoch w become the nadir n (log form only).
        ideal: K-vector z: the paper's form on raw losses with this ideal point and no warm-up;
            ``None`` (default) = the official log/nadir form.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch, and :meth:`on_epoch_end` after every epoch (the log form's
    warm-up counts epochs); the returned ``StepInfo.weights`` are the effective task weights (K,).
    """

    name = "stch"

    def __init__(self, n_tasks: int, mu: float = 1.0, preferences: Sequence[float] | None = None,
                 warmup_epochs: int = 4, ideal: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not (isinstance(mu, (int, float)) and mu > 0 and np.isfinite(mu)):
            raise ValueError(f"stch: mu must be a positive number, got {mu!r}")
        if not (isinstance(warmup_epochs, int) and warmup_epochs >= 0):
            raise ValueError(f"stch: warmup_epochs must be a non-negative integer, got {warmup_epochs!r}")
        p = np.ones(n_tasks) if preferences is None else np.asarray(list(preferences), dtype=np.float64)
        if p.shape != (n_tasks,) or not np.isfinite(p).all() or (p < 0).any() or not (p > 0).any():
            raise ValueError(f"stch: preferences must be {n_tasks} finite non-negative numbers, not all 0, "
                             f"got {preferences!r}")
        z = None if ideal is None else np.asarray(list(ideal), dtype=np.float64)
        if z is not None and (z.shape != (n_tasks,) or not np.isfinite(z).all()):
            raise ValueError(f"stch: ideal must be {n_tasks} finite numbers, got {ideal!r}")
        self.mu, self.warmup_epochs, self.preferences, self.ideal = float(mu), warmup_epochs, p, z
        self.epochs_done = 0
        self.nadir: np.ndarray | None = None          # (K,), or (B, K) for rows in lockstep
        self.epoch_sum: np.ndarray | None = None      # this epoch's summed losses (one row)
        self.epoch_batches = 0
        self._warm: bool | None = None                # whether the last step was a warm-up step

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        epochs = {b.epochs_done for b in rows}  # type: ignore[attr-defined]
        if len(epochs) > 1:
            raise ValueError("stch: rows in lockstep must have ended the same number of epochs")
        nadirs = [b.nadir for b in rows]  # type: ignore[attr-defined]
        self.nadir = None if nadirs[0] is None else np.stack(nadirs)

    # ------------------------------------------------------------------ rules
    def in_warmup(self) -> bool:
        """Whether the next step is a warm-up step (log form before the nadir is known)."""
        return self.ideal is None and self.nadir is None

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂f/∂ℓ (..., K): 1/ℓ during the warm-up, then the smooth Tchebycheff weights
        (:func:`stch_rows`); a row with a non-positive loss fails in the log form."""
        self._warm = self.in_warmup()
        if self.ideal is not None:
            return RowStep(stch_rows(losses, self.preferences, self.mu, ideal=self.ideal))
        failed = (losses <= 0).any(-1)

        def reason(index: tuple[int, ...]) -> str:
            return f"stch: the log form needs positive losses, got {losses[index].tolist()}"

        with np.errstate(divide="ignore", invalid="ignore"):
            if self._warm:
                w = 1.0 / losses
            else:
                w = stch_rows(np.where(failed[..., None], 1.0, losses), self.preferences, self.mu,
                              nadir=self.nadir)
        return RowStep(np.where(failed[..., None], np.nan, w), failed=failed, reason=reason)

    def epoch_rows(self, mean_losses: np.ndarray, scores: np.ndarray | None) -> RowStep | None:
        """Count the epoch; at the end of epoch ``warmup_epochs`` (log form) its mean losses (..., K)
        become the nadir. A non-positive mean fails the row."""
        self.epochs_done += 1
        if self.ideal is not None or self.nadir is not None or self.epochs_done != self.warmup_epochs + 1:
            return None
        failed = ~((mean_losses > 0) & (mean_losses < np.inf)).all(-1)  # NaN fails too
        self.nadir = np.array(mean_losses, dtype=np.float64)

        def reason(index: tuple[int, ...]) -> str:
            return (f"stch: the nadir (mean warm-up losses) must be positive and finite, "
                    f"got {mean_losses[index].tolist()}")

        return RowStep(np.ones_like(self.nadir), failed=failed, reason=reason)

    # ------------------------------------------------------------------ per step / epoch
    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.ideal is None and self.nadir is None and self.epochs_done == self.warmup_epochs:
            cur = host(losses)  # the nadir epoch: remember its losses (official running mean)
            self.epoch_sum = cur if self.epoch_sum is None else self.epoch_sum + cur
            self.epoch_batches += 1
        return super().objective(losses)

    def on_epoch_end(self, info: EpochInfo) -> None:
        """Count the epoch; at the end of the nadir epoch take its mean training losses
        (``info.train_losses``, else the mean of the losses seen since the epoch began)."""
        check_epoch_info(self.name, info)
        mean = np.ones(self.n_tasks)
        if self.ideal is None and self.nadir is None and self.epochs_done == self.warmup_epochs:
            if info.train_losses is not None:
                t = torch.as_tensor(info.train_losses, dtype=torch.float64).detach().flatten()
                mean = host(self._rank_mean(t, self._sync_group()))
            elif self.epoch_batches:
                mean = self.epoch_sum / self.epoch_batches
            else:
                raise BalancerError("stch: on_epoch_end of the nadir epoch needs EpochInfo.train_losses or "
                                    "at least one backward call during the epoch")
            if mean.shape != (self.n_tasks,):
                raise BalancerError(f"stch: expected {self.n_tasks} epoch losses, got shape {mean.shape}")
        self.epoch_sum, self.epoch_batches = None, 0
        out = self.epoch_rows(mean, None)
        if out is not None:
            one_row(out)

    def _step_extras(self) -> dict[str, Any]:
        return {"warmup": bool(self._warm)} if self._warm is not None else {}

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done, "nadir": None if self.nadir is None else self.nadir.tolist(),
                "epoch_sum": None if self.epoch_sum is None else self.epoch_sum.tolist(),
                "epoch_batches": self.epoch_batches}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state["epochs_done"])
        self.nadir = None if state["nadir"] is None else np.asarray(state["nadir"], dtype=np.float64)
        self.epoch_sum = None if state["epoch_sum"] is None else np.asarray(state["epoch_sum"], dtype=np.float64)
        self.epoch_batches = int(state["epoch_batches"])

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, mu={self.mu}, ideal={None if self.ideal is None else self.ideal.tolist()}"
