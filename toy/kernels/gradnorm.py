"""Kernel of ``gradnorm``: learnable float32 task weights w, trained toward balanced gradient norms.

On the toy the shared parameters are x itself, so the "last shared layer" W is x whatever
``last_shared_params`` is, and ‖∇_W ℓ_i‖ = ‖J_i‖. Per step, in float32 as the balancer
(:func:`mtl_tune.balancers.gradnorm.gradnorm_targets` / ``gradnorm_weight_grad``):

    s = K/Σw,  w̃ = s·w,  n_i = ‖J_i‖,  G_i = w̃_i n_i,  r = (ℓ/ℓ(0)) / mean(ℓ/ℓ(0)),
    target = mean(G) · r^α,  u = sign(G − target) ⊙ n
    x.grad = Σ_i w_i J_i                       (the weights *before* their update)
    w ← Adam(lr)(w, s·(u − Σ_i w̃_i u_i / K)),  w ← max(w, 0) · K / Σ max(w, 0)

(the official weight gradient, through the renormalisation w̃ = w·K/Σw: ``gradnorm_weight_grad``).

ℓ(0) are the float32 losses of the first step. The float32 arithmetic reproduces torch's bits
(:mod:`toy.kernels._losses`: torch's norm, scalar pow loop and Adam, NumPy for the rest): the
sign of G − target flips on one ulp near balance. Failures as the balancer raises: non-finite
losses, non-positive (float32) losses, all weights at 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import Kernel, clip_rows, combine
from ._losses import Float32Adam, ScalarPow

F32 = np.float32


class GradNormKernel(Kernel):
    name = "gradnorm"

    def setup(self) -> None:
        self.w_t = torch.stack([b.weights.detach().clone() for b in self.balancers])  # float32 ones
        self.w = self.w_t.numpy()                    # the same memory: Adam steps it in place
        self.adam = Float32Adam(self.w_t, [b.w_optimizer for b in self.balancers])
        self.pow = ScalarPow([b.alpha for b in self.balancers], 2)
        self.ell = np.empty((self.rows, 2), dtype=F32)
        self.initial: np.ndarray | None = None
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def _check_losses(self, step: int, losses: np.ndarray, ell: np.ndarray) -> None:
        """The balancer's two raises, in its order: non-finite (float64) losses, then ℓ ≤ 0 (float32)."""
        self.fail(~np.isfinite(losses).all(-1), step,
                  [f"BalancerError: gradnorm: non-finite task loss {row.tolist()}" for row in losses])
        self.fail((ell <= 0).any(-1), step,
                  [f"BalancerError: gradnorm: loss ratios need positive losses, got {row.tolist()}" for row in ell])

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        ell = self.ell
        ell[...] = losses                            # .to(float32): round to nearest, as torch
        if not ((ell > 0).all() and np.isfinite(losses).all()):
            self._check_losses(step, losses, ell)
        if self.initial is None:
            self.initial = ell.copy()
        norms = torch.linalg.vector_norm(torch.from_numpy(np.ascontiguousarray(jac)), dim=-1).float().numpy()
        w_now = self.w.copy()
        scale = (F32(1) / (w_now[:, :1] + w_now[:, 1:])) * F32(2)   # K / Σw: reciprocal(Σw)·K, as torch
        scaled = w_now * scale
        g = scaled * norms
        ratio = ell / self.initial
        r = ratio / ((ratio[:, :1] + ratio[:, 1:]) / F32(2))    # torch's mean of two floats
        target = ((g[:, :1] + g[:, 1:]) / F32(2)) * self.pow(r)
        u = np.sign(g - target) * norms
        su = scaled * u
        self.adam.step(scale * (u - (su[:, :1] + su[:, 1:]) / F32(2)))
        w = np.maximum(self.w, F32(0))
        total = w[:, :1] + w[:, 1:]
        if not (total > 0).all():
            self.fail(~(total[:, 0] > 0), step,
                      [f"BalancerError: gradnorm: all task weights reached 0: {row.tolist()}" for row in self.w])
        self.w[...] = w * ((F32(1) / total) * F32(2))   # K / Σw: torch's int / tensor is reciprocal(Σw)·K
        self.weights = w_now.astype(np.float64)
        out = combine(self.weights, jac)
        return clip_rows(out, self.max_norm) if self.clip else out
