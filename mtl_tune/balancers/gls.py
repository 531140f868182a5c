"""``gls`` — geometric loss strategy: L = (Π_i ℓ_i)^{1/K}, the geometric mean of the task losses
(Chennupati et al., "MultiNet++", CVPR'19 workshops, https://arxiv.org/abs/1904.08492;
docs/methods.md#gls).

Its gradient is a linear scalarization with weights that depend on the losses:

    ∂L/∂ℓ_i = L / (K ℓ_i),     ∇L = (L/K) Σ_i ∇ℓ_i / ℓ_i,

i.e. the scale-invariant direction of ``si`` (Σ_i ∇ℓ_i/ℓ_i) times L/K. Multiplying one loss by
c > 0 multiplies L, hence every weight, by c^{1/K}: the direction is scale invariant, the step
size is not (it follows the geometric mean of the losses). The weights are computed in the log
domain, L = exp(mean_i log ℓ_i), so that the product of 40 CelebA losses neither underflows nor
overflows (LibMTL forms the product itself; the value is the same wherever that does not).

The paper has no public code; the reference implementation is LibMTL's ``GLS``
(https://github.com/median-research-group/LibMTL/blob/2d842d67260fc1d3881d758c17f13315b79cd287/LibMTL/weighting/GLS.py),
which backpropagates (Π ℓ_i)^{1/K} and reports ℓ_i/(K Π_j ℓ_j) as its weights — that is not
∂L/∂ℓ_i (it misses the exponent); the project reports ∂L/∂ℓ_i = L/(K ℓ_i), the weights its
update actually uses. Heads receive the same weighted gradient (one backward of L, as LibMTL).
No ×K, no clipping.

Non-positive losses: the geometric mean of numbers with a zero or negative entry has no
logarithm, and a gradient L/(Kℓ_i) that is 0/0 at ℓ_i = 0 (LibMTL's product form gives a NaN
gradient there; with an odd number of negative losses the product is negative and its 1/K-th power
NaN, with an even number finite but meaningless). Here the losses
are shifted by an optional ``min_losses`` ℓ* (default 0, as ``si``), D_i = ℓ_i − ℓ*_i, and a
step with some D_i ≤ 0 raises :class:`~mtl_tune.balancers.base.BalancerError` naming the losses
— never a NaN. The toy (losses down to −20) passes ℓ* = (−21·scale, −21), as for ``si``/``famo``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_tune.balancers._log_losses import loss_floor, shifted
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import LossBalancer


def gls_rows(d: np.ndarray) -> np.ndarray:
    """∂L/∂ℓ (..., K) of L = (Π D_i)^{1/K} for positive shifted losses D (..., K): L/(K D_i), L in the log domain."""
    k = d.shape[-1]
    mean_log = np.log(d).mean(-1, keepdims=True)
    return np.exp(mean_log) / (k * d)


class GeometricLoss(LossBalancer):
    """Geometric loss strategy: backpropagate the geometric mean (Π_i (ℓ_i − ℓ*_i))^{1/K}.

    Args:
        n_tasks: K, the number of tasks.
        min_losses: K lower bounds ℓ* of the losses (default zeros); the logarithms are taken of ℓ − ℓ*.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,), ∂L/∂ℓ_i = L/(K(ℓ_i − ℓ*_i)).
    """

    name = "gls"

    float32_state = ("min_losses",)  # the floor keeps its value under model.half() (Balancer.float32_state)

    def __init__(self, n_tasks: int, min_losses: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        self.register_buffer("min_losses", loss_floor(self.name, n_tasks, min_losses))

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """L/(K D_i) per row; a row with some D_i ≤ 0 fails with the losses named."""
        d, bad, reason = shifted(self.name, losses, host(self.min_losses))
        with np.errstate(invalid="ignore", divide="ignore"):  # failed rows: their numbers are not used
            w = gls_rows(np.where(bad[..., None], 1.0, d))
        return RowStep(np.where(bad[..., None], np.nan, w), failed=bad, reason=reason)
