"""``dwa`` — Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning
with Attention", CVPR'19; docs/methods.md#dwa).

Tasks whose loss went down more slowly get more weight. With a temperature T:

    r_i = L̄_i(t−1) / L̄_i(t−2),      w = K · softmax(r / T),      L = Σ_i w_i ℓ_i.

Two versions, because the paper and the benchmark code differ:

* ``mode="epoch"`` (default, the paper and the original MTAN/CAGrad trainer): L̄_i(t) is the
  mean training loss of task i over epoch t; w = 1 during the first two epochs (no two
  previous epochs yet). Weights change only in :meth:`on_epoch_end`.
* ``mode="iteration"`` (nash-mtl / FAMO-family / Samsung code, to reproduce their tables):
  a FIFO buffer of the last 2W per-step losses, **initialised to ones**, W = ``window``
  (25). After each append, if more than W earlier calls have been made, r is the
  per-task mean of the newest W rows divided by that of the oldest W rows; otherwise the
  previous weights (initially ones) are kept. So the first update happens at call W + 2
  and is computed partly from the initial ones (a quirk we reproduce on purpose).
  The loss is the **mean** Σ_i w_i ℓ_i / K (the official code), so the effective weights
  reported are w/K; ``extras["dwa_weights"]`` holds w.

Use outside our trainer (the epoch hook): call ``balancer.on_epoch_end(EpochInfo(epoch=e,
train_losses=mean_losses))`` after each training epoch. If ``train_losses`` is ``None``,
the balancer uses the mean of the losses it has itself seen in :meth:`backward` since
the previous call (an unweighted mean over batches; accumulated on the device, no sync),
and raises if it has seen none. In ``iteration`` mode the hook does nothing.
A ratio with a non-positive denominator (negative losses) raises :class:`BalancerError`.

Batch-first rules (:mod:`mtl_tune.balancers._rows`): :meth:`DynamicWeightAverage.weights_rows`
is ∂f/∂ℓ of one step for losses (..., K) — w in epoch mode, w/K in iteration mode, where it
also pushes the losses into the FIFO and recomputes w — and
:meth:`DynamicWeightAverage.epoch_rows` is the epoch update. Host syncs: an epoch-mode step has
none (:meth:`~DynamicWeightAverage.objective` multiplies by a device copy of w, which changes only
at epoch end; the epoch means cross to the host once per epoch); an iteration-mode step reads
its K losses on the host (one sync per step; the official rule's positivity test needed one
from call W + 2 on anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers._common import check_epoch_info
from mtl_tune.balancers.base import Balancer, BalancerError, EpochInfo, LossBalancer

MODES = ("epoch", "iteration")


def dwa_weights(recent: np.ndarray, older: np.ndarray, temp: float) -> np.ndarray:
    """K · softmax((recent / older) / T) over the last axis — the DWA rule for loss levels (..., K).

    The caller makes sure that ``older`` > 0 (:func:`ratio_failed`)."""
    x = (recent / older) / temp
    e = np.exp(x - x.max(-1, keepdims=True))  # shifted: the same softmax, no overflow
    return x.shape[-1] * e / e.sum(-1, keepdims=True)


def ratio_failed(older: np.ndarray) -> np.ndarray:
    """Rows (...) whose ratio r = recent / older has a non-positive denominator (negative losses)."""
    return (older <= 0).any(-1)


def ratio_reason(older: np.ndarray) -> Callable[[tuple[int, ...]], str]:
    """The failure message of a row of :func:`ratio_failed`, by its index."""
    return lambda index: f"dwa: loss ratios need positive losses, got denominators {older[index].tolist()}"


def safe_weights(recent: np.ndarray, older: np.ndarray, temp: float, failed: np.ndarray,
                 previous: np.ndarray) -> np.ndarray:
    """:func:`dwa_weights` on the rows that did not fail; a failed row keeps its ``previous``
    weights (the balancer raises before it would change them)."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf or NaN losses give NaN weights, visible as before
        if not failed.any():
            return dwa_weights(recent, older, temp)
        denominators = np.where(failed[..., None], 1.0, older)  # no division by 0 on failed rows
        return np.where(failed[..., None], previous, dwa_weights(recent, denominators, temp))


