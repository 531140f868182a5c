"""``nashmtl`` — Nash-MTL, multi-task learning as a bargaining game (Navon et al., ICML'22).

The Nash bargaining solution of the tasks is d = G α with α > 0 solving

    (A α)_i = 1 / α_i   for every task i,   A = G Gᵀ,

i.e. every task's directional derivative g_iᵀd equals 1/α_i. It is invariant to the scale of
each task's loss: if g_i → c_i g_i then α_i → α_i / c_i and d is unchanged (tested). The
update backpropagates Σ_i α_i ℓ_i: the shared gradient is G α (no ×K — α already carries the
scale, as in the official code) and the heads get α-weighted gradients
(docs/methods.md#what-the-task-heads-receive).
The shared gradient is clipped to ``max_norm`` = 1.0 as in the Nash-MTL paper and its
official repo (the FAMO-family copy lost the clip, docs/methods.md#gradient-clipping).

Solvers (``solver``):

* ``"newton"`` (default) — the equation is the α = 1 member of the FairGrad family, solved by
  the damped Newton method of :mod:`mtl_tune.balancers._fairness` (on a unit-diagonal scaled
  Gram matrix, warm-started from the previous α). ``optim_niter`` caps its iterations; it
  converges quadratically (2–5 iterations from a cold start on random problems, 1–2 warm).
* ``"cccp"`` — the official algorithm: sequential convex programming, each round solving
  min_a Σ_i (Âa)_i + ∇φ(a_prev)ᵀa / nf  s.t.  log(a_i) + log((Âa)_i) ≥ −log nf
  (Â = A/nf, nf = ‖A‖_F, φ(a) = Σ log a_i + Σ log (Âa)_i linearised at the previous round) with
  CLARABEL (ECOS, the official solver, is not installed; cvxpy ≥ 1.6 dropped it, which is what
  silently turned the official Nash-MTL into LS), at most ``optim_niter`` rounds, stopping when
  a round moves α by less than 1e-6.

Measured on the project's 2-core CPU machine (float64, random problems): Newton takes
0.3 ms (K = 3) to 0.8 ms (K = 40) per cold solve and always converged; CCCP took 3 ms (K = 3),
11 ms (K = 11), 270 ms (K = 40) cold and stalled far from the root on 1/10 (K = 3), 2/10
(K = 11), 7/10 (K = 40) problems within 20 rounds. Inside a training loop (CPU MLP, 256
samples, width 512, K = 3) Newton cost 1.8 ms of a 218 ms step (0.8 %), CCCP 65 ms (24 %).
Newton is therefore the default; the < 5 %-of-a-step budget holds with a wide margin.

Failures are never silent: a solve whose relative residual max_i |α_i (Aα)_i − 1| stays above
1e-6 (1e-4 for CCCP, whose rounds are only approximately solved), or a task with an exactly zero
shared gradient (then A α = 1/α has no solution: α_i → ∞; the other tasks are solved exactly on
the reduced system and α_i keeps its previous value), is counted in ``solver_failures``, warned
about, and raises :class:`BalancerError` after 20 in a row. A failed step keeps the previous α
for the failing tasks — what the official code does when its solver raises — never a switch to
equal weights (only if the very first solve fails does that step use the official initial α = 1,
and it says so).

**Pareto stationarity is not a failure.** When 0 is (within the tolerance of
:data:`~mtl_tune.balancers._fairness.STATIONARY_HULL`) in the convex hull of the task gradients —
e.g. a trajectory that has reached the Pareto front, where the two gradients of a 2-task problem
are opposite — A α = 1/α has no solution (α → ∞ while d = Gα keeps norm √K and turns along the
front, its limit undefined). The test runs *before* any solve, on the scale-free Gram matrix
(:func:`~mtl_tune.balancers._fairness.pareto_stationary`, the same criterion as FairGrad's), so it
does not depend on whether an iteration happened to converge. A stationary step writes a zero
shared gradient, is counted in ``stationary_steps`` (not in ``solver_failures``; it ends a run of
failures), warns nothing, and keeps α unchanged: the heads are trained with the previous α
(their own losses still have a meaningful gradient there, and α is the last valid bargaining
scale), and the next solve warm-starts from it. ``StepInfo.weights`` reports 0 — the weights of
the shared update that was applied (Σ 0·g_i); the heads' α stays in ``balancer.alpha``. With
``update_weights_every`` = n the steps that reuse a stationary decision also write 0 to the shared
parameters (the reuse approximates re-solving, which would again say "stationary").

Two tasks (the common 2-task benchmarks and the toy): the Newton solver is the closed form
α_i = 1/(‖g_i‖√(1 + ρ)) (ρ = cos ∠(g₁, g₂)) of :func:`~mtl_tune.balancers._fairness.solve_fair`'s
K = 2 path; the warm start is not needed there.

``update_weights_every`` = n re-solves α every n steps; in between, the previous α is reused
and the step costs one backward (no Jacobian) — the official cost knob, which crashes in the
FAMO-family copy and works here.
"""

