"""Fair method comparison after the search, and the preference-weight sweep.

* ``--seeds N``: each method's best configuration (by the ranking objective) is re-run
  with N *fresh* seeds (seed+1 … seed+N). The search trial that selected it is not
  reused, so the reported mean ± std carries no selection bias ("winner's curse").
  Methods without hyperparameters thus also run once per seed.
* ``--preferences N``: methods with a task-preference argument (``ls``'s ``task_weights``,
  Aligned-MTL's ``preferences``) are run on N evenly spread points of the simplex, so the
  front each method can reach is drawn and compared by hypervolume.

Both are plain Tune grid searches (no Optuna), stored as ``<method>.seeds/`` and
``<method>.prefs/`` next to the method's search and restored by ``--resume``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any

import numpy as np
import pandas as pd

from mtl_tune.registry import balancer_class
from mtl_tune.search.runner import Plan

PREFERENCE_ARGS = ("task_weights", "preferences")


def ranking_objective(plan: Plan) -> tuple[str, str]:
    """The scalar that ranks methods: the objective itself, or the benchmark's default
    scalar objective (Δm% where baselines exist) for a Pareto search."""
    if not plan.multi_objective:
        return plan.metrics[0], plan.modes[0]
    return plan.bench.default_objective()


def best_config(table: pd.DataFrame, method: str, metric: str, mode: str) -> dict[str, Any] | None:
    from ray.tune import ExperimentAnalysis

    done = table[(table["method"] == method) & (table["status"] == "TERMINATED")
                 & (table.get("phase", "search") == "search")]
    if done.empty or metric not in done:
        return None
    best = done.sort_values(metric, ascending=mode == "min").iloc[0]
    analysis = ExperimentAnalysis(str(best["logdir"]).rsplit("/", 1)[0])
    for trial in analysis.trials:
        if trial.trial_id == best["trial_id"]:
            return dict(trial.config)
    return None


def preference_arg(method: str) -> str | None:
    params = inspect.signature(balancer_class(method).__init__).parameters
    return next((a for a in PREFERENCE_ARGS if a in params), None)


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


def run_grid(plan: Plan, experiment: str, param_space: dict[str, Any]) -> None:
    from ray import tune

    from mtl_tune.search.execution import trial_dirname
    from mtl_tune.search.trainable import train_trial

    o = plan.options
    path = plan.sweep_dir / experiment
    trainable = tune.with_resources(train_trial, {"cpu": o.cpus_per_trial, "gpu": o.gpus_per_trial})
    if tune.Tuner.can_restore(str(path)):
        tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True).fit()
        return
    tune.Tuner(trainable, param_space=param_space,
               tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False, trial_dirname_creator=trial_dirname,
                                           max_concurrent_trials=o.max_concurrent),
               run_config=tune.RunConfig(name=experiment, storage_path=str(plan.sweep_dir), verbose=o.verbose,
                                         failure_config=tune.FailureConfig(max_failures=o.max_failures),
                                         checkpoint_config=tune.CheckpointConfig(num_to_keep=2))).fit()


def run_seeds(plan: Plan, table: pd.DataFrame) -> None:
    from ray import tune

    metric, mode = ranking_objective(plan)
    seeds = [plan.options.seed + i for i in range(1, plan.options.seeds + 1)]
    for method in plan.spaces:
        config = best_config(table, method, metric, mode)
        if config is None:
            print(f"--seeds: {method} has no finished trial with {metric}; no re-runs")
            continue
        run_grid(plan, f"{method}.seeds", {**config, "seed": tune.grid_search(seeds)})


def run_preferences(plan: Plan) -> None:
    from mtl_tune.search.runner import trial_constants

    from ray import tune

    grid = simplex_grid(plan.bench.n_tasks, plan.options.preferences)
    for method in plan.spaces:
        arg = preference_arg(method)
        if arg is None:
            continue
        const = trial_constants(plan, method)
        fixed = {k: v for k, v in plan.spaces[method].constants().items() if k != arg}
        const["hparams"] = {**fixed, arg: tune.grid_search(grid)}
        run_grid(plan, f"{method}.prefs", const)


def comparison_table(plan: Plan, table: pd.DataFrame) -> pd.DataFrame:
    """Per method: search budget, best search value and mean ± std over the seed re-runs,
    ranked (1 = best) by the re-run mean where there are re-runs, else the best value."""
    metric, mode = ranking_objective(plan)
    rows = []
    for method in plan.spaces:
        search = table[(table["method"] == method) & (table["phase"] == "search")]
        reruns = table[(table["method"] == method) & (table["phase"] == "seeds") & (table["status"] == "TERMINATED")]
        done = search[search["status"] == "TERMINATED"]
        best = done[metric].min() if mode == "min" else done[metric].max() if metric in done else math.nan
        row = {"method": method, "trials": len(search), "finished": len(done), f"best {metric}": best,
               "seeds": len(reruns)}
        if metric in reruns and len(reruns):
            row[f"mean {metric}"] = reruns[metric].mean()
            row[f"std {metric}"] = reruns[metric].std(ddof=1) if len(reruns) > 1 else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    key = f"mean {metric}" if f"mean {metric}" in frame else f"best {metric}"
    frame["rank"] = frame[key].rank(ascending=mode == "min", method="min")
    return frame.sort_values("rank").reset_index(drop=True)


def preference_hypervolumes(plan: Plan, table: pd.DataFrame) -> pd.DataFrame:
    """Hypervolume of each method's preference-sweep front over the primary metrics."""
    from mtl_tune.analysis import hypervolume, pareto_mask, reference_point

    metrics = [f"val/{m.name}" for m in plan.bench.primary_metrics()]
    modes = [m.mode for m in plan.bench.primary_metrics()]
    prefs = table[(table["phase"] == "prefs") & (table["status"] == "TERMINATED")]
    if prefs.empty or not all(m in prefs for m in metrics):
        return pd.DataFrame()
    ref = reference_point(metrics, plan.bench.name)
    rows = []
    for method, group in prefs.groupby("method"):
        values = group[metrics].to_numpy(float)
        rows.append({"method": method, "points": len(group), "non_dominated": int(pareto_mask(values, modes).sum()),
                     "hypervolume": hypervolume(values, modes, ref), "reference": list(map(float, ref))})
    return pd.DataFrame(rows).sort_values("hypervolume", ascending=False).reset_index(drop=True)
