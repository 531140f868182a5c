"""``excessmtl`` — task weights from estimated excess risks (He et al., ICML'24).

"Robust Multi-Task Learning with Excess Risks", https://arxiv.org/abs/2402.02009. ExcessMTL
weights each task by how far it is from its own optimum, not by its loss (which includes the
irreducible noise). The excess risk of task i is estimated from a second-order expansion with a
diagonal, AdaGrad-style Hessian estimate: accumulating S_i ← S_i + g_i ⊙ g_i over the steps,

    H_i = diag(√(S_i + 1e-7)),     e_i = g_iᵀ H_i⁻¹ g_i = Σ_p g_ip² / √(S_ip + 1e-7),

and the weights follow an exponentiated-gradient (multiplicative) update on the excess risks,
scaled by the first step's estimates e_i⁽¹⁾ (the paper's "scale processing": tasks whose excess
risk is not shrinking gain weight):

    step 1:   e⁽¹⁾ = e, the weights stay at 1;
    step t:   r_i = e_i / e_i⁽¹⁾,   w_i ← w_i · exp(η r_i),   w ← K w / Σ w,

with η the robust step size; the update is d = Σ w_i g_i and the heads are trained on Σ w_i ℓ_i.

Official code: https://github.com/yifei-he/ExcessMTL at b179956021c9ac26f93f986a35d034ffea38f790
(``LibMTL/LibMTL/weighting/ExcessMTL.py``; ``robust_step_size`` default 1e-2 in its ``config.py``),
copied into LibMTL. Conventions as official: weights start at 1 and sum to K (the update is at the
scale of the summed loss), heads weighted (the official code backpropagates Σ w_i ℓ_i), no clipping,
and the first step only records the baseline. The multiplicative update is computed in the log
domain (w = K softmax(log w + η r), the same numbers) so that a large ratio saturates the weights
instead of overflowing exp to inf and the weights to NaN.

How it runs. S is K×P (P = the shared parameters), so the rule needs the Jacobian itself:
:meth:`ExcessMTL.direction_rows`, in torch on the Jacobian's device, for any leading batch shape
(the toy's generic driver runs its rows in lockstep). S keeps the Jacobian's dtype; e and the
weights are float64 on the host (K numbers). Memory: one extra K×P tensor, as the official
``grad_sum``.

Degenerate cases: a task whose gradient is exactly zero at the first step has baseline e⁽¹⁾ = 0 and
an undefined ratio afterwards (the official code divides by 0: inf/NaN weights) — the step raises
:class:`BalancerError` naming the task. A Jacobian whose number of columns changes mid-run cannot
continue S: :class:`BalancerError`. Not offered: the paper's warm-up of 3 epochs collecting the
baseline (Appendix C.1), which the official code does not run either.
Known answers (tests/balancers/test_excessmtl.py): equal excess-risk ratios keep equal weights;
the official update replayed step by step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import state_like
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import Balancer, BalancerError, GradientBalancer

#: added to the accumulated squares inside the square root (official 1e-7)
HESSIAN_EPS = 1e-7


def excess_risks(squares: Tensor, sq_sum: Tensor) -> Tensor:
    """e_i = Σ_p g_ip² / √(S_ip + 1e-7) (..., K) for the squared gradients g ⊙ g and the accumulated
    squares S (..., K, P) (g ⊙ g is also what S accumulates: formed once for both)."""
    return (squares / torch.sqrt(sq_sum + HESSIAN_EPS)).sum(-1)


def excess_weight_step(weights: np.ndarray, ratios: np.ndarray, step_size: float) -> np.ndarray:
    """w ← K w exp(η r) / Σ w exp(η r) (..., K), in the log domain."""
    k = weights.shape[-1]
    with np.errstate(divide="ignore"):
        z = np.log(weights) + step_size * ratios
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return k * e / e.sum(axis=-1, keepdims=True)


class ExcessMTL(GradientBalancer):
    """ExcessMTL (He et al., ICML'24): multiplicative weights driven by estimated excess risks.

    Args:
        n_tasks: K, the number of tasks.
        robust_step_size: η > 0, the step of the multiplicative weight update (default 0.01, the
            official default).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are w (K,), summing to K.
    """
    name = "excessmtl"
    weighted_heads = True

    def __init__(self, n_tasks: int, robust_step_size: float = 0.01, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not robust_step_size > 0:
            raise ValueError(f"excessmtl: robust_step_size must be > 0, got {robust_step_size}")
        self.robust_step_size = float(robust_step_size)
        #: w (..., K), float64 on the host, summing to K
        self.task_weights = np.ones(n_tasks)
        #: e⁽¹⁾ (..., K), the first step's excess risks; None before it
        self.baseline: np.ndarray | None = None
        #: S (..., K, P), accumulated squared gradients; None before the first step
        self.sq_sum: Tensor | None = None

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """One step on Jacobians (..., K, P): accumulate S, estimate e, update w; d = Σ w_i g_i (torch).

        S and e are :func:`excess_risks`' operations; for P ≤ 2 on a
        float64 CPU Jacobian all but the square root in NumPy on the tensors' memory (products, sums
        and a quotient round the same in either library, and a sum of at most two terms is one
        addition in either), else in torch. Ratios skip the zero-baseline masks when no baseline is
        zero (they select e / e⁽¹⁾ everywhere then)."""
        s = state_like(self.sq_sum, jacobian, self.name, "accumulated squares")
        if jacobian.shape[-1] <= 2 and jacobian.is_cpu and jacobian.dtype == torch.float64 and s.is_cpu \
                and not jacobian.requires_grad:
            j = jacobian.numpy()
            sq = j * j
            s_np = s.detach().numpy() + sq
            # the square root stays torch's: its float64 sqrt differs from NumPy's in the last bit
            e = (sq / torch.sqrt(torch.from_numpy(s_np + HESSIAN_EPS)).numpy()).sum(-1)
            s = torch.from_numpy(s_np)
        else:
            sq = jacobian * jacobian
            s = s + sq
            e = host(excess_risks(sq, s))
        failed = None
        if self.baseline is None:
            self.baseline = e
        else:
            zero = self.baseline == 0
            if zero.any():
                failed = zero.any(-1)
                if failed.ndim == 0:  # one row: fail before changing the state
                    task = int(np.flatnonzero(zero)[0])
                    raise BalancerError(f"excessmtl: task {task} had an exactly zero gradient at the first step, "
                                        "so its baseline excess risk is 0 and its ratio is undefined")
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = np.where(zero, 0.0, e / np.where(zero, 1.0, self.baseline))
            else:  # the masks select e / baseline everywhere
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios = e / self.baseline
            self.task_weights = excess_weight_step(self.task_weights, ratios, self.robust_step_size)
        self.sq_sum = s
        w = torch.from_numpy(np.array(self.task_weights, dtype=np.float64))
        if w.dtype != jacobian.dtype or not jacobian.is_cpu:
            w = w.to(device=jacobian.device, dtype=jacobian.dtype)
        if w.dim() < jacobian.dim() - 1:  # first lockstep step: the rows share the initial weights
            w = w.expand(*jacobian.shape[:-1])
        direction = (w.unsqueeze(-2) @ jacobian).squeeze(-2)
        return RowStep(w, failed=failed, reason="excessmtl: a task had an exactly zero gradient at the first "
                                                "step (baseline excess risk 0: its ratio is undefined)",
                       direction=direction)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        return out.direction, out.weights

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.task_weights = np.stack([np.asarray(b.task_weights, dtype=np.float64) for b in rows])  # type: ignore[attr-defined]
        base = [b.baseline for b in rows]                                                           # type: ignore[attr-defined]
        self.baseline = None if any(x is None for x in base) else np.stack(base)
        sq = [b.sq_sum for b in rows]                                                               # type: ignore[attr-defined]
        self.sq_sum = None if any(x is None for x in sq) else torch.stack(sq)

    def _extra_state(self) -> dict[str, Any]:
        return {"task_weights": torch.from_numpy(np.array(self.task_weights, dtype=np.float64)),
                "baseline": None if self.baseline is None else torch.from_numpy(np.array(self.baseline)),
                "sq_sum": None if self.sq_sum is None else self.sq_sum.detach().cpu().clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.task_weights = state["task_weights"].numpy().astype(np.float64)
        self.baseline = None if state["baseline"] is None else state["baseline"].numpy().astype(np.float64)
        self.sq_sum = state["sq_sum"]
