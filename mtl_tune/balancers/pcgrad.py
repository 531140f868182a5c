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
from its own generator (:func:`order_draws`; in lockstep a block of steps per call, see
:mod:`~mtl_tune.balancers._random_rows`), the projections of all rows and tasks are batched
(:func:`pcgrad_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache, partial, reduce
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._random_rows import BlockDraws, OwnGenerator, block_steps, checked_seed, rows_mismatch
from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import Balancer, GradientBalancer

#: draws of ``Tensor.random_(0, m)`` below this bound take one 32-bit draw of the generator each
_ONE_DRAW_BOUND = 2 ** 32


def swap_modulus(k: int) -> int | None:
    """L = lcm(2, …, K) if one bounded integer draw can carry every swap of a K-shuffle (L < 2³²,
    i.e. K ≤ 22), else None."""
    modulus = reduce(math.lcm, range(2, k + 1), 1)
    return modulus if modulus < _ONE_DRAW_BOUND else None


def order_draws(generator: torch.Generator, k: int, steps: int = 1) -> np.ndarray:
    """``steps`` steps' task orders of one generator (steps, K, K): ``[t, i]`` is task i's order at step t,
    each a uniformly random permutation of the K tasks (every visit skips task i itself).

    The orders are our own Fisher–Yates shuffles: permutation p starts as 0 … K − 1 and swaps
    p[s] ↔ p[s + uₛ mod (K − s)] for s = 0 … K − 2, on 32-bit draws uₛ of the generator taken as
    ``random_(0, L)`` with L = lcm(2, …, K) (:func:`swap_modulus`): ``random_`` takes one 32-bit draw u per
    entry and returns u mod L, and every modulus m ≤ K divides L, so (u mod L) mod m = u mod m. One call
    fetches all K(K − 1) draws of a step's K permutations — or of ``steps`` steps' (the entries are
    filled one after the other, so a block of steps holds what one-step calls would have drawn, and
    leaves the generator where they would have left it: what lockstep rows rely on,
    :mod:`~mtl_tune.balancers._random_rows`).

    These orders do not call ``torch.randperm``, so they do not depend on its algorithm; they equal its
    draws on torch's CPU generator (the same swaps; tests/balancers/test_pcgrad.py compares orders and
    generator states), which keeps them those of earlier runs. Should a torch release change
    ``randperm``, this shuffle stays as documented here. For K > 22 (L ≥ 2³²: ``random_`` would take
    64-bit draws) each order is a ``torch.randperm`` call instead, whose numbers are torch's.
    """
    modulus = swap_modulus(k)
    if modulus is None:
        return np.array([[torch.randperm(k, generator=generator).numpy() for _ in range(k)]
                         for _ in range(steps)], dtype=np.int64).reshape(steps, k, k)
    draws = torch.empty(steps, k, k - 1, dtype=torch.int64).random_(0, modulus, generator=generator).numpy()
    return shuffle(draws, k)


def shuffle(draws: np.ndarray, k: int) -> np.ndarray:
    """The Fisher–Yates permutations (..., K) of 0 … K − 1 for swap draws (..., K − 1) (:func:`order_draws`),
    all at once: step s swaps p[s] with p[s + uₛ mod (K − s)]."""
    orders = np.broadcast_to(np.arange(k), (*draws.shape[:-1], k)).copy()
    for s in range(k - 1):
        swap = (s + draws[..., s] % (k - s))[..., None]   # the position p[s] trades with
        partner = np.take_along_axis(orders, swap, -1)
        np.put_along_axis(orders, swap, orders[..., s:s + 1], -1)
        orders[..., s:s + 1] = partner
    return orders


def random_orders(generators: Sequence[torch.Generator], k: int) -> np.ndarray:
    """One step's task orders (len(generators), K, K), row r's from ``generators[r]`` (:func:`order_draws`)."""
    return np.stack([order_draws(g, k)[0] for g in generators]).reshape(len(generators), k, k)


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
    """n K×K identity matrices (n, K, K), writable (a copy of a cached template: one NumPy call)."""
    return _identities(n, k).copy()


@lru_cache(maxsize=64)
def _identities(n: int, k: int) -> np.ndarray:
    eye = np.zeros((n, k * k))
    eye[:, ::k + 1] = 1.0
    eye.flags.writeable = False
    return eye.reshape(n, k, k)


@lru_cache(maxsize=64)
def flat_pairs(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices for n rows of K tasks flattened to n·K entries m = r·K + i (read-only, cached): the task i of
    each entry, r·K (where row r's K entries start) and m·K (where entry m's K entries of an (n·K, K) array
    start). With them a visit j (n·K,) is one flat gather: ``x[first + j]`` (row r's task j) or
    ``y.ravel()[pair + j]`` (entry (r, i, j)): cheaper than indexing (n, K, K) arrays with (row, task) pairs."""
    tasks, first, pair = np.tile(np.arange(k), n), np.repeat(np.arange(n) * k, k), np.arange(n * k) * k
    for x in (tasks, first, pair):
        x.flags.writeable = False
    return tasks, first, pair


def pcgrad_rows(gram: np.ndarray, orders: np.ndarray, reduction: str = "sum") -> np.ndarray:
    """Coefficients c (..., K) with d = Σ_j c_j g_j, for Gram matrices A (..., K, K) and task orders
    (..., K, T) (:func:`order_array`).

    Task i's projected gradient is g_i^PC = Σ_l C_il g_l, C = I at the start. Visiting j (not i itself,
    and only if ‖g_j‖² = A_jj > 0): ⟨g_i^PC, g_j⟩ = Σ_l C_il A_lj, and when it is < 0, C_ij −= it / A_jj.
    c = Σ_i C_i (÷ K for ``"mean"``). The tasks' projections are independent of each other, so every
    row and every task takes its t-th visit at once (entries m = (row, task) flattened: :func:`flat_pairs`).

    The inner product is NumPy's sum of the K products; the balancer before the rule used torch's dot,
    whose vectorised accumulation rounds differently from K = 5 on (then c can differ in the last bit;
    for K ≤ 4 both give the same numbers).
    """
    a = np.asarray(gram, dtype=np.float64)
    k, shape = a.shape[-1], a.shape[:-2]
    n = math.prod(shape)
    a = a.reshape(n, k, k)
    visits = rows_of(orders, shape, k).reshape(n * k, -1)   # visits[m]: the tasks entry m = (r, i) visits
    columns = a.swapaxes(-1, -2).reshape(n * k, k)          # columns[r·K + j] = A[r][:, j] (a copy)
    diag = np.diagonal(a, axis1=-2, axis2=-1).reshape(n * k)
    tasks, first, pair = flat_pairs(n, k)
    c = identities(n, k).reshape(n * k, k)                  # c[m] = C_i of row r
    with np.errstate(invalid="ignore"):                     # non-finite Gram rows (failed toy rows): never projected
        for t in range(visits.shape[-1]):
            j = visits[:, t]                                # (n·K,): the task each entry visits now
            col = first + j                                 # row r's task j
            a_jj = diag[col]
            dot = (c * columns[col]).sum(-1)                # ⟨g_i^PC, g_j⟩
            project = (dot < 0) & (a_jj > 0) & (j != tasks)
            if project.any():                               # (elsewhere it subtracts 0/1 = 0: unchanged)
                c.ravel()[pair + j] -= np.where(project, dot, 0.0) / np.where(project, a_jj, 1.0)
    total = c.reshape(n, k, k).sum(-2)
    return (total / k if reduction == "mean" else total).reshape(*shape, k)


def pcgrad_coefficients(gram_matrix: Tensor, orders: Sequence[Sequence[int]], reduction: str = "sum") -> Tensor:
    """Coefficients c (K,) with d = Σ_j c_j g_j for one K×K Gram matrix; ``orders[i]`` is the order
    for task i (:func:`pcgrad_rows` on one row)."""
    return torch.from_numpy(pcgrad_rows(host(gram_matrix), order_array(orders), reduction)).to(gram_matrix.device)


def lockstep_orders(rows: Sequence[OwnGenerator], k: int) -> BlockDraws:
    """The task orders of lockstep rows (the balancers ``rows``), each row's from its own generator, a block of
    steps at a time (:mod:`~mtl_tune.balancers._random_rows`): every step hands out (rows, K, K − 1), each task's
    visits without itself (:func:`other_tasks`)."""
    return BlockDraws(rows, partial(_order_block, k=k), _visits_block, block_steps(k * (k - 1)))


# (functions, not lambdas, so that a balancer holding them can be pickled)
def _order_block(generator: torch.Generator, steps: int, k: int) -> np.ndarray:
    return order_draws(generator, k, steps)


def _visits_block(blocks: list[np.ndarray]) -> np.ndarray:
    return other_tasks(np.stack(blocks, 1))


def step_orders(balancer: PCGrad | Any, shape: tuple[int, ...]) -> np.ndarray:
    """This step's orders (shape..., K, K − 1) of ``balancer`` (PCGrad or GradVac): for one row (``shape == ()``)
    from its own generator, in lockstep from each row's (``row_draws``, set by ``start_rows``)."""
    k = balancer.n_tasks
    if shape == ():
        return other_tasks(order_draws(balancer.generator, k)[0])
    if balancer.row_draws is None:
        raise rows_mismatch(math.prod(shape), None)
    return balancer.row_draws.take(math.prod(shape)).reshape(*shape, k, k - 1)


class PCGrad(OwnGenerator, GradientBalancer):
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
        self.generator = torch.Generator().manual_seed(checked_seed(self.name, seed))
        #: the rows' orders in lockstep (:meth:`start_rows`); None for one row
        self.row_draws: BlockDraws | None = None

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # the rows' generators are used, not copied: row r draws the orders its own balancer would draw
        self.row_draws = lockstep_orders(rows, self.n_tasks)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """The rule: K fresh task orders per row from the row's generator, then the projections."""
        return RowStep(pcgrad_rows(gram, step_orders(self, gram.shape[:-2]), self.reduction))

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
