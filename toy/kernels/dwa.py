"""Kernel of ``dwa``: x.grad = Σ_i c_i ∇ℓ_i with DWA's weights w = K · softmax(r / T).

Two modes, per row (the rows of one kernel may mix them), as the balancer:

* ``epoch``: r = L̄(e−1) / L̄(e−2) from the epoch-mean losses the engine hands to
  :meth:`epoch_end` (w = 1 until two epochs have ended); c = w.
* ``iteration``: a FIFO of the last 2W per-step losses initialised to ones; from call W + 2 on
  (calls > W before the append) r = mean(newest W) / mean(oldest W); c = w / K (the balancer
  backpropagates the mean Σ w_i ℓ_i / K) and the reported weights are w / K.

A ratio with a non-positive denominator fails the row, as :func:`mtl_tune.balancers.dwa.dwa_weights`
raises (in :meth:`direction` for iteration rows, in :meth:`epoch_end` for epoch rows).
"""

from __future__ import annotations

import numpy as np

from ._base import Kernel, clip_rows, combine


def dwa_weights_rows(recent: np.ndarray, older: np.ndarray, temp: np.ndarray) -> np.ndarray:
    """K · softmax((recent / older) / T) per row, for (B, 2) loss levels and (B,) temperatures."""
    x = (recent / older) / temp[:, None]
    e = np.exp(x - x.max(-1, keepdims=True))
    return 2 * (e / e.sum(-1, keepdims=True))


def ratio_failure(older: np.ndarray) -> list[str]:
    """The balancer's message for non-positive denominators, per row."""
    return [f"BalancerError: dwa: loss ratios need positive losses, got denominators {row.tolist()}" for row in older]


class _Fifo:
    """The iteration-mode buffers (B_W, 2W, 2) of the (non-empty) ``rows`` that share one window W,
    started from the balancers' own buffers (ones)."""

    def __init__(self, rows: np.ndarray, window: int, temp: np.ndarray, costs: np.ndarray) -> None:
        # a slice when the rows are contiguous (one variant: the usual case) — a view, not a gather
        contiguous = np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size))
        self.rows = slice(int(rows[0]), int(rows[0]) + rows.size) if contiguous else rows
        self.index = rows
        self.window = window
        self.temp = temp[rows]
        self.costs = costs


class DWAKernel(Kernel):
    name = "dwa"

    def setup(self) -> None:
        self.temp = self.attr("temp")
        self.iteration = np.array([b.mode == "iteration" for b in self.balancers])
        self.any_iteration = bool(self.iteration.any())
        self.w = np.stack([b.weights.double().numpy() for b in self.balancers])  # ones: DWA's own w
        # what x.grad and StepInfo carry: w for epoch rows, w / K for iteration rows (the mean loss)
        self.scale = np.where(self.iteration, 0.5, 1.0)[:, None]
        self.weights = self.w * self.scale
        # epoch mode: the previous epoch's mean losses and how many epochs have ended
        self.last_epoch = np.full((self.rows, 2), np.nan)
        self.epochs = 0
        # iteration mode: one FIFO per distinct window, and the number of earlier calls
        windows = self.attr("window", np.int64)
        self.fifos = []
        for w in np.unique(windows[self.iteration]):
            rows = np.flatnonzero(self.iteration & (windows == w))
            costs = np.stack([self.balancers[r].costs.double().numpy() for r in rows])
            self.fifos.append(_Fifo(rows, int(w), self.temp, costs))
        self.calls = 0
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        if self.any_iteration:
            for f in self.fifos:
                c = f.costs
                c[:, :-1] = c[:, 1:]              # drop the oldest, append the newest (the balancer's cat)
                c[:, -1] = losses[f.rows]
                if self.calls > f.window:
                    recent = c[:, f.window:].mean(1)
                    older = c[:, :f.window].mean(1)
                    if (older <= 0).any():
                        bad = np.zeros(self.rows, dtype=bool)
                        bad[f.index] = (older <= 0).any(-1)
                        msgs = [""] * self.rows
                        for r, m in zip(f.index, ratio_failure(older)):
                            msgs[r] = m
                        self.fail(bad, step, msgs)
                    self.w[f.rows] = dwa_weights_rows(recent, older, f.temp)
            self.calls += 1
        # StepInfo.weights of this step (an epoch_end after the last step changes w, not them)
        self.weights = self.w * self.scale
        out = combine(self.weights, jac)
        return clip_rows(out, self.max_norm) if self.clip else out

    def epoch_end(self, epoch: int, mean_losses: np.ndarray, scores: np.ndarray) -> None:
        rows = ~self.iteration
        if not rows.any():
            return
        self.epochs += 1
        if self.epochs >= 2:
            older = self.last_epoch
            bad = rows & (older <= 0).any(-1)
            if bad.any():
                self.fail(bad, (epoch + 1) * self.cfg.epoch_steps, ratio_failure(older))
            new = dwa_weights_rows(mean_losses, older, self.temp)
            self.w[rows] = new[rows]
        self.last_epoch = mean_losses.copy()
