"""Property assertions every balancer is checked against (as TorchJD does for its aggregators).

A balancer's step is run through the public API (``get_balancer`` + ``backward``) on a linear
problem whose per-task gradients are exactly the rows of a chosen K×P matrix J (float64):

    θ = 0 (P,),  z = θ (the shared representation, a non-leaf),  h_i = 1 (one scalar head per task),
    ℓ_i = (J_i · z) h_i + b_i,  so ∂ℓ_i/∂θ = ∂ℓ_i/∂z = J_i and ℓ_i = b_i > 0.

The step returns the shared update d (θ's gradient, P) and ``StepInfo.weights`` w (K). Clipping
is switched off (``max_norm=None``): it is a post-step of the base class, checked by
tests/test_balancer_contract.py, and would hide the scaling law of d.

The properties, each used per method in tests/balancers/test_<method>.py where the math says
it holds (a method that lacks one says why next to its test):

* :func:`assert_valid_step`: d is (P,), w is (K,), both finite;
* :func:`assert_permutation_equivariant`: relabelling the tasks (rows of J and the losses b)
  permutes w the same way and leaves d unchanged;
* :func:`assert_gram_function_equivariant`: the same two properties one level down, for the
  pure weight functions of a K×K Gram matrix A = J Jᵀ (``min_norm_simplex``, ``nash_weights``,
  ``solve_fair``, ...): P A Pᵀ gives the permuted weights, a²A gives a^weight_degree times them;
* :func:`assert_gradient_scaling`: scaling every gradient by a > 0 (J → aJ, the losses b kept)
  scales d by a^degree and w by a^weight_degree. degree = 1 for methods linear in the
  gradients whose weights ignore their overall size (weight_degree 0), degree = 0 for methods
  whose direction is scale-invariant (Nash-MTL, MGDA with norm normalisation), (1 − α)/(1 + α)
  for FairGrad's α-fair update.

Tolerances are relative and stated by each caller: ~1e-12 for closed forms (float64 rounding
of K-term sums, eps ≈ 2.2e-16, times the size of the few intermediate quantities) and the
solver's own stopping tolerance for iterative methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers.base import ForwardOutput
from mtl_tune.registry import get_balancer

#: the gradient scale factor of :func:`assert_gradient_scaling`; not a power of two, so that the
#: scaled problem is rounded differently from the original one (a power of two would scale
#: every intermediate exactly and could hide a tolerance that is too tight)
SCALE = 3.0
#: columns of J: more than K, so the rows are linearly independent (no Pareto-stationary case)
P = 7


@dataclass(frozen=True)
class Case:
    """A seeded random problem: gradients ``jac`` (K×P) and positive losses ``losses`` (K)."""

    jac: Tensor
    losses: Tensor
    seed: int

    @property
    def k(self) -> int:
        return self.jac.shape[0]

    def __repr__(self) -> str:  # the pytest id
        return f"K{self.k}-seed{self.seed}"


def property_cases(ks: Sequence[int] = (2, 3, 4), seeds: Sequence[int] = (0, 1)) -> list[Case]:
    """Gaussian gradients with log-normal norms (std 0.5: norms ~3× apart) and losses in [0.5, 2]."""
    out = []
    for k in ks:
        for seed in seeds:
            g = torch.Generator().manual_seed(1000 * k + seed)
            rows = torch.randn(k, P, generator=g, dtype=torch.float64)
            jac = rows * torch.exp(0.5 * torch.randn(k, 1, generator=g, dtype=torch.float64))
            losses = 0.5 + 1.5 * torch.rand(k, generator=g, dtype=torch.float64)
            out.append(Case(jac, losses, seed))
    return out


Step = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def balancer_step(name: str, **hparams: Any) -> Step:
    """``step(jac, losses) -> (d, w)``: one ``backward`` of a fresh balancer (a fresh one per
    call, so stateful methods start from the same state) on the linear problem above."""

    def step(jac: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        k, p = jac.shape
        theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
        heads = [torch.ones((), dtype=torch.float64, requires_grad=True) for _ in range(k)]
        z = theta * 1.0
        values = torch.stack([(jac[i] @ z) * heads[i] for i in range(k)]) + losses
        balancer = get_balancer(name, k, max_norm=None, **hparams)
        info = balancer.backward(values, [theta], [[h] for h in heads], z)
        return theta.grad.detach().clone(), info.weights.detach().double()

    return step


def train_step_weights(name: str, case: Case, **hparams: Any) -> tuple[Tensor, Tensor]:
    """For training-loop methods: one ``train_step`` (SGD) on the linear problem; returns the
    parameters after it and the step's weights."""
    theta = torch.zeros(case.jac.shape[1], dtype=torch.float64, requires_grad=True)

    def forward() -> ForwardOutput:
        return ForwardOutput(case.jac @ theta + case.losses)

    balancer = get_balancer(name, case.k, max_norm=None, **hparams)
    _, info = balancer.train_step(forward, torch.optim.SGD([theta], lr=0.01), [theta])
    return theta.detach().clone(), info.weights.detach().double()


