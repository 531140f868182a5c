"""Kernel of ``cagrad``: K × the CAGrad direction, from the K = 2 closed form of its dual.

The balancer itself solves K = 2 with :func:`mtl_tune.balancers.cagrad.cagrad_coefficients_2`
(exact minimiser of the dual on [0, 1], derivation in :func:`~mtl_tune.balancers.cagrad.cagrad_dual_2`);
the kernel calls that same function on all rows at once, with each row's ``c`` and ``rescale``.
x.grad = 2 γ G (the ×K of the balancer), clipped at ``max_norm``; the weights are 2γ. The closed
form cannot fail, so ``solver_failures`` stays 0 (the balancer reports the same count).
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers.cagrad import cagrad_coefficients_2
from ._base import Kernel, clip_rows, combine, gram2


class CAGradKernel(Kernel):
    name = "cagrad"
    variants = ({"c": 0.0}, {"c": 0.9, "rescale": 0}, {"rescale": 2}, {"max_norm": 0.5})

    def setup(self) -> None:
        self.c = self.attr("c")
        self.rescale = self.attr("rescale", np.int64)
        self.k = self.attr("n_tasks")[:, None]          # the ×K of the balancer (2 here)
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())
        self.solver_failures = np.zeros(self.rows, dtype=np.int64)

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        a11, a12, a22 = gram2(jac)
        self.weights = cagrad_coefficients_2(a11, a12, a22, self.c, self.rescale) * self.k
        d = combine(self.weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
