"""``moco`` — Multi-objective gradient Correction (Fernando et al., ICLR'23).

"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
https://openreview.net/forum?id=dLAYGdKTi2. MoCo replaces MGDA's per-step min-norm solve on
noisy gradients (biased: the min-norm weights of a stochastic Jacobian are not those of the
true one) by two slowly moving sequences: tracked gradients y_i ≈ ∇ℓ_i and simplex weights λ.
Step t = 1, 2, … with the step's (optionally rescaled) task gradients g_i:

    y_i ← y_i − β_t (y_i − g_i),                 β_t = β / t^{β_σ}     (y starts at 0)
    λ  ← U(λ − γ_t (Y Yᵀ + ρ I) λ),              γ_t = γ / t^{γ_σ}     (λ starts at 1/K)
    d  = Yᵀ λ = Σ_i λ_i y_i

where U is the update map of λ: the paper's Algorithm 1 projects onto the simplex
(``lambda_update="project"``, :func:`~mtl_tune.balancers._simplex.project_to_simplex_rows`);
LibMTL's implementation, "based on the author's sharing code", takes a softmax of the same
vector instead (``lambda_update="softmax"``). (Y Yᵀ + ρI)λ is the gradient of ½‖Yᵀλ‖² + ½ρ‖λ‖²,
so with the projection the λ sequence is projected gradient descent on MGDA's (regularised) dual
with the tracked gradients; the softmax map is LibMTL's variant of that step. LibMTL also rescales every gradient first, g_i ← ℓ_i g_i / (‖g_i‖ + 1e-8)
(``normalize=True``); the paper's algorithm uses the raw gradients (``normalize=False``).

Official code: LibMTL ``LibMTL/weighting/MoCo.py``
(https://github.com/median-research-group/LibMTL/blob/8b8f1d030377b14d9c29017e11e2586944a23d9b/LibMTL/weighting/MoCo.py),
whose docstring says it is based on the authors' shared code. Defaults are LibMTL's: β = 0.5, β_σ = 0.5, γ = 0.1,
γ_σ = 0.5, ρ = 0, softmax update, rescaled gradients. Conventions (LibMTL): the shared gradient is
Yᵀλ at the scale of the mean of the (rescaled) gradients, **no ×K**; task heads receive the plain
∇Σℓ_i (LibMTL's per-task backward accumulates every head's own gradient, unweighted); no clipping.

How it runs. The state is the K×P matrix Y of tracked gradients (P = the shared parameters), so the
update is not a function of the Gram matrix: the rule is :meth:`MoCo.direction_rows`, in torch on
the Jacobian's device, for any leading batch shape (the toy's generic driver runs its rows in
lockstep: Y of shape (B, K, P), λ of shape (B, K); the step count t is shared because rows step
together). The λ update is K-sized and runs in float64 NumPy on Y Yᵀ (float64, built blockwise
for a model's Jacobian: :func:`~mtl_tune.balancers._common.gram`). Y keeps the Jacobian's dtype
and lives where the Jacobian lives. Memory: one extra K×P tensor, like LibMTL's ``self.y``.

Reported weights: λ (on the simplex). Degenerate cases: a zero gradient is left at zero by the
rescaling (0/(0 + 1e-8)); all-zero tracked gradients leave λ unchanged under ``project``, while
``softmax`` pulls any λ toward uniform weights even then (softmax(λ) ≠ λ: a property of LibMTL's
update, kept in that mode). A Jacobian whose number of columns changes between steps
cannot continue the tracked sequence: :class:`BalancerError`. With ``normalize=True`` a negative loss raises
:class:`BalancerError`: ℓ_i g_i/‖g_i‖ would point the task's tracked gradient uphill (LibMTL does so
silently); a zero loss gives a zero rescaled gradient, as in LibMTL. A data-parallel run averages the
Jacobian across ranks before the rule (the base class), so every rank tracks the same Y.
Known-answer cases (tests/balancers/test_moco.py): with β = 1 and β_σ = 0 the tracking is off
(y = g) and, on a fixed Jacobian with the projected update, λ converges to MGDA's min-norm weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import gram, state_like, power_decay
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers._simplex import project_to_simplex_rows
from mtl_tune.balancers.base import Balancer, BalancerError, GradientBalancer

LAMBDA_UPDATES = ("softmax", "project")
#: added to ‖g_i‖ in LibMTL's rescaling ℓ_i g_i/(‖g_i‖ + 1e-8)
NORM_EPS = 1e-8
NEGATIVE = ("moco: normalize=True rescales each gradient by its loss, and a negative loss would turn its task's "
            "gradient around (the update would ascend that loss); shift the losses to be non-negative or use "
            "normalize=False")


def moco_lambda_step(tracked_gram: np.ndarray, lambd: np.ndarray, gamma_t: float, rho: float,
                     update: str) -> np.ndarray:
    """λ ← U(λ − γ_t (A + ρI) λ) for float64 Gram matrices A = Y Yᵀ (..., K, K) and weights (..., K);
    U = the simplex projection (``"project"``) or a softmax (``"softmax"``)."""
    step = np.einsum("...ij,...j->...i", tracked_gram, lambd) + rho * lambd
    v = lambd - gamma_t * step
    if update == "project":
        return project_to_simplex_rows(v)
    # (the ufuncs' reductions that ``max``/``sum`` call, without the methods' wrappers: run every step)
    e = np.exp(v - np.maximum.reduce(v, axis=-1, keepdims=True))
    return e / np.add.reduce(e, axis=-1, keepdims=True)


def rescaled_gradients(jacobian: Tensor, losses: Tensor) -> Tensor:
    """LibMTL's g_i ← ℓ_i g_i / (‖g_i‖ + 1e-8) on Jacobians (..., K, P) and losses (..., K)."""
    norms = torch.linalg.vector_norm(jacobian, dim=-1, keepdim=True)
    # (the product in place on the quotient, a temporary of this function: the same operations)
    return (jacobian / (norms + NORM_EPS)).mul_(losses.to(jacobian).unsqueeze(-1))


