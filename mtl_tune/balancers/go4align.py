"""``go4align`` — GO4Align, group risk minimisation (Shen et al., NeurIPS'24,
arXiv 2404.06486; docs/methods.md#go4align).

Per step, with the detached task losses ℓ (K,):

    P = mean(ℓ) / ℓ                                   (scale vector; needs ℓ > 0)
    Q_t = normalise(Q_{t−1} ⊙ exp(−β ℓ)),  Q_0 = 1/K   (smoothness; sums to 1)
    γ = P ⊙ Q_t                                        (group indicator, no gradient)
    groups = k-means of the K scalars γ into M groups; ω_i = centre of i's group
    L = Σ_i ω_i ℓ_i                                    (one backward; heads weighted)

Decisions (and where they differ from the official code):

* ``scale="mean"`` (default) is the paper's P. The official code (GO4Align repo and
  MTLlib) uses Σ_j ℓ_j / ℓ_i = K·P — ``scale="sum"`` reproduces it. Since Q ≈ 1/K, the paper's
  weights are ≈ 1/ℓ_i · mean(ℓ)/K (mean-loss scale) and the code's are K times larger.
* k-means is the **exact** optimum of the 1-D problem (:func:`kmeans_1d`, dynamic
  programming on the sorted values — an optimal 1-D clustering is contiguous in sorted
  order), deterministic and without sklearn. MTLlib runs sklearn's Lloyd iterations
  (``random_state=42``), a local optimum that in 1-D almost always coincides; the
  official GO4Align repo cannot run M ≥ 2 at all (its k-means import is commented out).
* M = ``num_groups`` must be in 1..K: MTLlib's default M = 5 crashes inside sklearn for
  K < 5, here it is a clear :class:`ValueError` at construction. M = 1 gives every task
  mean(γ) (LS with an adaptive global scale); M = K gives ω = γ (inverse-loss weighting).
* Q is kept in the log domain (log Q ← log_softmax(log Q − βℓ)), which is the same
  recursion without the underflow of a long product of exponentials.
* No clipping (as the official code). A non-positive loss raises :class:`BalancerError`.

The step is a batch-first rule (:meth:`GO4Align.weights_rows`, :mod:`mtl_tune.balancers._rows`):
losses (..., K) give ω (..., K), which is ∂f/∂ℓ and the reported weights; the balancer's
``objective`` runs it on one row, the toy's generic kernel on many.
Cost: one host sync per step (the K scalars go to the CPU), as the official code.
State: log Q (saved in :meth:`state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import Balancer, LossBalancer

SCALES = ("mean", "sum")


def kmeans_1d(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Globally optimal k-means of scalars ``x`` (n,) into ``m`` non-empty groups.

    Minimises Σ_groups Σ_{i∈g} (x_i − mean_g)². Optimal groups are contiguous in sorted
    order, so with D_k(j) = best cost of the j smallest values in k groups,
        D_k(j) = min_{i<j} D_{k−1}(i) + c(i, j),   c(i, j) = SSE of sorted x[i:j],
    computed from prefix sums (Bellman 1973; Wang & Song, R Journal 2011 "Ckmeans.1d.dp").
    Ties go to the smallest split index, so the result is deterministic.
    Returns ``(labels (n,) in the input order, centres (m,) ascending, total SSE)``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if not 1 <= m <= n:
        raise ValueError(f"k-means needs 1 <= groups <= {n} values, got {m} groups")
    order = np.argsort(x, kind="stable")
    xs = x[order] - x.mean()  # centring keeps the prefix-sum formula free of cancellation
    p1 = np.concatenate([[0.0], np.cumsum(xs)])
    p2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cnt = j - i
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (p2[j] - p2[i]) - (p1[j] - p1[i]) ** 2 / cnt
    cost = np.where(cnt > 0, np.maximum(cost, 0.0), np.inf)  # only non-empty segments i < j
    best = cost[0].copy()  # best[j] = D_1(j)
    back = np.zeros((m, n + 1), dtype=np.int64)
    for k in range(1, m):
        total = best[:, None] + cost  # total[i, j] = D_k(i) + c(i, j)
        back[k] = np.argmin(total, axis=0)
        best = total[back[k], np.arange(n + 1)]
    bounds = [n]
    for k in range(m - 1, 0, -1):
        bounds.append(int(back[k][bounds[-1]]))
    bounds.append(0)
    bounds.reverse()
    labels_sorted = np.empty(n, dtype=np.int64)
    centres = np.empty(m)
    xo = x[order]
    for g in range(m):
        labels_sorted[bounds[g]:bounds[g + 1]] = g
        centres[g] = xo[bounds[g]:bounds[g + 1]].mean()
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels, centres, float(best[n])


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log softmax over the last axis: x − max − log Σ exp(x − max) (shifted: no overflow)."""
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def group_indicator(losses: np.ndarray, log_q: np.ndarray, beta: float, scale: str = "mean"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(γ = P ⊙ Q_t, new log Q_t), both (..., K), for positive losses (..., K) and log Q_{t−1} (..., K)
    (see the module docstring): log Q_t = log_softmax(log Q_{t−1} − βℓ), P = mean(ℓ)/ℓ or Σℓ/ℓ."""
    new_log_q = log_softmax(log_q - beta * losses)
    if scale == "mean":  # sum / K is what ndarray.mean computes, without its Python overhead (~5 µs a call)
        level = losses.sum(-1, keepdims=True) / losses.shape[-1]
    elif scale == "sum":
        level = losses.sum(-1, keepdims=True)
    else:
        raise ValueError(f"go4align: scale must be one of {SCALES}, got {scale!r}")
    return level / losses * np.exp(new_log_q), new_log_q


def group_weights(gamma: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(ω (..., K): the centre of each task's group, group labels (..., K)) from the exact 1-D k-means
    of each row of γ (..., K) into M = ``num_groups`` groups.

    M = 1 and M = K need no search: one group whose centre is mean(γ) (labels 0), or every task its
    own group (ω = γ; labels = the ranks of γ, ties in task order, as :func:`kmeans_1d` numbers
    them); otherwise :func:`kmeans_1d` row by row."""
    k = gamma.shape[-1]
    if num_groups == 1:
        return np.repeat(gamma.sum(-1, keepdims=True) / k, k, axis=-1), np.zeros(gamma.shape, dtype=np.int64)
    if num_groups == k:
        return gamma, np.argsort(np.argsort(gamma, axis=-1, kind="stable"), axis=-1, kind="stable")
    weights, labels = np.empty_like(gamma), np.empty(gamma.shape, dtype=np.int64)
    flat_w, flat_l = weights.reshape(-1, k), labels.reshape(-1, k)
    for r, row in enumerate(gamma.reshape(-1, k)):
        flat_l[r], centres, _ = kmeans_1d(row, num_groups)
        flat_w[r] = centres[flat_l[r]]
    return weights, labels


@dataclass
class _Grouping:
    """The rule's state (a plain object: setting a module attribute costs ~2 µs, a toy step a few)."""

    log_q: np.ndarray                 # log Q (K,), or (B, K) for rows in lockstep after start_rows
    labels: np.ndarray | None = None  # the last step's groups (..., K)


class GO4Align(LossBalancer):
    """GO4Align group risk minimisation (Shen et al., NeurIPS'24): weights from a k-means
    grouping of the tasks' scaled risk indicators.

    Args:
        n_tasks: K, the number of tasks.
        num_groups: number of groups M, in 1..K (default 2).
        beta: smoothness step β ≥ 0 of Q ← normalise(Q·exp(−βℓ)) (default 1e-4).
        scale: ``"mean"`` (paper, mean(ℓ)/ℓ) or ``"sum"`` (official code, Σℓ/ℓ).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    Group risk minimisation weights (see the module docstring).
    """

    name = "go4align"

    def __init__(self, n_tasks: int, num_groups: int = 2, beta: float = 1e-4, scale: str = "mean", **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not (isinstance(num_groups, (int, np.integer)) and 1 <= num_groups <= n_tasks):
            raise ValueError(f"go4align: num_groups must be an integer in 1..{n_tasks} (the number of tasks), "
                             f"got {num_groups!r}")
        if not beta >= 0:
            raise ValueError(f"go4align: beta must be >= 0, got {beta}")
        if scale not in SCALES:
            raise ValueError(f"go4align: scale must be one of {SCALES}, got {scale!r}")
        self.num_groups, self.beta, self.scale = int(num_groups), float(beta), scale
        self._grouping = _Grouping(np.full(n_tasks, -float(np.log(n_tasks))))

    @property
    def log_q(self) -> Tensor:
        """log Q_t (K,) as a float64 tensor (a view of the rule's state, which each step replaces)."""
        return torch.from_numpy(self._grouping.log_q)

    @log_q.setter
    def log_q(self, value: Tensor | np.ndarray) -> None:
        self._grouping.log_q = torch.as_tensor(value, dtype=torch.float64).detach().cpu().numpy().copy()

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self._grouping = _Grouping(np.stack([b._grouping.log_q for b in rows]))

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂f/∂ℓ = ω (..., K) of one step for losses (..., K): update log Q, γ = P ⊙ Q, ω from the k-means
        of γ (:func:`group_indicator`, :func:`group_weights`). A row with a non-positive or non-finite loss
        fails, and keeps its log Q."""
        # NaN fails both comparisons; the common case (every row valid) costs two reductions
        valid = bool(losses.min() > 0) and bool(losses.max() < np.inf)
        ok = None if valid else ((losses > 0) & (losses < np.inf)).all(-1)
        safe = losses if ok is None else np.where(ok[..., None], losses, 1.0)  # no 1/0 or NaN k-means
        state = self._grouping
        gamma, log_q = group_indicator(safe, state.log_q, self.beta, self.scale)
        weights, state.labels = group_weights(gamma, self.num_groups)
        if ok is None:
            state.log_q = log_q
            return RowStep(weights)
        state.log_q = np.where(ok[..., None], log_q, state.log_q)

        def reason(index: tuple[int, ...]) -> str:
            return f"go4align: needs finite positive losses (scale = mean/ℓ), got {losses[index].tolist()}"

        return RowStep(np.where(ok[..., None], weights, np.nan), failed=~ok, reason=reason)

    def _step_extras(self) -> dict[str, Any]:
        labels = self._grouping.labels
        return {"groups": None if labels is None else torch.from_numpy(labels),
                "q": torch.from_numpy(np.exp(self._grouping.log_q))}

    def _extra_state(self) -> dict[str, Any]:
        return {"log_q": self.log_q.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.log_q = state["log_q"]
