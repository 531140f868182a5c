"""``gradvac`` — Gradient Vaccine (Wang, Tsvetkov, Firat, Cao, ICLR'21).

GradVac generalises PCGrad: instead of only removing negative similarity it raises the
cosine between task gradients to an adaptive target. State: targets φ̂ ∈ R^{K×K} (init 0).
For each task i, g_i' ← g_i; for every j ≠ i in a random order, with φ_ij = cos(g_i', g_j):

    if φ_ij < φ̂_ij:   g_i' ← g_i' + ‖g_i'‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j
    φ̂_ij ← (1 − β) φ̂_ij + β φ_ij

after which cos(g_i', g_j) = φ̂_ij exactly. The update is d = Σ_i g_i' (a sum, so already
at the scale of the summed loss; no extra ×K). With φ̂ ≡ 0 and β = 0 the correction is
−⟨g_i', g_j⟩/‖g_j‖² g_j when φ_ij < 0: exactly PCGrad.

``target_update`` (docs/methods.md#gradvac):
* ``"paper"`` (default): the EMA is updated for every visited pair, so φ̂ tracks the
  observed similarities (and can become positive, which is the point of the method).
* ``"official"``: SamsungLabs/MTL and LibMTL update φ̂ only inside the ``if`` — φ̂ can then
  only move down from 0 and the method reduces to a damped PCGrad. No published table of
  our benchmarks needs it; offered for comparisons with those codes.

Like :mod:`mtl_tune.balancers.pcgrad` every g_i' stays a combination of the original
gradients, so we run the loop on coefficient vectors with the K×K Gram matrix (O(K³), not
O(K²P)), keeping A c and ‖g_i'‖² up to date incrementally. Orders come from the balancer's
own seeded generator (same draws as ``pcgrad`` for the same seed). The rule
(:meth:`GradVac.weights_rows`) runs any number of rows at once, each with its own generator and
targets (in lockstep, taken from the rows' balancers by :meth:`GradVac.start_rows`).

Guards (documented, the official code has none and NaNs): a zero g_j or a zero g_i' is skipped (no cosine exists);
cosines are clipped to [−1, 1] and targets to [−1 + 1e-6, 1 − 1e-6] when used (a target of
exactly ±1 would need an infinite correction).

Heads get the unweighted task gradients. Samsung's GradVac writes only the shared gradient,
so its decoders are never trained (an apparent bug, docs/methods.md#gradvac); we fix that.
Granularity (LibMTL's per-layer / per-matrix targets) is not offered: whole shared vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtl_tune.balancers._random_rows import BlockDraws, OwnGenerator, checked_seed
from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import Balancer, GradientBalancer
from mtl_tune.balancers.pcgrad import flat_pairs, identities, lockstep_orders, order_array, rows_of, step_orders

TARGET_UPDATES = ("paper", "official")
#: targets are kept this far from ±1 when used (the correction diverges at ±1).
TARGET_MARGIN = 1e-6


def vaccine_step(gi_norm: np.ndarray, gj_norm: np.ndarray, phi: np.ndarray, target: np.ndarray,
                 where: np.ndarray | None = None) -> np.ndarray:
    """Coefficient of g_j that moves cos(g_i', g_j) from ``phi`` up to ``target`` (elementwise); 0 where
    ``where`` is False (the last division masked: as ``np.where(where, step, 0.0)``, one call less)."""
    sin_target = np.sqrt(1.0 - target * target)   # (once: it appears twice)
    numerator, denominator = gi_norm * (target * np.sqrt(1.0 - phi * phi) - phi * sin_target), gj_norm * sin_target
    if where is None:
        return numerator / denominator
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape), where=where)


def gradvac_coefficients(gram_matrix: np.ndarray, targets: np.ndarray, orders: Sequence[Sequence[int]] | np.ndarray,
                         beta: float, target_update: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """Coefficients c (..., K) with d = Σ_j c_j g_j, and the updated targets φ̂ (..., K, K), for Gram
    matrices A (..., K, K), targets (..., K, K) and task orders (..., K, T) (or, for one row, lists:
    ``orders[i]`` lists the tasks j visited for task i; i itself is skipped; see
    :func:`~mtl_tune.balancers.pcgrad.order_array`).

    Task i keeps g_i' = Σ_l C_il g_l (C_i = e_i at the start), (A C_i)_j = ⟨g_i', g_j⟩ and
    ‖g_i'‖² = C_iᵀ A C_i, both updated incrementally: a correction s·g_j adds s·A[:, j] to A C_i and
    2s⟨g_i', g_j⟩ + s²A_jj to ‖g_i'‖². Task i alone reads and writes the targets φ̂_i·, so the tasks are
    independent: every row and every task takes its t-th visit at once (entries (row, task) flattened:
    :func:`~mtl_tune.balancers.pcgrad.flat_pairs`).
    """
    a = np.asarray(gram_matrix, dtype=np.float64)
    k, shape = a.shape[-1], a.shape[:-2]
    n = math.prod(shape)
    a = a.reshape(n, k, k)
    visits = rows_of(order_array(orders), shape, k).reshape(n * k, -1)   # visits[m]: entry m = (r, i)'s tasks
    phi_hat = np.asarray(targets, dtype=np.float64)
    phi_hat = (phi_hat.copy() if phi_hat.shape == (*shape, k, k)     # (a copy: the caller's stay as they are)
               else np.array(np.broadcast_to(phi_hat, (*shape, k, k)))).reshape(n * k * k)
    columns = a.swapaxes(-1, -2).reshape(n * k, k)      # columns[r·K + j] = A[r][:, j] (a copy)
    diag = np.diagonal(a, axis1=-2, axis2=-1).reshape(n * k)
    norms = np.sqrt(np.maximum(diag, 0.0))
    tasks, first, pair = flat_pairs(n, k)               # (entries m flattened: see flat_pairs)
    c = identities(n, k).reshape(n * k, k)              # c[m] = C_i of row r
    last = visits.shape[-1] - 1
    # ac[m] = A C_i, so ⟨g_i', g_j⟩ = ac[m, j]; updated after every visit but the last (K = 2: one
    # visit, so it stays the columns and needs no copy of its own)
    ac = columns.copy() if last > 0 else columns
    sq = diag                                           # ‖g_i'‖² (replaced, never written into)
    update_all = target_update == "paper"
    with np.errstate(divide="ignore", invalid="ignore"):  # skipped visits may divide by 0: masked
        for t in range(visits.shape[-1]):
            j = visits[:, t]                            # (n·K,): the task each entry visits now
            col, ij = first + j, pair + j               # row r's task j; the pair (r, i, j)
            gj_norm = norms[col]
            visit = (j != tasks) & (gj_norm != 0.0) & (sq > 0.0)  # no cosine with a zero gradient
            gi_norm = np.sqrt(sq)
            dot = ac.ravel()[ij]
            phi = np.minimum(np.maximum(dot / (gi_norm * gj_norm), -1.0), 1.0)       # clip (ufuncs: cheaper)
            old = phi_hat[ij]
            target = np.minimum(np.maximum(old, -1.0 + TARGET_MARGIN), 1.0 - TARGET_MARGIN)
            fire = visit & (phi < target)
            if fire.any():                              # (elsewhere the step is 0: nothing moves)
                step = vaccine_step(gi_norm, gj_norm, phi, target, where=fire)
                c.ravel()[ij] += step
                if t < last:                            # (A C_i and ‖g_i'‖² serve the next visits only)
                    sq = np.where(fire, np.maximum(sq + 2.0 * step * dot + step * step * diag[col], 0.0), sq)
                    ac += step[:, None] * columns[col]
            # φ̂ ← (1 − β) φ̂ + β φ where updated, written over ``old`` (a gathered copy) by the masked sum
            np.add((1.0 - beta) * old, beta * phi, out=old, where=visit if update_all else fire)
            phi_hat[ij] = old
    # (NumPy's sum over the tasks, without the method's wrapper)
    return np.add.reduce(c.reshape(n, k, k), axis=-2).reshape(*shape, k), phi_hat.reshape(*shape, k, k)


class GradVac(OwnGenerator, GradientBalancer):
    """Gradient Vaccine (Wang et al., ICLR'21): pairwise corrections towards adaptive
    cosine-similarity targets.

    Args:
        n_tasks: K, the number of tasks.
        beta: EMA rate of the target similarities, in [0, 1] (default 0.5).
        target_update: ``"paper"`` (update every pair's target, default) or ``"official"``
            (only when the correction fires).
        seed: seed of the random task orders (int, default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "gradvac"
    supports_gram = True  # the vaccinated gradients stay combinations of the originals

    def __init__(self, n_tasks: int, beta: float = 0.5, target_update: str = "paper", seed: int = 0,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"gradvac: beta must lie in [0, 1], got {beta}")
        if target_update not in TARGET_UPDATES:
            raise ValueError(f"gradvac: target_update must be one of {TARGET_UPDATES}, got {target_update!r}")
        self.beta, self.target_update = float(beta), target_update
        self.generator = torch.Generator().manual_seed(checked_seed(self.name, seed))
        self.targets = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)  # (rows, K, K) after start_rows
        #: the rows' orders in lockstep (:meth:`start_rows`); None for one row
        self.row_draws: BlockDraws | None = None

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # generators used, not copied (row r draws the orders its own balancer would); targets from each row
        self.row_draws = lockstep_orders(rows, self.n_tasks)
        self.targets = torch.stack([b.targets for b in rows])

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """The rule: K fresh task orders per row from the row's generator, then the corrections
        towards each row's targets, which it updates."""
        orders = step_orders(self, gram.shape[:-2])
        coef, targets = gradvac_coefficients(gram, self.targets.numpy(), orders, self.beta, self.target_update)
        self.targets = torch.from_numpy(targets)
        return RowStep(coef)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "targets": self.targets.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        targets = torch.as_tensor(state["targets"], dtype=torch.float64)
        if targets.shape != (self.n_tasks, self.n_tasks):
            raise ValueError(f"gradvac: saved targets have shape {tuple(targets.shape)}, "
                             f"expected ({self.n_tasks}, {self.n_tasks})")
        self.targets = targets.clone()
