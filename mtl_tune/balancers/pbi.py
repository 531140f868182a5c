"""``pbi`` — penalty-based boundary intersection (Zhang & Li, "MOEA/D: A Multiobjective
Evolutionary Algorithm Based on Decomposition", IEEE TEVC 11(6), 2007,
https://doi.org/10.1109/TEVC.2007.892759), used as a loss scalarisation for gradient training.

With preferences p (direction p̂ = p/‖p‖), the ideal point z and r = ℓ − z:

    d₁ = rᵀp̂            (how far along the preference ray from z),
    d₂ = ‖r − d₁ p̂‖     (how far off the ray),
    f(ℓ) = d₁ + θ d₂,   ∂f/∂ℓ = p̂ + θ (r − d₁p̂)/d₂,

so a step is Σᵢ wᵢ ∇ℓᵢ with w = ∂f/∂ℓ. The penalty θ > 0 pulls the losses onto the ray
{z + t p̂}; d₁ then pushes them down it, to where the ray meets the front (for θ large enough,
also on a non-convex front). θ = 0 is the weighted sum with weights p̂. The off-ray part of w
sums to 0 along no fixed direction: a task can get a *negative* weight (its loss is allowed to
rise to come back to the ray) — the method, not a defect.

Conventions and choices (there is no official multi-task code; TorchJD's ``PBI`` scalariser,
https://github.com/SimplexLab/TorchJD, is the independent implementation the tests compare with):

* ``ideal`` z defaults to the origin, a lower bound of non-negative losses (as TorchJD's default);
  for losses that can be negative give z below every attainable loss (the toy:
  docs/toy.md#preference-fronts).
* On the ray (d₂ = 0) the norm has no gradient; we take its minimum-norm subgradient 0, so w = p̂
  there. Losses put on the ray by a computation are off it by rounding (d₂ ~ eps·‖ℓ − z‖), and the
  unit vector of that noise would add a random θ-sized term: d₂ ≤ 64 eps·‖ℓ − z‖ counts as on the
  ray. TorchJD adds 1e-12 under the square root instead, whose gradient is the same 0 exactly on
  the ray and differs from ours by a relative ~5e-13/d₂² off it (tests).
* No ×K: the objective is the paper's d₁ + θ d₂ (‖p̂‖ = 1, so the weights along the ray sum to at
  most √K).
* θ = 5 by default, the value of the MOEA/D paper's experiments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import LossBalancer

#: d₂ ≤ ON_RAY·‖ℓ − z‖ counts as on the ray: 64 eps, above the rounding of r − d₁p̂ (a few eps·‖r‖).
ON_RAY = 64 * np.finfo(np.float64).eps


def pbi_rows(losses: np.ndarray, preferences: np.ndarray, theta: float, ideal: np.ndarray) -> np.ndarray:
    """∂f/∂ℓ (..., K) of f = d₁ + θ d₂ for losses (..., K) (module docstring); w = p̂ on the ray."""
    direction = preferences / np.linalg.norm(preferences)
    r = losses - ideal
    d1 = (r * direction).sum(-1)  # not a matmul: the same rounding for one row and for many
    off = r - d1[..., None] * direction
    d2 = np.sqrt((off * off).sum(-1))
    # on the ray up to the rounding of r − d₁p̂ (a few eps·‖r‖): that noise has no direction to follow
    on_ray = d2 <= ON_RAY * np.sqrt((r * r).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        unit_off = np.where(on_ray[..., None], 0.0, off / d2[..., None])
    return direction + theta * unit_off


class PenaltyBoundaryIntersection(LossBalancer):
    """PBI (Zhang & Li, MOEA/D 2007): minimise the distance d₁ along a preference ray from the
    ideal point plus θ times the distance d₂ off it.

    Args:
        n_tasks: K, the number of tasks.
        theta: penalty θ ≥ 0 on the distance to the ray (default 5, the paper's).
        preferences: K non-negative preferences, not all zero (default all ones); only their
            direction matters.
        ideal: the ideal point z (K numbers, default the origin), below every attainable loss.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """

    name = "pbi"

    def __init__(self, n_tasks: int, theta: float = 5.0, preferences: Sequence[float] | None = None,
                 ideal: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not (isinstance(theta, (int, float)) and theta >= 0 and np.isfinite(theta)):
            raise ValueError(f"pbi: theta must be a non-negative number, got {theta!r}")
        p = np.ones(n_tasks) if preferences is None else np.asarray(list(preferences), dtype=np.float64)
        if p.shape != (n_tasks,) or not np.isfinite(p).all() or (p < 0).any() or not (p > 0).any():
            raise ValueError(f"pbi: preferences must be {n_tasks} finite non-negative numbers, not all 0, "
                             f"got {preferences!r}")
        z = np.zeros(n_tasks) if ideal is None else np.asarray(list(ideal), dtype=np.float64)
        if z.shape != (n_tasks,) or not np.isfinite(z).all():
            raise ValueError(f"pbi: ideal must be {n_tasks} finite numbers, got {ideal!r}")
        self.theta, self.preferences, self.ideal = float(theta), p, z

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂f/∂ℓ (..., K) (:func:`pbi_rows`)."""
        return RowStep(pbi_rows(losses, self.preferences, self.theta, self.ideal))

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, theta={self.theta}"
