"""Variance–performance correlation: does a larger spread of per-task drops go with a worse Δm%?

PIVRG (Qin, Wang & Yan, CVPR'25) motivates its performance weights with "a strong
positive correlation between cross-task performance variance and average benchmark
performance" (MTLlib README; the paper's exact statistic was not retrievable, docs/methods.md#pivrg).
We test it on any set of methods or trials:

* per-task drop d_{m,k} = mean over task k's metrics of 100(−1)^δ (M − B)/B;
* spread s_m = std_k d_{m,k} (population, ddof = 0; with K = 2 tasks it is |d₁ − d₂|/2)
  or the variance s_m²;
* performance P_m = Δm%_m (mean over metrics, the published definition) or the task mean
  of d_{m,k} (``performance="task_mean"``, which weights tasks equally);
* Pearson r and Spearman ρ of (s_m, P_m) with their two-sided p-values
  (``scipy.stats.pearsonr`` / ``spearmanr``), and percentile bootstrap confidence
  intervals from resampling methods with replacement (seeded ``numpy`` Generator;
  resamples in which either variable is constant have no correlation and are dropped —
  their number is reported, never hidden).

With few methods (13–21) and methods copied between papers, the p-values assume
independent rows; they are descriptive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, rankdata, spearmanr

from mtl_tune.analysis.ranking import delta_m_table, task_drops
from mtl_tune.metrics import MetricSpec

SPREADS = ("std", "var")
PERFORMANCES = ("delta_m", "task_mean")


@dataclass(frozen=True)
class CorrelationResult:
    """Statistics of one variance–performance analysis (see the module docstring)."""

    n: int
    pearson_r: float
    pearson_p: float
    pearson_ci: tuple[float, float]
    spearman_rho: float
    spearman_p: float
    spearman_ci: tuple[float, float]
    spread: str
    performance: str
    n_boot: int
    n_boot_used: int
    ci_level: float
    seed: int
    table: pd.DataFrame = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int | str]:
        """Flat summary (no table) for reports."""
        return {"n": self.n, "spread": self.spread, "performance": self.performance,
                "pearson_r": self.pearson_r, "pearson_p": self.pearson_p,
                "pearson_ci_low": self.pearson_ci[0], "pearson_ci_high": self.pearson_ci[1],
                "spearman_rho": self.spearman_rho, "spearman_p": self.spearman_p,
                "spearman_ci_low": self.spearman_ci[0], "spearman_ci_high": self.spearman_ci[1],
                "n_boot": self.n_boot, "n_boot_used": self.n_boot_used, "ci_level": self.ci_level}


def task_spread(drops: pd.DataFrame, spread: str = "std") -> pd.Series:
    """Population std (or variance) of each row's per-task drops."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    arr = drops.to_numpy(dtype=float)
    val = arr.std(axis=1, ddof=0) if spread == "std" else arr.var(axis=1, ddof=0)
    return pd.Series(val, index=drops.index, name=f"task_{spread}")


