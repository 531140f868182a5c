"""``paretomtl`` — Pareto multi-task learning (Lin, Zhen, Li, Zhang & Kwong, "Pareto Multi-Task
Learning", NeurIPS'19, https://arxiv.org/abs/1912.12854).

Pareto MTL splits the loss space into M subregions Ω_k = {ℓ : (u_j − u_k)ᵀℓ ≤ 0 ∀ j ≠ k} of M
unit reference (preference) vectors u_1 … u_M — Ω_k holds the loss vectors closer in angle to u_k
than to any other u_j — and looks for a Pareto-optimal solution inside one of them, the subproblem

    min_θ ℓ(θ) = (ℓ_1(θ), …, ℓ_K(θ))   s.t.  G_j(θ) = w_jᵀ ℓ(θ) ≤ 0  for j ≠ k,   w_j = u_j − u_k.

The official code tests the constraints on the normalised losses, G_j ∝ w_jᵀ ℓ/‖ℓ‖, and counts
constraint j *active* when that is > 0 (strictly; no tolerance). ∇G_j = Σᵢ w_ji ∇ℓ_i, so with the
task gradients g_i (Gram matrix A = G Gᵀ) and the active rows W_a (m × K) every vector involved is
a combination of the g_i and every inner product comes from A:

* **phase 1** (a feasible start; at most ``init_steps`` steps): d = the min-norm point of the convex
  hull of {∇G_j : j active} (one active constraint: ∇G_j itself); its simplex weights β minimise
  βᵀ (W_a A W_aᵀ) β, and the task weights are c = W_aᵀβ (a task can get a negative weight: a
  constraint is a difference of losses). Phase 1 ends at the first step with no active constraint
  (the loss vector is in Ω_k), or after ``init_steps`` steps, and is not entered again.
* **phase 2**: d = the min-norm point of the convex hull of {g_i} ∪ {∇G_j : j active}, the
  vectors V = [I_K; W_a] g with Gram matrix V A Vᵀ; with its simplex weights (α, β) the task
  weights are c = α + W_aᵀβ, rescaled to K c / Σ|c| (official ``normalize_coeff``: the step at the
  scale of the summed loss). With no active constraint this is MGDA (``mgda``'s K·w*; tested).

Both min-norm problems are solved by the project's exact simplex solver
(:func:`~mtl_tune.balancers._simplex.min_norm_weights`; closed form for two vectors, every support
of at most three vectors for all rows at once up to eight vectors — always enough when the
gradients span two dimensions, as on the toy — checked optimal, an active-set method otherwise) on
the augmented Gram matrix, so the rule needs only A and ℓ and runs on the Gram path. Task heads get the
same weights (``weighted_heads``; official: every parameter gets the weighted loss).

Reference set. The trial's own vector u_k is ``preferences`` (what ``--preferences N`` sweeps); the
others come from ``references``: an integer n (default 5, the official ``npref``) builds n evenly
spread unit vectors — for two tasks the official ``circle_points`` (angles evenly spaced on
[0, π/2]), for K ≥ 3 about n: the Das–Dennis lattice of the simplex with the most divisions that
gives at most n points (at least the K axes; the rule of the ``--preferences n`` grid) normalised
to unit length — or an explicit list of K-vectors. All are normalised to unit length (as the official
synthetic example; the multi-MNIST trainer's circle points already are); a reference in the
direction of u_k gives w_j = 0 and no constraint, and is dropped. The default ``preferences`` (all
ones) is the middle direction, itself one of the default references for K = 2.

Official code: https://github.com/Xi-L/ParetoMTL at commit dc34904e744b (``multiMNIST/train.py``:
``get_d_paretomtl_init``, ``get_d_paretomtl``, ``circle_points``) and commit 80bb0b90a92c
(``synthetic_example/run_synthetic_example.py``).

Departures and choices:

* The official trainers hard-code K = 2 (the weights are assembled component by component); the
  rule above is the same formula for any K (tested equal to it for K = 2 on explicit vectors).
* Phase-1 length: the multi-MNIST trainer runs at most 2 epochs and stops at the first batch with
  no active constraint; the synthetic example runs 20 iterations (20 % of 100), where a step with
  no active constraint has weights 0, so the point stays put and the rest of phase 1 does nothing
  — both end phase 1 at the first feasible step. ``init_steps`` (default 20, the synthetic
  example's) counts steps, as a balancer sees steps, not epochs. The official step that detects
  feasibility makes no update (the multi-MNIST trainer skips the batch); a balancer must return a
  direction for every step, so that step is already a phase-2 step (one batch earlier).
* Phase-1 weights are used as they are (official: no renormalisation in phase 1), phase-2 weights
  are rescaled to Σ|c| = K (official). The synthetic example does not rescale phase 2; the
  multi-MNIST trainer does, and we follow it.
* Losses all zero (‖ℓ‖ = 0): the official division gives NaN and no active constraint; here no
  constraint is active either (the angle is undefined), so the step is phase 2 without constraints.
  Negative losses are allowed: the constraints compare angles, which are defined for any ℓ ≠ 0.
* A min-norm solve that does not converge (the active-set solver, where it runs) fails the row with
  a reason (:class:`~mtl_tune.balancers.base.BalancerError`), as ``mgda``; there is no fallback.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers._simplex import min_norm_weights
from mtl_tune.balancers.base import Balancer, GradientBalancer

#: the official number of reference vectors (``npref``) and phase-1 iterations (synthetic example)
N_REFERENCES, INIT_STEPS = 5, 20
#: a reference whose unit vector is within this of u_k's is the same direction (no constraint)
SAME_DIRECTION = 1e-12


def circle_points(n: int) -> np.ndarray:
    """n unit vectors (n, 2) at angles evenly spaced on [0, π/2] (the official two-task grid)."""
    t = np.linspace(0.0, 0.5 * np.pi, n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def lattice_directions(k: int, n: int) -> np.ndarray:
    """About n evenly spread unit vectors (…, K): the Das–Dennis lattice of the K-simplex with the most
    divisions h whose C(h + K − 1, K − 1) points are at most n (at least h = 1: the K axes; the rule
    of the ``--preferences n`` grid), normalised to unit length."""
    if k == 1:  # one task: one direction (the lattice below would never stop growing)
        return np.ones((1, 1))
    h = 1
    while math.comb(h + 1 + k - 1, k - 1) <= n:
        h += 1
    points = []
    for bars in itertools.combinations(range(h + k - 1), k - 1):
        points.append(np.diff([-1, *bars, h + k - 1]) - 1)
    p = np.array(points, dtype=np.float64)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def reference_vectors(k: int, references: int | Sequence[Sequence[float]]) -> np.ndarray:
    """The unit reference vectors (M, K) for ``references`` (module docstring)."""
    if isinstance(references, (int, np.integer)) and not isinstance(references, bool):
        return circle_points(int(references)) if k == 2 else lattice_directions(k, int(references))
    r = np.asarray([list(v) for v in references], dtype=np.float64)
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def constraint_rows(preference: np.ndarray, references: np.ndarray) -> np.ndarray:
    """W (m, K): w_j = u_j/‖u_j‖ − u_k/‖u_k‖ for the references not in u_k's direction."""
    w = references / np.linalg.norm(references, axis=1, keepdims=True) - preference / np.linalg.norm(preference)
    return w[np.linalg.norm(w, axis=1) > SAME_DIRECTION]


