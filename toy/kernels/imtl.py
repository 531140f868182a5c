"""Kernel of ``imtl``: IMTL-G's equal-projection weights for K = 2, in closed form.

For two non-zero, non-parallel gradients the balancer's system (:func:`mtl_tune.balancers.imtl.imtl_g_weights`)
has the unique solution α = (‖g₂‖, ‖g₁‖)/(‖g₁‖ + ‖g₂‖) (its module docstring; opposite gradients
included), so x.grad = α₁g₁ + α₂g₂ — no ×K, as the balancer — clipped at ``max_norm``, weights α.
The balancer's documented choices for the other cases, reproduced here:

* one zero gradient: that task is dropped, the other gets α = 1; both zero: α = ½ each.
* nearly parallel gradients in the same direction (cos > 1 − ``NEAR_PARALLEL``): the balancer's
  3×3 system has condition number ~1/(1 − cos), so its least-squares solve (SVD, cut-off
  1e-12) returns the closed form plus rounding noise of relative size ~ε/(1 − cos) — and at
  cos = 1 exactly (the papers' init (0, 0): both gradients along x₂) its minimum-norm
  solution, which is not the closed form at all. On the toy's symmetry line x₁ = 0 the true
  x₁-component of the update is 0, so that noise *is* the x₁-gradient Adam normalises: the
  trajectory drifts off the line by the balancer's rounding (chaotically: the papers' init
  (0, 0) swings x₁ by ±4e-3 within 6 steps at lr 1e-2). The kernel therefore runs those rows
  exactly as the balancer does — its ``gram``, ``imtl_g_weights``, ``α @ J`` and torch's clip, one
  call per row (only near x₂ = 0 on the line: |x₂| ≲ 0.24, a few hundred steps of a run).
"""

from __future__ import annotations

import numpy as np
import torch

from mtl_tune.balancers.base import BalancerError, gram
from mtl_tune.balancers.imtl import imtl_g_weights
from ._base import Kernel, clip_rows, combine, gram2

#: rows with cos(g₁, g₂) > 1 − this run through the balancer's own solve (see the module docstring).
NEAR_PARALLEL = 1e-3


class IMTLKernel(Kernel):
    name = "imtl"

    def setup(self) -> None:
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        a11, a12, a22 = gram2(jac)
        n1, n2 = np.sqrt(a11), np.sqrt(a22)
        nonzero = (n1 > 0) & (n2 > 0)
        if nonzero.all():
            alpha1 = n2 / (n1 + n2)
        else:  # a zero gradient's task is dropped (the other gets α = 1); both zero: ½ each
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha1 = np.where(nonzero, n2 / (n1 + n2), np.where(n1 > 0, 1.0, np.where(n2 > 0, 0.0, 0.5)))
        w = np.stack([alpha1, 1.0 - alpha1], axis=-1)
        d = combine(w, jac)
        if self.clip:
            d = clip_rows(d, self.max_norm)
        near = nonzero & (a12 > (1.0 - NEAR_PARALLEL) * (n1 * n2))
        if near.any():
            self._balancer_rows(np.flatnonzero(near), step, jac, w, d)
        self.weights = w
        return d

    def _balancer_rows(self, rows: np.ndarray, step: int, jac: np.ndarray, w: np.ndarray, d: np.ndarray) -> None:
        """``IMTLG.backward`` itself on ``rows``, bit for bit (into ``w`` and ``d``): its ``combine``,
        then torch's ``clip_grad_norm_`` where the row clips; its BalancerError fails the row."""
        for r in rows:
            j = torch.from_numpy(jac[r])
            try:
                alpha = imtl_g_weights(gram(j))[0]
            except BalancerError as err:
                mask = np.zeros(self.rows, dtype=bool)
                mask[r] = True
                self.fail(mask, step, f"BalancerError: {err}")
                continue
            p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
            p.grad = alpha @ j
            if np.isfinite(self.max_norm[r]):
                torch.nn.utils.clip_grad_norm_([p], float(self.max_norm[r]))
            w[r] = alpha.numpy()
            d[r] = p.grad.numpy()