def _close(got: Tensor, want: Tensor, rtol: float, what: str) -> None:
    """|got − want| ≤ rtol·‖want‖∞ elementwise (relative to the vector's size, so that a
    near-zero entry does not demand more than the float64 rounding of its neighbours)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} × {scale:.3g}\n got  {got}\n want {want}"


def assert_valid_step(d: Tensor, w: Tensor, case: Case) -> None:
    assert d.shape == (case.jac.shape[1],), f"direction shape {tuple(d.shape)}"
    assert w.shape == (case.k,), f"weights shape {tuple(w.shape)}"
    assert bool(torch.isfinite(d).all()), f"non-finite direction {d}"
    assert bool(torch.isfinite(w).all()), f"non-finite weights {w}"


def _permutations(k: int) -> list[Tensor]:
    swap = torch.cat([torch.tensor([1, 0]), torch.arange(2, k)])
    return [torch.roll(torch.arange(k), 1), swap]


def assert_permutation_equivariant(step: Step, case: Case, rtol: float) -> None:
    """A cyclic shift and a swap of the first two tasks (together they generate every
    permutation of K tasks, so equivariance under both is equivariance under all): w follows,
    d stays."""
    d, w = step(case.jac, case.losses)
    for perm in _permutations(case.k):
        d_p, w_p = step(case.jac[perm], case.losses[perm])
        _close(w_p, w[perm], rtol, f"weights under permutation {perm.tolist()}")
        _close(d_p, d, rtol, f"direction under permutation {perm.tolist()}")


def assert_gradient_scaling(step: Step, case: Case, degree: float, weight_degree: float, rtol: float,
                            scale: float = SCALE) -> None:
    """J → aJ (losses kept): d → a^degree d and w → a^weight_degree w."""
    d, w = step(case.jac, case.losses)
    d_a, w_a = step(scale * case.jac, case.losses)
    _close(d_a, scale ** degree * d, rtol, f"direction under J → {scale}·J (degree {degree})")
    _close(w_a, scale ** weight_degree * w, rtol, f"weights under J → {scale}·J (degree {weight_degree})")


def assert_gram_function_equivariant(weights_of: Callable[[np.ndarray], Any], case: Case, weight_degree: float,
                                     rtol: float, scale: float = SCALE) -> None:
    """``weights_of(A) -> (K,)`` for the case's Gram matrix A = J Jᵀ: P A Pᵀ → w[perm] (the same
    two permutations as above) and a²A → a^weight_degree w."""
    a = (case.jac @ case.jac.T).numpy()

    def weights(m: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(weights_of(m), dtype=np.float64))

    w = weights(a)
    assert w.shape == (case.k,) and bool(torch.isfinite(w).all()), f"weights {w}"
    for perm in _permutations(case.k):
        idx = perm.numpy()
        _close(weights(a[np.ix_(idx, idx)]), w[perm], rtol, f"weights of P A Pᵀ, permutation {perm.tolist()}")
    _close(weights(scale * scale * a), scale ** weight_degree * w, rtol,
           f"weights of {scale}²·A (degree {weight_degree})")