def push_fifo(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """The FIFO (..., 2W, K) without its oldest row and with ``losses`` (..., K) as its newest."""
    return np.concatenate([costs[..., 1:, :], losses[..., None, :]], axis=-2)


def window_ratio_levels(costs: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the newest ``window`` rows, mean of the oldest ``window`` rows) of FIFOs (..., 2W, K)."""
    # sum / n is what ndarray.mean computes, without its Python overhead (~5 µs a call)
    return costs[..., window:, :].sum(-2) / window, costs[..., :window, :].sum(-2) / window


@dataclass
class _Rows:
    """The rules' state of rows in lockstep (after :meth:`DynamicWeightAverage.start_rows`); a plain
    object, as setting a module attribute costs ~2 µs (a toy step costs a few)."""

    weights: np.ndarray        # (B, K) DWA's own w
    costs: np.ndarray          # (B, 2W, K) iteration mode's FIFO
    previous: np.ndarray | None  # (B, K) the last epoch's mean losses, None before the first epoch end
    calls: int                 # iteration mode's earlier calls (the rows step together)


class DynamicWeightAverage(LossBalancer):
    """Dynamic Weight Average (Liu et al., CVPR'19): weights from the ratios of recent
    losses, K·softmax(r/T).

    Args:
        n_tasks: K, the number of tasks.
        temp: softmax temperature T > 0 (default 2).
        mode: ``"epoch"`` (paper: epoch-mean losses, via :meth:`on_epoch_end`) or
            ``"iteration"`` (a FIFO buffer of the last 2·window steps).
        window: iteration-mode window W (int ≥ 1, default 25).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    DWA; see the module docstring for the two modes.
    """

    name = "dwa"

    @property
    def checks_finite_losses(self) -> bool:  # type: ignore[override]
        """Iteration mode reads every step's losses on the host (checked there); epoch mode does not
        (no sync per step) and checks the epoch means in :meth:`on_epoch_end` instead."""
        return self.mode == "iteration"

    def __init__(self, n_tasks: int, temp: float = 2.0, mode: str = "epoch", window: int = 25, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not temp > 0:
            raise ValueError(f"dwa: temp must be > 0, got {temp}")
        if mode not in MODES:
            raise ValueError(f"dwa: mode must be one of {MODES}, got {mode!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"dwa: window must be a positive integer, got {window!r}")
        self.temp, self.mode, self.window = float(temp), mode, window
        self.register_buffer("weights", torch.ones(n_tasks, dtype=torch.float64))
        # epoch mode: the last two epoch-mean losses (oldest first) and this epoch's running sum
        self.history: list[Tensor] = []
        self.epoch_sum: Tensor | None = None
        self.epoch_batches = 0
        # iteration mode: the official FIFO buffer, initialised to ones
        self.register_buffer("costs", torch.ones(2 * window, n_tasks, dtype=torch.float64))
        self.calls = 0
        # the rules' state: the buffers and the history above for one row, these arrays for rows in lockstep
        self._rows: _Rows | None = None
        # epoch mode's w on the device and in the dtype of the losses (a step then needs no copy)
        self._device_weights: Tensor | None = None

    # ------------------------------------------------------------------ the rules' state
    def start_rows(self, rows: Sequence[Balancer]) -> None:
        histories = {len(b.history) > 0 for b in rows}
        if len(histories) > 1:
            raise ValueError("dwa: rows in lockstep must all have ended an epoch, or none")
        self._rows = _Rows(weights=np.stack([host(b.weights) for b in rows]),
                           costs=np.stack([host(b.costs) for b in rows]),
                           previous=np.stack([host(b.history[-1]) for b in rows]) if histories == {True} else None,
                           calls=self.calls)

    def _state(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(w (..., K), FIFO (..., 2W, K)) as float64 arrays on the host, and the calls so far."""
        if self._rows is not None:
            return self._rows.weights, self._rows.costs, self._rows.calls
        return host(self.weights), host(self.costs), self.calls

    def _keep(self, weights: np.ndarray, fifo: tuple[np.ndarray, int] | None = None) -> None:
        """Store the rules' new w and (iteration mode) the new FIFO and call count; arrays are
        replaced, never changed in place."""
        if self._rows is not None:
            self._rows.weights = weights
            if fifo is not None:
                self._rows.costs, self._rows.calls = fifo
            return
        # new buffers (in their device and dtype), not copies into the old ones: a step's reported
        # weights may be the old buffer itself (epoch mode), and must not change afterwards
        self.weights = torch.tensor(weights, dtype=self.weights.dtype, device=self.weights.device)
        if fifo is not None:
            costs, self.calls = fifo
            self.costs = torch.tensor(costs, dtype=self.costs.dtype, device=self.costs.device)
        self._device_weights = None

    def _previous_epoch(self) -> np.ndarray | None:
        """The last epoch's mean losses (..., K), or None before the first epoch end."""
        if self._rows is not None:
            return self._rows.previous
        return host(self.history[-1]) if self.history else None

    def _push_epoch(self, mean_losses: np.ndarray) -> None:
        if self._rows is not None:
            self._rows.previous = mean_losses.copy()
        else:  # the last two, as the checkpoints written before the rules hold them
            self.history = [*self.history, torch.from_numpy(mean_losses.copy())][-2:]

    # ------------------------------------------------------------------ rules
    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂f/∂ℓ (..., K) of one step for losses (..., K).

        Epoch mode: this epoch's w (the losses only enter the epoch means, which the caller hands
        to :meth:`epoch_rows`). Iteration mode: push the losses into the FIFO; from call W + 2 on
        (more than W earlier calls) w = K·softmax(r/T) with r = mean(newest W) / mean(oldest W);
        returns w/K (the objective is the mean Σ wᵢ ℓᵢ / K). A row with a non-positive oldest-window
        mean fails (and keeps its w)."""
        weights, costs, calls = self._state()
        if self.mode == "epoch":
            return RowStep(weights)
        costs = push_fifo(costs, losses)
        out = RowStep(weights)
        if calls > self.window:
            recent, older = window_ratio_levels(costs, self.window)
            failed = ratio_failed(older)
            weights = safe_weights(recent, older, self.temp, failed, weights)
            out = RowStep(weights, failed=failed, reason=ratio_reason(older))
        self._keep(weights, (costs, calls + 1))
        out.weights = weights / self.n_tasks
        return out

    def epoch_rows(self, mean_losses: np.ndarray, scores: np.ndarray | None) -> RowStep | None:
        """Epoch mode: remember the epoch's mean losses (..., K) and, from the second epoch end on,
        set w = K·softmax(r/T) with r = this epoch's means / the previous epoch's; returns the rows' w, and
        fails a row whose previous means are not all positive (it keeps its w). Iteration mode: nothing (None)."""
        if self.mode != "epoch":
            return None
        older = self._previous_epoch()
        self._push_epoch(mean_losses)
        weights = self._state()[0]
        if older is None:  # the first epoch end: w stays 1
            return RowStep(weights)
        failed = ratio_failed(older)
        weights = safe_weights(mean_losses, older, self.temp, failed, weights)
        self._keep(weights)
        return RowStep(weights, failed=failed, reason=ratio_reason(older))

    # ------------------------------------------------------------------ per step
    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.mode == "iteration":
            return super().objective(losses)  # the rule on one row
        cur = losses.detach().to(torch.float64)
        self.epoch_sum = cur.clone() if self.epoch_sum is None else self.epoch_sum + cur
        self.epoch_batches += 1
        w = self._weights_like(losses)
        return (w * losses).sum(), w

    def _weights_like(self, losses: Tensor) -> Tensor:
        """Epoch mode's w on the losses' device and dtype: copied once per change of w, not per step
        (a copy from the host would be a sync when the balancer was not moved to the model's device)."""
        cached = self._device_weights
        if cached is None or cached.device != losses.device or cached.dtype != losses.dtype:
            cached = self._device_weights = self.weights.to(losses)
        return cached

    def _step_extras(self) -> dict[str, Any]:
        return {"dwa_weights": self.weights.detach().clone()}

    def _after_move(self) -> None:
        self._device_weights = None

    # ------------------------------------------------------------------ per epoch
    def on_epoch_end(self, info: EpochInfo) -> None:
        """Epoch mode: record this epoch's mean losses and set the next epoch's weights (:meth:`epoch_rows`)."""
        check_epoch_info(self.name, info)
        if self.mode != "epoch":
            return
        if info.train_losses is not None:  # rank-local epoch means: average them (data parallel)
            mean = self._rank_mean(torch.as_tensor(info.train_losses, dtype=torch.float64).detach().flatten(),
                                   self._sync_group())
        elif self.epoch_batches:
            mean = self.epoch_sum / self.epoch_batches
        else:
            raise BalancerError("dwa: on_epoch_end needs EpochInfo.train_losses or at least one backward "
                                "call during the epoch")
        if mean.shape != (self.n_tasks,):
            raise BalancerError(f"dwa: expected {self.n_tasks} epoch losses, got shape {tuple(mean.shape)}")
        if not bool(torch.isfinite(mean).all()):  # before the history takes it: a NaN there would stay
            raise BalancerError(f"dwa: non-finite epoch losses {mean.tolist()}")
        self.epoch_sum, self.epoch_batches = None, 0
        one_row(self.epoch_rows(host(mean), None))

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"history": [h.cpu() for h in self.history],
                "epoch_sum": None if self.epoch_sum is None else self.epoch_sum.cpu(),
                "epoch_batches": self.epoch_batches, "calls": self.calls}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [h.clone() for h in state["history"]]
        self.epoch_sum = None if state["epoch_sum"] is None else state["epoch_sum"].clone()
        self.epoch_batches = int(state["epoch_batches"])
        self.calls = int(state["calls"])
        self._device_weights = None  # the weights buffer was loaded
