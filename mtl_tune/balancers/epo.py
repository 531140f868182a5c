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
``linprog`` (HiGHS), row by row, and for K = 2 in closed form on all rows at once (α = (t, 1 − t):
every constraint bounds t; tens of µs for every row together instead of a ~5–15 ms solver call per
row, tested equal to ``linprog``). A unique optimum is
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
#: relative losses at most this are left out of μ (their l̂ log(K l̂) → 0)
_EPS64 = float(np.finfo(np.float64).eps)


def adjustments_rows(losses: np.ndarray, preferences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r ⊙ ℓ, non-uniformity μ, adjustment a) for rows (n, K) (module docstring): a = 0 and μ = 0
    where Σ r⊙ℓ ≤ 0; a has −∞ where a relative loss is 0. The caller checks r⊙ℓ ≥ 0."""
    rl = preferences * losses
    total = rl.sum(-1, keepdims=True)
    k = rl.shape[-1]
    positive = total > 0
    every = positive.all()   # the common case: no row to mask (the same lines without the masks)
    with np.errstate(divide="ignore", invalid="ignore"):
        l_hat = rl / (total if every else np.where(positive, total, 1.0))
        log_k_l = np.log(l_hat * k)
        kept = l_hat > _EPS64
        mu = np.where(kept, l_hat * log_k_l, 0.0).sum(-1, keepdims=True)
        if every:
            a = preferences * (log_k_l - mu)
        else:
            mu = np.where(positive, mu, 0.0)
            a = np.where(positive, preferences * (log_k_l - mu), 0.0)
    return rl, mu[..., 0], a


def adjustments(losses: np.ndarray, preferences: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """:func:`adjustments_rows` for one row: (r ⊙ ℓ, μ, a)."""
    rl, mu, a = adjustments_rows(np.asarray(losses, dtype=np.float64)[None], preferences)
    return rl[0], float(mu[0]), a[0]


def epo_lps(gram: np.ndarray, losses: np.ndarray, preferences: np.ndarray, eps: float = EPS,
            relax: bool = False) -> dict[str, np.ndarray]:
    """The LP of every row (n, K, K), (n, K) (module docstring): max objectiveᵀα over the simplex s.t.
    lhs α ≥ rhs for the ``present`` constraints — rows 0 … K−1 of ``lhs`` are the Gram matrix's, row K
    is Ca (descent without ``relax`` only). Also ``move``, ``mu`` and ``finite`` (False where a relative
    loss is 0 and the adjustment is −∞)."""
    n, k = losses.shape
    rl, mu, a = adjustments_rows(losses, preferences)
    finite = np.isfinite(a).all(-1)
    if finite.all():
        ca = (gram * a[:, None, :]).sum(-1)                               # C a, row by row
    else:   # −∞ adjustments: NaN products, quietly (the row is not solved)
        with np.errstate(invalid="ignore"):
            ca = (gram * a[:, None, :]).sum(-1)
    balance = mu > eps
    any_up = (ca > 0).any(-1, keepdims=True)
    lagging = rl == rl.max(-1, keepdims=True)
    # balance: drop the tasks with (Ca)ⱼ > 0 unless one is; the lagging tasks must not get worse
    present_gram = np.where(balance[:, None], ~any_up | (ca <= 0) | lagging, True)
    rhs_gram = np.where(balance[:, None] & any_up & ~lagging, ca, 0.0)
    keep_balance = ~balance & (not relax)
    lhs = np.concatenate([gram, ca[:, None, :]], axis=1)
    rhs = np.concatenate([rhs_gram, np.minimum(ca.max(-1), 0.0)[:, None]], axis=1)
    present = np.concatenate([present_gram, keep_balance[:, None]], axis=1)
    objective = np.where(balance[:, None], ca, gram.sum(-2))
    return {"objective": objective, "lhs": lhs, "rhs": rhs, "present": present,
            "move": np.where(balance, BALANCE, DESCENT), "mu": mu, "finite": finite}


def epo_lp_rows(gram: np.ndarray, losses: np.ndarray, preferences: np.ndarray, eps: float = EPS,
                relax: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """EPO's step for rows (n, K, K), (n, K): (α (n, K) on the simplex, NaN where the LP failed; the
    moves; μ; one message per row, "" where it solved). K = 2: the closed form on all rows at once;
    K ≥ 3: SciPy's ``linprog`` row by row."""
    lp = epo_lps(gram, losses, preferences, eps, relax)
    n, k = losses.shape
    solvable = lp["finite"]
    every = solvable.all()
    if k == 2:
        alpha, messages = simplex_lp_two_rows(lp["objective"], lp["lhs"], lp["rhs"],
                                              lp["present"] if every else lp["present"] & solvable[:, None])
    else:
        alpha, messages = np.full((n, k), np.nan), [""] * n
        for i in np.flatnonzero(solvable):
            keep = lp["present"][i]
            got, messages[i] = simplex_lp(lp["objective"][i], lp["lhs"][i][keep], lp["rhs"][i][keep])
            if got is not None:
                alpha[i] = got
    for i in () if every else np.flatnonzero(~solvable):
        alpha[i], messages[i] = np.nan, "a relative loss is 0: the adjustment log(K l̂) is -inf"
    return alpha, lp["move"], lp["mu"], messages


def epo_lp(gram: np.ndarray, losses: np.ndarray, preferences: np.ndarray, eps: float = EPS,
           relax: bool = False) -> tuple[np.ndarray | None, int, float, str]:
    """One EPO step (:func:`epo_lp_rows` for one row): (α on the simplex, or None when the LP failed;
    the move; μ; the solver's message)."""
    alpha, move, mu, messages = epo_lp_rows(np.asarray(gram, dtype=np.float64)[None],
                                            np.asarray(losses, dtype=np.float64)[None], preferences, eps, relax)
    return (None if messages[0] else alpha[0]), int(move[0]), float(mu[0]), messages[0]


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


