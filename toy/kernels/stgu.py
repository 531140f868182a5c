"""Kernel of ``stgu``: ``STGU.train_step`` on the toy, all rows at once (a training-loop kernel).

One iteration of a row (batch b = step + 1), as the balancer does it with x the only parameter:

1. groups: singletons while b ≤ ``prepos`` + 1 (the balancer's warm-up); else affinity
   propagation on S = sim(A), which for K = 2 is the closed form
   :class:`~mtl_tune.balancers.stgu.PairGrouping` (two groups ⟺ the ``preference_quantile``
   quantile of S exceeds S[0, 1]; the balancer's ``group_tasks`` takes the same branch, tested
   against sklearn); the group order is ``torch.randperm`` from the
   row's own generator (one draw per row and batch, as the balancer draws).
2. plan = the ordered groups, a single group listed twice (``repeat_single_group``): M = 2
   group steps for K = 2 either way. Group step j: forward ℓ⁽ʲ⁾, J⁽ʲ⁾ at the current x, then
   x.grad = Σ_{t∈g} c_t ∇ℓ_t (c_t = 1, or 1/|g| with ``group_norm``), clipped to ``max_norm``,
   and one Adam step. ``zero_grad(set_to_none=True)`` before each backward only means that each
   step sees its own group's gradient: x is shared by every group, so it always has a gradient
   and Adam steps it (and counts a step) M times per batch.
3. affinity EMA (:func:`~mtl_tune.balancers.stgu.affinity_update_pairs`, the batched form of
   the balancer's ``affinity_update``): ``paper`` credits group j with ℓ⁽ʲ⁾ → ℓ⁽ʲ⁺¹⁾ (ℓ⁽²⁾ from
   one more forward after the last step); ``official`` credits plan[1] with ℓ⁽⁰⁾ → ℓ⁽¹⁾ only.

The forward after the last step (``paper``) is the next iteration's first forward at the same x,
so it is kept and reused (2 landscape evaluations per iteration instead of 3). Failures where the
balancer raises: non-finite losses at a checked forward, non-positive losses in an affinity
update, a non-finite x after the iteration (the reference loop's check); a similarity that is not
finite goes to the row's own ``next_groups`` (sklearn raises on it, and that error is the row's).
``solver_failures`` stays 0: for K = 2 affinity propagation cannot fail (no iterations).

Not supported: ``repeat_single_group=False`` (a one-group batch then takes one Adam step, the
engine's ``adam_step`` steps all rows of the block together): :meth:`STGUKernel.unsupported`
sends such variants to the reference path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from mtl_tune.balancers.stgu import PairGrouping, affinity_similarity, affinity_update_pairs
from ._base import Kernel, clip_rows, combine

#: the engine's ``adam_step`` steps every row of the block, so every row must take the same
#: number of group steps per iteration; without the repeat a one-group batch takes one.
NO_REPEAT = ("repeat_single_group=False takes one or two optimizer steps per batch depending on the grouping; "
             "the fast engine steps all rows of a method together")
_TASKS = np.arange(2)


class STGUKernel(Kernel):
    name = "stgu"
    training_loop = True

    @classmethod
    def unsupported(cls, balancer) -> str | None:
        return None if balancer.repeat_single_group else NO_REPEAT

    def setup(self) -> None:
        b = self.balancers
        self.decay = self.attr("affin_decay").reshape(-1, 1, 1)
        self.prepos = self.attr("prepos", np.int64)
        self.grouping = PairGrouping(self.attr("preference_quantile"))
        self.paper = np.array([bal.attribution == "paper" for bal in b])
        self.official_similarity = np.array([bal.similarity == "official" for bal in b])
        self.all_paper = bool(self.paper.all())
        self.any_paper = bool(self.paper.any())
        # weight of each group member: 1, or 1/|g| (group_norm) — as a (B,) factor per group size
        norm = self.attr("group_norm", bool)
        self.pair_weight = np.where(norm, 1.0 / 2, 1.0)
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())
        self.affinity = np.stack([bal.affinity for bal in b]).astype(np.float64)  # the balancers' start (0)
        self.two = np.array([len(bal.groups) == 2 for bal in b])                  # current groups (AP's last)
        self.generators = [bal.generator for bal in b]
        self.solver_failures = np.zeros(self.rows, dtype=np.int64)
        self.rows_idx = np.arange(self.rows)
        self.every_row = np.ones(self.rows, dtype=bool)
        self._cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # (x, losses, jac)

    # ------------------------------------------------------------------ grouping
    def _groups(self, step: int) -> np.ndarray:
        """(B,) bool: whether batch ``step + 1`` has two groups (singletons during the warm-up,
        batches 1 … prepos + 1, i.e. steps 0 … prepos).

        S = (X + Xᵀ)/2 is symmetric bit for bit (fl(a + b) = fl(b + a)), so the closed form is
        ``group_tasks``'s answer wherever S is finite."""
        grouping = step > self.prepos
        if grouping.any():
            sim = affinity_similarity(self.affinity, self.official_similarity)
            self.two = np.where(grouping, self.grouping.split(sim), self.two)
            if not np.isfinite(sim).all():  # sklearn's input check raises there: the row's own call
                for r in np.flatnonzero(grouping & ~np.isfinite(sim).all(axis=(-2, -1)) & ~self.failed):
                    self._group_row(r, step)
        return np.where(grouping, self.two, True)

    def _group_row(self, r: int, step: int) -> None:
        """The row's own ``next_groups`` (sklearn, failure counter) where the closed form does not apply."""
        bal = self.balancers[r]
        bal.affinity, bal.batches = self.affinity[r].copy(), step + 1
        bal.groups = [[0], [1]] if self.two[r] else [[0, 1]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                groups = bal.next_groups()
            except Exception as err:  # sklearn on a non-finite similarity, 20 failures in a row
                self.fail(self.rows_idx == r, step, f"{type(err).__name__}: {err}")
                groups = bal.groups
        if caught:
            self.warn(self.rows_idx == r, str(caught[0].message))
        self.two[r] = len(groups) == 2
        self.solver_failures[r] = bal.failures.total

    def _first_members(self, two: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members (B, 2) of plan[0] and plan[1]: the shuffled singletons, or the one group twice."""
        # per-row generators: the balancer's own draws, one randperm per row and batch
        first = np.array([torch.randperm(2 if n2 else 1, generator=gen).tolist()[0]
                          for n2, gen in zip(two.tolist(), self.generators)])
        single = ~two[:, None]
        m0 = (first[:, None] == _TASKS) | single
        return m0, ~m0 | single

    # ------------------------------------------------------------------ checks the balancer makes
    def _check_losses(self, losses: np.ndarray, step: int) -> None:
        bad = ~np.isfinite(losses).all(-1)
        if bad.any():
            self.fail(bad, step, [f"BalancerError: stgu: non-finite task loss {row.tolist()}" for row in losses])

    def _check_positive(self, before: np.ndarray, rows: np.ndarray, step: int) -> None:
        bad = rows & (before <= 0).any(-1)
        if bad.any():
            self.fail(bad, step, [f"BalancerError: stgu: affinities are relative loss decreases and need positive "
                                  f"losses, got {row}" for row in before])

    # ------------------------------------------------------------------ one iteration
    def _group_step(self, members: np.ndarray, jac: np.ndarray, adam_step: Callable[[np.ndarray], None]
                    ) -> np.ndarray:
        """One group step: x.grad = Σ_{t∈g} c_t ∇ℓ_t (clipped), one Adam step; returns the coefficients."""
        coef = members * np.where(members.all(-1), self.pair_weight, 1.0)[:, None]
        d = combine(coef, jac)
        adam_step(clip_rows(d, self.max_norm) if self.clip else d)
        return coef

    def train_step(self, step: int, x: np.ndarray, adam_step: Callable[[np.ndarray], None],
                   landscape: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
        two = self._groups(step)
        m0, m1 = self._first_members(two)
        cached = self._cached
        if cached is not None and np.array_equal(cached[0], x):
            l0, j0 = cached[1], cached[2]   # the last iteration's lookahead forward, same x
        else:
            l0, j0 = landscape(x)
        self._check_losses(l0, step)
        c0 = self._group_step(m0, j0, adam_step)
        l1, j1 = landscape(x)
        self._check_losses(l1, step)
        self._check_positive(l0, self.every_row, step)
        c1 = self._group_step(m1, j1, adam_step)
        weights = c0 + c1
        # EMA over l0 → l1: paper credits plan[0] (its own step), official plan[1] (the step before)
        credited = m0 if self.all_paper else np.where(self.paper[:, None], m0, m1)
        if self.any_paper:  # paper: plan[1] gets l1 → l2, one more forward (its values unchecked there)
            l2, j2 = landscape(x)
            self._check_positive(l1, self.paper, step)
            self.affinity = affinity_update_pairs(self.affinity, (credited, m1 & self.paper[:, None]),
                                                  (l0, l1), (l1, l2), self.decay)
            self._cached = (x.copy(), l2, j2)
        else:
            self.affinity = affinity_update_pairs(self.affinity, credited, l0, l1, self.decay)
        bad = ~np.isfinite(x).all(-1)
        if bad.any():
            self.fail(bad, step, [f"RuntimeError: non-finite point {row.tolist()}" for row in x])
        # a failed row's table weights are those of its last completed batch (the API's last StepInfo)
        self.weights = np.where(self.failed[:, None], self.weights, weights)