from __future__ import annotations

from collections.abc import Sequence

import inspect
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._common import all_finite, weighted_rows
from mtl_tune.balancers._fair_pairs import FairPairs
from mtl_tune.balancers._fairness import FairSolution, pareto_stationary, solve_fair
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import (GRADIENT_PATHS, Balancer, BalancerError, SolverFailureCounter, StepInfo,
                                     check_losses, gram, pick_gradient_path, trainable_split)
from mtl_tune.distributed import distributed_run

SOLVERS = ("newton", "cccp")


def nash_weights(gram_matrix: np.ndarray, alpha0: np.ndarray | None = None, max_iter: int = 20,
                 tol: float = 1e-10) -> tuple[np.ndarray, bool, int, str]:
    """α > 0 with A α = 1/α by damped Newton (FairGrad with α = 1); returns (α, converged, iters, message).

    Zero-gradient tasks have no finite solution: their α_i is NaN and ``converged`` is False,
    while the other tasks' α is the exact solution of the reduced system. A Pareto-stationary
    problem has no solution at all: α is NaN, ``converged`` False and the message says why
    (:class:`NashMTL` tests stationarity itself and does not count it as a failure).
    """
    return _nash_alpha(solve_fair(gram_matrix, 1.0, x0=alpha0, tol=tol, max_iter=max_iter))


def _nash_alpha(sol: FairSolution) -> tuple[np.ndarray, bool, int, str]:
    """(α, converged, iterations, message) of a FairGrad α = 1 solution (NaN where α is undefined)."""
    if sol.stationary or not sol.converged:  # no solution, or only the best iterate of a failed solve
        return np.full_like(sol.x, np.nan), False, sol.iterations, sol.message
    if sol.zero_tasks:
        alpha = sol.x.copy()
        alpha[list(sol.zero_tasks)] = np.nan
        return alpha, False, sol.iterations, f"tasks {list(sol.zero_tasks)} have a zero gradient (α_i → ∞)"
    return sol.x, True, sol.iterations, sol.message


