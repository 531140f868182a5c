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
stalls (α = 10 with gradient norms spread over decades). Two tasks: one scalar equation solved
by a monotone Newton iteration (closed form at α = 1), shared with the toy kernel.

At a Pareto-stationary point (0 within 1e-3 of the convex hull of the unit task gradients,
tested on the Gram matrix before solving; e.g. a toy trajectory on the front, where the two
gradients are opposite) no x > 0 solves the equation — x runs off as h^{−α/(α+1)} as the hull
gap h → 0: the step is then converged by definition, with d = 0, weights 0, counted in
``stationary_steps`` and not as a solver failure (:mod:`mtl_tune.balancers._fairness`).
"""

from __future__ import annotations

from typing import Any

from mtl_tune.balancers._fairness import FairBalancer


class FairGrad(FairBalancer):
    """FairGrad (Ban & Ji, ICML'24): the α-fair update direction; α = 1 is Nash-MTL's
    condition.

    Args:
        n_tasks: K, the number of tasks.
        alpha: fairness exponent α > 0 (default 2, the official runs; → 0 utilitarian,
            1 proportional, → ∞ max-min).
        solver: ``"newton"`` (damped Newton on log x, default) or ``"least_squares"`` (scipy,
            as in the official code).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "fairgrad"

    def __init__(self, n_tasks: int, alpha: float = 2.0, solver: str = "newton", **kw: Any) -> None:
        super().__init__(n_tasks, alpha=alpha, solver=solver, **kw)
