"""Kernel of ``ls``: x.grad = Σ_i w_i ∇ℓ_i with the balancer's fixed ``task_weights``."""

from __future__ import annotations

import numpy as np

from ._base import Kernel, clip_rows, combine


class LSKernel(Kernel):
    name = "ls"
    variants = ({"task_weights": [0.1, 3.0]}, {"max_norm": 0.3})

    def setup(self) -> None:
        # the balancer's own weight tensor (float32 as stored there), so 0.1 means the same number
        self.weights = np.stack([b.task_weights.double().numpy() for b in self.balancers])
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        d = combine(self.weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
