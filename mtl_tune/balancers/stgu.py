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

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._adam import adam_step, clear_grads
from mtl_tune.balancers._random_rows import checked_seed
from mtl_tune.balancers._rows import host
from mtl_tune.balancers._task_affinity import (ZERO_DIAGONAL, PairGrouping, affinity_similarity,  # noqa: F401
                                               affinity_update, affinity_update_rows, group_tasks, interpolate,
                                               linear_quantile, propagate_groups, quantile_neighbours)
from mtl_tune.balancers.base import (Balancer, BalancerError, ForwardOutput, SolverFailureCounter, StepInfo,
                                     _as_param_list, check_losses)

#: the toy steps a method's rows together, so every row must take the same number of group steps
NO_REPEAT = ("repeat_single_group=False takes one or two optimizer steps per batch depending on the grouping; "
             "rows in lockstep step together")
ATTRIBUTIONS = ("paper", "official")
SIMILARITIES = ("intended", "official")


def _pair_groups(two: np.ndarray) -> list[list[list[int]]]:
    """K = 2: each row's groups from whether its tasks form two groups."""
    return [[[0], [1]] if t else [[0, 1]] for t in two.tolist()]


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
        self.generator: Any = torch.Generator().manual_seed(checked_seed(self.name, seed))
        self.failures: Any = SolverFailureCounter(self.name)
        self._last_plan = (0, 0)    # (groups, group steps) of the last batch, for its StepInfo
        self._pair_grouping: tuple[float, PairGrouping] | None = None   # K = 2: (quantile, its positions)
        self._pair_cache: tuple | None = None   # K = 2 rows: (group_norm, plan table, draw buffer)

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        raise BalancerError("stgu is a training-loop method (several grouped optimizer steps per batch): "
                            "call balancer.train_step(forward, optimizer, shared_params, task_params), not backward()")

    # ------------------------------------------------------------------ rows (the toy's lockstep)
    @classmethod
    def has_rows_rule(cls) -> bool:
        return True

    def rows_unsupported(self) -> str | None:
        return None if self.repeat_single_group else NO_REPEAT

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.affinity = np.stack([b.affinity for b in rows])
        self.groups = [b.groups for b in rows]            # per row from here on
        self.generator = [b.generator for b in rows]      # each init's own stream
        self.failures = [b.failures for b in rows]

    def _per_row(self) -> tuple[bool, np.ndarray, list, list, list]:
        """(one row?, affinities (R, K, K), groups, generators, failure counters) as lists of rows."""
        one = self.affinity.ndim == 2
        wrap = (lambda v: [v]) if one else (lambda v: v)
        return (one, self.affinity.reshape(-1, self.n_tasks, self.n_tasks), wrap(self.groups),
                wrap(self.generator), wrap(self.failures))

    # ------------------------------------------------------------------ grouping
    def next_groups(self) -> list[list[int]]:
        """Groups for the current batch of a one-row balancer (``self.batches``, counted from 1):
        singletons during the warm-up (batches 1 … prepos + 1: the official 0-based
        ``iter_count <= prepos``), then affinity propagation."""
        return self._groups_rows(np.zeros(1, dtype=bool), [""])[0]

    def _warming_up(self) -> bool:
        return self.batches - 1 <= self.prepos

    def _pair_split(self) -> np.ndarray | None:
        """K = 2 past the warm-up: (R,) whether each row's tasks form two groups (``group_tasks``'
        closed form, all rows at once); None where it does not apply (K ≠ 2, a non-finite S)."""
        if self.n_tasks != 2:
            return None
        affinity = self.affinity.reshape(-1, 2, 2)
        sim = affinity_similarity(affinity, self.similarity == "official")
        if not np.isfinite(sim).all():
            return None
        cached = self._pair_grouping   # the quantile's sorted positions, computed once
        if cached is None or cached[0] != self.preference_quantile:
            cached = self._pair_grouping = (self.preference_quantile, PairGrouping(self.preference_quantile))
        return cached[1].split(sim)

    def _groups_rows(self, failed: np.ndarray, reasons: list[str]) -> list[list[list[int]]]:
        one, affinity, groups, _, counters = self._per_row()
        if self._warming_up():
            return [[[i] for i in range(self.n_tasks)] for _ in groups]
        two = self._pair_split()
        if two is not None:
            groups = _pair_groups(two)
            self.groups = groups[0] if one else groups
            return groups
        sim = affinity_similarity(affinity, self.similarity == "official")
        for r in range(len(groups)):
            try:
                found = group_tasks(sim[r], self.preference_quantile)
                if found is None:
                    counters[r].failure("affinity propagation found no exemplar after 10 tries; keeping the "
                                        "previous groups")
                else:
                    counters[r].success()
                    groups[r] = found
            except Exception as err:  # sklearn on a non-finite similarity, 20 failures in a row: the row's
                if one:
                    raise
                failed[r], reasons[r] = True, f"{type(err).__name__}: {err}"
        self.groups = groups[0] if one else groups
        return groups

    def plan_rows(self, failed: np.ndarray, reasons: list[str]) -> np.ndarray:
        """The batch's group steps as loss coefficients (M, R, K): each row's groups in the order its
        generator draws, a single group listed twice (``repeat_single_group``); a member's
        coefficient is 1, or 1/|g| with ``group_norm``. Counts the batch."""
        self.batches += 1
        if self.affinity.ndim == 3 and self.n_tasks == 2 and self.repeat_single_group:
            two = np.ones(len(self.affinity), dtype=bool) if self._warming_up() else self._pair_split()
            if two is not None:
                if not self._warming_up():  # the groups a later sklearn call would keep on failure
                    self.groups[:] = _pair_groups(two)
                return self._pair_plan(two)
        one, _, _, generators, _ = self._per_row()
        plans = []
        groups = [self.next_groups()] if one else self._groups_rows(failed, reasons)
        for row_groups, gen in zip(groups, generators):
            order = torch.randperm(len(row_groups), generator=gen).tolist()
            plan = [row_groups[i] for i in order]
            plans.append(plan * 2 if len(plan) == 1 and self.repeat_single_group else plan)
        steps = {len(p) for p in plans}
        if len(steps) != 1:
            raise ValueError(f"stgu: rows in lockstep take different numbers of group steps {sorted(steps)}")
        self._last_plan = (len(groups[0]), len(plans[0]))
        coef = np.zeros((len(plans[0]), len(plans), self.n_tasks))
        for r, plan in enumerate(plans):
            for m, group in enumerate(plan):
                coef[m, r, group] = 1.0 / len(group) if self.group_norm else 1.0
        return coef

    def _pair_plan(self, two: np.ndarray) -> np.ndarray:
        """:meth:`plan_rows` of K = 2 rows with the single group repeated, from ``two`` (R,): two
        steps either way, {first}, {other} in the order the row's ``randperm(2)`` draws, or both
        tasks twice (coefficient 1, or 1/2 with ``group_norm``), looked up in a table of the three
        plans. A one-group row draws nothing: ``randperm(1)`` takes no number from its generator
        (checked in tests/balancers/test_stgu.py), so skipping it leaves every stream as the
        general plan leaves it; ``randperm(2, out=…)`` into one reused buffer draws what
        ``randperm(2)`` draws, at a third of the cost. (Rows only: a one-row plan, whose
        ``next_groups`` callers may replace, and its StepInfo counts go the general way.)"""
        if self._pair_cache is None or self._pair_cache[0] != self.group_norm:
            both = 0.5 if self.group_norm else 1.0   # 1/|g| for the group of both tasks
            table = np.array([[[1.0, 0.0], [0.0, 1.0], [both, both]], [[0.0, 1.0], [1.0, 0.0], [both, both]]])
            self._pair_cache = (self.group_norm, table, torch.empty(2, dtype=torch.int64))
        _, table, draw = self._pair_cache
        drawn = draw.numpy()   # (its view taken here: a deep copy of the balancer would not keep a stored one)
        codes = []   # the row's plan: 0 = {0} then {1}, 1 = {1} then {0}, 2 = {0, 1} twice
        for t, gen in zip(two.tolist(), self.generator):
            if t:
                torch.randperm(2, generator=gen, out=draw)
                codes.append(drawn[0])
            else:
                codes.append(2)
        return table[:, codes]

    def _check_before(self, before: np.ndarray, failed: np.ndarray, reasons: list[str]) -> bool:
        """Affinities are relative loss decreases: a row with a non-positive loss before an update fails
        (a one-row balancer raises), at the update's place in the batch. Returns whether one did."""
        if not (before <= 0).any():
            return False
        message = "stgu: affinities are relative loss decreases and need positive losses, got {}"
        if self.affinity.ndim == 2:
            raise BalancerError(message.format(before[0]))
        newly = (before <= 0).any(-1) & ~failed
        for r in np.flatnonzero(newly):
            failed[r], reasons[r] = True, "BalancerError: " + message.format(before[r])
        return bool(newly.any())

    def train_rows(self, forward: Callable[[bool], np.ndarray], step: Callable[[np.ndarray], None],
                   dead: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """One batch of every row: the group steps of :meth:`plan_rows` and the affinity updates.

        ``forward(with_grad)`` evaluates the losses (R, K) at the current parameters (the last one
        with ``with_grad`` is what ``step`` differentiates); ``step(coef)`` takes one optimizer step on
        Σ coef ℓ (coef (R, K)). ``dead``: rows that failed before (their affinity is left alone).
        Returns (the first forward's losses, the summed coefficients, failed rows, their reasons as
        "ErrorType: message").

        The updates of a batch are, with ℓ⁽ⁱ⁾ the i-th forward's losses and g_j its j-th group:
        ``paper`` g_j over ℓ⁽ʲ⁾ → ℓ⁽ʲ⁺¹⁾ for every j (ℓ⁽ᴹ⁾ from one more forward), ``official`` g_j
        over ℓ⁽ʲ⁻¹⁾ → ℓ⁽ʲ⁾ for j ≥ 1. Each one's losses are checked where it falls in the batch (a
        one-row balancer raises there: before g_j's step for ``paper``, after it for ``official``);
        the EMA steps themselves run in order at the end, in one :func:`affinity_update_rows` call
        on the recorded forwards — nothing reads the affinity within a batch — or, if a forward or
        a step raises, those recorded up to there (``finally``): the affinity is always what
        updating at each step would have left. A row failing at an update is left alone from that
        update on.
        """
        affinity = self.affinity.reshape(-1, self.n_tasks, self.n_tasks)
        rows = len(affinity)
        failed = np.zeros(rows, dtype=bool) if dead is None else dead.copy()
        any_failed = dead is not None and bool(failed.any())
        reasons = [""] * rows
        plan = self.plan_rows(failed, reasons)
        paper = self.attribution == "paper"
        seen: list[np.ndarray] = []            # every forward's losses, in order
        gone: dict[int, np.ndarray] = {}       # update → the rows failed by then (once any has)
        made = 0                               # updates checked: update u is over seen[u] → seen[u + 1]

        def record() -> None:
            nonlocal any_failed, made
            any_failed = self._check_before(seen[made], failed, reasons) or any_failed
            if any_failed:
                gone[made] = failed.copy()
            made += 1

        try:
            for m in range(len(plan)):
                seen.append(forward(True))
                if m > 0 and paper:
                    record()                 # lookahead of the previous group
                step(plan[m])
                if m > 0 and not paper:
                    record()                 # change since the previous forward
            if paper:
                seen.append(forward(False))
                record()
        finally:
            if made:
                self._apply_updates(affinity, plan[0 if paper else 1:][:made] > 0, np.array(seen[:made + 1]), gone)
        self.step_count += 1
        return seen[0], plan.sum(0), failed, reasons

    def _apply_updates(self, affinity: np.ndarray, members: np.ndarray, losses: np.ndarray,
                       gone: dict[int, np.ndarray]) -> None:
        """The affinity EMA of :meth:`train_rows`: update u over losses[u] → losses[u + 1] for the
        group ``members[u]`` (R, K), except in the rows ``gone[u]`` (failed by then)."""
        before, after = losses[:-1], losses[1:]
        if gone:  # a failed row is left alone (1.0: a harmless divisor)
            none = np.zeros(len(affinity), dtype=bool)
            rows_gone = np.stack([gone.get(u, none) for u in range(len(members))])[..., None]
            members, before = members & ~rows_gone, np.where(rows_gone, 1.0, before)
        new = affinity_update_rows(affinity, members, before, after, self.affin_decay)
        self.affinity = new.reshape(self.affinity.shape)

    # ------------------------------------------------------------------ one batch
    def train_step(self, forward: Callable[[], ForwardOutput], optimizer: torch.optim.Optimizer,
                   shared_params: Sequence[Tensor], task_params: Sequence[Sequence[Tensor]] | None = None
                   ) -> tuple[Tensor, StepInfo]:
        self._sync_group()  # raises under an active process group
        shared = [p for p in _as_param_list(shared_params) if p.requires_grad]
        graph: dict[str, Tensor] = {}

        def losses_now(with_grad: bool) -> np.ndarray:
            if not with_grad:
                with torch.no_grad():
                    return host(forward().losses)
            losses = forward().losses
            check_losses(losses, self.n_tasks, self.name)
            graph["losses"] = losses
            graph.setdefault("first", losses.detach())
            return host(losses)

        def group_step(coef: np.ndarray) -> None:
            losses = graph["losses"]
            clear_grads(optimizer)   # zero_grad / step() bit for bit, without their wrappers (_adam)
            (losses * torch.from_numpy(coef[0]).to(losses)).sum().backward()
            self._clip(shared)
            adam_step(optimizer)

        _, weights, _, _ = self.train_rows(lambda with_grad: losses_now(with_grad)[None], group_step)
        first = graph["first"]
        return first, StepInfo(weights=torch.from_numpy(weights[0]).to(first),
                               extras={"n_groups": self._last_plan[0], "group_steps": self._last_plan[1],
                                       **self._step_extras()})

    def _step_extras(self) -> dict[str, Any]:
        return {"solver_failures": sum(f.total for f in self._per_row()[4])}

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
