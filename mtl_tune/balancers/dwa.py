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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers.base import BalancerError, EpochInfo, LossBalancer

MODES = ("epoch", "iteration")


def dwa_weights(recent: Tensor, older: Tensor, temp: float) -> Tensor:
    """K · softmax((recent/older) / T) — the DWA rule for one pair of loss levels."""
    if bool((older <= 0).any()):
        raise BalancerError(f"dwa: loss ratios need positive losses, got denominators {older.tolist()}")
    r = recent / older
    return r.numel() * torch.softmax(r / temp, dim=0)


def window_ratio_levels(costs: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(mean of the newest ``window`` rows, mean of the oldest ``window`` rows) of a 2W×K buffer."""
    return costs[window:].mean(0), costs[:window].mean(0)


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

    # ------------------------------------------------------------------ per step
    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        cur = losses.detach().to(torch.float64)
        if self.mode == "epoch":
            self.epoch_sum = cur.clone() if self.epoch_sum is None else self.epoch_sum + cur
            self.epoch_batches += 1
            w = self.weights.to(losses)
            return (w * losses).sum(), w
        self.costs = torch.cat([self.costs[1:].to(cur.device), cur[None].to(self.costs.dtype)])
        if self.calls > self.window:
            recent, older = window_ratio_levels(self.costs, self.window)
            self.weights = dwa_weights(recent, older, self.temp).to(self.weights.dtype)
        self.calls += 1
        w = self.weights.to(losses)
        return (w * losses).mean(), w / self.n_tasks

    def _step_extras(self) -> dict[str, Any]:
        return {"dwa_weights": self.weights.detach().clone()}

    # ------------------------------------------------------------------ per epoch
    def on_epoch_end(self, info: EpochInfo) -> None:
        """Epoch mode: record this epoch's mean losses and set the next epoch's weights."""
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
        self.history = [*self.history, mean.cpu()][-2:]
        self.epoch_sum, self.epoch_batches = None, 0
        if len(self.history) == 2:
            self.weights = dwa_weights(self.history[1], self.history[0], self.temp).to(self.weights)

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
