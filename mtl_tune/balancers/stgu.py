"""``stgu`` — selective task group updates (Jeong & Yoon, ICLR'25; arXiv 2502.11986).

A training-loop method (docs/methods.md#stgu): each batch is used for M grouped optimizer steps, one
per task group, each backpropagating only its group's losses Σ_{t∈g} w_t ℓ_t (w_t = 1, or
1/|g| with ``group_norm``). Groups come from a *proximal inter-task affinity* A (K×K, EMA):

    a_t = (1 − ℓ_t^after / ℓ_t^before) / |g|        (relative decrease of task t's loss)
    A[s, t] ← (1 − decay) A[s, t] + decay · â       for every s ∈ g and every task t,

with â = a_t for t ∉ g; inside the group â = a_t if a_t a_s ≥ 0 and −max(a_t, a_s) if the two
disagree in sign, and the self-affinity A[s, s] is only updated by non-negative a_s (as the
official ``form_task_affinity.update``). Grouping: X[:, i] = A[:, i] / A[i, i], similarity
S = (X + Xᵀ)/2, ``sklearn.cluster.AffinityPropagation(affinity="precomputed")`` with preference
= the ``preference_quantile`` quantile of S (0.5 = sklearn's default median, the official value),
clusters = groups. For K = 2 sklearn never iterates (its equal-similarities branch, see
:class:`PairGrouping`): two groups exactly when the preference exceeds S[0, 1], which
:func:`group_tasks` evaluates in closed form (same answer, no 1 ms sklearn call per batch).
Warm-up: every task is its own group in the first ``prepos + 1`` batches (as the official
``train_phase_affinity``, which tests ``iter_count <= prepos`` with ``iter_count`` counting from
0 before its increment), so with ``prepos = 0`` the first batch trains each task alone and the
first grouping sees an affinity that has been updated once. The group order is shuffled
every batch with the balancer's own seeded generator (the official code uses Python's global
``random``).

**Attribution** (``attribution``). The paper defines a group's affinity by the change *its own*
update causes (a lookahead): ℓ^before is measured right before group g's step and ℓ^after right
after it — we reuse the next group's forward as the lookahead, plus one no-grad forward after
the last group (M + 1 forwards per batch). The official code (``"official"``) instead credits
to group g the change between the previous group's forward and g's forward, i.e. the effect
of the *previous* group's update, never measures the last group and skips the first group of
every batch (docs/methods.md#stgu). Losses must be positive (relative decrease).

**Similarity: the intended formula, not the official code's.** The official ``next_group``
normalises in place, ``X[:, i] /= X[i, i]`` on a torch tensor, whose divisor is a view of an
entry of the column being divided: once the diagonal entry has been divided by itself (→ 1),
the entries below it (rows j > i) are divided by 1, i.e. only the entries on and above the
diagonal are normalised. The evident intent (each column relative to its task's
self-affinity) divides the whole column by A[i, i]; :func:`affinity_similarity` does that by
default (``similarity="intended"``). On a recorded affinity the two differ by up to 0.30 and can
group the tasks differently. ``attribution="official"`` changes only the loss-change attribution,
not this; ``similarity="official"`` reproduces the official values (entries below the diagonal
left as they are; the zero-diagonal guard below still applies above it), for reproducing the
official groupings.

**Zero self-affinity.** A starts at 0 and A[i, i] only grows by non-negative updates, so it can
be exactly 0 (the official division then gives inf/NaN similarities). A column whose diagonal
is ≤ 1e-12 is divided by its largest absolute entry instead (1 if the column is all zero), so S
stays finite and in [−1, 1] for that column.

**One group.** When grouping yields a single group the official code lists it twice, i.e. two
optimizer steps on the full loss per batch; ``repeat_single_group=True`` (default) keeps that.
Affinity propagation that finds no exemplar after 10 tries (``convergence_iter`` 50, +100 per
try) keeps the previous groups and is counted in ``solver_failures`` (the official code keeps
them silently); with K = 2 that cannot happen (no iterations). Every group step zeroes grads
with ``set_to_none=True``, so Adam skips the parameters of tasks outside the group (torch ≥ 2
behaviour; under torch 1.13 zeroed grads let Adam's momentum keep moving them, docs/methods.md#stgu
pitfall 2). The official ``lr_ts`` (task heads at K× the learning rate) is an optimizer setting
of the trainer, not part of this class.
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
SIMILARITIES = ("intended", "official")
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


_DIAG = np.eye(2, dtype=bool)   # entry masks of a 2 × 2 affinity (K = 2 closed forms)
_OFF = ~_DIAG


def affinity_update_pairs(affinity: np.ndarray, members: np.ndarray, before: np.ndarray, after: np.ndarray,
                          decay: np.ndarray) -> np.ndarray:
    """:func:`affinity_update` for K = 2 on a batch of B affinities at once (returns a new array).

    ``affinity`` (B, 2, 2); ``members`` (B, 2) bool, each row's group, with ``before``/``after``
    (B, 2) the losses around the update — or (N, B, 2) each: N updates applied in order (the
    batch's group steps), a row with no member being left alone by that update; ``before``
    finite and > 0 (the caller checks positivity, where :func:`affinity_update` raises);
    ``decay`` (B,) or (B, 1, 1). Same formula and the same floating-point operations as
    :func:`affinity_update`, its per-entry branches as masks: a_t = (1 − ℓ_t^after/ℓ_t^before)/|g|;
    entry (s, t) is updated for s ∈ g; the diagonal only by a_s ≥ 0 (``not a_s < 0``, as there);
    an off-diagonal entry by −max(a_t, a_s) when t ∈ g, a_s is finite and a_t a_s < 0 (the
    product, as there), else by a_t. For K = 2 the product and −max(a₀, a₁) are shared by both
    off-diagonal entries.
    """
    m = np.asarray(members, dtype=bool)
    d = np.asarray(decay, dtype=np.float64).reshape(-1, 1, 1)
    ratio = np.asarray(after, dtype=np.float64) / np.asarray(before, dtype=np.float64)
    a = (1.0 - ratio) / np.maximum(m.sum(-1, keepdims=True), 1)
    a0, a1 = a[..., 0], a[..., 1]
    conflict = (a0 * a1 < 0)[..., None, None] & m[..., None, :] & np.isfinite(a)[..., :, None] & _OFF
    value = np.where(conflict, -np.maximum(a0, a1)[..., None, None], a[..., None, :])
    update = m[..., :, None] & ~(_DIAG & (a < 0)[..., :, None])
    if m.ndim == 2:
        return np.where(update, (1.0 - d) * affinity + d * value, affinity)
    out = np.asarray(affinity, dtype=np.float64)
    for upd, val in zip(update, value):  # in order: each EMA step starts from the previous one
        out = np.where(upd, (1.0 - d) * out + d * val, out)
    return out


def affinity_similarity(affinity: np.ndarray, official: bool | np.ndarray = False) -> np.ndarray:
    """S = (X + Xᵀ)/2 with X[:, i] = A[:, i] / A[i, i] (zero-diagonal guard, see the docstring).

    ``affinity`` (K, K), or a batch (…, K, K) (the same operations on each matrix). ``official``
    (a bool, or one per matrix of the batch): X[j, i] = A[j, i] for j > i, as the official in-place
    ``X[:, i] /= X[i, i]`` leaves the entries below the diagonal (module docstring)."""
    a = np.asarray(affinity, dtype=np.float64)
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    col_max = np.max(np.abs(a), axis=-2)
    divisor = np.where(diag > ZERO_DIAGONAL, diag, np.where(col_max > 0, col_max, 1.0))
    x = a / divisor[..., None, :]
    official = np.asarray(official, dtype=bool)
    if official.any():
        below = np.tril(np.ones(a.shape[-2:], dtype=bool), -1)
        x = np.where(below & official.reshape(official.shape + (1, 1)), a, x)
    return (x + np.swapaxes(x, -1, -2)) / 2.0


def quantile_neighbours(n: int, q: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where NumPy's linear-method quantile q of n values lies: sorted indices (i, j) and weight γ.

    As ``np.quantile``: virtual index v = (n − 1) q, i = ⌊v⌋, j = i + 1, γ = v − i, except that
    v ≥ n − 1 takes the maximum (i = j = n − 1, γ = v + 1: NumPy sets i to −1 before γ).
    """
    virtual = (n - 1) * np.asarray(q, dtype=np.float64)
    top = virtual >= n - 1
    lower = np.where(top, -1.0, np.floor(virtual))
    gamma = virtual - lower
    i = np.where(top, n - 1, lower).astype(np.intp)
    j = np.where(top, n - 1, lower + 1).astype(np.intp)
    return i, j, gamma


def interpolate(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """NumPy's quantile ``_lerp``: a + (b − a) γ, or b − (b − a)(1 − γ) where γ ≥ 0.5."""
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def linear_quantile(values: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """``np.quantile(values[b], q[b])`` (method "linear") for every row b, with NumPy's arithmetic.

    ``values`` (B, n), ``q`` (B,) or a scalar. Reproduced operation by operation
    (:func:`quantile_neighbours`, :func:`interpolate`) because the K = 2 grouping compares this
    value with a similarity (:class:`PairGrouping`): an ulp decides there.
    """
    v = np.asarray(values, dtype=np.float64)
    i, j, gamma = quantile_neighbours(v.shape[-1], np.broadcast_to(q, v.shape[:-1]))
    ordered = np.sort(v, axis=-1)
    rows = np.arange(v.shape[0])
    return interpolate(ordered[rows, i], ordered[rows, j], gamma)


class PairGrouping:
    """K = 2: whether affinity propagation puts the two tasks into two groups (else one), for
    B rows with fixed preference quantiles (positions computed once: the per-batch cost is a sort
    of four numbers and a comparison).

    Why there is a closed form: sklearn's ``_affinity_propagation`` first checks whether all
    preferences are equal (one scalar preference: always) and all off-diagonal similarities are
    equal — for K = 2 these are S[0, 1] and S[1, 0], equal in a symmetric S — and then returns
    without iterating: one cluster per sample when preference > S[0, 1], else a single cluster
    (its "All samples have mutually equal similarities" branch). So for K = 2 the damping, the
    random_state noise, ``convergence_iter``, the retries and the "no exemplar" outcome never
    come into play: two groups ⟺ quantile_q(S) > S[0, 1], with the quantile over the four
    entries (diagonal included) exactly as :func:`group_tasks` computes it. Valid for finite S
    with S[0, 1] == S[1, 0] (sklearn raises on non-finite input; :func:`affinity_similarity` is
    symmetric by construction).
    """

    def __init__(self, preference_quantile: np.ndarray | float) -> None:
        q = np.atleast_1d(np.asarray(preference_quantile, dtype=np.float64))
        self.i, self.j, self.gamma = quantile_neighbours(4, q)
        self.rows = np.arange(q.shape[0])

    def split(self, similarity: np.ndarray) -> np.ndarray:
        """(B,) bool from (B, 2, 2) similarities: True = two groups {0}, {1}."""
        ordered = np.sort(similarity.reshape(-1, 4), axis=-1)
        preference = interpolate(ordered[self.rows, self.i], ordered[self.rows, self.j], self.gamma)
        return preference > similarity[:, 0, 1]


def group_tasks(similarity: np.ndarray, preference_quantile: float = 0.5, convergence_iter: int = 50,
                tries: int = 10) -> list[list[int]] | None:
    """Affinity-propagation clusters of the K tasks (sorted lists), or None if AP never converges.

    K = 2 with a finite symmetric S takes sklearn's own no-iteration branch in closed form
    (:class:`PairGrouping`; ~1 ms saved per batch); everything else runs sklearn
    (:func:`propagate_groups`), which also raises on non-finite similarities.
    """
    s = np.asarray(similarity, dtype=np.float64)
    k = s.shape[0]
    if k == 1:
        return [[0]]
    if k == 2 and bool(np.isfinite(s).all()) and s[0, 1] == s[1, 0]:
        return [[0], [1]] if bool(PairGrouping(preference_quantile).split(s[None])[0]) else [[0, 1]]
    return propagate_groups(s, float(np.quantile(s, preference_quantile)), convergence_iter, tries)


def propagate_groups(similarity: np.ndarray, preference: float, convergence_iter: int = 50,
                     tries: int = 10) -> list[list[int]] | None:
    """sklearn ``AffinityPropagation`` on a precomputed similarity with a scalar ``preference``:
    clusters as sorted lists, retried with a longer ``convergence_iter``; None if no try finds
    an exemplar."""
    s = np.asarray(similarity, dtype=np.float64)
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
    """Selective task group updates (Jeong & Yoon, ICLR'25): tasks are grouped by a
    proximal inter-task affinity and each group takes its own optimizer step, so use
    :meth:`train_step` (``backward`` raises).

    Args:
        n_tasks: K, the number of tasks.
        affin_decay: EMA rate of the affinity, in (0, 1] (default 1e-3).
        prepos: warm-up batches with one group per task (int ≥ 0, default 100).
        preference_quantile: affinity-propagation preference as a quantile of the
            similarities, in [0, 1] (default 0.5).
        attribution: ``"paper"`` (a group is credited with its own step's loss change) or
            ``"official"`` (with the previous group's).
        repeat_single_group: step a single group twice per batch (default True, official).
        group_norm: divide a group's summed loss by its size (default False).
        seed: seed of the group order (int, default 0).
        similarity: ``"intended"`` (default: each column of the affinity divided by its
            diagonal entry) or ``"official"`` (the official code's in-place normalisation,
            which reads already-normalised entries; see the module docstring).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "stgu"
    supports_distributed = False  # a chain of grouped optimizer steps per batch

    def __init__(self, n_tasks: int, affin_decay: float = 1e-3, prepos: int = 100, preference_quantile: float = 0.5,
                 attribution: str = "paper", repeat_single_group: bool = True, group_norm: bool = False,
                 seed: int = 0, similarity: str = "intended", **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if not (0 < affin_decay <= 1):
            raise ValueError(f"stgu: affin_decay must be in (0, 1], got {affin_decay!r}")
        if not (isinstance(prepos, int) and prepos >= 0):
            raise ValueError(f"stgu: prepos must be an integer >= 0, got {prepos!r}")
        if not (0 <= preference_quantile <= 1):
            raise ValueError(f"stgu: preference_quantile must be in [0, 1], got {preference_quantile!r}")
        if attribution not in ATTRIBUTIONS:
            raise ValueError(f"stgu: attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"stgu: similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
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
        """Groups for the current batch (``self.batches``, counted from 1): singletons during
        the warm-up (batches 1 … prepos + 1: the official 0-based ``iter_count <= prepos``), then
        affinity propagation."""
        if self.batches - 1 <= self.prepos:
            return [[i] for i in range(self.n_tasks)]
        groups = group_tasks(affinity_similarity(self.affinity, self.similarity == "official"),
                             self.preference_quantile)
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
        self._sync_group()  # raises under an active process group
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
