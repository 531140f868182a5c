"""Kernel of ``nashmtl``: x.grad = clip(α₁g₁ + α₂g₂) with α from the K = 2 Nash solve.

The balancer's Newton solver is FairGrad's with α = 1, whose K = 2 path
(:class:`mtl_tune.balancers._fair_pairs.FairPairs`) is the closed form α_i = 1/(‖g_i‖√(1 + ρ)) —
computed here by the same code for all rows. Around it, what ``NashMTL.backward`` does:

* a solve every ``update_weights_every`` steps (per row: variants may differ); in between the
  stored α is reused (x.grad = α·G);
* a Pareto-stationary solve ((1 + ρ)/2 ≤ ``STATIONARY_HULL``): x.grad = 0, weights 0, α kept,
  and the reuse steps after it write 0 too; no failure, and it ends a run of failures;
* a failed solve (residual above 1e-6, or a zero gradient, whose α_i → ∞) keeps the previous α
  of the tasks without a valid value (α starts at the official 1), counts, warns, and fails the
  row at the 20th in a row (:mod:`toy.kernels._fair`).
"""

from __future__ import annotations

import inspect

import numpy as np

from mtl_tune.balancers._fair_pairs import FairPairs
from mtl_tune.balancers._fairness import solve_fair
from ._base import gram2
from ._fair import FairFamilyKernel


class NashMTLKernel(FairFamilyKernel):
    name = "nashmtl"

    def setup(self) -> None:
        self.setup_family()
        # NashMTL.solve → solve_fair(gram, 1.0, x0=α, max_iter=optim_niter) with solve_fair's default tol
        tol = inspect.signature(solve_fair).parameters["tol"].default
        self.solver = FairPairs(1.0, tol, self.attr("optim_niter", np.int64))
        self.every = self.attr("update_weights_every", np.int64)
        self.alpha = np.ones((self.rows, 2))          # the official initial α
        self.stationary = np.zeros(self.rows, dtype=bool)

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        self.fail_bad_inputs(step, losses, jac)
        solving = step % self.every == 0
        if solving.any():
            sol = self.solver.solve(*gram2(jac))
            valid = sol.converged[:, None] & ~sol.zero   # zero-gradient tasks: α_i → ∞, keep the old one
            new_alpha = np.where(valid & ~sol.stationary[:, None], sol.x, self.alpha)
            missed = solving & (~sol.converged | sol.zero.any(-1))   # (a stationary row has no zero task)
            self.account(step, missed, sol.residual, solving)
            live = solving & ~self.failed
            self.alpha = np.where(live[:, None], new_alpha, self.alpha)
            self.stationary = np.where(live, sol.stationary, self.stationary)
        self.stationary_steps += self.stationary & ~self.failed
        weights = np.where(self.stationary[:, None], 0.0, self.alpha) if self.stationary.any() else self.alpha
        return self.finish(step, weights, jac)

