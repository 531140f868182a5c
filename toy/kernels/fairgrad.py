"""Kernel of ``fairgrad``: x.grad = clip(2·(x₁g₁ + x₂g₂)), x from the balancer's K = 2 fairness solve.

(A x)_i = x_i^{−1/α} with the Pareto-stationarity test first (x = 0 there), solved for all rows
at once by :class:`mtl_tune.balancers._fair_pairs.FairPairs` — the code the balancer runs for two
tasks — with the balancer's failure bookkeeping (:mod:`toy.kernels._fair`).
"""

from __future__ import annotations

from ._fair import FairGradFamilyKernel


class FairGradKernel(FairGradFamilyKernel):
    name = "fairgrad"
