"""``stgu`` — selective task group updates (Jeong & Yoon, ICLR'25; arXiv 2502.11986).

A training-loop method (methods.md §4): each batch is used for M grouped optimizer steps, one
per task group, each backpropagating only its group's losses Σ_{t∈g} w_t ℓ_t (w_t = 1, or
1/|g| with ``group_norm``). Groups come from a *proximal inter-task affinity* A (K×K, EMA):

    a_t = (1 − ℓ_t^after / ℓ_t^before) / |g|        (relative decrease of task t's loss)
    A[s, t] ← (1 − decay) A[s, t] + decay · â       for every s ∈ g and every task t,

with â = a_t for t ∉ g; inside the group â = a_t if a_t a_s ≥ 0 and −max(a_t, a_s) if the two
disagree in sign, and the self-affinity A[s, s] is only updated by non-negative a_s (as the
official ``form_task_affinity.update``). Grouping: X[:, i] = A[:, i] / A[i, i], similarity
S = (X + Xᵀ)/2, ``sklearn.cluster.AffinityPropagation(affinity="precomputed")`` with preference
= the ``preference_quantile`` quantile of S (0.5 = sklearn's default median, the official value),
clusters = groups. During the first ``prepos`` batches every task is its own group. The group
order is shuffled every batch with the balancer's own seeded generator (the official code uses
Python's global ``random``).

**Attribution** (``attribution``). The paper defines a group's affinity by the change *its own*
update causes (a lookahead): ℓ^before is measured right before group g's step and ℓ^after right
after it — we reuse the next group's forward as the lookahead, plus one no-grad forward after
the last group (M + 1 forwards per batch). The official code (``"official"``) instead credits
to group g the change between the previous group's forward and g's forward, i.e. the effect
of the *previous* group's update, never measures the last group and skips the first group of
every batch (methods.md §4). Losses must be positive (relative decrease).

**Zero self-affinity.** A starts at 0 and A[i, i] only grows by non-negative updates, so it can
be exactly 0 (the official division then gives inf/NaN similarities). A column whose diagonal
is ≤ 1e-12 is divided by its largest absolute entry instead (1 if the column is all zero), so S
stays finite and in [−1, 1] for that column.

**One group.** When grouping yields a single group the official code lists it twice, i.e. two
optimizer steps on the full loss per batch; ``repeat_single_group=True`` (default) keeps that.
Affinity propagation that finds no exemplar after 10 tries (``convergence_iter`` 50, +100 per
try) keeps the previous groups and is counted in ``solver_failures`` (the official code keeps
them silently). Every group step zeroes grads with ``set_to_none=True``, so Adam skips the
parameters of tasks outside the group (torch ≥ 2 behaviour; under torch 1.13 zeroed grads let
Adam's momentum keep moving them, methods.md §4 pitfall 2). The official ``lr_ts`` (task
heads at K× the learning rate) is an optimizer setting of the trainer, not part of this class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.cluster import AffinityPropagation
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from mtl_tune.balancers.base import (Balancer, BalancerError, ForwardOutput, SolverFailureCounter, StepInfo,
                                     _as_param_list, check_losses)

ATTRIBUTIONS = ("paper", "official")
ZERO_DIAGONAL = 1e-12


def affinity_update(affinity: np.ndarray, group: Sequence[int], before: np.ndarray, after: np.ndarray,
                    decay: float) -> np.ndarray:
    """One EMA update of the proximal inter-task affinity for group ``group`` (returns a new array).

    ``before``/``after``: per-task losses around the update; NaN in ``before`` = not measured
    (that target is skipped). See the module docstring for the formula.
    """
    out = np.array(affinity, dtype=np.float64, copy=True)
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    valid = np.isfinite(before)
    if np.any(before[valid] <= 0):
        raise BalancerError(f"stgu: affinities are relative loss decreases and need positive losses, got {before}")
    a = np.full_like(before, np.nan)
    a[valid] = (1.0 - after[valid] / before[valid]) / len(group)
    members = set(group)
    for s in group:
        for t in np.flatnonzero(valid):
            if t == s:
                if a[t] < 0:
                    continue
                value = a[t]
            elif t in members and np.isfinite(a[s]) and a[t] * a[s] < 0:
                value = -max(a[t], a[s])
            else:
                value = a[t]
            out[s, t] = (1.0 - decay) * out[s, t] + decay * value
    return out


def affinity_similarity(affinity: np.ndarray) -> np.ndarray:
    """S = (X + Xᵀ)/2 with X[:, i] = A[:, i] / A[i, i] (zero-diagonal guard, see the docstring)."""
    a = np.asarray(affinity, dtype=np.float64)
    diag = np.diag(a).copy()
    col_max = np.max(np.abs(a), axis=0)
    divisor = np.where(diag > ZERO_DIAGONAL, diag, np.where(col_max > 0, col_max, 1.0))
    x = a / divisor[None, :]
    return (x + x.T) / 2.0


def group_tasks(similarity: np.ndarray, preference_quantile: float = 0.5, convergence_iter: int = 50,
                tries: int = 10) -> list[list[int]] | None:
    """Affinity-propagation clusters of the K tasks (sorted lists), or None if AP never converges."""
    s = np.asarray(similarity, dtype=np.float64)
    k = s.shape[0]
    if k == 1:
        return [[0]]
    preference = float(np.quantile(s, preference_quantile))
    for attempt in range(tries):
        ap = AffinityPropagation(affinity="precomputed", preference=preference,
                                 convergence_iter=convergence_iter + 100 * attempt, random_state=0)
        with warnings.catch_warnings():
            # non-convergence is detected below and counted by the caller; sklearn's note on
            # all-equal similarities is a tie (it then returns one group, or one per task when
            # the preference exceeds the common similarity), not a failure
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.filterwarnings("ignore", message="All samples have mutually equal similarities")
            labels = ap.fit(s).labels_
        if len(ap.cluster_centers_indices_) > 0 and np.all(labels >= 0):
            return [sorted(int(i) for i in np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return None


class STGU(Balancer):
    name = "stgu"

    def __init__(self, n_tasks: int, affin_decay: float = 1e-3, prepos: int = 100, preference_quantile: float = 0.5,
                 attribution: str = "paper", repeat_single_group: bool = True, group_norm: bool = False,
                 seed: int = 0, **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not (0 < affin_decay <= 1):
            raise ValueError(f"stgu: affin_decay must be in (0, 1], got {affin_decay!r}")
        if not (isinstance(prepos, int) and prepos >= 0):
            raise ValueError(f"stgu: prepos must be an integer >= 0, got {prepos!r}")
        if not (0 <= preference_quantile <= 1):
            raise ValueError(f"stgu: preference_quantile must be in [0, 1], got {preference_quantile!r}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"stgu: attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        self.affin_decay, self.prepos, self.preference_quantile = float(affin_decay), prepos, float(preference_quantile)
        self.attribution, self.repeat_single_group, self.group_norm = attribution, bool(repeat_single_group), group_norm
        self.affinity = np.zeros((n_tasks, n_tasks))
        self.groups: list[list[int]] = [[i] for i in range(n_tasks)]
        self.batches = 0
        self.generator = torch.Generator().manual_seed(int(seed))
        self.failures = SolverFailureCounter(self.name)

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        raise BalancerError("stgu is a training-loop method (several grouped optimizer steps per batch): "
                            "call balancer.train_step(forward, optimizer, shared_params, task_params), not backward()")

    # ------------------------------------------------------------------ grouping
    def next_groups(self) -> list[list[int]]:
        """Groups for the next batch: singletons during warm-up, then affinity propagation."""
        if self.batches <= self.prepos:
            return [[i] for i in range(self.n_tasks)]
        groups = group_tasks(affinity_similarity(self.affinity), self.preference_quantile)
        if groups is None:
            self.failures.failure("affinity propagation found no exemplar after 10 tries; keeping the previous groups")
        else:
            self.failures.success()
            self.groups = groups
        return self.groups

    def _plan(self) -> list[list[int]]:
        groups = self.next_groups()
        order = torch.randperm(len(groups), generator=self.generator).tolist()
        plan = [groups[i] for i in order]
        return plan * 2 if len(plan) == 1 and self.repeat_single_group else plan

    def _update(self, group: list[int], before: Tensor | None, after: Tensor) -> None:
        if before is None:
            return
        self.affinity = affinity_update(self.affinity, group, before.double().cpu().numpy(),
                                        after.double().cpu().numpy(), self.affin_decay)

    # ------------------------------------------------------------------ one batch
    def train_step(self, forward: Callable[[], ForwardOutput], optimizer: torch.optim.Optimizer,
                   shared_params: Sequence[Tensor], task_params: Sequence[Sequence[Tensor]] | None = None
                   ) -> tuple[Tensor, StepInfo]:
        self.batches += 1
        plan = self._plan()
        shared = [p for p in _as_param_list(shared_params) if p.requires_grad]
        first: Tensor | None = None
        weights: Tensor | None = None
        prev_group: list[int] | None = None
        prev_losses: Tensor | None = None
        for group in plan:
            losses = forward().losses
            check_losses(losses, self.n_tasks, self.name)
            now = losses.detach()
            if self.attribution == "paper" and prev_group is not None:
                self._update(prev_group, prev_losses, now)  # lookahead of the previous group's step
            if first is None:
                first, weights = now.clone(), torch.zeros_like(now)
            coef = torch.zeros_like(now)
            coef[group] = 1.0 / len(group) if self.group_norm else 1.0
            optimizer.zero_grad(set_to_none=True)
            (losses * coef).sum().backward()
            self._clip(shared)
            optimizer.step()
            if self.attribution == "official":
                self._update(group, prev_losses, now)  # change since the previous group's forward
            weights += coef
            prev_group, prev_losses = group, now
        if self.attribution == "paper":
            with torch.no_grad():
                self._update(prev_group, prev_losses, forward().losses.detach())
        self.step_count += 1
        return first, StepInfo(weights=weights, extras={"n_groups": len(set(map(tuple, plan))),
                                                        "group_steps": len(plan),
                                                        "solver_failures": self.failures.total})

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"affinity": self.affinity.copy(), "groups": [list(g) for g in self.groups], "batches": self.batches,
                "generator": self.generator.get_state(), "failures": self.failures.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.affinity = np.asarray(state["affinity"], dtype=np.float64).copy()
        self.groups = [list(map(int, g)) for g in state["groups"]]
        self.batches = int(state["batches"])
        self.generator.set_state(state["generator"])
        self.failures.load_state_dict(state["failures"])