class CCCPSolver:
    """The official sequential convex program for A α = 1/α (see the module docstring).

    The cvxpy problem is built once per task count with parameters (Â, ∇φ/nf, log nf), so each
    round only re-solves a DPP-compiled problem.
    """

    def __init__(self, n_tasks: int, max_iter: int = 20, tol: float = 1e-4) -> None:
        import cvxpy as cp  # optional heavy dependency: only this solver needs it

        self.cp, self.max_iter, self.tol = cp, max_iter, tol
        self.var = cp.Variable(n_tasks, nonneg=True)
        self.a_hat = cp.Parameter((n_tasks, n_tasks))
        self.lin = cp.Parameter(n_tasks)
        self.log_nf = cp.Parameter()
        # α_i (Aα)_i ≥ 1 written as −log α_i − log (Âα)_i ≤ log nf (DPP-compliant)
        cons = [-cp.log(self.var) - cp.log(self.a_hat @ self.var) <= self.log_nf]
        self.problem = cp.Problem(cp.Minimize(cp.sum(self.a_hat @ self.var) + self.lin @ self.var), cons)

    def solve(self, gram_matrix: np.ndarray, alpha0: np.ndarray) -> tuple[np.ndarray, bool, int, str]:
        a = np.asarray(gram_matrix, dtype=np.float64)
        if np.any(np.diag(a) <= 0):
            return np.full_like(alpha0, np.nan), False, 0, "a task has a zero gradient (α_i → ∞)"
        nf = float(np.linalg.norm(a))
        a_hat = a / nf
        self.a_hat.value, self.log_nf.value = a_hat, np.log(nf)
        prev = alpha0.copy()
        for it in range(1, self.max_iter + 1):
            ap = a_hat @ prev
            if np.any(ap <= 0):
                return np.full_like(alpha0, np.nan), False, it, "CCCP linearisation point has (Âα)_i ≤ 0"
            self.lin.value = (1.0 / prev + a_hat.T @ (1.0 / ap)) / nf
            try:
                self.problem.solve(solver=self.cp.CLARABEL)
            except self.cp.SolverError as err:
                return np.full_like(alpha0, np.nan), False, it, f"CLARABEL: {err}"
            new = self.var.value
            if new is None or self.problem.status not in ("optimal", "optimal_inaccurate"):
                return np.full_like(alpha0, np.nan), False, it, f"CLARABEL status {self.problem.status}"
            step = float(np.linalg.norm(new - prev))
            prev = np.maximum(new, 1e-300)
            if step < 1e-6:
                break
        err = float(np.max(np.abs(prev * (a @ prev) - 1.0)))  # relative residual (Aα)_i α_i − 1
        if err > self.tol:
            return np.full_like(prev, np.nan), False, it, f"CCCP stalled (relative residual {err:.2e})"
        return prev, True, it, "ok"


