"""Kernel of ``famo``: softmax-of-logits weights on log(ℓ − ℓ*), logits learnt from post-step losses.

Per step, with z = softmax(ξ) (ξ float32, as the balancer's logits), D = ℓ − ℓ* + ε:

    x.grad = Σ_i (z_i / D_i) / c · ∇ℓ_i,   c = Σ_i z_i / D_i      (gradient of Σ z_i log D_i / c)

and after the optimizer step, with the losses ℓ' at the new point (:meth:`after_step`):

    δ_i = log D_i(ℓ) − log D_i(ℓ'),   ξ.grad = z ⊙ (δ − zᵀδ),   one Adam(w_lr, weight_decay γ) step.

The logits' update reproduces the balancer's float32 arithmetic bit for bit
(:mod:`toy.kernels._losses`: torch's softmax, log and Adam, NumPy float32 for the rest): the
logit gradient is a difference of float32 logs of nearly equal numbers, so it must round as the
balancer's does. ``StepInfo.weights`` are :func:`mtl_tune.balancers.famo.famo_weights`, i.e. z
taken in float64 from the float32 logits; the direction uses the float32 softmax cast to
float64, as the balancer's objective does. A loss at or below ``min_losses`` fails the row
(before the step in :meth:`direction`, after it in :meth:`after_step`), as the balancer raises.
"""

from __future__ import annotations

import numpy as np
import torch

from mtl_tune.balancers.famo import EPS
from ._base import Kernel, clip_rows, combine
from ._losses import Float32Adam, one_thread

F32 = np.float32


def softmax2(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, 2) logits in float64 (the max is subtracted, as torch does)."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class FAMOKernel(Kernel):
    name = "famo"
    needs_post_step_losses = True

    def setup(self) -> None:
        # ℓ* as the balancer stores it (float32): −2.1 is −2.0999999046… in both forms
        self.min32 = np.stack([b.min_losses.detach().float().numpy() for b in self.balancers])
        self.min64 = self.min32.astype(np.float64)
        self.logits_t = torch.stack([b.logits.detach().clone() for b in self.balancers])
        self.logits = self.logits_t.numpy()          # the same memory: Adam steps it in place
        self.adam = Float32Adam(self.logits_t, [b.w_optimizer for b in self.balancers])
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())
        # float32 D of the losses before (row 0) and after (row 1) the optimizer step, for torch's log
        self.d32_t = torch.empty(2, self.rows, 2, dtype=torch.float32)
        self.d32 = self.d32_t.numpy()
        self.step = 0
        self._refresh()

    def _refresh(self) -> None:
        """z after a logits update: float32 softmax (objective, ξ.grad) and the float64 one (weights)."""
        with one_thread():
            self.z32 = torch.softmax(self.logits_t, dim=-1).numpy()
        self.z_obj = self.z32.astype(np.float64)
        self.z64 = softmax2(self.logits.astype(np.float64))

    def _check(self, losses: np.ndarray, step: int) -> None:
        bad = (losses <= self.min64).any(-1)
        if bad.any():
            self.fail(bad, step, [f"BalancerError: famo: a loss {losses[r].tolist()} is not above min_losses "
                                  f"{self.min32[r].tolist()}; set min_losses below the lowest reachable loss"
                                  for r in range(self.rows)])

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self._check(losses, step)
        self.step = step
        self.d32[0] = losses                         # prev_losses.to(float32) of after_optimizer_step
        d = losses - self.min64 + EPS
        zd = self.z_obj / d
        coef = zd / (zd[:, :1] + zd[:, 1:])          # z_i / (c D_i), c = Σ z/D
        zd = self.z64 / d
        self.weights = zd / (zd[:, :1] + zd[:, 1:])
        out = combine(coef, jac)
        return clip_rows(out, self.max_norm) if self.clip else out

    def after_step(self, losses: np.ndarray) -> None:
        self._check(losses, self.step + 1)
        d32 = self.d32
        d32[1] = losses
        d32 -= self.min32                            # float32 ℓ − ℓ*, then + ε (a float32 constant)
        d32 += F32(EPS)
        logd = torch.log(self.d32_t).numpy()         # torch's (VML) float32 log
        delta = logd[0] - logd[1]
        z = self.z32
        zd = z * delta
        self.adam.step(z * (delta - (zd[:, :1] + zd[:, 1:])))   # zᵀδ: a two-element sum is one addition
        self._refresh()
