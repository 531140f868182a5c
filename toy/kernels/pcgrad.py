"""Kernel of ``pcgrad``: PCGrad's projections for K = 2, on the Gram matrix.

:func:`mtl_tune.balancers.pcgrad.pcgrad_coefficients` for K = 2: task i visits the tasks of its
random order but skips itself, so it meets exactly one other task j whatever the order, and
projects g_i off g_j when ⟨g_i, g_j⟩ = a₁₂ < 0 (and ‖g_j‖ > 0). Hence, in the balancer's own
arithmetic (c_i starts as e_i, then c_i[j] = 0 − a₁₂/a_jj; the sum adds c₂ to c₁):

    γ = (1 + [a₁₂ < 0, a₁₁ > 0]·(−a₁₂/a₁₁),  [a₁₂ < 0, a₂₂ > 0]·(−a₁₂/a₂₂) + 1),   ÷2 for "mean",

x.grad = γ₁g₁ + γ₂g₂ (clipped at ``max_norm``), weights γ. The random orders cannot change the
result for K = 2, so the kernel does not draw them: the balancer's generator only decides
orders, and nothing in the toy reads its state (no checkpoints).
"""

from __future__ import annotations

import numpy as np

from ._base import Kernel, clip_rows, combine, gram2


class PCGradKernel(Kernel):
    name = "pcgrad"

    def setup(self) -> None:
        self.divisor = np.array([2.0 if b.reduction == "mean" else 1.0 for b in self.balancers])[:, None]
        self.mean = bool((self.divisor != 1.0).any())
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        a11, a12, a22 = gram2(jac)
        conflict = a12 < 0
        # 1 + (−a₁₂/a_jj) = 1 − a₁₂/a_jj in IEEE arithmetic; masked entries divide nothing (0)
        c1 = 1.0 - np.divide(a12, a11, out=np.zeros(self.rows), where=conflict & (a11 > 0))
        c2 = 1.0 - np.divide(a12, a22, out=np.zeros(self.rows), where=conflict & (a22 > 0))
        w = np.stack([c1, c2], axis=-1)
        if self.mean:
            w = w / self.divisor
        self.weights = w
        d = combine(w, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