def _corr_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (B, n) arrays; NaN where a row is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc ** 2).sum(axis=1) * (yc ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / den
    # relative tolerance: a resample of one repeated value has rounding-level spread
    scale = np.abs(x).max(axis=1) * np.abs(y).max(axis=1) + 1e-300
    r[den <= 1e-12 * scale * x.shape[1]] = np.nan
    return r


def bootstrap_correlations(x: np.ndarray, y: np.ndarray, n_boot: int = 10_000, seed: int = 0,
                           ci_level: float = 0.95) -> tuple[tuple[float, float], tuple[float, float], int]:
    """Percentile bootstrap CIs of Pearson r and Spearman ρ; returns (pearson_ci, spearman_ci, used).

    Rows are resampled with replacement ``n_boot`` times; degenerate resamples are dropped.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    xb, yb = x[idx], y[idx]
    pr = _corr_rows(xb, yb)
    sr = _corr_rows(rankdata(xb, axis=1), rankdata(yb, axis=1))
    alpha = (1.0 - ci_level) / 2.0
    ok = np.isfinite(pr) & np.isfinite(sr)

    def ci(v: np.ndarray) -> tuple[float, float]:
        if not ok.any():
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(v[ok], [alpha, 1.0 - alpha])
        return (float(lo), float(hi))

    return ci(pr), ci(sr), int(ok.sum())


def variance_performance(drops: pd.DataFrame, performance: pd.Series, spread: str = "std",
                         n_boot: int = 10_000, seed: int = 0, ci_level: float = 0.95,
                         performance_name: str = "delta_m") -> CorrelationResult:
    """Correlate the cross-task spread of ``drops`` (rows × tasks) with ``performance`` (per row)."""
    if len(drops) < 3:
        raise ValueError(f"need at least 3 rows to correlate, got {len(drops)}")
    s = task_spread(drops, spread)
    p = performance.reindex(drops.index).astype(float)
    ok = np.isfinite(s.to_numpy()) & np.isfinite(p.to_numpy())
    s, p = s[ok], p[ok]
    pr = pearsonr(s, p)
    sr = spearmanr(s, p)
    pci, sci, used = bootstrap_correlations(s.to_numpy(), p.to_numpy(), n_boot, seed, ci_level)
    table = drops[ok].copy()
    table[s.name] = s
    table[performance_name] = p
    return CorrelationResult(n=int(ok.sum()), pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                             pearson_ci=pci, spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue),
                             spearman_ci=sci, spread=spread, performance=performance_name, n_boot=n_boot,
                             n_boot_used=used, ci_level=ci_level, seed=seed, table=table)


def variance_performance_from_metrics(table: pd.DataFrame, specs: Sequence[MetricSpec], spread: str = "std",
                                      performance: str = "delta_m", tasks: Sequence[str] | None = None,
                                      **kw) -> CorrelationResult:
    """:func:`variance_performance` from a methods × metrics table and its specs (with baselines)."""
    if performance not in PERFORMANCES:
        raise ValueError(f"performance must be one of {PERFORMANCES}, got {performance!r}")
    drops = task_drops(table, specs, tasks)
    perf = delta_m_table(table, specs) if performance == "delta_m" else drops.mean(axis=1).rename("task_mean")
    return variance_performance(drops, perf, spread=spread, performance_name=performance, **kw)


def task_weights(specs: Sequence[MetricSpec], tasks: Sequence[str] | None = None) -> np.ndarray:
    """Share of each task in Δm% (its number of metrics / S): Δm% = Σ_k w_k d_k exactly."""
    tasks = list(dict.fromkeys(s.task for s in specs)) if tasks is None else list(tasks)
    counts = np.array([sum(s.task == t for s in specs) for t in tasks], dtype=float)
    return counts / counts.sum()


def permutation_null(drops: pd.DataFrame, weights: Sequence[float] | None = None, spread: str = "std",
                     n_perm: int = 10_000, seed: int = 0) -> dict[str, float]:
    """How much spread–performance correlation is there when tasks are *unrelated*?

    Spread and performance are two functions of the same per-task drops, so they
    correlate even with no method-level effect: with K = 2 and one drop ≈ 0, both are
    ≈ |d₂|/2. The null permutes every task column independently across rows (keeping
    each task's distribution of drops, breaking which method produced which
    combination), recomputes P = Σ_k w_k d_k and the spread, and records Pearson r.
    Returns the observed r, the null mean and 95 % interval, and the one-sided
    permutation p-value P(r_null ≥ r_obs) (with the +1 correction).
    """
    d = drops.to_numpy(dtype=float)
    n, k = d.shape
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (k,):
        raise ValueError(f"{w.shape[0]} weights for {k} tasks")

    def stats(arr: np.ndarray) -> np.ndarray:  # arr: (B, n, k)
        perf = arr @ w
        spr = arr.std(axis=2, ddof=0) if spread == "std" else arr.var(axis=2, ddof=0)
        return _corr_rows(spr, perf)

    observed = float(stats(d[None])[0])
    rng = np.random.default_rng(seed)
    # independent permutation of each column: argsort of uniforms gives B×k permutations
    perms = np.argsort(rng.random((n_perm, k, n)), axis=2)
    shuffled = np.stack([d[perms[:, j, :], j] for j in range(k)], axis=2)
    null = stats(shuffled)
    null = null[np.isfinite(null)]
    return {"observed_r": observed, "null_mean_r": float(null.mean()),
            "null_low": float(np.quantile(null, 0.025)), "null_high": float(np.quantile(null, 0.975)),
            "p_value": float((1 + (null >= observed).sum()) / (1 + len(null))), "n_perm": int(len(null))}
