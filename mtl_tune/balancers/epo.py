"""``epo`` — exact Pareto optimal search (Mahapatra & Rajan, "Multi-Task Learning with User
Preferences: Gradient Descent with Controlled Ascent in Pareto Optimization", ICML'20,
https://proceedings.mlr.press/v119/mahapatra20a.html).

EPO looks for the Pareto-optimal point where the *relative* losses r ⊙ ℓ are equal ("exact
Pareto optimal" for the preference r: ℓᵢ ∝ 1/rᵢ). Each step solves a linear programme in the
simplex weights α of the update d = Σ αᵢ gᵢ, with C = G Gᵀ the Gram matrix (C α = the directional
derivatives of the losses along d):

* non-uniformity μ = Σᵢ l̂ᵢ log(K l̂ᵢ), the KL divergence of l̂ = r⊙ℓ / Σ r⊙ℓ from uniform;
  the "adjustment" aᵢ = rᵢ(log(K l̂ᵢ) − μ) is its gradient direction in the losses, Ca = C a;
* **balance** (μ > ε): maximise αᵀCa (the descent of μ) over the simplex subject to
  (Cα)ⱼ ≥ (Ca)ⱼ for every task with (Ca)ⱼ ≤ 0, none for those with (Ca)ⱼ > 0, and (Cα)ⱼ ≥ 0 for the
  tasks of largest r⊙ℓ (they must not get worse); when no (Ca)ⱼ is positive: Cα ≥ 0;
* **descent** (μ ≤ ε): maximise 1ᵀCα (the summed descent) subject to Cα ≥ 0 and, unless
  ``relax``, αᵀCa ≥ min(maxⱼ (Ca)ⱼ, 0) (do not undo the balance).

The update is backpropagated as Σᵢ K αᵢ ℓᵢ (official ``epo_train.py``: ×K, every parameter, heads
included, gets the weighted loss). Official code: https://github.com/dbmptr/EPOSearch at commit
0293ee98304b (``multiMNIST/epo_lp.py``, ``epo_train.py``; ε = 1e-4).

Departures: the official LP runs through cvxpy/GLPK; we solve the same LP with SciPy's
``linprog`` (HiGHS), row by row, and for K = 2 in closed form (α = (t, 1 − t): every constraint
bounds t; ~10 µs instead of a ~5–15 ms solver call, tested equal to ``linprog``). A unique optimum is
the same; where the LP has several optima (a flat objective, e.g. two gradients of equal norm in a
descent step) the solvers may return different optimal vertices, and the K = 2 closed form takes
the middle of the optimal interval (symmetric in the tasks). When the
LP fails (infeasible, or a numerical failure), the official code prints the exception and uses
α = r/Σr; we use the same α but count the step as a **solver failure** (warned, fatal after 20
in a row, as every solver in this project). r ⊙ ℓ with a negative entry fails the step (official:
``ValueError``, then the same fallback every step): EPO needs non-negative losses. A zero
relative loss gives log 0 = −∞ in the adjustment (official: NaN into the LP): a solver failure with
the fallback α. All losses zero (Σ r⊙ℓ = 0): μ = 0, a = 0, a descent step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linprog

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import GradientBalancer

#: the official balance/descent switch on the non-uniformity μ (``EPO_LP(eps=1e-4)``).
EPS = 1e-4
#: the move of a row, as reported in ``extras["epo_move"]``.
BALANCE, DESCENT = 0, 1


def adjustments(losses: np.ndarray, preferences: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(r ⊙ ℓ, non-uniformity μ, adjustment a) for one row (module docstring); the caller checks r⊙ℓ ≥ 0."""
    rl = preferences * losses
    total = rl.sum()
    k = len(rl)
    if total <= 0:
        return rl, 0.0, np.zeros(k)
    l_hat = rl / total
    kept = l_hat > np.finfo(np.float64).eps
    mu = float(np.sum(l_hat[kept] * np.log(l_hat[kept] * k)))
    with np.errstate(divide="ignore"):
        a = preferences * (np.log(l_hat * k) - mu)
    return rl, mu, a


def epo_lp(gram: np.ndarray, losses: np.ndarray, preferences: np.ndarray, eps: float = EPS,
           relax: bool = False) -> tuple[np.ndarray | None, int, float, str]:
    """One EPO step: (α on the simplex, or None when the LP failed; the move; μ; the solver's
    message)."""
    k = len(losses)
    rl, mu, a = adjustments(losses, preferences)
    if not np.isfinite(a).all():
        return None, BALANCE, mu, "a relative loss is 0: the adjustment log(K l̂) is -inf"
    ca = gram @ a
    if mu > eps:
        move, objective = BALANCE, ca
        if (ca > 0).any():
            rhs = ca.copy()
            rhs[ca > 0] = -np.inf
            rhs[rl == rl.max()] = 0.0
        else:
            rhs = np.zeros(k)
        rows = np.isfinite(rhs)
        lhs, rhs = gram[rows], rhs[rows]
    else:
        move, objective = DESCENT, gram.sum(0)
        lhs, rhs = gram, np.zeros(k)
        if not relax:
            lhs, rhs = np.vstack([lhs, ca[None]]), np.append(rhs, min(float(ca.max()), 0.0))
    alpha, msg = (simplex_lp_two if k == 2 else simplex_lp)(objective, lhs, rhs)
    return alpha, move, mu, msg


