"""``pcgrad`` — Projecting Conflicting Gradients (Yu et al., NeurIPS'20).

For each task i: g_i^PC ← g_i; for every other task j in a random order, if
⟨g_i^PC, g_j⟩ < 0 remove the conflicting component, g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩/‖g_j‖² g_j.
The update is Σ_i g_i^PC (``reduction="sum"``, the official default) or the mean.

Every g_i^PC stays a linear combination of the original gradients, so we run the
projections on coefficient vectors with the K×K Gram matrix (O(K³) instead of O(K²P))
and form the direction once: d = cᵀ G. The random order comes from the balancer's own
seeded generator (reproducible, saved in checkpoints). Task heads get the unweighted
sum of task gradients (docs/methods.md#pcgrad). A zero gradient g_j is never projected on.

The rule (:meth:`PCGrad.weights_rows`) runs on any number of rows at once: each row's orders come
from its own generator (:func:`random_orders`), the projections of all rows and tasks are batched
(:func:`pcgrad_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host, row_generators
from mtl_tune.balancers.base import Balancer, GradientBalancer

#: draws of ``Tensor.random_(0, m)`` below this bound take one 32-bit draw of the generator each
_ONE_DRAW_BOUND = 2 ** 32


def swap_modulus(k: int) -> int | None:
    """L = lcm(2, …, K) if one bounded integer draw can carry every swap of a K-shuffle (L < 2³²,
    i.e. K ≤ 22), else None."""
    modulus = reduce(math.lcm, range(2, k + 1), 1)
    return modulus if modulus < _ONE_DRAW_BOUND else None


def random_orders(generators: Sequence[torch.Generator], k: int) -> np.ndarray:
    """Task orders (len(generators), K, K): ``orders[r, i]`` is the i-th of K calls
    ``torch.randperm(K, generator=generators[r])``, the same numbers and generator states after.

    ``torch.randperm`` (CPU, K < 2³²/20) is a Fisher–Yates shuffle on K − 1 32-bit draws uₛ of the
    generator: swap p[s] ↔ p[s + uₛ mod (K − s)], s = 0 … K − 2. ``random_(0, L)`` with L < 2³² also
    takes one 32-bit draw u per entry and returns u mod L; with L = lcm(2, …, K) every modulus m ≤ K
    divides L, so (u mod L) mod m = u mod m. One ``random_`` call per row therefore fetches all
    K(K − 1) draws of a step's K permutations (tests/balancers/test_pcgrad.py checks the orders and
    the generator states against ``torch.randperm``), and the shuffles run on all rows at once.
    For K > 22 (L ≥ 2³²: ``random_`` would take 64-bit draws) each order is a ``torch.randperm`` call.
    """
    n = len(generators)
    modulus = swap_modulus(k)
    if modulus is None:
        return np.stack([np.stack([torch.randperm(k, generator=g).numpy() for _ in range(k)]) for g in generators])
    draws = np.empty((n, k, k - 1), dtype=np.int64)
    for row, generator in zip(torch.from_numpy(draws), generators):
        row.random_(0, modulus, generator=generator)
    orders = np.broadcast_to(np.arange(k), (n, k, k)).copy()
    rows, perms = np.arange(n)[:, None], np.arange(k)
    for s in range(k - 1):
        swap = s + draws[..., s] % (k - s)                 # (n, K): the position p[s] trades with
        partner = orders[rows, perms, swap]
        orders[rows, perms, swap] = orders[..., s]
        orders[..., s] = partner
    return orders


def other_tasks(orders: np.ndarray) -> np.ndarray:
    """Task i's visits without task i itself (which every visit skips): permutations (..., K, K) of the
    K tasks become (..., K, K − 1), in the same order."""
    k = orders.shape[-1]
    return orders[orders != np.arange(k)[:, None]].reshape(*orders.shape[:-1], k - 1)


def order_array(orders: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Task orders as an int array (..., K, T): ``orders[..., i, :]`` lists the tasks task i visits.
    Lists of unequal lengths are padded with the task's own index, which every visit skips."""
    if isinstance(orders, np.ndarray):
        return orders.astype(np.int64, copy=False)
    width = max((len(o) for o in orders), default=0)
    return np.array([list(o) + [i] * (width - len(o)) for i, o in enumerate(orders)],
                    dtype=np.int64).reshape(len(orders), width)