#: :func:`simplex_lp_two_rows`: slope × these is (slope, −slope) (exact); the fills (no lower, no upper bound)
_SIGNS, _NO_BOUND = np.array([[1.0], [-1.0]]), np.array([[0.0], [1.0]])


def simplex_lp_two_rows(objective: np.ndarray, lhs: np.ndarray, rhs: np.ndarray,
                        present: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """:func:`simplex_lp` for K = 2 in closed form on rows — objective (n, 2), constraints lhs (n, m, 2),
    rhs (n, m) where ``present`` (n, m): α = (t, 1 − t), every constraint is a bound on t, the optimum
    the end of the feasible interval the objective points to (its midpoint when the objective is flat:
    every feasible t is optimal, and the midpoint is symmetric in the tasks). A tolerance of 1e-12 ×
    the row's largest |entry| absorbs rounding in the bounds. Returns (α (n, 2), NaN where infeasible;
    a message per row, "" where it solved)."""
    n = len(objective)
    # the largest |entry| of the present constraints, lhs and rhs together (a max: any grouping is exact)
    entries = np.abs(np.concatenate([lhs, rhs[..., None]], axis=-1))
    tol = 1e-12 * np.maximum(np.where(present[..., None], entries, 0.0).max((-2, -1)), 1e-300)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):   # rows without a solvable LP carry inf/NaN
        slope, need = lhs[..., 0] - lhs[..., 1], rhs - lhs[..., 1]         # constraint: slope·t ≥ need
        bound = need / slope
        independent_violated = (present & (np.abs(slope) <= tol) & (need > tol)).any(-1)
        # the lower bounds (slope > tol) and the upper ones (slope < −tol, i.e. −slope > tol) as one
        # (n, 2, m) array: lo = max(0, their largest lower bound), hi = min(1, their smallest upper bound)
        bounding = present[:, None] & (slope[:, None] * _SIGNS > tol[:, :, None])
        ends = np.where(bounding, bound[:, None], _NO_BOUND)
        lo, hi = np.maximum(0.0, ends[:, 0].max(-1)), np.minimum(1.0, ends[:, 1].min(-1))
        empty = ~independent_violated & (lo > hi + 1e-12)
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        gain = objective[:, 0] - objective[:, 1]
        scale = 1e-12 * np.maximum(np.abs(objective).max(-1), 1e-300)
        t = np.where(gain > scale, hi, np.where(gain < -scale, lo, 0.5 * (lo + hi)))
    alpha = np.empty((n, 2), dtype=t.dtype)
    alpha[:, 0] = t
    np.subtract(1.0, t, out=alpha[:, 1])
    messages = [""] * n
    infeasible = independent_violated | empty
    if infeasible.any():
        for i in np.flatnonzero(independent_violated):
            messages[i] = "closed-form LP (K = 2): infeasible (a constraint independent of α is violated)"
        for i in np.flatnonzero(empty):
            messages[i] = f"closed-form LP (K = 2): infeasible (t ∈ [{lo[i]:.6g}, {hi[i]:.6g}])"
        alpha[infeasible] = np.nan
    return alpha, messages


def simplex_lp_two(objective: np.ndarray, lhs: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray | None, str]:
    """:func:`simplex_lp_two_rows` for one LP: (α, "") or (None, the reason)."""
    alpha, messages = simplex_lp_two_rows(np.asarray(objective, dtype=np.float64)[None],
                                          np.asarray(lhs, dtype=np.float64).reshape(1, -1, 2),
                                          np.asarray(rhs, dtype=np.float64).reshape(1, -1),
                                          np.ones((1, len(rhs)), dtype=bool))
    return (None if messages[0] else alpha[0]), messages[0]


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
        #: the weights of a failed LP, K r/Σr (official α = r/Σr), made once
        self._fallback = n_tasks * r / r.sum()
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """K α (..., K), one LP per row (K = 2: in closed form, all rows at once); a failed LP gives K r/Σr and
        a solver failure."""
        k = self.n_tasks
        shape = losses.shape[:-1]
        flat_g, flat_l = gram.reshape(-1, k, k), losses.reshape(-1, k)
        failed = (self.preferences * flat_l < 0).any(-1)
        alpha, moves, mus, messages = epo_lp_rows(flat_g, flat_l, self.preferences, self.eps, self.relax)
        if any(messages):
            solver_failed = np.array([bool(m) for m in messages]) & ~failed
            failures = [m for m, bad in zip(messages, solver_failed) if bad]
        else:   # the common case: every LP solved
            solver_failed, failures = np.zeros(len(messages), dtype=bool), []
        weights = k * alpha
        if failures:
            weights = np.where(solver_failed[:, None], self._fallback, weights)
        if failed.any():
            weights[failed] = np.nan
        if not shape:
            self._last = {"epo_move": int(moves[0]), "epo_mu": float(mus[0])}

        def reason(index: tuple[int, ...]) -> str:
            return f"epo: needs non-negative losses, got {losses[index].tolist()}"

        return RowStep(weights.reshape(*shape, k), failed=failed.reshape(shape), reason=reason,
                       solver_failed=solver_failed.reshape(shape),
                       solver_message=f"LP failed, used α = r/Σr ({failures[0]})" if failures else "",
                       extras={"epo_move": moves.reshape(shape), "epo_mu": mus.reshape(shape)})

    def _step_extras(self) -> dict[str, Any]:
        return {**self._last, "solver_failures": self.failures.total}

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}, preferences={self.preferences.tolist()}"
