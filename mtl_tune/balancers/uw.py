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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtl_tune.balancers.base import LossBalancer

FORMS = ("regression", "classification")


def uw_objective(losses: Tensor, log_vars: Tensor, form: str = "regression") -> tuple[Tensor, Tensor]:
    """Return (L, ∂L/∂ℓ) for the uncertainty objective; see the module docstring."""
    s = log_vars.to(losses)
    precision = torch.exp(-s)
    if form == "regression":
        return 0.5 * (precision * losses + s).sum(), 0.5 * precision.detach()
    if form == "classification":
        return (precision * losses + 0.5 * s).sum(), precision.detach()
    raise ValueError(f"uw: form must be one of {FORMS}, got {form!r}")


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

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return uw_objective(losses, self.log_vars, self.form)

    def _step_extras(self) -> dict[str, Any]:
        return {"precision": torch.exp(-self.log_vars.detach()), "log_vars": self.log_vars.detach().clone()}


