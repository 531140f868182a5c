"""Kernel of ``pivrg``: FairGrad(α = 2) whose equation carries the priorities p = K·softmax(s/T).

The per-task scores s arrive in :meth:`PIVRGKernel.epoch_end` (the gap scores the engine hands to
``on_epoch_end``); p comes from the balancer module's :func:`~mtl_tune.balancers.pivrg.performance_priorities`
with each row's ``bound`` and ``mintemp``, and stays fixed until the next epoch (s = 0, p = 1
before the first). Each step is then the balancer's K = 2 solve of (A x)_i = √(p_i/x_i) for all
rows (:class:`mtl_tune.balancers._fair_pairs.FairPairs`), ×K, clipped.
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers.pivrg import performance_priorities
from ._fair import FairGradFamilyKernel


class PIVRGKernel(FairGradFamilyKernel):
    name = "pivrg"

    def setup(self) -> None:
        super().setup()
        self.bound, self.mintemp = self.attr("bound"), self.attr("mintemp")
        self.p: np.ndarray | None = None  # p = 1 until the first scores (identical numbers to passing ones)

    def priorities(self) -> np.ndarray | None:
        return self.p

    def epoch_end(self, epoch: int, mean_losses: np.ndarray, scores: np.ndarray) -> None:
        step = (epoch + 1) * self.cfg.epoch_steps  # the step the engine reports an epoch-end failure at
        finite = np.isfinite(scores).all(-1)
        self.fail(~finite, step, [f"BalancerError: pivrg: scores must be 2 finite numbers, got {s.tolist()}"
                                  for s in scores])
        p = np.ones((self.rows, 2)) if self.p is None else self.p.copy()
        for r in np.flatnonzero(finite):  # once per epoch: the balancer module's own function per row
            p[r] = performance_priorities(scores[r], self.bound[r], self.mintemp[r])
        self.p = p