def rows_of(orders: np.ndarray, shape: tuple[int, ...], k: int) -> np.ndarray:
    """Task orders (..., K, T) for rows of leading shape ``shape`` (broadcast if they are one row's),
    flattened to (rows, K, T)."""
    if orders.shape[:-1] != (*shape, k):
        orders = np.broadcast_to(orders, (*shape, k, orders.shape[-1]))
    return orders.reshape(math.prod(shape), k, orders.shape[-1])


def identities(n: int, k: int) -> np.ndarray:
    """n K×K identity matrices (n, K, K), writable."""
    eye = np.zeros((n, k * k))
    eye[:, ::k + 1] = 1.0
    return eye.reshape(n, k, k)


def pcgrad_rows(gram: np.ndarray, orders: np.ndarray, reduction: str = "sum") -> np.ndarray:
    """Coefficients c (..., K) with d = Σ_j c_j g_j, for Gram matrices A (..., K, K) and task orders
    (..., K, T) (:func:`order_array`).

    Task i's projected gradient is g_i^PC = Σ_l C_il g_l, C = I at the start. Visiting j (not i itself,
    and only if ‖g_j‖² = A_jj > 0): ⟨g_i^PC, g_j⟩ = Σ_l C_il A_lj, and when it is < 0, C_ij −= it / A_jj.
    c = Σ_i C_i (÷ K for ``"mean"``). The tasks' projections are independent of each other, so every
    row and every task takes its t-th visit at once.

    The inner product is NumPy's sum of the K products; the balancer before the rule used torch's dot,
    whose vectorised accumulation rounds differently from K = 5 on (then c can differ in the last bit;
    for K ≤ 4 both give the same numbers).
    """
    a = np.asarray(gram, dtype=np.float64)
    k, shape = a.shape[-1], a.shape[:-2]
    a = a.reshape(-1, k, k)
    orders = rows_of(orders, shape, k)
    rows, tasks = np.arange(len(a))[:, None], np.arange(k)
    columns = a.swapaxes(-1, -2)                      # columns[r, j] = A[r][:, j]
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    c = identities(len(a), k)                         # c[r, i] = C_i of row r
    with np.errstate(invalid="ignore"):               # non-finite Gram rows (failed toy rows): never projected
        for t in range(orders.shape[-1]):
            j = orders[..., t]                        # (rows, K): the task each task visits now
            a_jj = diag[rows, j]
            dot = (c * columns[rows, j]).sum(-1)      # ⟨g_i^PC, g_j⟩
            project = (dot < 0) & (a_jj > 0) & (j != tasks)
            if project.any():                         # (elsewhere it subtracts 0/1 = 0: unchanged)
                c[rows, tasks, j] -= np.where(project, dot, 0.0) / np.where(project, a_jj, 1.0)
    total = c.sum(-2)
    return (total / k if reduction == "mean" else total).reshape(*shape, k)


def pcgrad_coefficients(gram_matrix: Tensor, orders: Sequence[Sequence[int]], reduction: str = "sum") -> Tensor:
    """Coefficients c (K,) with d = Σ_j c_j g_j for one K×K Gram matrix; ``orders[i]`` is the order
    for task i (:func:`pcgrad_rows` on one row)."""
    return torch.from_numpy(pcgrad_rows(host(gram_matrix), order_array(orders), reduction)).to(gram_matrix.device)


class PCGrad(GradientBalancer):
    """PCGrad (Yu et al., NeurIPS'20): project each task gradient off the others it
    conflicts with, in random order.

    Args:
        n_tasks: K, the number of tasks.
        reduction: ``"sum"`` (default) or ``"mean"`` of the projected gradients.
        seed: seed of the random task orders (int, default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "pcgrad"
    supports_gram = True  # every projected gradient is a combination of the originals (module docstring)

    def __init__(self, n_tasks: int, reduction: str = "sum", seed: int = 0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.generator = torch.Generator().manual_seed(int(seed))
        #: the rows' generators in lockstep (:meth:`start_rows`); None for one row
        self.row_generators: list[torch.Generator] | None = None

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # adopted, not copied: row r draws the orders its own balancer would draw
        self.row_generators = [b.generator for b in rows]

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """The rule: K fresh task orders per row from the row's generator, then the projections."""
        shape, k = gram.shape[:-2], self.n_tasks
        orders = other_tasks(random_orders(row_generators(self.generator, self.row_generators, shape), k))
        return RowStep(pcgrad_rows(gram, orders.reshape(*shape, k, k - 1), self.reduction))

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
