"""Kernel of ``graddrop``: gradient sign dropout per coordinate, with the balancer's own draws.

Per row and coordinate c (:mod:`mtl_tune.balancers.graddrop`): purity P_c = ½(1 + Σᵢg_ic/Σᵢ|g_ic|)
(½ where both are 0), keep the positive entries if U_c < P_c else the negative ones,
m_ic = λ + (1 − λ)·[kept, g_ic ≠ 0], x.grad = Σᵢ m_i ⊙ g_i (clipped at ``max_norm``), weights
w_i = ⟨m_i ⊙ g_i, g_i⟩/‖g_i‖² on rows rescaled by their largest |entry| (1 for a zero gradient),
in the balancer's operation order.

Randomness: U comes from each row's balancer generator (``balancers[r].generator``, seeded by the
row's ``seed``), float64 as the balancer draws it. A CPU generator fills ``torch.rand(n)`` element
by element, so one draw of 2·``CHUNK`` numbers is the balancer's next ``CHUNK`` draws of 2 in a
row: the kernel draws a chunk per row every ``CHUNK`` steps (the equivalence test checks the
streams agree) instead of one torch call per row per step. The generators end further ahead than
the balancers' would; nothing in the toy reads their state.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import Kernel, clip_rows

#: steps of uniforms drawn per row at a time.
CHUNK = 1024


class GradDropKernel(Kernel):
    name = "graddrop"

    def setup(self) -> None:
        self.leak = self.attr("leak")[:, None, None]
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())
        self.uniforms = np.empty((self.rows, CHUNK, 2))
        self.used = CHUNK                                   # draw on the first step

    def _next_uniforms(self) -> np.ndarray:
        """(B, 2) uniforms of this step: the next two numbers of every row's generator."""
        if self.used == CHUNK:
            for r, b in enumerate(self.balancers):   # CPU generators (the toy's Jacobian lives there)
                self.uniforms[r] = torch.rand(2 * CHUNK, generator=b.generator, dtype=torch.float64
                                              ).view(CHUNK, 2).numpy()
            self.used = 0
        u = self.uniforms[:, self.used]
        self.used += 1
        return u

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        u = self._next_uniforms()
        g1, g2 = jac[:, 0], jac[:, 1]
        total, magnitude = g1 + g2, np.abs(g1) + np.abs(g2)
        with np.errstate(divide="ignore", invalid="ignore"):
            purity = 0.5 * (1.0 + np.where(magnitude > 0, total / magnitude, 0.0))
        keep_positive = (u < purity)[:, None, :]              # (B, 1 task axis, 2 coordinates)
        mask = np.where(jac > 0, keep_positive, ~keep_positive) & (jac != 0)
        mult = self.leak + (1.0 - self.leak) * mask
        d = (mult * jac).sum(1)
        self.weights = self._effective_weights(jac, mult)
        return clip_rows(d, self.max_norm) if self.clip else d

    @staticmethod
    def _effective_weights(jac: np.ndarray, mult: np.ndarray) -> np.ndarray:
        """``effective_weights`` of the balancer on (B, 2, 2): ⟨m ⊙ r, r⟩/‖r‖² with r = g/max|g|."""
        peak = np.abs(jac).max(-1, keepdims=True)
        r = jac / np.where(peak > 0, peak, 1.0)
        energy = (r * r).sum(-1)
        kept = (mult * r * r).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(energy > 0, kept / np.where(energy > 0, energy, 1.0), 1.0)
