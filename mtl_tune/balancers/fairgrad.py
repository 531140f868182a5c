"""``fairgrad`` — FairGrad, α-fair multi-task optimisation (Ban & Ji, ICML'24).

Maximising Σ_i U_α(g_iᵀd) of the tasks' loss-decrease rates (U_α(t) = t^{1−α}/(1−α), log t for
α = 1) under a norm bound gives d = G x with x > 0 solving

    (A x)_i = x_i^{−1/α},   A = G Gᵀ.

α → 0 approaches the utilitarian sum (≈ LS), α = 1 is proportional fairness (the Nash-MTL
condition A x = 1/x), α = 2 minimum potential delay (every official run), α → ∞ max–min
fairness. Unlike Nash-MTL the result depends on the gradient scale when α ≠ 1:
A → A/s gives x → s^{−α/(α+1)} x (tested).

Update: shared grad ← K·G x (×K as the official code, "to match the sum loss"), clipped to
``max_norm`` = 1.0 (the official code's effective behaviour); heads get the unweighted task
gradients (official per-task backward). The solve, failure accounting and zero-gradient
handling live in :mod:`mtl_tune.balancers._fairness`; the official code's scipy least_squares
(``res.success`` never checked, unscaled A) is available as ``solver="least_squares"`` on the
scaled problem and agrees with the default Newton solver to 1e-6 relative or better
(tested; typically ~1e-10), while Newton is faster and also converges where least_squares
stalls (α = 10 with gradient norms spread over decades).
"""

from __future__ import annotations

from typing import Any

from mtl_tune.balancers._fairness import FairBalancer


class FairGrad(FairBalancer):
    name = "fairgrad"

    def __init__(self, n_tasks: int, alpha: float = 2.0, solver: str = "newton", **kw: Any) -> None:
        super().__init__(n_tasks, alpha=alpha, solver=solver, **kw)
