"""``cagrad`` — Conflict-Averse Gradient descent (Liu et al., NeurIPS'21).

With g_0 = mean_i g_i and A = G Gᵀ, solve the dual over the simplex
    w* = argmin_{w ∈ Δ}  wᵀ A b + c‖g_0‖ √(wᵀ A w + 1e-8),   b = 1/K · 1,
then d = g_0 + λ G w* with λ = c‖g_0‖ / ‖G w*‖. ``rescale`` 0/1/2 divides d by 1,
1 + c², 1 + c (the official benchmarks use 1). c = 0 is gradient descent on the mean.
The update is written at the scale of the summed loss (×K, as the official code does);
task heads receive the unweighted task gradients (methods.md §3.7).

Solver: SLSQP (as the official code) in float64 on the K×K Gram matrix, warm-started at
uniform weights. Unlike the official code we check ``res.success``: a failed solve is
counted (``solver_failures`` in the step extras), warned about, and raises after 20
consecutive failures; the failed step uses the best feasible iterate projected onto
the simplex, never a silent switch to another method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtl_tune.balancers._simplex import project_to_simplex
from mtl_tune.balancers.base import GradientBalancer, SolverFailureCounter, gram


def cagrad_coefficients(gram_matrix: np.ndarray, c: float, rescale: int = 1) -> tuple[np.ndarray, bool, str]:
    """Coefficients γ (K,) with d = Σ γ_i g_i (mean scale), plus (solver success, message)."""
    a = np.asarray(gram_matrix, dtype=np.float64)
    k = a.shape[0]
    b = np.full(k, 1.0 / k)
    ok, msg = True, "ok"
    g0_norm = float(np.sqrt(max(b @ a @ b, 0.0) + 1e-8))
    if c == 0 or k == 1:
        w = b.copy()
    else:
        scale = max(float(np.max(np.abs(np.diag(a)))), 1e-300)
        an = a / scale  # solve on a normalised Gram (same minimiser), map back
        cn = c * float(np.sqrt(max(b @ an @ b, 0.0) + 1e-8 / scale))
        ab = an @ b

        def obj(w: np.ndarray) -> float:
            return float(w @ ab + cn * np.sqrt(max(w @ an @ w, 0.0) + 1e-8 / scale))

        res = minimize(obj, b, bounds=[(0.0, 1.0)] * k,
                       constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},), method="SLSQP",
                       options={"ftol": 1e-12, "maxiter": 200})
        ok, msg = bool(res.success), str(res.message)
        w = project_to_simplex(res.x)
    gw_norm = float(np.sqrt(max(w @ a @ w, 0.0)))
    lam = c * g0_norm / (gw_norm + 1e-8)
    coef = b + lam * w
    if rescale == 1:
        coef = coef / (1 + c ** 2)
    elif rescale == 2:
        coef = coef / (1 + c)
    return coef, ok, msg


class CAGrad(GradientBalancer):
    name = "cagrad"

    def __init__(self, n_tasks: int, c: float = 0.4, rescale: int = 1, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not (0.0 <= c < 1e3):
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
        self.c, self.rescale = float(c), int(rescale)
        self.failures = SolverFailureCounter(self.name)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        coef, ok, msg = cagrad_coefficients(gram(jacobian).cpu().numpy(), self.c, self.rescale)
        if ok:
            self.failures.success()
        else:
            self.failures.failure(msg)
        coef_t = torch.from_numpy(coef * self.n_tasks).to(jacobian.device)
        return coef_t.to(jacobian.dtype) @ jacobian, coef_t

    def _step_extras(self) -> dict[str, Any]:
        return {"solver_failures": self.failures.total}

    def _extra_state(self) -> dict[str, Any]:
        return {"failures": self.failures.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.failures.load_state_dict(state["failures"])
