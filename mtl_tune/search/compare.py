"""Fair method comparison after the search, and the preference-weight sweep.

* ``--seeds N``: each method's best configuration (by the ranking objective) is re-run
  with N *fresh* seeds (seed+1 … seed+N). The search trial that selected it is not
  reused, so the reported mean ± std carries no selection bias ("winner's curse").
  Methods without hyperparameters thus also run once per seed.
* ``--preferences N``: methods with a task-preference argument (``ls``'s ``task_weights``;
  the ``preferences`` of Aligned-MTL, STCH, PBI and EPO) are run on N evenly spread points of the simplex, so the
  front each method can reach is drawn and compared by hypervolume.

Both are plain Tune grid searches (no Optuna), stored as ``<method>.seeds/`` and
``<method>.prefs/`` next to the method's search and restored by ``--resume``; they are
built and run by :mod:`mtl_tune.search.execution` (the one module that starts Tune runs).
This module holds what they are made of (the ranking objective, the preference grid) and
the tables that compare their results; it starts nothing.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd

from mtl_tune.search.runner import Plan
from mtl_tune.search.validate import PREFERENCE_ARGS, preference_arg  # noqa: F401 - re-exported


def ranking_objective(plan: Plan) -> tuple[str, str]:
    """The scalar that ranks methods: the objective itself, or the benchmark's default
    scalar objective (Δm% where baselines exist) for a Pareto search."""
    if not plan.multi_objective:
        return plan.metrics[0], plan.modes[0]
    return plan.bench.default_objective()


def simplex_grid(n_tasks: int, n_points: int) -> list[list[float]]:
    """About ``n_points`` evenly spread weight vectors on the simplex (Das–Dennis lattice),
    scaled to sum to K and strictly positive (an exact zero would drop a task entirely)."""
    divisions = 1
    while math.comb(divisions + 1 + n_tasks - 1, n_tasks - 1) <= n_points:
        divisions += 1
    points = []
    for combo in itertools.combinations(range(divisions + n_tasks - 1), n_tasks - 1):
        parts = np.diff([-1, *combo, divisions + n_tasks - 1]) - 1
        points.append(parts / divisions)
    grid = np.clip(np.array(points), 1e-3, None)
    grid = grid / grid.sum(1, keepdims=True) * n_tasks
    return grid.round(6).tolist()


def comparison_table(plan: Plan, table: pd.DataFrame) -> pd.DataFrame:
    """Per method: search budget, best search value and mean ± std over the seed re-runs.

    A scalar search is ranked (1 = best) by the re-run mean where there are re-runs, else
    by the best value. A multi-objective search is ranked by the hypervolume of each
    method's search trials over the declared objectives (fixed reference point in
    ``attrs["reference"]``), with its non-dominated counts; the scalar columns then only
    describe the ``--seeds`` re-runs. ``seeds`` counts distinct seeds; ``attrs["notes"]``
    holds warnings (degenerate hypervolume, a benchmark whose seed changes nothing)."""
    metric, mode = ranking_objective(plan)
    rows = []
    for method in plan.spaces:
        search = table[(table["method"] == method) & (table["phase"] == "search")]
        reruns = table[(table["method"] == method) & (table["phase"] == "seeds") & (table["status"] == "TERMINATED")]
        done = search[search["status"] == "TERMINATED"]
        best = (done[metric].min() if mode == "min" else done[metric].max()) if metric in done else math.nan
        row = {"method": method, "trials": len(search), "finished": len(done), f"best {metric}": best,
               "seeds": int(reruns["seed"].nunique()) if "seed" in reruns else len(reruns)}
        if metric in reruns and len(reruns):
            row[f"mean {metric}"] = reruns[metric].mean()
            row[f"std {metric}"] = reruns[metric].std(ddof=1) if len(reruns) > 1 else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    notes: list[str] = []
    reference = None
    if plan.multi_objective:
        from mtl_tune.analysis import reference_point
        from mtl_tune.analysis.summary import degenerate_notes, method_front_summary

        reference = reference_point(plan.metrics, plan.bench.name, plan.bench.metrics)
        searched = table[table["phase"] == "search"] if "phase" in table else table
        summary = method_front_summary(searched, plan.metrics, plan.modes, reference).drop(index="(all)")
        for col, name in (("hypervolume", "hypervolume"), ("n_front", "non_dominated"),
                          ("on_global_front", "on_global_front")):
            frame[name] = frame["method"].map(summary[col]).fillna(0.0 if col == "hypervolume" else 0)
        frame["rank"] = frame["hypervolume"].rank(ascending=False, method="min")
        notes += degenerate_notes(summary, reference, plan.metrics)
    else:
        key = f"mean {metric}" if f"mean {metric}" in frame else f"best {metric}"
        frame["rank"] = frame[key].rank(ascending=mode == "min", method="min")
    if plan.options.seeds and not plan.bench.seed_changes_results(trial_constants_for(plan)):
        notes.append(f"NOTE: benchmark {plan.bench.name} is deterministic in this configuration (its seed changes "
                     "nothing), so the re-runs repeat the search trial and their std carries no information")
    frame = frame.sort_values("rank").reset_index(drop=True)
    frame.attrs.update(notes=notes, reference=None if reference is None else [float(r) for r in reference],
                       ranking=("hypervolume" if plan.multi_objective else metric), scalar=metric)
    return frame


def trial_constants_for(plan: Plan) -> dict[str, Any]:
    """The benchmark settings every trial of the search runs with (defaults + --config)."""
    return {**plan.bench.defaults, **plan.options.config}


def preference_hypervolumes(plan: Plan, table: pd.DataFrame) -> pd.DataFrame:
    """Hypervolume of each method's preference-sweep front over the primary metrics;
    ``attrs["notes"]`` warns when a value is degenerate (nothing beats the reference point,
    or the front is one point)."""
    from mtl_tune.analysis import reference_point
    from mtl_tune.analysis.summary import degenerate_notes, method_front_summary

    metrics = [f"val/{m.name}" for m in plan.bench.primary_metrics()]
    modes = [m.mode for m in plan.bench.primary_metrics()]
    prefs = table[(table["phase"] == "prefs") & (table["status"] == "TERMINATED")]
    if prefs.empty or not all(m in prefs for m in metrics):
        return pd.DataFrame()
    ref = reference_point(metrics, plan.bench.name)
    summary = method_front_summary(prefs, metrics, modes, ref).drop(index="(all)")
    frame = pd.DataFrame({"method": summary.index, "points": summary["n_trials"].to_numpy(),
                          "non_dominated": summary["n_front"].to_numpy(),
                          "beats_reference": summary["beats_reference"].to_numpy(),
                          "hypervolume": summary["hypervolume"].to_numpy(),
                          "reference": [list(map(float, ref))] * len(summary)})
    frame = frame.sort_values("hypervolume", ascending=False).reset_index(drop=True)
    frame.attrs["notes"] = degenerate_notes(summary, ref, metrics)
    return frame
