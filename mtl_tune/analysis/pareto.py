"""Pareto dominance, non-dominated sets and non-dominated sorting for any number of objectives.

Convention: every objective is turned into minimisation (``"max"`` columns negated, see
:func:`as_minimisation`). Point a dominates point b iff a_j ≤ b_j for all j and
a_j < b_j for at least one j (Deb, *Multi-Objective Optimization using Evolutionary
Algorithms*, 2001, Def. 2.5). Consequences documented once here:

* exact duplicates do not dominate each other, so **all copies of a non-dominated point
  are kept** (a method that lands on the same point with two seeds shows twice);
* rows with a NaN/±inf objective are never on the front and never dominate anything
  (a diverged trial must not knock real trials off the front).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mtl_tune.analysis.sweep import completed_trials

MODES = ("min", "max")


def check_modes(modes: Sequence[str], n_objectives: int) -> list[str]:
    """Validate ``modes`` ("min"/"max", one per objective)."""
    modes = [str(m).lower() for m in modes]
    if len(modes) != n_objectives:
        raise ValueError(f"got {len(modes)} modes for {n_objectives} objectives")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes must be 'min' or 'max', got {bad}")
    return modes


def as_minimisation(values: np.ndarray | pd.DataFrame, modes: Sequence[str]) -> np.ndarray:
    """(n, d) float64 array with every ``"max"`` column negated, so smaller is better everywhere."""
    arr = np.asarray(values.to_numpy(dtype=np.float64) if isinstance(values, pd.DataFrame) else values,
                     dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None] if len(modes) == 1 else arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"values must be 2-D (n points × d objectives), got shape {arr.shape}")
    modes = check_modes(modes, arr.shape[1])
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return arr * sign


def dominates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether a dominates b (minimisation), broadcast over leading axes."""
    return np.all(a <= b, axis=-1) & np.any(a < b, axis=-1)


def pareto_mask(values: np.ndarray | pd.DataFrame, modes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n points × d objectives).

    Algorithm: visit points in increasing order of their coordinate sum (a dominating
    point always has a strictly smaller exact sum, so big dominators are found early) and
    let each surviving point delete every remaining point it dominates; one vectorised
    O(m·d) comparison per visited point, O(n·|front|·d) in total — thousands of rows and
    40+ objectives take well under a second. The result does not depend on the order
    (dominance is transitive), only the speed does.

    Duplicates of a non-dominated point are all kept; rows with non-finite values are
    excluded (see the module docstring).
    """
    y = as_minimisation(values, modes)
    n = y.shape[0]
    mask = np.zeros(n, dtype=bool)
    finite = np.flatnonzero(np.isfinite(y).all(axis=1))
    if finite.size == 0:
        return mask
    sums = y[finite].sum(axis=1)
    order = np.argsort(sums, kind="stable")
    cand, pts, sums = finite[order], y[finite][order], sums[order]
    i = 0
    while i < len(cand):
        # rounding is monotone, so a dominated point never has a smaller float sum: only
        # points from the first one tying with pts[i]'s sum onwards can be beaten by it
        lo = int(np.searchsorted(sums, sums[i], side="left"))
        beaten = dominates(pts[i], pts[lo:])
        if beaten.any():
            keep = np.ones(len(cand), dtype=bool)
            keep[lo:] = ~beaten
            i = int(keep[:i].sum())  # position of pts[i] after deletion (never beaten by itself)
            cand, pts, sums = cand[keep], pts[keep], sums[keep]
        i += 1
    mask[cand] = True
    return mask


def nondominated_ranks(values: np.ndarray | pd.DataFrame, modes: Sequence[str]) -> np.ndarray:
    """Non-dominated sorting rank of each row: 0 = Pareto front, 1 = front after removing it, …

    Rows with non-finite values get rank −1. (NSGA-II's fronts, Deb et al., IEEE TEC 2002.)
    """
    y = as_minimisation(values, modes)
    ranks = np.full(y.shape[0], -1, dtype=int)
    left = np.flatnonzero(np.isfinite(y).all(axis=1))
    r = 0
    while left.size:
        m = pareto_mask(y[left], ["min"] * y.shape[1])
        ranks[left[m]] = r
        left = left[~m]
        r += 1
    return ranks


def pareto_front(df: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str],
                 include_incomplete: bool = False) -> pd.DataFrame:
    """The non-dominated trials of ``df`` on ``metrics`` (sorted by the first metric, best first).

    By default only :func:`~mtl_tune.analysis.sweep.completed_trials` take part, so an
    ASHA-stopped or diverged trial can neither join nor shadow the front.
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise KeyError(f"metrics not in the table: {missing}; available: {sorted(c for c in df.columns if '/' in c)}")
    pool = completed_trials(df, include_incomplete)
    mask = pareto_mask(pool[list(metrics)], modes)
    front = pool[mask]
    return front.sort_values(list(metrics)[0], ascending=str(modes[0]).lower() == "min")


def staircase(front_min: np.ndarray) -> np.ndarray:
    """Vertices of the 2-D attainment staircase through non-dominated points (minimisation).

    Points sorted by the first objective; between consecutive points the curve runs
    horizontally then vertically, i.e. the boundary of the region they dominate.
    """
    p = np.asarray(front_min, dtype=np.float64)
    p = p[np.lexsort((p[:, 1], p[:, 0]))]
    verts = [p[0]]
    for a, b in zip(p[:-1], p[1:]):
        verts.append(np.array([b[0], a[1]]))
        verts.append(b)
    return np.array(verts)
