"""``uw`` — homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR'18;
docs/methods.md#uw).

Learnable s_i = log σ_i² (init 0), trained jointly with the model:

* ``form="regression"`` (default; nash-mtl / FAMO-family code, Kendall's Gaussian
  likelihood applied to every task):   L = Σ_i ½ (e^{−s_i} ℓ_i + s_i).
  For a fixed ℓ_i > 0 the minimiser over s_i is e^{−s_i} = 1/ℓ_i.
* ``form="classification"`` (SamsungLabs/MTL ``uncertainty``):   L = Σ_i (e^{−s_i} ℓ_i + ½ s_i),
  minimiser e^{−s_i} = 1/(2ℓ_i) — the same method up to a factor 2 in the weights.

Both forms are unbounded below when a loss reaches 0 (s → −∞); that is the method.

How s is trained: :meth:`parameters` returns ``[log_vars]``, and the *training* optimizer
must update it — the FAMO-family trainers put it in a second Adam param group with
lr = ``--method-params-lr`` (0.025). ``lr`` is therefore a constructor argument that this
class only stores (and returns in :meth:`param_groups`, the ready-made group for
``torch.optim.Adam([{"params": model_params}, *balancer.param_groups()], lr=...)``); the
trainer reads it. Note the official CelebA trainers forget this group, so there s never
moves and UW degenerates to ½·LS (docs/methods.md#learnable-balancer-parameters) — we do not
reproduce that bug.

Reported weights are the effective ∂L/∂ℓ_i (½e^{−s} or e^{−s}); the official code reports
e^{−s} for the regression form, available here as ``extras["precision"]``.
Heads receive the same weighted gradient (official behaviour).

The batch-first rule (:meth:`Uncertainty.weights_rows`, :func:`uw_rows`) gives both gradients of
L per row, with c = ½ (regression) or 1 (classification):

    ∂L/∂ℓ_i = c·e^{−s_i},     ∂L/∂s_i = ½ − c·e^{−s_i}·ℓ_i

(the s term is ½s_i in both forms). :meth:`Uncertainty.objective` back-propagates the
linearisation Σ_i w_i ℓ_i + Σ_i g_i s_i with w, g those two (detached), whose gradients are L's:
one copy of the math serves the balancer and the toy's generic kernel (which steps each row's s
with the training optimizer's Adam, as the trainer does after the backward). Its *value* is not L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import Balancer, LossBalancer

FORMS = ("regression", "classification")
#: c of ∂L/∂ℓ_i = c·e^{−s_i} per form (the ½ of the regression form's ½(e^{−s}ℓ + s))
LOSS_COEF = {"regression": 0.5, "classification": 1.0}


def uw_rows(losses: np.ndarray, log_vars: np.ndarray, form: str = "regression") -> tuple[np.ndarray, np.ndarray]:
    """(∂L/∂ℓ, ∂L/∂s), each (..., K), of the uncertainty objective at losses ℓ and log-variances s
    (..., K), float64: w = c·e^{−s} and ½ − w·ℓ (see the module docstring)."""
    if form not in LOSS_COEF:
        raise ValueError(f"uw: form must be one of {FORMS}, got {form!r}")
    w = LOSS_COEF[form] * np.exp(-log_vars)
    return w, 0.5 - w * losses


class Uncertainty(LossBalancer):
    """Homoscedastic uncertainty weighting (Kendall et al., CVPR'18): learned log-variances
    s (an ``nn.Parameter``; add :meth:`param_groups` to the training optimizer).

    Args:
        n_tasks: K, the number of tasks.
        lr: learning rate of s in its param group (float > 0, default 0.025).
        form: ``"regression"`` ½(e^{−s}ℓ + s) or ``"classification"`` e^{−s}ℓ + ½s.
        init: initial value of every s_i (default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    Learned log-variances s_i (see the module docstring).
    """

    name = "uw"

    def __init__(self, n_tasks: int, lr: float = 0.025, form: str = "regression", init: float = 0.0,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not lr > 0:
            raise ValueError(f"uw: lr must be > 0, got {lr}")
        if form not in FORMS:
            raise ValueError(f"uw: form must be one of {FORMS}, got {form!r}")
        self.lr, self.form = float(lr), form
        self.log_vars = nn.Parameter(torch.full((n_tasks,), float(init)))

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer param group for s with its own learning rate ``lr``."""
        return [{"params": [self.log_vars], "lr": self.lr}]

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂L/∂ℓ (..., K) and, as ``param_grads``, ∂L/∂s (..., K) at this balancer's s (float32,
        exact in float64); s has the rows' leading dimension after :meth:`start_rows`."""
        w, grad_s = uw_rows(losses, host(self.log_vars), self.form)
        return RowStep(w, param_grads=grad_s)

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # one (B, K) parameter: the toy's one Adam over it is B independent Adams (element-wise)
        self.log_vars = nn.Parameter(torch.stack([b.log_vars.detach().clone() for b in rows]))

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Σ w_i ℓ_i + Σ g_i s_i with w = ∂L/∂ℓ and g = ∂L/∂s from the rule, detached: autograd then
        gives ℓ the weights w and s the gradient g (float64, cast to s's dtype as for L itself)."""
        out = self.weights_rows(host(losses))
        w = torch.from_numpy(one_row(out)).to(losses)
        s = self.log_vars
        grad_s = torch.from_numpy(out.param_grads).to(s.device)
        return (losses * w).sum() + (s.double() * grad_s).sum().to(losses), w

    def _step_extras(self) -> dict[str, Any]:
        return {"precision": torch.exp(-self.log_vars.detach()), "log_vars": self.log_vars.detach().clone()}


