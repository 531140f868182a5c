"""Shared pieces of the FairGrad-family kernels (``fairgrad``, ``pivrg``; ``nashmtl`` uses the helpers).

The per-step math is the balancers' own K = 2 solver, :class:`mtl_tune.balancers._fair_pairs.FairPairs`,
called on all rows at once (the balancer calls the same code with one row): the Pareto-stationarity
test (1 + ρ)/2 ≤ ``STATIONARY_HULL`` → x = 0, else the scalar Newton solve, and its acceptance.
What the kernels add is the bookkeeping the balancers do around it, vectorised over rows:

* ``solver_failures`` and the run of consecutive failures (``SolverFailureCounter``): a miss is
  counted and warned about; the ``max_consecutive``-th miss in a row fails the row (the balancer
  raises ``BalancerError``). A stationary step is no miss and ends a run, as in the balancer.
* a row that fails keeps the weights and counts of its last completed step: the balancer raised
  before returning that step's ``StepInfo``, so the lockstep table shows the previous one.
* ``solver`` variants other than Newton (scipy ``least_squares``, Nash-MTL's ``cccp``) are other
  numerical methods with their own tolerances and failure modes: no kernel reproduces them, so
  :meth:`FairFamilyKernel.unsupported` sends such variants to the lockstep path — never a silent
  substitution of the Newton answer.
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers._fair_pairs import FairPairs
from ._base import Kernel, clip_rows, combine, gram2

#: a warm-started solve needs 1–2 Newton steps where a cold one needs up to ~6 (α = 5): below this
#: ``max_iter`` the kernel starts cold like the balancer, so that the same rows hit the limit
WARM_START_MIN_ITER = 10


class FairFamilyKernel(Kernel):
    """Bookkeeping shared by the fairness kernels (see the module docstring)."""

    #: the solver option each row must have for the kernel to reproduce it
    kernel_solver = "newton"

    @classmethod
    def unsupported(cls, balancer) -> str | None:
        if balancer.solver == cls.kernel_solver:
            return None
        return (f"solver={balancer.solver!r} has no toy kernel (the kernel is the balancer's K = 2 "
                f"{cls.kernel_solver} path)")

    def setup_family(self) -> None:
        self.solver_failures = np.zeros(self.rows, dtype=np.int64)
        self.consecutive = np.zeros(self.rows, dtype=np.int64)
        self.stationary_steps = np.zeros(self.rows, dtype=np.int64)
        self.max_consecutive = np.array([b.failures.max_consecutive for b in self.balancers])
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def account(self, step: int, missed: np.ndarray, residual: np.ndarray, solving: np.ndarray | None = None) -> None:
        """``SolverFailureCounter`` per row: count and warn misses, fail the rows whose run of
        misses reaches ``max_consecutive``; any other solve (converged or stationary) ends a run.
        ``solving``: the rows that solved this step (Nash-MTL's reuse steps touch no counter)."""
        ended = 0 if solving is None else np.where(solving, 0, self.consecutive)
        if missed.any():
            missed = missed & ~self.failed
            run = np.where(missed, self.consecutive + 1, ended)
            total = self.solver_failures + missed
            self.warn(missed, [f"{self.name}: solver failed (relative residual {r:.1e}); failure #{n}"
                               for r, n in zip(residual, total)])
            self.fail(missed & (run >= self.max_consecutive), step,
                      f"BalancerError: {self.name}: solver failed {int(self.max_consecutive[0])} times in a row")
            keep = self.failed  # rows failing now keep the counts of their last completed step
            self.consecutive = np.where(keep, self.consecutive, run)
            self.solver_failures = np.where(keep, self.solver_failures, total)
        elif solving is None:
            self.consecutive[:] = 0
        else:
            self.consecutive = ended

    def finish(self, step: int, weights: np.ndarray, jac: np.ndarray) -> np.ndarray:
        """x.grad = clip(Σ w_i g_i); ``self.weights`` ← w except on failed rows (their last step's)."""
        if not np.isfinite(weights).all():
            self.fail(~np.isfinite(weights).all(-1), step,
                      f"BalancerError: {self.name}: solver produced non-finite weights")
        self.weights = np.where(self.failed[:, None], self.weights, weights) if self.failed.any() else weights
        d = combine(weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d


class FairGradFamilyKernel(FairFamilyKernel):
    """d = K·G x with x from the K = 2 fairness solve with priorities :meth:`priorities` (None = 1)."""

    def setup(self) -> None:
        self.setup_family()
        max_iter = self.attr("max_iter", np.int64)
        self.solver = FairPairs(self.attr("alpha"), self.attr("tol"), max_iter)
        # warm starts from the previous step change only the iteration count (same root to tol): used
        # unless an iteration limit is so low that the count decides convergence (then cold, as the balancer)
        self.warm = bool(max_iter.min() >= WARM_START_MIN_ITER)
        self.start: tuple[np.ndarray, np.ndarray] | None = None
        self.previous: tuple[np.ndarray, np.ndarray] | None = None

    def priorities(self) -> np.ndarray | None:
        return None

    def extrapolated(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Warm start: the last two solutions' variable extrapolated linearly (the trajectory moves
        smoothly, so one Newton step usually reaches ``tol`` from there), or the last one alone."""
        if self.start is None or self.previous is None:
            return self.start
        (v1, neg1), (v0, neg0) = self.start, self.previous
        return np.where(neg1 == neg0, 2.0 * v1 - v0, v1), neg1

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        sol = self.solver.solve(*gram2(jac), self.priorities(), self.extrapolated())
        if self.warm:
            self.previous, self.start = self.start, sol.start
        self.account(step, ~sol.converged, sol.residual)
        self.stationary_steps += sol.stationary & ~self.failed
        return self.finish(step, 2.0 * sol.x, jac)  # ×K (K = 2); 0 on stationary rows
