"""``si`` — scale-invariant loss: L = Σ_i log ℓ_i (docs/methods.md#si).

Used as a baseline by Nash-MTL (Navon et al., ICML'22) and every FAMO-family paper
(``ScaleInvariantLinearScalarization``). Its gradient is

    ∇L = Σ_i ∇ℓ_i / ℓ_i,

i.e. linear scalarization with the (implicitly detached) weights 1/ℓ_i, so multiplying a
task's loss by any c > 0 leaves the update unchanged (the log turns c into an additive
constant). Heads receive the same weighted gradient, as in the official code.

Options (each documented because the implementations disagree):

* ``form="log"`` (default, paper/FAMO-family) or ``form="log1p"`` — the SamsungLabs/MTL
  ``si`` uses log(1 + ℓ_i), whose weights 1/(1 + ℓ_i) are **not** scale invariant; it is a
  different method in practice and offered only to reproduce that code.
* ``min_losses`` ℓ* (default 0): the logs are taken of D_i = ℓ_i − ℓ*_i, as FAMO does, so
  problems with negative losses (the toy, min ≈ −20) can be run. The official code has no
  shift and no epsilon, so a loss ≤ 0 gives −inf/NaN there; here a D_i ≤ 0 (or
  1 + D_i ≤ 0 for ``log1p``) raises :class:`BalancerError` naming the losses.

The effective weights reported per step are 1/D_i (or 1/(1 + D_i)); they do not sum to
anything fixed — that is the point of the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_tune.balancers._log_losses import loss_floor
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import LossBalancer

FORMS = ("log", "log1p")


class ScaleInvariant(LossBalancer):
    """Scale-invariant loss Σ_i log(ℓ_i − min_i): LS with weights 1/ℓ_i.

    Args:
        n_tasks: K, the number of tasks.
        form: ``"log"`` (paper) or ``"log1p"`` (log(1 + ℓ), not scale invariant).
        min_losses: K lower bounds of the losses (default zeros).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    Sum of log-losses (see the module docstring).
    """

    name = "si"

    float32_state = ("min_losses",)  # the floor keeps its value under model.half() (Balancer.float32_state)

    def __init__(self, n_tasks: int, form: str = "log", min_losses: Sequence[float] | None = None,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        if form not in FORMS:
            raise ValueError(f"si: form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.register_buffer("min_losses", loss_floor(self.name, n_tasks, min_losses))

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """1/D (or 1/(1 + D)) per row; a row with D ≤ 0 (1 + D ≤ 0) fails with the losses named."""
        d = losses - host(self.min_losses)
        if self.form == "log1p":
            d = d + 1.0
        bad = (d <= 0).any(-1)
        what = "ℓ − min_losses" if self.form == "log" else "1 + ℓ − min_losses"

        def reason(index: tuple[int, ...]) -> str:
            return (f"si: {what} must be > 0 for every task, got losses {losses[index].tolist()} with min_losses "
                    f"{self.min_losses.tolist()}; set min_losses below the lowest reachable loss")

        return RowStep(1.0 / d, failed=bad, reason=reason)
