"""Kernel of ``go4align``: group weights ω from k-means of γ = P ⊙ Q, x.grad = Σ_i ω_i ∇ℓ_i.

Per step, in float64 as the balancer (:func:`mtl_tune.balancers.go4align.group_indicator`), with
the losses ℓ (B, 2) and the robust step β (``beta``):

    log Q ← log_softmax(log Q − β ℓ),   P = mean(ℓ)/ℓ ("mean") or Σℓ/ℓ ("sum"),   γ = P ⊙ Q

and the K = 2 closed form of the exact 1-D k-means (:func:`~mtl_tune.balancers.go4align.kmeans_1d`):
M = 1 group → ω_i = (γ₁ + γ₂)/2 for both tasks; M = 2 groups → every task is its own group,
ω = γ. The only state is log Q; the method uses no epoch information. A non-positive or
non-finite loss fails the row, as the balancer raises.
"""

from __future__ import annotations

import numpy as np

from ._base import Kernel, clip_rows, combine


def log_softmax2(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (B, 2) values: x − max − log Σ exp(x − max)."""
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class GO4AlignKernel(Kernel):
    name = "go4align"

    def setup(self) -> None:
        self.log_q = np.stack([b.log_q.double().numpy().copy() for b in self.balancers])
        self.beta = self.attr("beta")[:, None]
        # P's numerator: Σℓ for "sum" rows, mean(ℓ) = Σℓ/2 for "mean" rows
        self.p_scale = np.array([1.0 if b.scale == "sum" else 0.5 for b in self.balancers])[:, None]
        self.one_group = np.array([b.num_groups == 1 for b in self.balancers])[:, None]
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        ok = (losses > 0) & (losses < np.inf)          # NaN fails both comparisons
        if not ok.all():
            self.fail(~ok.all(-1), step, [f"BalancerError: go4align: needs finite positive losses (scale = mean/ℓ), "
                                          f"got {row.tolist()}" for row in losses])
        self.log_q = log_softmax2(self.log_q - self.beta * losses)
        p = losses.sum(-1, keepdims=True) * self.p_scale / losses
        gamma = p * np.exp(self.log_q)
        self.weights = np.where(self.one_group, gamma.mean(-1, keepdims=True), gamma)
        out = combine(self.weights, jac)
        return clip_rows(out, self.max_norm) if self.clip else out
