"""``trimmedmean`` — coordinate-wise trimmed mean (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML'18, https://arxiv.org/abs/1803.01498),
as offered for multi-task learning by TorchJD (https://github.com/SimplexLab/TorchJD/tree/862baeda,
``torchjd.aggregation.TrimmedMean``; compared against torchjd 0.18.0).

At every coordinate c of the shared parameters, the K task-gradient entries g₁c … g_Kc are sorted,
the t = ``trim_number`` largest and t smallest are dropped, and the rest are averaged:

    d_c = (1/(K − 2t)) Σ_{r = t+1}^{K−t} g_(r)c        (g_(r)c: the r-th smallest entry at c).

Which tasks survive differs per coordinate, so d is **not** a combination Σ cᵢ gᵢ of the task
gradients: the rule is ``direction_rows`` on the Jacobian (as ``graddrop``), in torch on the
Jacobian's device, and the Gram path is not available. t = 0 is the mean; t = (K − 1)/2 (odd K) the
coordinate-wise median. Valid for K ≥ 2t + 1 (a ``ValueError`` otherwise): with K = 2 only t = 0,
the mean (the search spaces fix t = 0 there and say so).

Reported weights: the least-squares effective weight of each task, wᵢ = ⟨mᵢ ⊙ gᵢ, gᵢ⟩/‖gᵢ‖² with
m_ic = 1/(K − 2t) where gᵢ's entry at c is kept and 0 where trimmed (a zero gradient reports the
mean of its mᵢ). Equal entries are ordered by task index (a stable sort): which copy of a tied value is
dropped does not change d, only the reported weights.

Memory: the sort runs on column blocks of at most :data:`BLOCK_ENTRIES` entries, so a model's K×P
Jacobian needs no K×P sorted copy or index tensor.

Conventions: **mean** scale (as the paper and TorchJD; no ×K); heads get their unweighted task
gradients; no clipping. TorchJD's forward is the same formula (its sort is not stable, which only
matters for the reported weights, which it does not report); parity is exact up to the order of
the float additions in the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import GradientBalancer

#: entries (all rows × tasks × columns) of one column block of the sort
BLOCK_ENTRIES = 2 ** 22


def check_trim(n_tasks: int, trim_number: int) -> int:
    """Validate t against K (``ValueError`` naming the bound)."""
    if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
        raise ValueError(f"trimmedmean: trim_number must be a non-negative integer, got {trim_number!r}")
    if n_tasks < 2 * trim_number + 1:
        raise ValueError(f"trimmedmean: trim_number = {trim_number} drops 2·{trim_number} of the K = {n_tasks} "
                         f"entries per coordinate; it needs K ≥ 2·trim_number + 1 = {2 * trim_number + 1}")
    return trim_number


def trimmed_mean(jacobian: Tensor, trim_number: int) -> tuple[Tensor, Tensor]:
    """The trimmed-mean direction (..., P) and the effective weights (..., K) of Jacobians (..., K, P)."""
    k, p = jacobian.shape[-2], jacobian.shape[-1]
    keep = k - 2 * trim_number
    rows = jacobian.shape[:-2].numel()
    block = max(1, min(p, BLOCK_ENTRIES // max(rows * k, 1)))
    # nothing trimmed from at most two entries: their sum does not depend on their order (a + b = b + a
    # in floating point), so the sort is skipped and every entry is kept — the same floats
    unsorted = trim_number == 0 and k <= 2
    if unsorted and block == p:
        # ... and in one block (the toy's) every task's kept energy is its energy, the same sum of the
        # same squares, so the weight is kept/energy/keep = 1/keep, or, for a zero (or NaN) gradient,
        # (P/P)/keep = 1/keep: the direction is the mean, in one call, and the weights are 1/keep
        return jacobian.mean(-2), jacobian.new_full(jacobian.shape[:-1], 1.0 / keep)
    scale = jacobian.abs().amax(-1, keepdim=True)                     # (..., K, 1): no under/overflow below
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    directions, kept_energy = [], torch.zeros(jacobian.shape[:-1], dtype=jacobian.dtype, device=jacobian.device)
    kept_count = torch.zeros_like(kept_energy)
    for start in range(0, p, block):
        part = jacobian[..., start:start + block]
        r = part / safe
        if unsorted:
            directions.append(part.mean(-2))
            kept_energy += (r * r).sum(-1)
            kept_count += part.shape[-1]
            continue
        values, order = torch.sort(part, dim=-2, stable=True)
        directions.append(values.narrow(-2, trim_number, keep).mean(-2))
        kept = torch.zeros_like(part, dtype=torch.bool)
        kept.scatter_(-2, order.narrow(-2, trim_number, keep), True)
        kept_energy += (r * r * kept).sum(-1)
        kept_count += kept.sum(-1)
    energy = (jacobian / safe).square().sum(-1)
    weights = torch.where(energy > 0, kept_energy / torch.where(energy > 0, energy, torch.ones_like(energy)),
                          kept_count / p) / keep
    return torch.cat(directions, -1), weights


class TrimmedMean(GradientBalancer):
    """Coordinate-wise trimmed mean (Yin et al., ICML'18): per shared-parameter coordinate, drop the
    ``trim_number`` largest and smallest task-gradient entries and average the rest.

    Args:
        n_tasks: K, the number of tasks.
        trim_number: t, entries dropped at each end per coordinate (0 ≤ t ≤ (K − 1)/2; default 0 =
            the mean, the only value valid for every K).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``: see
    :class:`~mtl_tune.balancers.base.Balancer`. ``StepInfo.weights`` are the effective task
    weights (K,).
    """
    name = "trimmedmean"

    def __init__(self, n_tasks: int, trim_number: int = 0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        self.trim_number = check_trim(n_tasks, trim_number)

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule on Jacobians (..., K, P): ``direction`` (..., P) and ``weights`` (..., K),
        torch tensors on the Jacobian's device."""
        direction, weights = trimmed_mean(jacobian, self.trim_number)
        return RowStep(weights, direction=direction)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        return out.direction, out.weights
