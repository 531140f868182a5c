"""Hypervolume (the Lebesgue measure of the objective region a set of points dominates).

HV(P; r) = λ( ∪_{p ∈ P} [p, r] ) in minimisation form (Zitzler & Thiele, PPSN 1998),
with every "max" objective negated first (for points *and* reference point), so one
implementation serves any mix of directions. Points not strictly better than r in every
objective add nothing and are dropped; non-finite points are dropped.

Algorithms (all exact, written here; optuna's ``optuna._hypervolume`` is private API and
pymoo is not a dependency — the tests cross-check against optuna when it is importable):

* d = 1: r − min p;
* d = 2: sort by the first objective and sum the rectangles of the staircase, O(n log n);
* d ≥ 3: WFG (While, Bradstreet & Barone, IEEE TEC 2012): HV = Σ_i exclusive(p_i), with
  exclusive(p_i) = box(p_i) − HV(nd(limit set)), limit set = {max(p_i, p_j) : j > i};
  exponential in d in the worst case but fast for the front sizes of a sweep.
* :func:`hypervolume_mc`: a seeded Monte-Carlo estimate with its standard error, for
  many-objective fronts (e.g. CelebA's 40 tasks) where the exact value is out of reach.

**Reference point.** HV values are only comparable when r is the same for every method,
seed and sweep of a benchmark, so r is fixed per benchmark and never derived from the
observed points (docs/references.md#hypervolume-reference-point). :func:`reference_point` resolves
it per metric key:

1. an explicit override;
2. the benchmark's own ``reference_points`` (a class attribute of
   :class:`~mtl_tune.benchmarks.base.Benchmark`) — the toy: (loss1, loss2) = (0, 0), which
   every point of the true front beats (front L₁ ∈ [−2.0, −0.04], L₂ ∈ [−20.0, −0.4]);
3. ``delta_m`` and ``drop/<task>`` keys (relative drops in %): 100;
4. a metric with an STL baseline B: the value whose relative drop is +100 %, i.e. 2B for a
   lower-is-better metric and 0 for a higher-is-better one (a model twice as bad as STL,
   or one scoring zero, contributes nothing).
Anything else raises, naming the metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mtl_tune.analysis._benchmarks import bare_metric, registered_benchmark
from mtl_tune.analysis.pareto import as_minimisation, check_modes, pareto_mask
from mtl_tune.analysis.sweep import completed_trials
from mtl_tune.metrics import MetricSpec

DROP_REFERENCE = 100.0


def reference_point(metrics: Sequence[str], benchmark: str | None = None,
                    specs: Sequence[MetricSpec] | None = None,
                    overrides: Mapping[str, float] | None = None) -> np.ndarray:
    """The fixed reference point for ``metrics`` (in their own units); rules in the module docstring."""
    cls = registered_benchmark(benchmark)
    table = cls.reference_points if cls is not None else {}
    by_name = {s.name: s for s in specs or ()}
    if not by_name and cls is not None:
        by_name = {s.name: s for s in cls.metrics}
    out = []
    for key in metrics:
        bare = bare_metric(key)
        if overrides and (key in overrides or bare in overrides):
            out.append(float(overrides.get(key, overrides.get(bare))))
        elif bare in table:
            out.append(table[bare])
        elif bare == "delta_m" or bare.startswith("drop/"):
            out.append(DROP_REFERENCE)
        elif bare in by_name and by_name[bare].baseline is not None:
            spec = by_name[bare]
            out.append(0.0 if spec.higher_is_better else 2.0 * float(spec.baseline))
        else:
            raise ValueError(f"no fixed hypervolume reference for metric {key!r} of benchmark {benchmark!r}: "
                             "pass overrides={...} or declare it in the benchmark's reference_points")
    return np.array(out, dtype=np.float64)


def hypervolume(values: np.ndarray | pd.DataFrame, modes: Sequence[str], reference: Sequence[float]) -> float:
    """Exact hypervolume of ``values`` (n × d, raw metric units) w.r.t. ``reference`` (raw units).

    ``modes`` gives each objective's direction; "max" columns and their reference entry
    are negated (sign normalisation) before the minimisation-form computation.
    """
    y = as_minimisation(values, modes)
    r = as_minimisation(np.asarray(reference, dtype=np.float64)[None, :], modes)[0]
    if not np.isfinite(r).all():
        raise ValueError(f"reference point must be finite, got {list(reference)}")
    y = y[np.isfinite(y).all(axis=1)]
    y = y[(y < r).all(axis=1)]
    if len(y) == 0:
        return 0.0
    y = y[pareto_mask(y, ["min"] * y.shape[1])]
    y = np.unique(y, axis=0)
    return float(_hv(y, r))


def _hv(y: np.ndarray, r: np.ndarray) -> float:
    n, d = y.shape
    if n == 0:
        return 0.0
    if n == 1:
        return float(np.prod(r - y[0]))
    if d == 1:
        return float(r[0] - y[:, 0].min())
    if d == 2:
        return _hv2d(y, r)
    return _wfg(y, r)


def _hv2d(y: np.ndarray, r: np.ndarray) -> float:
    """Σ (x_{i+1} − x_i)(r₂ − y_i) over the staircase of mutually non-dominated points."""
    p = y[np.lexsort((y[:, 1], y[:, 0]))]
    best_y, total = np.inf, 0.0
    xs = np.append(p[:, 0], r[0])
    for i in range(len(p)):
        best_y = min(best_y, p[i, 1])
        total += (xs[i + 1] - xs[i]) * (r[1] - best_y)
    return float(total)


def _wfg(y: np.ndarray, r: np.ndarray) -> float:
    # sorting by the last objective (worst first) keeps the limit sets small (WFG paper §IV)
    p = y[np.argsort(-y[:, -1], kind="stable")]
    total = 0.0
    for i in range(len(p)):
        box = float(np.prod(r - p[i]))
        rest = p[i + 1:]
        if len(rest) == 0:
            total += box
            continue
        limit = np.maximum(rest, p[i])
        limit = limit[(limit < r).all(axis=1)]
        if len(limit):
            limit = np.unique(limit[pareto_mask(limit, ["min"] * limit.shape[1])], axis=0)
        total += box - _hv(limit, r)
    return total


def hypervolume_mc(values: np.ndarray | pd.DataFrame, modes: Sequence[str], reference: Sequence[float],
                   n_samples: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Monte-Carlo hypervolume estimate and its standard error (seeded, reproducible).

    Samples uniformly in the box [min over points, r] (which contains the dominated
    region) and counts samples dominated by at least one point.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    y = as_minimisation(values, modes)
    r = as_minimisation(np.asarray(reference, dtype=np.float64)[None, :], modes)[0]
    if not np.isfinite(r).all():
        raise ValueError(f"reference point must be finite, got {list(reference)}")
    y = y[np.isfinite(y).all(axis=1)]
    y = y[(y < r).all(axis=1)]
    if len(y) == 0:
        return 0.0, 0.0
    y = y[pareto_mask(y, ["min"] * y.shape[1])]
    lo = y.min(axis=0)
    vol = float(np.prod(r - lo))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_samples, 20_000):
        m = min(20_000, n_samples - start)
        s = lo + rng.random((m, y.shape[1])) * (r - lo)
        hits += int(np.any(np.all(y[None, :, :] <= s[:, None, :], axis=2), axis=1).sum())
    frac = hits / n_samples
    return vol * frac, vol * float(np.sqrt(frac * (1 - frac) / n_samples))


def hypervolume_table(df: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str],
                      reference: Sequence[float], by: str | Sequence[str] | None = "method",
                      include_incomplete: bool = False) -> pd.DataFrame:
    """Hypervolume of each group's trials (and of all trials, row ``"(all)"``).

    Columns: ``hypervolume``, ``n_trials`` (usable rows), ``n_front`` (the group's own
    non-dominated count). Only completed trials count unless ``include_incomplete``.
    """
    modes = check_modes(modes, len(metrics))
    pool = completed_trials(df, include_incomplete)
    vals = pool[list(metrics)].apply(pd.to_numeric, errors="coerce")
    ok = np.isfinite(vals.to_numpy(dtype=float)).all(axis=1)
    pool, vals = pool[ok], vals[ok]
    rows = []
    groups = [("(all)", pool.index)]
    if by is not None:
        groups += [(name if not isinstance(name, tuple) or len(name) > 1 else name[0], idx)
                   for name, idx in pool.groupby(by, sort=True).groups.items()]
    for name, idx in groups:
        v = vals.loc[idx].to_numpy(dtype=float)
        rows.append({"group": name, "hypervolume": hypervolume(v, modes, reference), "n_trials": len(v),
                     "n_front": int(pareto_mask(v, modes).sum()) if len(v) else 0})
    return pd.DataFrame(rows).set_index("group")