class MoCo(GradientBalancer):
    """MoCo (Fernando et al., ICLR'23): MGDA-style weights on tracked (averaged) task gradients.

    Args:
        n_tasks: K, the number of tasks.
        beta: step of the gradient tracking y ← y − β_t(y − g) (float in (0, 1], default 0.5).
        beta_sigma: decay exponent of β_t = β/t^{β_σ} (float ≥ 0, default 0.5).
        gamma: step of the weight update (float > 0, default 0.1).
        gamma_sigma: decay exponent of γ_t = γ/t^{γ_σ} (float ≥ 0, default 0.5).
        rho: ℓ2 regularisation of the weights' objective (float ≥ 0, default 0).
        lambda_update: ``"softmax"`` (LibMTL, default) or ``"project"`` (the paper's projection).
        normalize: rescale each gradient to ℓ_i g_i/‖g_i‖ first (LibMTL, default True).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are λ (K,).
    """
    name = "moco"

    def __init__(self, n_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, lambda_update: str = "softmax",
                 normalize: bool = True, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"moco: beta must lie in (0, 1], got {beta}")
        if gamma <= 0:
            raise ValueError(f"moco: gamma must be > 0, got {gamma}")
        if beta_sigma < 0 or gamma_sigma < 0 or rho < 0:
            raise ValueError(f"moco: beta_sigma, gamma_sigma and rho must be >= 0, got "
                             f"{beta_sigma}, {gamma_sigma}, {rho}")
        if lambda_update not in LAMBDA_UPDATES:
            raise ValueError(f"moco: lambda_update must be one of {LAMBDA_UPDATES}, got {lambda_update!r}")
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma = float(beta), float(beta_sigma), float(gamma), \
            float(gamma_sigma)
        self.rho, self.lambda_update, self.normalize = float(rho), lambda_update, bool(normalize)
        #: λ (..., K), float64 on the host
        self.lambd = np.full(n_tasks, 1.0 / n_tasks)
        #: Y (..., K, P), the Jacobian's dtype and device; None before the first step
        self.tracked: Tensor | None = None

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """One MoCo step on Jacobians (..., K, P): updates Y and λ, returns λ and d = Yᵀλ (torch)."""
        t = self.step_count + 1
        failed = None
        if self.normalize:
            negative = losses < 0
            if negative.any():          # (one reduction; the rows only when some loss is negative)
                if negative.dim() == 1:  # one row: fail before touching the state
                    raise BalancerError(f"{NEGATIVE} (losses {losses.tolist()})")
                failed = negative.any(-1).cpu().numpy()
        g = rescaled_gradients(jacobian, losses) if self.normalize else jacobian
        y = state_like(self.tracked, g, self.name, "tracked gradients")
        y = y - power_decay(self.beta, t, self.beta_sigma) * (y - g)
        self.tracked = y
        # the toy's rows: float64 on the host, no autograd: no casts, no copies (the same numbers)
        host64 = y.dtype == torch.float64 and y.device.type == "cpu" and not y.requires_grad
        if y.dim() == 2:
            a = host(gram(y))
        elif host64:   # (.double() is y itself: the same product, already a fresh float64 host array)
            a = (y @ y.transpose(-1, -2)).numpy()
        else:
            a = host(y.double() @ y.double().transpose(-1, -2))
        self.lambd = moco_lambda_step(a, self.lambd, power_decay(self.gamma, t, self.gamma_sigma), self.rho,
                                      self.lambda_update)
        weights = torch.from_numpy(self.lambd)
        if not host64:
            weights = weights.to(device=y.device, dtype=y.dtype)
        direction = (weights.unsqueeze(-2) @ y).squeeze(-2)
        return RowStep(weights, failed=failed, reason=NEGATIVE, direction=direction)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        return out.direction, out.weights

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.lambd = np.stack([np.asarray(b.lambd, dtype=np.float64) for b in rows])     # type: ignore[attr-defined]
        tracked = [b.tracked for b in rows]                                                 # type: ignore[attr-defined]
        self.tracked = None if any(y is None for y in tracked) else torch.stack(tracked)

    def _extra_state(self) -> dict[str, Any]:
        return {"lambd": torch.from_numpy(np.array(self.lambd)),
                "tracked": None if self.tracked is None else self.tracked.detach().cpu().clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.lambd = state["lambd"].numpy().astype(np.float64)
        self.tracked = state["tracked"]
