"""``imtlfull`` — IMTL, Impartial Multi-Task Learning as in the paper: IMTL-L's learned loss scales,
then IMTL-G on the gradients of the scaled losses (Liu et al., ICLR'21,
https://openreview.net/forum?id=IMPnRXEWpvr; docs/methods.md#imtlfull).

Per step, with learnable scales s (init 0) and D = diag(e^{s}):

1. scaled losses ℓ'_i = e^{s_i} ℓ_i − s_i (``imtll``); their shared gradients g'_i = e^{s_i} g_i, so
   their Gram matrix is A' = D A D — the rule stays a function of the step's (A, ℓ);
2. IMTL-G (``imtl``'s :func:`~mtl_tune.balancers.imtl.imtl_rows`, the same solver) on A' gives α'
   (Σα' = 1) with d = Σ α'_i g'_i = Σ c_i g_i, c_i = α'_i e^{s_i} (the reported weights);
3. s is trained by the training optimizer on ∂/∂s_i Σ_j ℓ'_j = e^{s_i} ℓ_i − 1 (IMTL-L's gradient,
   the gradient the paper's Algorithm 1 and LibMTL's per-task backward give s);
4. heads receive ∇ Σ_i ℓ'_i, i.e. e^{s_i} ∇ℓ_i — the scaled losses' own gradients, not weighted by
   α' (the paper's Algorithm 1; LibMTL's per-task backward does the same).

What the scales change: the unit gradients u_i are the same for g_i and e^{s_i} g_i, so the
equal-projection conditions u_iᵀd = t have the same solutions up to scale, and the direction is
IMTL-G's: c = α / Σ_j α_j e^{−s_j}, with α IMTL-G's weights on the unscaled A (an identity the
tests check). The scales set the step size of the shared update (it grows as the scaled losses'
weights e^{s} grow) and the heads' weights. With s = 0 the shared update is exactly ``imtl``'s.

Degenerate cases are ``imtl``'s (zero gradients, collinear gradients, the undefined case that raises
:class:`~mtl_tune.balancers.base.BalancerError`); a loss ≤ 0 makes s run off as in ``imtll``.

Departures from the reference implementation, LibMTL's ``IMTL``
(https://github.com/median-research-group/LibMTL/blob/2d842d67260fc1d3881d758c17f13315b79cd287/LibMTL/weighting/IMTL.py;
the authors published no code):

* LibMTL creates the scales as a plain tensor with ``requires_grad=True``, not an ``nn.Parameter``,
  and its trainer builds the optimizer from ``model.parameters()``: s receives gradients but is
  never stepped, stays 0, and LibMTL's IMTL runs as IMTL-G with heads on the plain losses. The
  project trains s (its own param group, ``lr`` default 0.025 = the project's method-params lr,
  as ``uw``); ``imtl`` is the s = 0 method.
* IMTL-G itself is ``imtl``'s solver (least squares in well-scaled variables, K = 2 closed form)
  instead of LibMTL's matrix inverse; see ``imtl.py``.
* Gradients of the shared parameters (LibMTL's default; its ``rep_grad`` option, IMTL-G on the
  shared representation, is not offered).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import Balancer, GradientBalancer, StepInfo
from mtl_tune.balancers.imtl import UNDEFINED, imtl_rows
from mtl_tune.balancers.imtll import imtll_rows


def imtlfull_rows(gram: np.ndarray, losses: np.ndarray, scales: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IMTL on float64 rows: (c (..., K), ∂L/∂s (..., K), zero-gradient tasks (...), common projection t of
    the scaled gradients (...), consistent (...)) for Gram matrices (..., K, K), losses and scales (..., K)."""
    e, grad_s = imtll_rows(losses, scales)
    alpha, n_zero, t, ok = imtl_rows(gram * e[..., :, None] * e[..., None, :])
    return alpha * e, grad_s, n_zero, t, ok


class IMTL(GradientBalancer):
    """IMTL (Liu et al., ICLR'21): IMTL-L's learned scales s (an ``nn.Parameter``; add
    :meth:`param_groups` to the training optimizer), IMTL-G on the scaled losses' gradients.

    Args:
        n_tasks: K, the number of tasks.
        lr: learning rate of s in its param group (float > 0, default 0.025).
        init: initial value of every s_i (default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping), ``jacobian_engine`` and
    ``gradient_path``: see :class:`~mtl_tune.balancers.base.GradientBalancer`. Call :meth:`backward`
    (or :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the coefficients
    c (K,) of d = Σ c_i g_i on the unscaled task gradients.
    """

    name = "imtlfull"
    supports_gram = True

    def __init__(self, n_tasks: int, lr: float = 0.025, init: float = 0.0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.scales = nn.Parameter(torch.full((n_tasks,), float(init)))
        self._last: dict[str, Any] = {}
        self._grad_s: np.ndarray | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer param group for s with its own learning rate ``lr``."""
        return [{"params": [self.scales], "lr": self.lr}]

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """c (..., K) and, as ``param_grads``, ∂L/∂s (..., K) at this balancer's s (a leading row
        dimension after :meth:`start_rows`)."""
        c, grad_s, n_zero, t, ok = imtlfull_rows(gram, losses, host(self.scales))
        if gram.ndim == 2:  # one row: the balancer's step reports these and writes s's gradient
            self._last = {"zero_grad_tasks": int(n_zero), "projection": float(t)} if ok else {}
            self._grad_s = grad_s

        def reason(index: tuple[int, ...]) -> str:
            return f"{UNDEFINED.replace('imtl:', 'imtlfull:', 1)} (residual {float(t[index]):.3g})"

        return RowStep(c, failed=~ok, reason=reason, param_grads=grad_s)

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # one (B, K) parameter: the toy's one Adam over it is B independent Adams (element-wise)
        self.scales = nn.Parameter(torch.stack([b.scales.detach().clone() for b in rows]))

    def head_weights(self, weights: Tensor, losses: Tensor) -> Tensor:
        """e^{s_i}: the heads get the gradients of the scaled losses e^{s_i}ℓ_i − s_i."""
        return torch.exp(self.scales.detach().double()).to(losses)  # float64 as the rule's e^{s}

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        """The IMTL-G step of :class:`~mtl_tune.balancers.base.GradientBalancer` on the scaled losses,
        then ∂L/∂s (from the same, rank-mean, losses) added to s's gradient through autograd."""
        self._grad_s = None
        info = super().backward(losses, shared_params, task_params, representation)
        if self._grad_s is not None and self.scales.requires_grad:
            grad = torch.from_numpy(self._grad_s).to(self.scales)
            torch.autograd.backward([self.scales], grad_tensors=[grad])
        return info

    def _step_extras(self) -> dict[str, Any]:
        return {**self._last, "scales": self.scales.detach().clone()}