def simplex_lp(objective: np.ndarray, lhs: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray | None, str]:
    """max objectiveᵀα over the simplex subject to lhs α ≥ rhs, by SciPy's ``linprog`` (HiGHS); (α, "")
    or (None, the solver's message)."""
    k = len(objective)
    res = linprog(-objective, A_ub=-lhs if len(rhs) else None, b_ub=-rhs if len(rhs) else None,
                  A_eq=np.ones((1, k)), b_eq=[1.0], bounds=(0, None), method="highs")
    if res.status != 0 or res.x is None:
        return None, f"linprog (HiGHS) status {res.status}: {res.message}"
    alpha = np.clip(res.x, 0.0, None)
    return alpha / alpha.sum(), ""


def simplex_lp_two(objective: np.ndarray, lhs: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray | None, str]:
    """:func:`simplex_lp` for K = 2 in closed form: α = (t, 1 − t), every constraint is a bound on t,
    the optimum the end of the feasible interval the objective points to (its midpoint when the
    objective is flat: every feasible t is optimal, and the midpoint is symmetric in the tasks).
    A tolerance of 1e-12 × the largest |entry| absorbs rounding in the bounds."""
    tol = 1e-12 * max(float(np.abs(lhs).max(initial=0.0)), float(np.abs(rhs).max(initial=0.0)), 1e-300)
    slope, need = lhs[:, 0] - lhs[:, 1], rhs - lhs[:, 1]          # constraint: slope·t ≥ need
    lo, hi = 0.0, 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = need / slope
    if (need[np.abs(slope) <= tol] > tol).any():
        return None, "closed-form LP (K = 2): infeasible (a constraint independent of α is violated)"
    lo = max(lo, float(bound[slope > tol].max(initial=0.0)))
    hi = min(hi, float(bound[slope < -tol].min(initial=1.0)))
    if lo > hi + 1e-12:
        return None, f"closed-form LP (K = 2): infeasible (t ∈ [{lo:.6g}, {hi:.6g}])"
    lo, hi = min(lo, hi), max(lo, hi) if lo <= hi else lo
    gain = objective[0] - objective[1]
    scale = 1e-12 * max(float(np.abs(objective).max()), 1e-300)
    t = hi if gain > scale else lo if gain < -scale else 0.5 * (lo + hi)
    return np.array([t, 1.0 - t]), ""


class EPO(GradientBalancer):
    """EPO (Mahapatra & Rajan, ICML'20): per step an LP in the Gram matrix that first makes the
    relative losses r⊙ℓ equal (balance), then descends while keeping them so (descent).

    Args:
        n_tasks: K, the number of tasks.
        preferences: K positive preferences r (default all ones); EPO aims at ℓᵢ ∝ 1/rᵢ.
        eps: the non-uniformity μ above which a step balances (official 1e-4).
        relax: drop the descent step's "keep the balance" constraint (the official ``relax``
            flag; default False, as its training scripts).

    Common keyword arguments ``max_norm`` (shared-gradient clipping), ``jacobian_engine`` and
    ``gradient_path``: see :class:`~mtl_tune.balancers.base.GradientBalancer`. Call :meth:`backward`
    (or :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the effective task
    weights K α (K,).
    """

    name = "epo"
    weighted_heads = True
    supports_gram = True

    def __init__(self, n_tasks: int, preferences: Sequence[float] | None = None, eps: float = EPS,
                 relax: bool = False, **kw) -> None:
        super().__init__(n_tasks, **kw)
        r = np.ones(n_tasks) if preferences is None else np.asarray(list(preferences), dtype=np.float64)
        if r.shape != (n_tasks,) or not np.isfinite(r).all() or (r <= 0).any():
            raise ValueError(f"epo: preferences must be {n_tasks} finite positive numbers, got {preferences!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"epo: eps must be a non-negative number, got {eps!r}")
        self.preferences, self.eps, self.relax = r, float(eps), bool(relax)
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """K α (..., K), row by row (one LP each); a failed LP gives K r/Σr and a solver failure."""
        k = self.n_tasks
        shape = losses.shape[:-1]
        flat_g, flat_l = gram.reshape(-1, k, k), losses.reshape(-1, k)
        n = len(flat_l)
        weights, moves, mus = np.empty((n, k)), np.zeros(n, dtype=np.int64), np.zeros(n)
        solver_failed, failed = np.zeros(n, dtype=bool), (self.preferences * flat_l < 0).any(-1)
        messages: list[str] = []
        fallback = k * self.preferences / self.preferences.sum()
        for i in range(n):
            if failed[i]:
                weights[i] = np.nan
                continue
            alpha, moves[i], mus[i], msg = epo_lp(flat_g[i], flat_l[i], self.preferences, self.eps, self.relax)
            if alpha is None:
                solver_failed[i] = True
                messages.append(msg)
                weights[i] = fallback
            else:
                weights[i] = k * alpha
        if not shape:
            self._last = {"epo_move": int(moves[0]), "epo_mu": float(mus[0])}

        def reason(index: tuple[int, ...]) -> str:
            return f"epo: needs non-negative losses, got {losses[index].tolist()}"

        return RowStep(weights.reshape(*shape, k), failed=failed.reshape(shape), reason=reason,
                       solver_failed=solver_failed.reshape(shape),
                       solver_message=f"LP failed, used α = r/Σr ({messages[0]})" if messages else "",
                       extras={"epo_move": moves.reshape(shape), "epo_mu": mus.reshape(shape)})

    def _step_extras(self) -> dict[str, Any]:
        return {**self._last, "solver_failures": self.failures.total}

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, preferences={self.preferences.tolist()}"
