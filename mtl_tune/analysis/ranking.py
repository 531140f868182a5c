"""Δm%, per-task relative drops and mean rank (MR) of methods × metrics tables.

Input tables have one row per method (or trial) and one column per metric, named as
the :class:`~mtl_tune.metrics.MetricSpec` names (``seg/miou``); sweep tables whose
columns carry a split prefix (``test_last10/seg/miou``) are handled by :func:`metric_table`.

* Δm% (Maninis et al., CVPR'19; the Nash-MTL/FAMO form used by every table we compare
  with): Δm% = (100/S) Σ_s (−1)^{δ_s} (M_s − B_s)/B_s, δ_s = 1 when higher is better —
  the mean over **metrics** (not tasks), computed by :func:`mtl_tune.metrics.delta_m`.
* per-task drop: d_k = mean over task k's metrics of the same signed relative drop
  (:func:`mtl_tune.metrics.task_scores`; PIVRG's per-task score).
* MR: for each metric rank the methods of the table (1 = best), then average a method's
  ranks over the metrics. The papers do not say how ties are ranked; the default is the
  average rank (``scipy.stats.rankdata(method="average")``). NTKMTL's Cityscapes table is
  reproduced exactly with ties="max" (a tie takes the worse rank), see the tests. MR
  depends on the compared set: only compare MRs computed over the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from mtl_tune.analysis.pareto import check_modes
from mtl_tune.metrics import MetricSpec, delta_m, relative_drop, task_scores

TIES = ("average", "min", "max", "dense", "ordinal")


def metric_table(df: pd.DataFrame, specs: Sequence[MetricSpec], split: str = "test_last10",
                 index: str | None = None) -> pd.DataFrame:
    """Select ``<split>/<spec.name>`` columns of a sweep table and rename them to the spec names.

    Falls back to the bare spec name when the table has no split prefix. ``index`` sets
    the row labels from a column (e.g. ``"trial_id"``).
    """
    cols = {}
    for s in specs:
        key = f"{split}/{s.name}" if split else s.name
        if key in df.columns:
            cols[s.name] = df[key]
        elif s.name in df.columns:
            cols[s.name] = df[s.name]
        else:
            raise KeyError(f"metric {s.name!r} not in the table (looked for {key!r} and {s.name!r})")
    out = pd.DataFrame(cols).apply(pd.to_numeric, errors="coerce")
    if index is not None:
        out.index = df[index].to_numpy()
    return out


def relative_drops(table: pd.DataFrame, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """Per-metric signed relative drop vs STL, 100·(−1)^δ (M − B)/B (positive = worse than STL)."""
    return pd.DataFrame({s.name: [relative_drop(v, s) for v in table[s.name]] for s in specs}, index=table.index)


def delta_m_table(table: pd.DataFrame, specs: Sequence[MetricSpec]) -> pd.Series:
    """Δm% of every row (mean of the per-metric relative drops over all S metrics)."""
    names = [s.name for s in specs]
    return pd.Series([delta_m(row, specs) for row in table[names].to_dict("records")],
                     index=table.index, name="delta_m", dtype=float)


def task_drops(table: pd.DataFrame, specs: Sequence[MetricSpec], tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-task mean relative drop d_k of every row (columns = tasks)."""
    tasks = list(dict.fromkeys(s.task for s in specs)) if tasks is None else list(tasks)
    names = [s.name for s in specs]
    rows = [task_scores(row, specs, tasks) for row in table[names].to_dict("records")]
    return pd.DataFrame(rows, index=table.index, columns=tasks, dtype=float)


def metric_ranks(table: pd.DataFrame, modes: Sequence[str] | Sequence[MetricSpec], ties: str = "average") -> pd.DataFrame:
    """Rank of every row on every metric (1 = best; NaN values get NaN and are not ranked)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    dirs = [m.mode if isinstance(m, MetricSpec) else str(m) for m in modes]
    if len(dirs) != table.shape[1]:
        raise ValueError(f"{len(dirs)} directions for {table.shape[1]} metric columns")
    dirs = check_modes(dirs, len(dirs))  # "MAX" is max; "maximise" is an error, not min
    out = pd.DataFrame(index=table.index, columns=table.columns, dtype=float)
    for col, mode in zip(table.columns, dirs):
        v = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(v)
        key = -v[ok] if mode == "max" else v[ok]
        r = np.full(len(v), np.nan)
        r[ok] = rankdata(key, method=ties)
        out[col] = r
    return out


def mean_rank(table: pd.DataFrame, modes: Sequence[str] | Sequence[MetricSpec], ties: str = "average") -> pd.Series:
    """MR = mean over metrics of each row's rank among the rows of ``table`` (lower = better).

    ``modes``: one "min"/"max" (or a MetricSpec) per column of ``table``; ``ties``: how
    equal values are ranked (``scipy.stats.rankdata`` method; default average ranks). A
    missing value is left out of that row's mean.
    """
    return metric_ranks(table, modes, ties).mean(axis=1, skipna=True).rename("mean_rank")


def summary_table(table: pd.DataFrame, specs: Sequence[MetricSpec], ties: str = "average") -> pd.DataFrame:
    """Per-metric values plus ``mean_rank`` and ``delta_m`` (when every spec has a baseline)."""
    out = table[[s.name for s in specs]].copy()
    out["mean_rank"] = mean_rank(out, specs, ties)
    if all(s.baseline is not None for s in specs):
        out["delta_m"] = delta_m_table(table, specs)
    return out


def seed_summary(df: pd.DataFrame, value_cols: Sequence[str], by: str | Sequence[str] = "method") -> pd.DataFrame:
    """Mean, std (ddof=1, NaN for one seed) and count of ``value_cols`` per group, e.g. per method over seeds.

    Columns are a MultiIndex (value, statistic) flattened to ``<value>/mean`` etc.
    """
    g = df.groupby(by, sort=True)[list(value_cols)]
    stats = g.agg(["mean", "std", "count"])
    stats.columns = [f"{c}/{s}" for c, s in stats.columns]
    return stats
