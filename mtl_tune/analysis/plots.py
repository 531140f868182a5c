"""Every figure of the analysis: Pareto fronts (2-D staircase, 3-D pairwise panels, parallel
coordinates for > 3 objectives), hyperparameter vs objective, spread vs Δm% with its fit, and
method bars over seeds.

Every function writes one PNG and returns its path; figures use the Agg canvas
(:mod:`mtl_tune.analysis._figure`). Trials are filtered by
:func:`~mtl_tune.analysis.sweep.completed_trials` unless ``include_incomplete=True``,
in which case the unfinished ones are drawn as crosses and take part in the front.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_tune.analysis._figure import Colours, minmax_columns, new_figure, save, short
from mtl_tune.analysis._figure import label_points as place_labels
from mtl_tune.analysis.correlation import CorrelationResult
from mtl_tune.analysis.pareto import as_minimisation, check_modes, pareto_mask, staircase
from mtl_tune.analysis.sweep import completed_trials, decode_hp


def plot_pareto_front(df: pd.DataFrame, metrics: list[str], modes: list[str], path: str | Path,
                      color_by: str | None = "method", title: str | None = None,
                      reference_front: np.ndarray | None = None, reference_label: str = "true front",
                      include_incomplete: bool = False) -> Path:
    """Draw all trials in objective space with the non-dominated set highlighted.

    * 2 objectives: scatter coloured by ``color_by`` (a categorical column such as
      ``method``, or a numeric one such as ``hp/c`` → colour bar); the front is drawn
      with black-edged markers joined by its attainment staircase (the boundary of the
      region it dominates).
    * 3 objectives: the three pairwise projections; a point marked as front is
      non-dominated in all three objectives (so it may look dominated in a projection).
    * more: parallel coordinates (:func:`plot_parallel_coordinates`).

    ``reference_front``: optional (m, 2) array in the metrics' own units (e.g.
    ``mtl_tune.benchmarks.toy.pareto_front()``), drawn as a thick grey curve (2-D only).
    """
    modes = check_modes(modes, len(metrics))
    if len(metrics) < 2:
        raise ValueError("a Pareto plot needs at least 2 metrics")
    if len(metrics) > 3:
        return plot_parallel_coordinates(df, metrics, modes, path, color_by=color_by, title=title,
                                         include_incomplete=include_incomplete)
    data = _plottable(df, metrics, include_incomplete)
    front = pareto_mask(data[metrics], modes) if len(data) else np.zeros(0, bool)
    colours = Colours(data[color_by] if color_by and color_by in data.columns else None)
    done = completed_trials(data).index
    if len(metrics) == 2:
        fig = new_figure(6.5, 5.0)
        ax = fig.add_subplot(1, 1, 1)
        _panel(ax, data, front, done, metrics, modes, colours, reference_front, reference_label)
        colours.colorbar(fig, ax, color_by or "")
        _legend(ax)
    else:
        fig = new_figure(15.0, 4.8)
        axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
        for ax, (i, j) in zip(axes, combinations(range(3), 2)):
            sub = [metrics[i], metrics[j]]
            _panel(ax, data, front, done, sub, [modes[i], modes[j]], colours, None, reference_label, stairs=False)
        colours.colorbar(fig, axes[-1], color_by or "")
        _legend(axes[0])
    n_front = int(front.sum())
    fig.suptitle(title or f"Pareto front: {n_front} of {len(data)} trials non-dominated")
    return save(fig, path)


def _plottable(df: pd.DataFrame, metrics: Sequence[str], include_incomplete: bool) -> pd.DataFrame:
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise KeyError(f"metrics not in the table: {missing}")
    pool = completed_trials(df, include_incomplete)
    vals = pool[list(metrics)].apply(pd.to_numeric, errors="coerce")
    return pool[np.isfinite(vals.to_numpy(dtype=float)).all(axis=1)]


def _panel(ax, data, front, done, metrics, modes, colours, reference_front, reference_label, stairs=True) -> None:
    x, y = metrics
    if reference_front is not None:
        ref = np.asarray(reference_front, dtype=float)
        ref = ref[np.argsort(ref[:, 0])]
        ax.plot(ref[:, 0], ref[:, 1], color="#72727A", lw=6, alpha=0.5, zorder=1, label=reference_label)
    unfinished = ~data.index.isin(done)
    for label, rows, colour in colours.groups(data):
        pos = data.index.get_indexer(rows.index)
        labelled = False
        for sel, kw in (((~front[pos]) & ~unfinished[pos], dict(s=18, alpha=0.45)),
                        (front[pos] & ~unfinished[pos], dict(s=60, edgecolors="black", linewidths=1.2, zorder=4)),
                        (front[pos] & unfinished[pos], dict(s=60, marker="X", edgecolors="black", zorder=4)),
                        ((~front[pos]) & unfinished[pos], dict(s=30, marker="x", alpha=0.6))):
            if not sel.any():
                continue
            per_row = isinstance(colour, np.ndarray) and colour.ndim == 2
            ckw = {"c": colour[sel]} if per_row else {"color": colour}
            ax.scatter(rows[x].to_numpy()[sel], rows[y].to_numpy()[sel], label=None if labelled else label,
                       **ckw, **kw)
            labelled = labelled or bool(label)
    if stairs and front.sum() > 1:
        pts = data[[x, y]].to_numpy(dtype=float)[front]
        sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
        st = staircase(pts * sign) * sign
        ax.plot(st[:, 0], st[:, 1], color="black", lw=1.2, zorder=3, label="Pareto front")
    ax.set_xlabel(f"{short(x)} ({'↓' if modes[0] == 'min' else '↑'})")
    ax.set_ylabel(f"{short(y)} ({'↓' if modes[1] == 'min' else '↑'})")
    ax.grid(alpha=0.3)


def _legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best", framealpha=0.8)


def plot_parallel_coordinates(df: pd.DataFrame, metrics: list[str], modes: list[str], path: str | Path,
                              color_by: str | None = "method", title: str | None = None,
                              include_incomplete: bool = False) -> Path:
    """Parallel coordinates of trials over any number of objectives, front in bold.

    Each axis is min–max scaled over the plotted trials and oriented so that **up is
    better** (``"min"`` axes flipped); the tick labels give the raw best/worst values.
    """
    modes = check_modes(modes, len(metrics))
    data = _plottable(df, metrics, include_incomplete)
    raw = data[metrics].to_numpy(dtype=float)
    front = pareto_mask(raw, modes) if len(data) else np.zeros(0, bool)
    z = minmax_columns(raw, [m == "max" for m in modes]) if len(data) else raw
    colours = Colours(data[color_by] if color_by and color_by in data.columns else None)
    fig = new_figure(max(6.0, 1.1 * len(metrics) + 2), 5.0)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(metrics))
    for label, rows, colour in colours.groups(data):
        pos = data.index.get_indexer(rows.index)
        for k, p in enumerate(pos):
            c = colour[k] if isinstance(colour, np.ndarray) and colour.ndim == 2 else colour
            ax.plot(xs, z[p], color=c, lw=2.0 if front[p] else 0.7, alpha=0.95 if front[p] else 0.3,
                    zorder=3 if front[p] else 2)
        if label:  # proxy so the legend shows the colour at full strength
            ax.plot([], [], color=colour, lw=2.0, label=label)
    for i in xs:
        ax.axvline(i, color="grey", lw=0.6)
        if len(data):
            col = raw[:, i]
            best, worst = (np.nanmax(col), np.nanmin(col)) if modes[i] == "max" else (np.nanmin(col), np.nanmax(col))
            ax.annotate(f"{best:.4g}", (i, 1.0), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7)
            ax.annotate(f"{worst:.4g}", (i, 0.0), xytext=(0, -11), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(xs, [short(m) for m in metrics], rotation=30 if len(metrics) > 5 else 0, ha="right" if len(metrics) > 5 else "center")
    ax.set_yticks([0, 1], ["worst", "best"])
    ax.set_ylim(-0.08, 1.08)
    colours.colorbar(fig, ax, color_by or "")
    _legend(ax)
    fig.suptitle(title or f"Parallel coordinates: {int(front.sum())} of {len(data)} trials non-dominated (bold)")
    return save(fig, path)


def front_in_min_space(df: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str]) -> np.ndarray:
    """The non-dominated rows of ``df[metrics]`` as a minimisation array (helper for overlays)."""
    y = as_minimisation(df[list(metrics)], modes)
    return y[pareto_mask(y, ["min"] * y.shape[1])]


def plot_hp_vs_objective(df: pd.DataFrame, hp: Sequence[str], objective: str, mode: str, path: str | Path,
                         color_by: str | None = "method", log_x: bool | Sequence[bool] | None = None,
                         include_incomplete: bool = False, title: str | None = None,
                         highlight: pd.Series | None = None, highlight_label: str = "non-dominated") -> Path:
    """One panel per hyperparameter column: objective vs its value, best trial starred.

    ``highlight`` (a boolean Series aligned with ``df``): star these trials instead of the
    single best on ``objective`` — for a multi-objective sweep, its non-dominated trials, so
    no objective is singled out as "the" ranking.

    Numeric hyperparameters go on a log axis when ``log_x`` says so (default: when all
    values are > 0 and span more than two decades). Categorical / JSON-list values are
    drawn as categories (strings).
    """
    hp = list(hp)
    if not hp:
        raise ValueError("no hyperparameter columns to plot")
    data = completed_trials(df, include_incomplete)
    data = data[np.isfinite(pd.to_numeric(data[objective], errors="coerce").to_numpy(dtype=float))]
    cols = min(3, len(hp))
    rows = int(np.ceil(len(hp) / cols))
    fig = new_figure(4.6 * cols, 3.8 * rows)
    colours = Colours(data[color_by] if color_by and color_by in data.columns else None)
    logs = [log_x] * len(hp) if log_x is None or isinstance(log_x, bool) else list(log_x)
    for i, name in enumerate(hp):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = data[name] if name in data.columns else pd.Series(np.nan, index=data.index)
        numeric = pd.to_numeric(values, errors="coerce")
        is_num = numeric.notna().any() and numeric[values.notna()].notna().all()
        if is_num:
            x = numeric
        else:
            cats = sorted(values.map(lambda v: str(decode_hp(v))).unique())
            x = values.map(lambda v: cats.index(str(decode_hp(v)))).astype(float)
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=7)
        for label, part, colour in colours.groups(data):
            ckw = {"c": colour} if isinstance(colour, np.ndarray) and np.ndim(colour) == 2 else {"color": colour}
            ax.scatter(x.loc[part.index], part[objective], s=18, alpha=0.7, label=label if i == 0 else None, **ckw)
        if len(data):
            if highlight is not None:
                starred = highlight.reindex(data.index).fillna(False).astype(bool)
                stars, star_label = data.index[starred.to_numpy()], highlight_label
            else:
                obj = data[objective].astype(float)
                stars, star_label = [obj.idxmin() if mode == "min" else obj.idxmax()], "best"
            # clip_on=False + margins: a star at the edge of the data is drawn whole, not halved by the axis
            ax.scatter(x.loc[stars], data.loc[stars, objective], marker="*", s=220, color="gold",
                       edgecolors="black", zorder=5, clip_on=False, label=star_label if i == 0 else None)
            ax.margins(x=0.06, y=0.1)
        use_log = logs[i]
        if use_log is None and is_num:
            pos = numeric.dropna()
            use_log = bool(len(pos) and (pos > 0).all() and pos.max() / pos.min() > 100)
        if use_log and is_num:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"{short(objective)} ({'↓' if mode == 'min' else '↑'})")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.axes[0].legend(fontsize=7)
    fig.suptitle(title or f"{short(objective)} vs hyperparameters ({len(data)} completed trials)")
    return save(fig, path)


def plot_variance_vs_delta_m(result: CorrelationResult, path: str | Path, title: str | None = None,
                             label_points: bool = True) -> Path:
    """Scatter of the cross-task spread vs performance with the least-squares line and the stats."""
    t = result.table
    x = t[f"task_{result.spread}"].to_numpy(dtype=float)
    y = t[result.performance].to_numpy(dtype=float)
    fig = new_figure(6.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x, y, s=30, color="tab:blue", zorder=3)
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, slope * xs + intercept, color="tab:red", lw=1.5,
                label=f"fit: {slope:.2f}·x {intercept:+.2f}")
    pc, sc = result.pearson_ci, result.spearman_ci
    text = (f"Pearson r = {result.pearson_r:.2f} (p = {result.pearson_p:.2g}, {result.ci_level:.0%} CI {pc[0]:.2f}…{pc[1]:.2f})\n"
            f"Spearman ρ = {result.spearman_rho:.2f} (p = {result.spearman_p:.2g}, CI {sc[0]:.2f}…{sc[1]:.2f}), n = {result.n}")
    ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax.set_xlabel(f"cross-task {'std' if result.spread == 'std' else 'variance'} of per-task drops (%)")
    ax.set_ylabel("Δm% (↓)" if result.performance == "delta_m" else "mean per-task drop (%) (↓)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "Task-performance spread vs average performance")
    if label_points:  # last: placed against the final layout so that names do not overlap
        place_labels(ax, x, y, [str(n) for n in t.index])
    return save(fig, path)


def plot_method_bars(df: pd.DataFrame, value: str, path: str | Path, by: str = "method", mode: str | None = None,
                     title: str | None = None, seed: str | None = "seed") -> Path:
    """Bar per group: mean of ``value`` over distinct seeds with ±1 std error bars (ddof = 1).

    With a ``seed`` column, runs of the same seed are averaged first and ``n`` counts
    distinct seeds (two runs of seed 0 are one seed, not a spread); without one, every row
    counts. Groups with one seed get no error bar. Bars are sorted best first when ``mode`` is given.
    """
    from mtl_tune.analysis.summary import distinct_seed_stats

    if seed and seed in df.columns:
        stats, unit = distinct_seed_stats(df, value, by, seed), " seed"
    else:
        vals = pd.to_numeric(df[value], errors="coerce")
        g = vals.groupby(df[by].astype(str))
        stats, unit = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}), ""
    stats = stats[stats["n"] > 0]
    if mode in ("min", "max"):
        stats = stats.sort_values("mean", ascending=mode == "min")
    fig = new_figure(max(5.0, 0.6 * len(stats) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(stats))
    ax.bar(pos, stats["mean"], yerr=stats["std"].fillna(0.0), capsize=4, color="tab:blue", alpha=0.8)
    ticks = [f"{name}\n(n={n}{unit}{'s' if unit and n != 1 else ''})" for name, n in zip(stats.index, stats["n"])]
    ax.set_xticks(pos, ticks, rotation=30 if len(stats) > 5 else 0, ha="right" if len(stats) > 5 else "center")
    arrow = {"min": " (↓)", "max": " (↑)"}.get(mode or "", "")
    ax.set_ylabel(f"{short(value)}{arrow}, mean ± std")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"{short(value)} by {by}")
    return save(fig, path)
