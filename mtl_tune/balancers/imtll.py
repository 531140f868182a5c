"""``imtll`` — IMTL-L, the loss part of Impartial Multi-Task Learning (Liu et al., ICLR'21,
https://openreview.net/forum?id=IMPnRXEWpvr; docs/methods.md#imtll).

Learnable scales s_i (init 0), trained jointly with the model on

    L = Σ_i (e^{s_i} ℓ_i − s_i).

For a fixed ℓ_i > 0 the minimiser over s_i is e^{s_i} ℓ_i = 1: every scaled loss is driven to 1,
so that the tasks' losses count equally whatever their units. The gradients of L:

    ∂L/∂ℓ_i = e^{s_i},     ∂L/∂s_i = e^{s_i} ℓ_i − 1.

It is UW's regression form up to the sign of the parameter and a factor 2: with s = −log σ²,
L = 2 · Σ_i ½(e^{−log σ_i²} ℓ_i + log σ_i²) (tested against ``uw``). With a loss ℓ_i ≤ 0 there is
no minimiser: ∂L/∂s_i ≤ −1 < 0 pushes s_i (and the weight e^{s_i}) up without bound, as UW's
log-variances run off for a zero loss; that is the method (the paper assumes positive losses).
The toy gallery feeds it shifted losses (docs/toy.md).

How s is trained: as ``uw``'s log-variances — :meth:`parameters` is ``[scales]`` and the
*training* optimizer updates it, in the param group of :meth:`param_groups` with its own ``lr``
(default 0.025, the project's ``--method-params-lr``; the paper's code is not public, LibMTL
trains its IMTL scales with the model's optimizer and learning rate — see ``imtlfull`` for why
they never move there). Reported weights are e^{s_i}; heads receive the same weighted gradient
(one backward of L). No ×K, no clipping.

The batch-first rule (:meth:`IMTLL.weights_rows`, :func:`imtll_rows`) returns both gradients per
row; :meth:`IMTLL.objective` back-propagates the linearisation Σ w_i ℓ_i + Σ g_i s_i with w, g
those two (detached), whose gradients are L's (its value is not L).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import Balancer, LossBalancer


def imtll_rows(losses: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(∂L/∂ℓ, ∂L/∂s), each (..., K), of L = Σ(e^{s_i}ℓ_i − s_i) at losses ℓ and scales s (..., K), float64."""
    w = np.exp(scales)
    return w, w * losses - 1.0


class IMTLL(LossBalancer):
    """IMTL-L (Liu et al., ICLR'21): learned loss scales s (an ``nn.Parameter``; add
    :meth:`param_groups` to the training optimizer), L = Σ(e^{s_i}ℓ_i − s_i).

    Args:
        n_tasks: K, the number of tasks.
        lr: learning rate of s in its param group (float > 0, default 0.025).
        init: initial value of every s_i (default 0: L starts as the plain sum).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights e^{s_i} (K,).
    """

    name = "imtll"

    def __init__(self, n_tasks: int, lr: float = 0.025, init: float = 0.0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not lr > 0:
            raise ValueError(f"{self.name}: lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.scales = nn.Parameter(torch.full((n_tasks,), float(init)))

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer param group for s with its own learning rate ``lr``."""
        return [{"params": [self.scales], "lr": self.lr}]

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂L/∂ℓ (..., K) and, as ``param_grads``, ∂L/∂s (..., K) at this balancer's s (float32, exact in
        float64); s has the rows' leading dimension after :meth:`start_rows`."""
        w, grad_s = imtll_rows(losses, host(self.scales))
        return RowStep(w, param_grads=grad_s)

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # one (B, K) parameter: the toy's one Adam over it is B independent Adams (element-wise)
        self.scales = nn.Parameter(torch.stack([b.scales.detach().clone() for b in rows]))

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Σ w_i ℓ_i + Σ g_i s_i with w = ∂L/∂ℓ and g = ∂L/∂s from the rule, detached."""
        out = self.weights_rows(host(losses))
        w = torch.from_numpy(one_row(out)).to(losses)
        s = self.scales
        grad_s = torch.from_numpy(out.param_grads).to(s.device)
        return (losses * w).sum() + (s.double() * grad_s).sum().to(losses), w

    def _step_extras(self) -> dict[str, Any]:
        return {"scales": self.scales.detach().clone()}
