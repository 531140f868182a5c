"""Kernel of ``gradvac``: Gradient Vaccine for K = 2, with its EMA targets per row.

:func:`mtl_tune.balancers.gradvac.gradvac_coefficients` for K = 2: task i meets exactly one other
task j (its random order skips i itself), so the orders cannot change the result and the kernel
does not draw them (nothing in the toy reads the generator's state). With n_i = ‖g_i‖ and
φ = clip(a₁₂/(n₁n₂), −1, 1) — the same cosine for both pairs — and targets φ̂₁₂, φ̂₂₁ (state,
zero at start), each pair (i, j) with n_i, n_j > 0 does

    t = clip(φ̂_ij, −1 + 1e-6, 1 − 1e-6);   if φ < t:  c_i[j] = n_i (t√(1−φ²) − φ√(1−t²)) / (n_j √(1−t²))
    φ̂_ij ← (1 − β) φ̂_ij + β φ     (``"paper"``: every visited pair; ``"official"``: only when φ < t)

and γ = (1 + c₂[1], c₁[2] + 1); x.grad = γ₁g₁ + γ₂g₂ (no ×K: the balancer's sum is at the
summed loss's scale), clipped at ``max_norm``; weights γ. Pairs with a zero gradient are skipped
(no correction, no EMA update), as in the balancer. The correction is the balancer's
``vaccine_step`` written for arrays (that one takes Python floats), same operation order.
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers.gradvac import TARGET_MARGIN
from ._base import Kernel, clip_rows, combine, gram2


def vaccine_steps(gi_norm: np.ndarray, gj_norm: np.ndarray, phi: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``vaccine_step`` on arrays: gᵢ-norm·(t√(1−φ²) − φ√(1−t²)) / (gⱼ-norm·√(1−t²))."""
    root_t = np.sqrt(1.0 - target * target)
    return gi_norm * (target * np.sqrt(1.0 - phi * phi) - phi * root_t) / (gj_norm * root_t)


class GradVacKernel(Kernel):
    name = "gradvac"

    def setup(self) -> None:
        self.beta = self.attr("beta")[:, None]
        self.paper = np.array([b.target_update == "paper" for b in self.balancers])[:, None]
        # φ̂₁₂ and φ̂₂₁ of each row (columns), from the balancers' (zero) initial targets
        self.targets = np.stack([[float(b.targets[0, 1]), float(b.targets[1, 0])] for b in self.balancers])
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        a11, a12, a22 = gram2(jac)
        n1, n2 = np.sqrt(np.maximum(a11, 0.0)), np.sqrt(np.maximum(a22, 0.0))
        visit = ((n1 > 0) & (n2 > 0))[:, None]           # both pairs are skipped on a zero gradient
        gi = np.stack([n1, n2], axis=-1)                  # pair (1, 2) in column 0, (2, 1) in column 1
        gj = gi[:, ::-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            phi = np.clip(a12 / (n1 * n2), -1.0, 1.0)[:, None]
            target = np.clip(self.targets, -1.0 + TARGET_MARGIN, 1.0 - TARGET_MARGIN)
            raise_ = visit & (phi < target)
            step_ = np.where(raise_, vaccine_steps(gi, gj, phi, target), 0.0)
        updated = (1.0 - self.beta) * self.targets + self.beta * phi
        self.targets = np.where(np.where(self.paper, visit, raise_), updated, self.targets)
        w = 1.0 + step_[:, ::-1]                          # c₂[1] adds to γ₁, c₁[2] to γ₂
        self.weights = w
        d = combine(w, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
