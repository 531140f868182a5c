"""Analysis of sweeps: loading, Pareto fronts, hypervolume, Δm%, mean rank, variance–performance
correlation, plots and reports.

Typical use::

    from mtl_tune.analysis import load_sweep, completed_trials, pareto_front, plot_pareto_front
    df = load_sweep("results/toy-sweep")
    front = pareto_front(df, ["val/loss1", "val/loss2"], ["min", "min"])
    plot_pareto_front(df, ["val/loss1", "val/loss2"], ["min", "min"], "front.png")

Command line: ``python -m mtl_tune.analyze RESULTS... --out DIR``. Details in docs/analysis.md.

Modules: :mod:`.sweep` (loading, :func:`completed_trials`), :mod:`.pareto` (dominance),
:mod:`.hypervolume`, :mod:`.ranking` (Δm%, MR), :mod:`.correlation` (PIVRG's claim),
:mod:`.plots` (PNG figures), :mod:`.trial_table` (the ``trials.csv`` rows),
:mod:`.published` (the papers' tables), :mod:`.report` (Markdown/HTML),
:mod:`.summary` (per-method hypervolume / non-dominated counts, degenerate-number warnings),
:mod:`.synthetic` (demo sweeps in the results format).
"""

from mtl_tune.analysis._benchmarks import known_front_points
from mtl_tune.analysis.correlation import (
    CorrelationResult,
    permutation_null,
    task_spread,
    task_weights,
    variance_performance,
    variance_performance_from_metrics,
)
from mtl_tune.analysis.hypervolume import (
    hypervolume,
    hypervolume_mc,
    hypervolume_table,
    reference_point,
)
from mtl_tune.analysis.pareto import (
    as_minimisation,
    dominates,
    nondominated_ranks,
    pareto_front,
    pareto_mask,
)
from mtl_tune.analysis.plots import (plot_hp_vs_objective, plot_method_bars, plot_parallel_coordinates,
                                     plot_pareto_front, plot_variance_vs_delta_m)
from mtl_tune.analysis.ranking import (
    delta_m_table,
    mean_rank,
    metric_ranks,
    metric_table,
    relative_drops,
    seed_summary,
    summary_table,
    task_drops,
)
from mtl_tune.analysis.report import build_report, write_report
from mtl_tune.analysis.summary import degenerate_notes, distinct_seed_stats, method_front_summary
from mtl_tune.analysis.sweep import (
    SweepNotFoundError,
    SweepWarning,
    completed_trials,
    decode_hp,
    expand_list_hps,
    hp_columns,
    iter_sweeps,
    load_sweep,
    load_sweep_meta,
    metric_columns,
    metric_specs,
    sweep_meta_of,
    sweep_objective,
    trials_from_folder,
    trials_from_ray,
)

__all__ = [
    "CorrelationResult",
    "SweepNotFoundError",
    "SweepWarning",
    "as_minimisation",
    "build_report",
    "completed_trials",
    "decode_hp",
    "degenerate_notes",
    "distinct_seed_stats",
    "delta_m_table",
    "dominates",
    "expand_list_hps",
    "hp_columns",
    "hypervolume",
    "hypervolume_mc",
    "hypervolume_table",
    "iter_sweeps",
    "known_front_points",
    "load_sweep",
    "load_sweep_meta",
    "mean_rank",
    "method_front_summary",
    "metric_columns",
    "metric_ranks",
    "metric_specs",
    "metric_table",
    "nondominated_ranks",
    "pareto_front",
    "pareto_mask",
    "permutation_null",
    "plot_hp_vs_objective",
    "plot_method_bars",
    "plot_parallel_coordinates",
    "plot_pareto_front",
    "plot_variance_vs_delta_m",
    "reference_point",
    "relative_drops",
    "seed_summary",
    "summary_table",
    "sweep_meta_of",
    "sweep_objective",
    "task_drops",
    "task_spread",
    "task_weights",
    "trials_from_folder",
    "trials_from_ray",
    "variance_performance",
    "variance_performance_from_metrics",
    "write_report",
]
