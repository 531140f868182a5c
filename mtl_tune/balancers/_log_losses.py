"""Shifted losses D = ℓ − ℓ* for methods that take logarithms of the losses (``si``, ``gls``, ``dbmtl``).

``si`` introduced the convention these follow (and takes its ℓ* from :func:`loss_floor` too): an optional K-vector ``min_losses`` ℓ* (default
0) lies below every reachable loss, the logarithms are taken of D = ℓ − ℓ*, and a row with some
D ≤ 0 (or a non-finite D) fails with a :class:`~mtl_tune.balancers.base.BalancerError` naming the losses and the
floor — never a NaN or an infinity from the logarithm of a non-positive number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def loss_floor(name: str, n_tasks: int, min_losses: Sequence[float] | None) -> Tensor:
    """ℓ* as a float64 tensor (K,) (zeros when ``min_losses`` is None); ValueError unless K finite numbers."""
    floor = torch.zeros(n_tasks, dtype=torch.float64) if min_losses is None else \
        torch.as_tensor(list(min_losses), dtype=torch.float64)
    if floor.shape != (n_tasks,) or not bool(torch.isfinite(floor).all()):
        raise ValueError(f"{name}: min_losses must be {n_tasks} finite numbers, got {min_losses!r}")
    return floor


def shifted(name: str, losses: np.ndarray, floor: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, Callable[[tuple[int, ...]], str]]:
    """(D = ℓ − ℓ* (..., K), bool rows (...) with some D ≤ 0 or non-finite, the reason of such a row).

    The common case costs two reductions: every D in (0, ∞) means no row fails (a NaN or ±∞ fails
    one of the two tests), and the rows are then all False without the element-wise pass."""
    d = losses - floor
    if d.min() > 0.0 and d.max() < np.inf:
        bad = np.zeros(d.shape[:-1], dtype=bool)
    else:  # a NaN or infinite loss fails too: its logarithm means nothing
        bad = ~(np.isfinite(d) & (d > 0)).all(-1)

    def reason(index: tuple[int, ...]) -> str:
        return (f"{name}: ℓ − min_losses must be finite and > 0 for every task (the method takes its logarithm), got losses "
                f"{losses[index].tolist()} with min_losses {floor.tolist()}; set min_losses below the lowest "
                "reachable loss")

    return d, bad, reason
