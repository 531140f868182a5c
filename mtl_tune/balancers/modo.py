"""``modo`` — Multi-Objective gradient with DOuble sampling (Chen et al., NeurIPS'23).

"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", https://arxiv.org/abs/2305.20057 (JMLR 2024). MoDo keeps simplex weights λ
(λ = 1/K at the start) and takes one projected gradient step on MGDA's regularised dual per
training step:

    λ ← Π_Δ(λ − γ (G_ξ G_ξ'ᵀ λ + ρ λ)),      d = G_ζᵀ λ,

with G_ξ, G_ξ' the Jacobians of two independent mini-batches (their product is an unbiased
estimate of the true Gram matrix — the "double sampling"), G_ζ that of a third one (LibMTL and the
official code with ``three_grads``) or of the first two averaged (the paper's Eq. 2.9b).

**One batch per step** (this project's training loop gives a balancer one batch): ξ = ξ' = ζ, so the
λ step uses the batch's Gram matrix A = G Gᵀ — a biased estimate of the true Gram matrix, so the
paper's convergence guarantee for the stochastic setting does not carry over; on a fixed problem
(full-batch, the toy) the rule is exact projected gradient descent on ½λᵀ(A + ρI)λ, whose fixed
point is the min-norm point of A + ρI (MGDA's weights for ρ = 0; tested). Written as a function of
the Gram matrix (:meth:`MoDo.weights_rows`, any leading batch shape), so the Gram path and the toy's
lockstep rows run it; λ is state (per row in lockstep, in the checkpoint).

Official code: https://github.com/heshandevaka/Trade-Off-MOL (``LibMTL/LibMTL/weighting/MoDo.py``)
and LibMTL ``LibMTL/weighting/MoDo.py`` at
https://github.com/median-research-group/LibMTL/blob/7a2cbe207c9d67c03b1f5bb9303e436ed8714ac3/LibMTL/weighting/MoDo.py
(defaults γ = 0.001, ρ = 0.1). Conventions as LibMTL: the shared gradient is Gᵀλ at the mean scale
(**no ×K**), task heads get the plain ∇Σℓ_i (LibMTL averages the three batches' head gradients,
unweighted), no clipping. The simplex projection is the project's sort-based one
(:func:`~mtl_tune.balancers._simplex.project_to_simplex_rows`), the same map as the official
loop's. Reported weights: λ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers._simplex import project_to_simplex_rows
from mtl_tune.balancers.base import Balancer, GradientBalancer


def modo_step(gram: np.ndarray, lambd: np.ndarray, gamma: float, rho: float) -> np.ndarray:
    """λ ← Π_Δ(λ − γ(Aλ + ρλ)) for float64 Gram matrices (..., K, K) and weights (..., K)."""
    grad = np.einsum("...ij,...j->...i", gram, lambd) + rho * lambd
    return project_to_simplex_rows(lambd - gamma * grad)


class MoDo(GradientBalancer):
    """MoDo (Chen et al., NeurIPS'23): one projected gradient step on MGDA's dual per training step.

    Args:
        n_tasks: K, the number of tasks.
        gamma: step of the weight update (float > 0, default 0.001 as LibMTL).
        rho: ℓ2 regularisation of the weights' objective (float ≥ 0, default 0.1).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are λ (K,).
    """
    name = "modo"
    supports_gram = True  # d = Gᵀλ, λ from the Gram matrix (and the previous λ)

    def __init__(self, n_tasks: int, gamma: float = 0.001, rho: float = 0.1, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not gamma > 0:
            raise ValueError(f"modo: gamma must be > 0, got {gamma}")
        if not rho >= 0:
            raise ValueError(f"modo: rho must be >= 0, got {rho}")
        self.gamma, self.rho = float(gamma), float(rho)
        #: λ (..., K), float64 on the host
        self.lambd = np.full(n_tasks, 1.0 / n_tasks)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        self.lambd = modo_step(gram, self.lambd, self.gamma, self.rho)
        return RowStep(self.lambd.copy())

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.lambd = np.stack([np.asarray(b.lambd, dtype=np.float64) for b in rows])  # type: ignore[attr-defined]

    def _extra_state(self) -> dict[str, Any]:
        return {"lambd": np.array(self.lambd).tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.lambd = np.asarray(state["lambd"], dtype=np.float64)
