"""``upgrad`` — Unconflicting Projection of Gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, https://arxiv.org/abs/2406.16232).

Each task gradient gᵢ is projected onto the dual cone C = {x : gⱼᵀx ≥ 0 ∀j} of all of them (the
directions that increase no loss to first order), and the projections are averaged:

    d = (1/K) Σᵢ π_C(gᵢ)                       (the paper's A_UPGrad, eq. 5)
    with preferences p (Σp = K):  d = Σᵢ (pᵢ/K) π_C(gᵢ)  (TorchJD's ``pref_vector`` = p/K).

π_C(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv (Proposition 1, G = J Jᵀ), so d = Jᵀ Σᵢ vᵢ with vᵢ the
projection coefficients of uᵢ = (pᵢ/K) eᵢ: a combination of the task gradients with weights from
the Gramian alone (``supports_gram``). The projections are solved exactly by the shared
:mod:`mtl_tune.balancers._dual_cone` (closed form for K = 2, an active-set NNLS for K ≥ 3).

Properties (tested): d ∈ C (no task's loss increases to first order); if no two gradients
conflict (gᵢᵀgⱼ ≥ 0 for all i, j) every gᵢ is already in C and d is the plain mean; d is linear
in a common scale of the gradients and independent of the weights' overall scale.

Official code: TorchJD (https://github.com/SimplexLab/TorchJD/tree/862baeda, ``torchjd.aggregation.UPGrad``; we
compare against torchjd 0.18.0). Departures, all documented in docs/methods.md#upgrad:

* ``reg_eps`` / ``norm_eps``: TorchJD adds 1e-4·I to the trace-normalised Gramian and treats a
  Gramian of trace < 1e-4 as zero (then d = the mean), because quadprog needs a positive-definite
  matrix. Our solver is exact on a positive semi-definite Gramian, so both default to 0 (the
  paper's exact projection); setting both to 1e-4 reproduces TorchJD to the solvers' tolerance.
* Linearly dependent gradients (singular G): the projection Jᵀv is unique, v is not; we return
  the one our active-set solver reaches (TorchJD needs the ridge there). Parity is on d.

Conventions: **mean** scale (the paper's 1/K; no ×K, unlike the FAMO-family gradient methods,
docs/methods.md#update-scale); heads get their unweighted task gradients (TorchJD's
``mtl_backward``); no clipping. A projection that fails its KKT check is a counted solver
failure (warned, fatal after 20 in a row), never silently replaced.
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers._dual_cone import project_weights
from mtl_tune.balancers._dual_cone_method import DualConeBalancer

def upgrad_rows(gram: np.ndarray, preferences: np.ndarray | None = None, reg_eps: float = 0.0,
                norm_eps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """UPGrad weights (..., K) and whether every projection passed its KKT check (...), for Gram
    matrices (..., K, K) and preferences p (K,) (None = ones; weights uᵢ = pᵢ/K)."""
    k = gram.shape[-1]
    p = np.ones(k) if preferences is None else preferences
    v, ok = project_weights(gram, np.diag(p / k), reg_eps, norm_eps)
    return v.sum(-2), ok


class UPGrad(DualConeBalancer):
    """UPGrad (Quinton & Rey, 2024): the mean of every task gradient's projection onto the dual
    cone of all task gradients.

    Args:
        n_tasks: K, the number of tasks.
        preferences: K non-negative task weights p (scaled as given; Σp = K keeps the mean scale),
            the projections are combined as Σᵢ (pᵢ/K) π_C(gᵢ); ``None`` = all ones (the paper).
        reg_eps: ridge added to the trace-normalised Gramian (TorchJD: 1e-4; default 0 = exact).
        norm_eps: a Gramian whose trace is below this is treated as zero (TorchJD: 1e-4; default 0).

    Common keyword arguments ``max_norm``, ``gradient_path`` and ``jacobian_engine``: see
    :class:`~mtl_tune.balancers.base.GradientBalancer`. ``StepInfo.weights`` are the
    coefficients c of d = Σ cᵢ gᵢ (K,).
    """
    name = "upgrad"
    rule = staticmethod(upgrad_rows)
