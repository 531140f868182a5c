"""``pivrg`` — performance-informed variance reduction gradient (Qin, Wang & Yan, CVPR'25).

FairGrad with α = 2 whose fairness equation carries per-task priorities p from the tasks'
current performance gaps s (docs/methods.md#pivrg):

    T = max((max s − min s) / ln(bound), mintemp),   p = K · softmax(s / T),
    (A x)_i = sqrt(p_i / x_i),   d = K · G x.

Σp = K and max p / min p = exp((max s − min s)/T) ≤ bound, so ``bound`` (> 1) caps how much
more a lagging task can be favoured, and ``mintemp`` keeps p nearly uniform while the scores
are close. Equal scores give p = 1, i.e. FairGrad with α = 2 (tested).

Scores arrive once per epoch through ``on_epoch_end(EpochInfo(scores=...))`` (``needs_scores``):
s_i = the task's mean relative drop vs the single-task baseline in **percent, positive = worse
than STL** (:func:`mtl_tune.metrics.task_scores`), so worse tasks get larger p. Before the first
epoch s = 0 (uniform p), as the official trainers. An epoch without scores (a benchmark without
STL baselines) keeps the previous scores and warns — PIVRG then runs as FairGrad(α = 2).
Which split the scores come from (training metrics on NYUv2/Cityscapes, validation on
CelebA/QM9 in the official trainers) is the trainer's choice, not the balancer's.
Heads unweighted, ×K, ``max_norm`` 1.0, and Pareto-stationary steps (d = 0, counted in
``stationary_steps``, no failure): as FairGrad.
"""

from __future__ import annotations

from collections.abc import Sequence

import math
import warnings
from typing import Any

import numpy as np
import torch

from mtl_tune.balancers._fairness import FairBalancer
from mtl_tune.balancers._rows import RowStep, one_row
from mtl_tune.balancers._common import check_epoch_info
from mtl_tune.balancers.base import Balancer, BalancerError, EpochInfo


def performance_priorities(scores: np.ndarray, bound: float, mintemp: float) -> np.ndarray:
    """p = K·softmax(s/T) with T = max((max s − min s)/ln(bound), mintemp); max p / min p ≤ bound.

    Batch-first: scores (..., K) give priorities (..., K)."""
    s = np.asarray(scores, dtype=np.float64)
    top = s.max(-1, keepdims=True)
    temp = np.maximum((top - s.min(-1, keepdims=True)) / math.log(bound), mintemp)
    e = np.exp((s - top) / temp)  # shifted: same softmax, no overflow
    return s.shape[-1] * e / e.sum(-1, keepdims=True)


class PIVRG(FairBalancer):
    """PIVRG (Qin, Wang & Yan, CVPR'25): FairGrad(α = 2) with performance priorities
    p = K·softmax(s/T) from the per-task scores handed to :meth:`on_epoch_end`.

    Args:
        n_tasks: K, the number of tasks.
        bound: cap on max p / min p (float > 1, default 2).
        mintemp: lower bound of the softmax temperature T over the scores in percent
            (default 10).
        solver: as in :class:`~mtl_tune.balancers.fairgrad.FairGrad`.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "pivrg"
    needs_scores = True

    def __init__(self, n_tasks: int, bound: float = 2.0, mintemp: float = 10.0, solver: str = "newton",
                 **kw: Any) -> None:
        super().__init__(n_tasks, alpha=2.0, solver=solver, **kw)
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 1):
            raise ValueError(f"pivrg: bound must be a number > 1 (ln(bound) divides the score spread), got {bound!r}")
        if not (isinstance(mintemp, (int, float)) and math.isfinite(mintemp) and mintemp > 0):
            raise ValueError(f"pivrg: mintemp must be a positive number, got {mintemp!r}")
        self.bound, self.mintemp = float(bound), float(mintemp)
        self._set_scores(np.zeros(n_tasks))
        self._warned_missing = False

    def task_priorities(self) -> np.ndarray:
        return self.priorities

    def _set_scores(self, scores: np.ndarray) -> None:
        # the priorities change only with the scores (once per epoch): computed here, not every step
        self.scores = scores
        self.priorities = performance_priorities(scores, self.bound, self.mintemp)

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        n = len(rows)
        super().start_rows(rows)
        self._set_scores(np.zeros((n, self.n_tasks)))

    def epoch_rows(self, mean_losses: np.ndarray, scores: np.ndarray | None) -> RowStep | None:
        """Keep each row's finite scores (..., K) for the next epoch's priorities; a row with a
        non-finite score fails (``on_epoch_end`` raises), and keeps its previous scores."""
        if scores is None:
            return None
        finite = np.isfinite(scores).all(-1)
        self._set_scores(np.where(finite[..., None], scores, self.scores))

        def reason(index: tuple[int, ...]) -> str:
            return f"pivrg: scores must be {self.n_tasks} finite numbers, got {scores[index].tolist()}"

        return RowStep(self.scores, failed=~finite, reason=reason)

    def on_epoch_end(self, info: EpochInfo) -> None:
        check_epoch_info(self.name, info)
        if info.scores is None:
            if not self._warned_missing:
                warnings.warn("pivrg: no per-task scores this epoch (no STL baselines?); keeping the previous "
                              "scores — with none ever given PIVRG is FairGrad(alpha=2)", RuntimeWarning, stacklevel=2)
                self._warned_missing = True
            return
        s = torch.as_tensor(info.scores, dtype=torch.float64).detach().cpu().numpy()
        if s.shape != (self.n_tasks,):
            raise BalancerError(f"pivrg: scores must be {self.n_tasks} finite numbers, got {s.tolist()}")
        one_row(self.epoch_rows(np.full(self.n_tasks, np.nan), s))

    def _step_extras(self) -> dict[str, Any]:
        return {**super()._step_extras(), "priorities": torch.from_numpy(self.task_priorities())}

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "scores": self.scores.copy()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self._set_scores(np.asarray(state["scores"], dtype=np.float64).copy())
