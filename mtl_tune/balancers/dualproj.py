"""``dualproj`` — DualProj: the mean gradient projected onto the dual cone of the task gradients
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
https://arxiv.org/abs/2406.16232, which compares it with UPGrad; the projection is eq. 11 of Lopez-Paz & Ranzato, "Gradient
Episodic Memory for Continual Learning", NeurIPS'17, https://arxiv.org/abs/1706.08840):

    d = π_C(ḡ),   ḡ = (1/K) Σᵢ gᵢ  (with preferences p, Σp = K:  ḡ = Σᵢ (pᵢ/K) gᵢ),
    C = {x : gⱼᵀx ≥ 0 ∀j}.

π_C(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv (G = J Jᵀ): one projection of u = p/K, solved exactly
by :mod:`mtl_tune.balancers._dual_cone` (closed form for K = 2, active-set NNLS for K ≥ 3). If
the mean already decreases every loss (gⱼᵀḡ ≥ 0 ∀j) d is the mean itself; otherwise it is the
closest direction to the mean that increases no loss to first order.

Official code: TorchJD (https://github.com/SimplexLab/TorchJD/tree/862baeda, ``torchjd.aggregation.DualProj``;
compared against torchjd 0.18.0). Departures (docs/methods.md#dualproj): as ``upgrad`` — TorchJD's
``reg_eps = norm_eps = 1e-4`` (needed by quadprog) default to 0 here (the exact projection);
both at 1e-4 reproduce TorchJD. For singular G the coefficients v are one of many with the same d.

Conventions: **mean** scale (the projection of the mean; no ×K); heads get their unweighted task
gradients; no clipping; a projection failing its KKT check is a counted solver failure.
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers._dual_cone import project_weights
from mtl_tune.balancers._dual_cone_method import DualConeBalancer


def dualproj_rows(gram: np.ndarray, preferences: np.ndarray | None = None, reg_eps: float = 0.0,
                  norm_eps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """DualProj weights (..., K) and whether the projection passed its KKT check (...), for Gram
    matrices (..., K, K) and preferences p (K,) (None = ones; u = p/K)."""
    k = gram.shape[-1]
    p = np.ones(k) if preferences is None else preferences
    v, ok = project_weights(gram, (p / k)[None, :], reg_eps, norm_eps)
    return v[..., 0, :], ok


class DualProj(DualConeBalancer):
    """DualProj (Quinton & Rey, 2024; GEM's projection): the mean task gradient projected onto
    the dual cone of the task gradients.

    Args:
        n_tasks: K, the number of tasks.
        preferences: K non-negative task weights p (Σp = K keeps the mean scale): the projected
            vector is Σᵢ (pᵢ/K) gᵢ; ``None`` = all ones (the mean).
        reg_eps: ridge added to the trace-normalised Gramian (TorchJD: 1e-4; default 0 = exact).
        norm_eps: a Gramian whose trace is below this is treated as zero (TorchJD: 1e-4; default 0).

    Common keyword arguments ``max_norm``, ``gradient_path`` and ``jacobian_engine``: see
    :class:`~mtl_tune.balancers.base.GradientBalancer`. ``StepInfo.weights`` are the
    coefficients c of d = Σ cᵢ gᵢ (K,).
    """
    name = "dualproj"
    rule = staticmethod(dualproj_rows)
