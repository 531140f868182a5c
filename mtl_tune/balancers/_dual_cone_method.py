"""The balancer side shared by ``upgrad`` and ``dualproj``: both take the same arguments (task
preferences and TorchJD's two regularisation constants) and differ only in which vectors they
project onto the dual cone of the task gradients (:mod:`mtl_tune.balancers._dual_cone`, the math)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from mtl_tune.balancers._aligned import check_preferences
from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import GradientBalancer

FAILED = "dual-cone projection did not satisfy its KKT conditions"

#: a method's rule: (Gram matrices (..., K, K), preferences or None, reg_eps, norm_eps) →
#: (weights (..., K), whether every projection passed its KKT check (...))
DualConeRule = Callable[[np.ndarray, "np.ndarray | None", float, float], "tuple[np.ndarray, np.ndarray]"]


def check_eps(reg_eps: float, norm_eps: float, method: str) -> tuple[float, float]:
    """Validate the two TorchJD regularisation constants (finite, non-negative)."""
    values = (float(reg_eps), float(norm_eps))
    if not all(np.isfinite(x) and x >= 0.0 for x in values):
        raise ValueError(f"{method}: reg_eps and norm_eps must be finite and non-negative, got "
                         f"{reg_eps!r}, {norm_eps!r}")
    return values


class DualConeBalancer(GradientBalancer):
    """A gradient method whose weights come from dual-cone projections of the Gram matrix: the
    subclass names its batch-first ``rule``; a failed KKT check counts as a solver failure."""

    supports_gram = True
    rule: ClassVar[DualConeRule]

    def __init__(self, n_tasks: int, preferences: Sequence[float] | None = None, reg_eps: float = 0.0,
                 norm_eps: float = 0.0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        self.preferences = check_preferences(preferences, n_tasks, self.name)
        self.reg_eps, self.norm_eps = check_eps(reg_eps, norm_eps, self.name)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        w, ok = type(self).rule(gram, self.preferences, self.reg_eps, self.norm_eps)
        return RowStep(w, solver_failed=~ok, solver_message=f"{self.name}: {FAILED}")
