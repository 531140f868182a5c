"""Kernel of ``fairgrad``: x.grad = clip(2·(x₁g₁ + x₂g₂)), x from the balancer's K = 2 fairness solve.

(A x)_i = x_i^{−1/α} with the Pareto-stationarity test first (x = 0 there), solved for all rows
at once by :class:`mtl_tune.balancers._fair_pairs.FairPairs` — the code the balancer runs for two
tasks — with the balancer's failure bookkeeping (:mod:`toy.kernels._fair`).
"""

from __future__ import annotations

from ._fair import FairGradFamilyKernel


class FairGradKernel(FairGradFamilyKernel):
    name = "fairgrad"
    #: α changes the equation (α = 1: closed form s = 0; 0.5 and 5: the scalar Newton with
    #: the exponents on either side of 1); max_norm None: the unclipped ×K direction
    variants = ({"alpha": 0.5}, {"alpha": 1.0}, {"alpha": 5.0}, {"max_norm": None})