def active_constraints(losses: np.ndarray, w: np.ndarray) -> np.ndarray:
    """bool (..., m): w_jᵀ ℓ/‖ℓ‖ > 0 (official ``gx > 0``); nothing is active where ℓ = 0."""
    norm = np.sqrt((losses * losses).sum(-1, keepdims=True))
    unit = losses / np.where(norm > 0, norm, 1.0)
    return (unit[..., None, :] * w).sum(-1) > 0


def row_groups(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of the rows with equal boolean ``keys`` (n, b) (phase and active set), one array per
    distinct key."""
    if len(keys) == 1:
        return [np.zeros(1, dtype=np.int64)]
    if keys.shape[1] <= 62:   # one integer per row: a 1-D sort instead of unique(axis=0)
        codes = keys @ (np.int64(1) << np.arange(keys.shape[1], dtype=np.int64))
    else:
        codes = np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)
    order = np.argsort(codes, kind="stable")
    cuts = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, cuts)


def hull_weights(gram: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Task weights c = Vᵀλ (n, K) of the min-norm point of the hull of the vectors V g (V: (v, K)),
    λ the min-norm simplex weights of V A Vᵀ, for Gram matrices (n, K, K); with the solver's
    ``converged`` (n,). One vector: λ = 1."""
    if len(vectors) == 1:
        return np.broadcast_to(vectors[0], (len(gram), vectors.shape[1])).copy(), np.ones(len(gram), dtype=bool)
    # products summed over the last axis, not matmuls: a row gives the same bits alone and among many
    a_v = (gram[:, None, :, :] * vectors[None, :, None, :]).sum(-1)           # (n, v, K): A v_a
    aug = (a_v[:, :, None, :] * vectors[None, None, :, :]).sum(-1)            # (n, v, v): v_bᵀ A v_a
    lam, ok = min_norm_weights(aug)
    return (lam[:, None, :] * vectors.T[None]).sum(-1), ok


class ParetoMTL(GradientBalancer):
    """Pareto MTL (Lin et al., NeurIPS'19): per step the min-norm point of the task gradients and the
    gradients of the active subregion constraints, after a phase that moves into the subregion.

    Args:
        n_tasks: K, the number of tasks.
        preferences: u_k, the reference vector of this run's subregion: K non-negative numbers, not
            all zero (default all ones); only the direction matters.
        references: the other reference vectors: an integer n ≥ 2 (default 5) of evenly spread
            vectors (K = 2: the official quarter-circle grid; K ≥ 3: about n, the normalised
            Das–Dennis lattice, at least the K axes), or a list of K-vectors, non-negative, not all zero.
        init_steps: the most phase-1 steps (default 20, the official synthetic example's); phase 1
            ends earlier at the first step with no active constraint. 0 skips it.

    Common keyword arguments ``max_norm`` (shared-gradient clipping), ``jacobian_engine`` and
    ``gradient_path``: see :class:`~mtl_tune.balancers.base.GradientBalancer`. Call :meth:`backward`
    (or :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the task weights c.
    """

    name = "paretomtl"
    weighted_heads = True
    supports_gram = True

    def __init__(self, n_tasks: int, preferences: Sequence[float] | None = None,
                 references: int | Sequence[Sequence[float]] = N_REFERENCES, init_steps: int = INIT_STEPS,
                 **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        u = np.ones(n_tasks) if preferences is None else np.asarray(list(preferences), dtype=np.float64)
        if u.shape != (n_tasks,) or not np.isfinite(u).all() or (u < 0).any() or not (u > 0).any():
            raise ValueError(f"paretomtl: preferences must be {n_tasks} finite non-negative numbers, not all 0, "
                             f"got {preferences!r}")
        if isinstance(references, bool) or (isinstance(references, (int, np.integer)) and references < 2):
            raise ValueError(f"paretomtl: references must be an integer >= 2 or a list of {n_tasks}-vectors, "
                             f"got {references!r}")
        if not isinstance(references, (int, np.integer)):
            try:
                r = np.asarray([list(v) for v in references], dtype=np.float64)
            except (TypeError, ValueError):
                r = np.zeros((0,))
            if (r.ndim != 2 or r.shape[1] != n_tasks or len(r) < 1 or not np.isfinite(r).all() or (r < 0).any()
                    or not (r > 0).any(1).all()):
                raise ValueError(f"paretomtl: references must be an integer >= 2 or a list of {n_tasks}-vectors, "
                                 f"non-negative and not all 0, got {references!r}")
        if isinstance(init_steps, bool) or not (isinstance(init_steps, (int, np.integer)) and init_steps >= 0):
            raise ValueError(f"paretomtl: init_steps must be a non-negative integer, got {init_steps!r}")
        self.preferences, self.init_steps = u, int(init_steps)
        self.references = references if isinstance(references, (int, np.integer)) else [list(map(float, v)) for v in references]
        #: W (m, K): one row per subregion constraint G_j = w_jᵀℓ
        self.constraints = constraint_rows(u, reference_vectors(n_tasks, references))
        #: whether the next step may still be a phase-1 step (per row after start_rows)
        self.initialising: np.ndarray = np.array(self.init_steps > 0)
        #: phase-1 steps taken (per row after start_rows)
        self.init_taken: np.ndarray = np.array(0, dtype=np.int64)
        self._last: dict[str, Any] = {}
        #: the hull's vectors per (phase 1?, active constraints' bytes), made at the first step that needs them
        self._vectors: dict[tuple[bool, bytes], np.ndarray] = {}

    # ------------------------------------------------------------------ rule
    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """Task weights (..., K) of this step (module docstring), updating the per-row phase."""
        k = self.n_tasks
        shape = losses.shape[:-1]
        flat_g, flat_l = gram.reshape(-1, k, k), losses.reshape(-1, k)
        n = len(flat_l)
        w = self.constraints
        active = active_constraints(flat_l, w) if len(w) else np.zeros((n, 0), dtype=bool)
        # phase 1 over on every row (its state already per row): no phase-1 step, the state stays
        settled = self.initialising.shape == shape and not self.initialising.any()
        if settled:
            init = taken = phase1 = None
            keys = active
        else:
            init = np.broadcast_to(self.initialising, shape).reshape(n).copy()
            taken = np.broadcast_to(self.init_taken, shape).reshape(n).copy()
            phase1 = init & (taken < self.init_steps) & active.any(-1)
            keys = np.concatenate([phase1[:, None], active], axis=1)
        if n == 1 or (keys == keys[0]).all():   # the common case: one phase and active set for every row
            weights, ok = self._group_weights(flat_g, not settled and bool(phase1[0]), active[0])
        else:
            weights, ok = np.full((n, k), np.nan), np.ones(n, dtype=bool)
            for sel in row_groups(keys):
                first = not settled and bool(phase1[sel[0]])
                weights[sel], ok[sel] = self._group_weights(flat_g[sel], first, active[sel[0]])
        if settled:
            phase = np.full(shape, 2)
        else:
            # phase 1 ends for good at the first step that is not one (feasible, or the budget spent)
            self.initialising = np.where(ok, init & phase1, init).reshape(shape)
            self.init_taken = np.where(ok & phase1, taken + 1, taken).reshape(shape)
            phase = np.where(phase1, 1, 2).reshape(shape)
        n_active = active.sum(-1).reshape(shape)
        if not shape:
            self._last = {"paretomtl_phase": int(phase), "paretomtl_active": int(n_active)}
        return RowStep(weights.reshape(*shape, k), failed=~ok.reshape(shape),
                       reason="paretomtl: min-norm solver did not converge",
                       extras={"paretomtl_phase": phase, "paretomtl_active": n_active})

    def _group_weights(self, gram: np.ndarray, first: bool, pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Task weights (n, K) (NaN where not converged) and ``converged`` (n,) of rows (n, K, K) that share
        the phase (``first``: phase 1) and the active constraints ``pattern`` (m,)."""
        key = (first, pattern.tobytes())
        vectors = self._vectors.get(key)
        if vectors is None:   # the hull's vectors V of this phase and active set, made once (read-only)
            w = self.constraints[pattern]
            vectors = self._vectors[key] = w if first else np.vstack([np.eye(self.n_tasks), w])
            vectors.flags.writeable = False
        c, conv = hull_weights(gram, vectors)
        if not first:
            total = np.abs(c).sum(-1, keepdims=True)
            c = self.n_tasks * c / np.where(total > 0, total, 1.0)
        return (c if conv.all() else np.where(conv[:, None], c, np.nan)), conv

    # ------------------------------------------------------------------ state
    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.initialising = np.array([bool(b.initialising) for b in rows])  # type: ignore[attr-defined]
        self.init_taken = np.array([int(b.init_taken) for b in rows], dtype=np.int64)  # type: ignore[attr-defined]

    def _step_extras(self) -> dict[str, Any]:
        return dict(self._last)

    def _extra_state(self) -> dict[str, Any]:
        return {"initialising": np.asarray(self.initialising).tolist(),
                "init_taken": np.asarray(self.init_taken).tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.initialising = np.asarray(state["initialising"], dtype=bool)
        self.init_taken = np.asarray(state["init_taken"], dtype=np.int64)

    def extra_repr(self) -> str:
        return (f"n_tasks={self.n_tasks}, preferences={self.preferences.tolist()}, references={self.references}, "
                f"init_steps={self.init_steps}")
