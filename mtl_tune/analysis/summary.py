"""Per-method multi-objective summary of a sweep and the warnings for degenerate numbers.

A multi-objective sweep is summarised by each method's hypervolume (fixed reference
point, shown with it) and its non-dominated counts, never by one objective alone;
:func:`degenerate_notes` says when such a number carries little information.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mtl_tune.analysis.hypervolume import hypervolume_table
from mtl_tune.analysis.pareto import as_minimisation, pareto_mask
from mtl_tune.analysis.sweep import completed_trials


def method_front_summary(df: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str],
                         reference: Sequence[float], include_incomplete: bool = False) -> pd.DataFrame:
    """One row per method (and ``(all)``): ``hypervolume``, ``n_trials``, ``n_front`` (its own
    non-dominated trials), ``on_global_front`` (its trials on the front of all trials),
    ``beats_reference`` (trials strictly better than the reference in every objective) and
    ``seeds`` (distinct seeds). Sorted by hypervolume, best first."""
    table = hypervolume_table(df, metrics, modes, reference, include_incomplete=include_incomplete)
    pool = completed_trials(df, include_incomplete)
    values = pool[list(metrics)].apply(pd.to_numeric, errors="coerce")
    pool = pool[np.isfinite(values.to_numpy(dtype=float)).all(axis=1)]
    y = as_minimisation(pool[list(metrics)].to_numpy(dtype=float), modes) if len(pool) else np.zeros((0, len(metrics)))
    r = as_minimisation(np.asarray(reference, dtype=float)[None, :], modes)[0]
    on_front = pareto_mask(y, ["min"] * len(metrics)) if len(pool) else np.zeros(0, bool)
    beats = (y < r).all(axis=1) if len(pool) else np.zeros(0, bool)
    method = pool["method"].astype(str).to_numpy() if "method" in pool else np.full(len(pool), "")
    seeds = pool["seed"] if "seed" in pool else pd.Series(0, index=pool.index)
    for group in table.index:
        sel = np.ones(len(pool), bool) if group == "(all)" else method == group
        table.loc[group, "on_global_front"] = int(on_front[sel].sum())
        table.loc[group, "beats_reference"] = int(beats[sel].sum())
        table.loc[group, "seeds"] = int(seeds[sel].nunique())
    for col in ("on_global_front", "beats_reference", "seeds"):
        table[col] = table[col].astype(int)
    order = ["(all)"] + table.drop(index="(all)").sort_values("hypervolume", ascending=False).index.tolist()
    return table.loc[order]


def degenerate_notes(summary: pd.DataFrame, reference: Sequence[float], metrics: Sequence[str]) -> list[str]:
    """Plain-language warnings for rows of :func:`method_front_summary` whose numbers are degenerate:
    hypervolume 0 because no trial beats the reference point, or a front of a single point."""
    ref = ", ".join(f"{m} = {r:g}" for m, r in zip(metrics, reference))
    notes = []
    for group, row in summary.iterrows():
        if row["n_trials"] == 0:
            continue
        if row["beats_reference"] == 0:
            notes.append(f"WARNING: hypervolume of {group} is 0 because none of its {int(row['n_trials'])} trial(s) "
                         f"beats the reference point ({ref}) in every objective; 0 here means 'not measured', "
                         "not 'worst'")
        elif row["n_front"] == 1 and row["n_trials"] > 1:
            notes.append(f"WARNING: the front of {group} is a single point (of {int(row['n_trials'])} trials): its "
                         "hypervolume is one box and says nothing about how wide a trade-off it reaches")
    return notes


def distinct_seed_stats(df: pd.DataFrame, value: str, by: str = "method", seed: str = "seed") -> pd.DataFrame:
    """Mean ± std of ``value`` over *distinct* seeds per group: repeated runs of one seed are
    averaged first, so ``n`` counts seeds, never repeats of the same seed."""
    vals = pd.to_numeric(df[value], errors="coerce")
    frame = pd.DataFrame({by: df[by].astype(str), "seed": df[seed] if seed in df else 0, "v": vals}).dropna()
    per_seed = frame.groupby([by, "seed"])["v"].mean().reset_index()
    g = per_seed.groupby(by)["v"]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})