class NashMTL(Balancer):
    """Nash-MTL (Navon et al., ICML'22): the bargaining solution G Gᵀ α = 1/α; the update
    is Σ α_i g_i, α warm-starts the next solve. Clips at ``max_norm`` 1.0 by default.

    Args:
        n_tasks: K, the number of tasks.
        update_weights_every: re-solve α every n steps and reuse it in between (int ≥ 1,
            default 1).
        optim_niter: iteration cap of the solver (int ≥ 1, default 20).
        solver: ``"newton"`` (exact, default) or ``"cccp"`` (the official convex-concave
            procedure; needs cvxpy).
        gradient_path: ``"auto"`` (default), ``"jacobian"`` or ``"gram"``: how the per-task
            gradients are combined (the Gram path streams the K×K Gram matrix and adds one
            backward of Σ αᵢ ℓᵢ instead of holding the K×P Jacobian; docs/performance.md §8).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "nashmtl"
    needs_jacobian: ClassVar[bool] = True
    default_max_norm: ClassVar[float | None] = 1.0

    def __init__(self, n_tasks: int, update_weights_every: int = 1, optim_niter: int = 20, solver: str = "newton",
                 gradient_path: str = "auto", **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if gradient_path not in GRADIENT_PATHS:
            raise ValueError(f"nashmtl: gradient_path must be one of {GRADIENT_PATHS}, got {gradient_path!r}")
        self.gradient_path = gradient_path
        if not (isinstance(update_weights_every, int) and update_weights_every >= 1):
            raise ValueError(f"nashmtl: update_weights_every must be a positive integer, got {update_weights_every!r}")
        if not (isinstance(optim_niter, int) and optim_niter >= 1):
            raise ValueError(f"nashmtl: optim_niter must be a positive integer, got {optim_niter!r}")
        if solver not in SOLVERS:
            raise ValueError(f"nashmtl: solver must be one of {SOLVERS}, got {solver!r}")
        self.update_weights_every, self.optim_niter, self.solver = update_weights_every, optim_niter, solver
        self.alpha = np.ones(n_tasks)  # official initial α; replaced by the first successful solve
        self.failures = SolverFailureCounter(self.name)
        # the last solve found a Pareto-stationary point (shared update 0); per row after start_rows
        self.stationary: np.ndarray = np.zeros((), dtype=bool)
        self.stationary_steps = 0
        self._cccp: CCCPSolver | None = None
        self._iterations: Any = 0
        # NashMTL.solve → solve_fair(gram, 1.0, x0=α, max_iter=optim_niter) with solve_fair's default tol
        self._pairs = FairPairs(1.0, inspect.signature(solve_fair).parameters["tol"].default, optim_niter)

    @classmethod
    def has_rows_rule(cls) -> bool:
        return True

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        n = len(rows)
        self.alpha = np.ones((n, self.n_tasks))
        self.stationary = np.zeros(n, dtype=bool)

    def solve_rows(self, gram: np.ndarray) -> RowStep:
        """Batch-first solve on Gram matrices (..., K, K): updates :attr:`alpha` (..., K) and
        :attr:`stationary` (...) row by row as the module docstring says, and returns the weights of
        the shared update (0 on stationary rows) with the rows whose solve failed.

        Two tasks with the Newton solver: :class:`FairPairs` (its Nash closed form) on every row at
        once; otherwise :func:`solve_fair` (or CCCP) row by row, warm-started at the row's α.
        """
        k, shape = gram.shape[-1], gram.shape[:-2]
        rows = gram.reshape(-1, k, k)
        old = self.alpha.reshape(-1, k) if self.alpha.shape == (*shape, k) else np.broadcast_to(self.alpha, (*shape, k)).reshape(-1, k)
        if k == 2 and self.solver == "newton":
            sol = self._pairs.solve(rows[:, 0, 0], rows[:, 0, 1], rows[:, 1, 1])
            stationary = sol.stationary
            ok = sol.converged & ~sol.zero.any(-1)
            alpha = np.where(sol.converged[:, None] & ~sol.zero, sol.x, np.nan)  # α_i → ∞ for a zero task
            iterations = sol.iterations
            message = "" if ok.all() else (
                "a task has a zero gradient (α_i → ∞)" if sol.zero.any() else
                f"K = 2 solve stopped at relative residual {float(sol.residual[~ok].max()):.1e} > 1e-06")
        else:
            alpha, ok = np.full((len(rows), k), np.nan), np.zeros(len(rows), dtype=bool)
            stationary, iterations, message = np.zeros(len(rows), dtype=bool), np.zeros(len(rows), np.int64), ""
            for r, a in enumerate(rows):
                if self.solver == "newton":  # solve_fair tests stationarity first (the previous α is its hint)
                    sol = solve_fair(a, 1.0, x0=old[r], max_iter=self.optim_niter)
                    stationary[r] = sol.stationary
                    alpha[r], ok[r], iterations[r], msg = _nash_alpha(sol)
                else:
                    stationary[r] = pareto_stationary(a, hint=old[r])[0]
                    if not stationary[r]:
                        self._cccp = self._cccp or CCCPSolver(self.n_tasks, self.optim_niter)
                        alpha[r], ok[r], iterations[r], msg = self._cccp.solve(a, old[r])
                if not (ok[r] or stationary[r]):
                    message = msg
        # entries without a valid solution (failed solve, zero-gradient task) keep their previous α;
        # a stationary row keeps all of α (converged by definition: no failure)
        keep = stationary[:, None] | ~np.isfinite(alpha)
        self.alpha = np.where(keep, old, alpha).reshape(*shape, k)
        self.stationary = stationary.reshape(shape)
        self._iterations = np.where(stationary, 0, iterations).reshape(shape)
        return RowStep(self.step_weights(), solver_failed=(~ok & ~stationary).reshape(shape),
                       solver_message=message)

    def step_weights(self) -> np.ndarray:
        """Weights of the shared update (..., K): α, or 0 on rows whose last solve was stationary."""
        return np.where(self.stationary[..., None], 0.0, self.alpha)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """The rule of one step: a solve every ``update_weights_every`` steps (``step_count`` counts
        them, as :meth:`backward` does), the stored α (0 if stationary) in between."""
        if self.step_count % self.update_weights_every == 0:
            return self.solve_rows(gram)
        return RowStep(self.step_weights())

    def solve(self, gram_matrix: Tensor) -> np.ndarray:
        """Update and return α (K,) from this step's Gram matrix (:meth:`solve_rows` on one row, with
        failure accounting). Sets :attr:`stationary`; on a Pareto-stationary step α is returned unchanged."""
        one_row(self.solve_rows(host(gram_matrix)), self.failures)
        return self.alpha

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name, graph=True)
        shared, heads = trainable_split(self.name, shared_params, task_params)
        group = self._sync_group()
        path = pick_gradient_path(self.name, self.gradient_path, True, self.n_tasks, shared,
                                  self.engine.can_stream_gram(losses.device), group)
        if self.step_count % self.update_weights_every == 0 and path == "gram":
            # the update is Σ αᵢ gᵢ: the Gram matrix, then one backward of Σ αᵢ ℓᵢ (or 0 if stationary)
            a = self.engine.gram(losses, shared)
            if not bool(torch.isfinite(a).all()):
                raise BalancerError(f"{self.name}: non-finite per-task gradient")
            alpha = torch.from_numpy(self.solve(a)).to(losses)
            if self.stationary:
                self._zero_shared(shared, group, losses.device)
                if heads:
                    (losses * alpha).sum().backward(inputs=heads)
            else:
                (losses * alpha).sum().backward(inputs=shared + heads)
        elif self.step_count % self.update_weights_every == 0:
            jac = self._rank_mean(self.engine.jacobian(losses, shared, retain_graph=bool(heads), reuse=True), group)
            if not all_finite(jac):  # before the solve, which would misread inf/NaN as a degenerate Gram matrix
                raise BalancerError(f"{self.name}: non-finite per-task gradient")
            alpha64 = torch.from_numpy(self.solve(gram(jac)))
            alpha = alpha64.to(device=jac.device, dtype=jac.dtype)
            direction = torch.zeros_like(jac[0]) if self.stationary else weighted_rows(alpha64, jac)
            if not all_finite(direction):
                raise BalancerError(f"{self.name}: produced a non-finite update direction")
            self._write_shared(shared, direction, group)
            if heads:
                (losses * alpha.to(losses)).sum().backward(inputs=heads)
        elif self.stationary:  # reuse a stationary decision: zero shared gradient, heads with α
            alpha = torch.from_numpy(self.alpha).to(losses)
            self._zero_shared(shared, group, losses.device)
            if heads:
                (losses * alpha).sum().backward(inputs=heads)
        else:  # reuse α: one ordinary backward of Σ α_i ℓ_i
            alpha = torch.from_numpy(self.alpha).to(losses)
            (losses * alpha).sum().backward(inputs=shared + heads)
        self._clip(shared)
        self.step_count += 1
        self.stationary_steps += int(self.stationary)
        weights = torch.zeros_like(alpha) if bool(self.stationary) else alpha
        return StepInfo(weights=weights.detach(), extras=self._step_extras())

    def _step_extras(self) -> dict[str, Any]:
        return {"solver_failures": self.failures.total, "solver_iterations": int(self._iterations),
                "stationary_steps": self.stationary_steps}

    def _zero_shared(self, shared: list[Tensor], group: Any, device: torch.device) -> None:
        """A stationary step: the shared parameters get a zero gradient (never None, so that
        optimizers with momentum still step; through autograd when DDP must see it)."""
        if group is not None or distributed_run():
            self._write_shared(shared, torch.zeros(sum(p.numel() for p in shared), device=device), group)
        for p in shared:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _extra_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha.copy(), "failures": self.failures.state_dict(), "stationary": bool(self.stationary),
                "stationary_steps": self.stationary_steps}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        alpha = np.asarray(state["alpha"], dtype=np.float64)
        if alpha.shape != (self.n_tasks,):
            raise ValueError(f"nashmtl: saved α has shape {alpha.shape}, expected ({self.n_tasks},)")
        self.alpha = alpha.copy()
        self.failures.load_state_dict(state["failures"])
        # absent in checkpoints written before stationarity was detected: none had been seen then
        self.stationary = np.array(bool(state.get("stationary", False)))
        self.stationary_steps = int(state.get("stationary_steps", 0))
