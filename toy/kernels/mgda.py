"""Kernel of ``mgda``: K × the min-norm point of the hull of the (normalised) gradients.

K = 2 closed form of :func:`mtl_tune.balancers._simplex.min_norm_simplex` on the Gram matrix
scaled by its largest diagonal entry (as there): γ = clip((a₂₂ − a₁₂)/(a₁₁ + a₂₂ − 2a₁₂), 0, 1),
the midpoint when the gradients coincide; normalisers as
:func:`mtl_tune.balancers.mgda.gradient_normalizers`.
"""

from __future__ import annotations

import numpy as np

from ._base import Kernel, clip_rows, combine, gram2


def min_norm_weights_2(a11: np.ndarray, a12: np.ndarray, a22: np.ndarray) -> np.ndarray:
    """(B, 2) simplex weights minimising ‖w₁g₁ + w₂g₂‖² (the ``_two_task`` closed form, batched)."""
    scale = np.maximum(np.maximum(np.abs(a11), np.abs(a22)), 1e-300)
    a11, a12, a22 = a11 / scale, a12 / scale, a22 / scale
    denom = a11 + a22 - 2 * a12
    gamma = np.where(denom <= 1e-300, 0.5, np.clip((a22 - a12) / np.where(denom <= 1e-300, 1.0, denom), 0.0, 1.0))
    return np.stack([gamma, 1.0 - gamma], axis=-1)


class MGDAKernel(Kernel):
    name = "mgda"
    variants = ({"normalization": "loss"}, {"normalization": "loss+"}, {"normalization": "norm"}, {"max_norm": 0.5})

    def setup(self) -> None:
        kinds = np.array([b.normalization for b in self.balancers])
        # (B, 1) masks of the normalisations in use (none of them for the default "none")
        self.masks = {k: (kinds == k)[:, None] for k in ("loss", "loss+", "norm") if (kinds == k).any()}
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def normalizers(self, a11: np.ndarray, a22: np.ndarray, losses: np.ndarray) -> np.ndarray | None:
        """Per-task divisors (B, 2) as ``gradient_normalizers`` (a zero divisor → 1); None = all ones."""
        if not self.masks:
            return None
        norms = np.sqrt(np.maximum(np.stack([a11, a22], -1), 0.0))
        out = np.ones_like(norms)
        for kind, rows in self.masks.items():
            n = {"loss": np.abs(losses), "loss+": np.abs(losses) * norms, "norm": norms}[kind]
            out = np.where(rows, np.where(n > 0, n, 1.0), out)
        return out

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        a11, a12, a22 = gram2(jac)
        n = self.normalizers(a11, a22, losses)
        if n is None:
            self.weights = 2 * min_norm_weights_2(a11, a12, a22)
        else:
            w = min_norm_weights_2(a11 / (n[:, 0] * n[:, 0]), a12 / (n[:, 0] * n[:, 1]), a22 / (n[:, 1] * n[:, 1]))
            self.weights = 2 * w / n
        d = combine(self.weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
