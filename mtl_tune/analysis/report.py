"""Build a Markdown or HTML report (tables + PNGs) for one or many sweeps.

The report is a list of blocks (heading, paragraph, table, image) rendered by
:func:`render_markdown` / :func:`render_html`; :func:`build_report` decides the content
from each sweep's ``sweep.json`` (objective, metric specs) and the trial table:

1. trial counts by status and method, and the errors of failed trials;
2. the best trial of every method on the search objective, and mean ± std over seeds of
   each method's best configuration (bar chart);
3. the Pareto front over the objective metrics (or, for a single-objective search, over
   the benchmark's per-task primary metrics), its plot and the hypervolume per method
   with the benchmark's fixed reference point;
4. hyperparameter-vs-objective plots per method;
5. with STL baselines: Δm% and mean rank of the methods' best trials, and the
   variance–performance correlation over completed trials.
"""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtl_tune.analysis._benchmarks import known_front_points, registered_benchmark
from mtl_tune.analysis._sweep_files import SweepWarning
from mtl_tune.analysis.correlation import task_weights, permutation_null, variance_performance_from_metrics
from mtl_tune.analysis.hypervolume import hypervolume_table, reference_point
from mtl_tune.analysis.pareto import pareto_front, pareto_mask
from mtl_tune.analysis.plots import plot_hp_vs_objective, plot_method_bars, plot_pareto_front, plot_variance_vs_delta_m
from mtl_tune.analysis.ranking import metric_table, summary_table
from mtl_tune.analysis.summary import degenerate_notes, method_front_summary
from mtl_tune.analysis.sweep import (
    completed_trials,
    expand_list_hps,
    hp_columns,
    iter_sweeps,
    metric_specs,
    sweep_objective,
)
from mtl_tune.metrics import MetricSpec


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "h3" | "p" | "table" | "img"
    content: Any


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "sweep"


def objective_of(df: pd.DataFrame, meta: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The sweep's objective from ``sweep.json``; else ``val/delta_m`` (min) or the first ``val/`` metric (min)."""
    metrics, modes = sweep_objective(meta) if meta else ([], [])
    metrics_modes = [(m, d) for m, d in zip(metrics, modes) if m in df.columns]
    missing = [m for m in metrics if m not in df.columns]
    if metrics and not metrics_modes:  # another objective than the sweep's would be reported as its result
        raise ValueError(f"the sweep's objective {metrics} has no column in its trials (no trial reported it, or the "
                         "table lost the column)")
    if missing:
        warnings.warn(f"the sweep's objective {metrics} without {missing}, which no column holds: analysed on "
                      f"{[m for m, _ in metrics_modes]} only", SweepWarning, stacklevel=2)
    if metrics_modes:
        return [m for m, _ in metrics_modes], [d for _, d in metrics_modes]
    if "val/delta_m" in df.columns:
        return ["val/delta_m"], ["min"]
    vals = [c for c in df.columns if c.startswith("val/") and pd.api.types.is_numeric_dtype(df[c])]
    if not vals:
        raise ValueError("cannot tell the objective: no sweep.json objective and no val/ metric column")
    return [vals[0]], ["min"]


def report_split(df: pd.DataFrame, specs: Sequence[MetricSpec]) -> str | None:
    """The split reported as final numbers: ``test_last*`` (papers' protocol), else ``test``, else ``val``."""
    if not specs:
        return None
    prefixes = sorted({c.split("/", 1)[0] for c in df.columns if "/" in c}, reverse=True)
    for want in [p for p in prefixes if p.startswith("test_last")] + ["test", "val"]:
        if all(f"{want}/{s.name}" in df.columns for s in specs):
            return want
    return None


def best_per_method(df: pd.DataFrame, objective: str, mode: str) -> pd.DataFrame:
    """The single best completed trial of each method on ``objective``."""
    done = completed_trials(df)
    done = done[np.isfinite(pd.to_numeric(done[objective], errors="coerce").to_numpy(dtype=float))]
    if done.empty:
        return done
    idx = done.groupby("method")[objective].idxmin() if mode == "min" else done.groupby("method")[objective].idxmax()
    return done.loc[idx.to_numpy()].sort_values(objective, ascending=mode == "min")


def config_key(df: pd.DataFrame) -> pd.Series:
    """A string identifying each trial's hyperparameter configuration (seed excluded)."""
    cols = hp_columns(df)
    if not cols:
        return pd.Series("default", index=df.index)
    keys = ["|".join("" if pd.isna(v) else str(v) for v in row) for row in df[cols].itertuples(index=False)]
    return pd.Series(keys, index=df.index, dtype=object)


def best_config_seeds(df: pd.DataFrame, objective: str, mode: str) -> pd.DataFrame:
    """All seeds of each method's best configuration (best = best mean objective over seeds)."""
    done = completed_trials(df).copy()
    if done.empty:
        return done
    done["config"] = config_key(done)
    means = done.groupby(["method", "config"])[objective].mean().reset_index()
    means = means.sort_values(objective, ascending=mode == "min").drop_duplicates("method")
    keep = set(zip(means["method"], means["config"]))
    return done[[(m, c) in keep for m, c in zip(done["method"], done["config"])]]


def scalar_ranking(df: pd.DataFrame, meta: dict[str, Any], metrics: list[str], modes: list[str],
                   rank_by: str | None) -> tuple[str, str] | None:
    """The scalar (metric, mode) that may rank trials: the declared objective when it is scalar,
    else only what the user asked for with ``rank_by`` (``metric`` or ``metric:min|max``)."""
    if rank_by:
        key, _, mode = rank_by.partition(":")
        if key not in df.columns:
            raise KeyError(f"--rank-by {key!r} is not a column of the trial table")
        if not mode:
            spec = {s.name: s for s in metric_specs(meta)}.get(key.split("/", 1)[-1])
            mode = spec.mode if spec else dict(zip(metrics, modes)).get(key, "min")
        if mode not in ("min", "max"):
            raise ValueError(f"--rank-by {rank_by!r}: the direction must be min or max")
        return key, mode
    return (metrics[0], modes[0]) if len(metrics) == 1 else None


def _rows_of_phase(df: pd.DataFrame, phase: str) -> pd.DataFrame:
    return df[df["phase"].astype(str) == phase] if "phase" in df.columns else df.iloc[0:0]


def _search_phase(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The Optuna search's trials of a sweep, and what else it holds ("" when nothing): seed re-runs
    and preference-sweep trials are other experiments — pooled, a method's budget, front and
    hypervolume counted them (comparison.csv does not)."""
    if "phase" not in df.columns:
        return df, ""
    phase = df["phase"].astype(str)
    in_search = phase.isin(["search", "", "nan"])  # (an empty cell reads "nan")
    search = df[in_search]
    others = {p: int(n) for p, n in phase[~in_search].value_counts().items()}
    described = ", ".join(f"{n} {'seed re-run' if p == 'seeds' else 'preference-sweep' if p == 'prefs' else p} "
                          f"trial(s)" for p, n in sorted(others.items()))
    return search, described


def _sweep_blocks(name: str, df: pd.DataFrame, meta: dict[str, Any], out: Path, include_incomplete: bool,
                  rank_by: str | None = None) -> list[Block]:
    blocks: list[Block] = [Block("h2", f"Sweep {name}")]
    bench = meta.get("benchmark") or (df["benchmark"].iloc[0] if "benchmark" in df.columns and len(df) else "")
    metrics, modes = objective_of(df, meta)
    blocks.append(Block("p", f"Benchmark **{bench}**, {len(df)} trials, objective "
                             + ", ".join(f"`{m}` ({d})" for m, d in zip(metrics, modes))
                             + (" (multi-objective: methods are compared by hypervolume and non-dominated counts)"
                                if len(metrics) > 1 else "")
                             + (f", created {meta['created']}" if meta.get("created") else "") + "."))
    if "status" in df.columns:
        counts = pd.crosstab(df["method"], df["status"])
        counts["completed"] = completed_trials(df).groupby("method").size().reindex(counts.index).fillna(0).astype(int)
        blocks += [Block("h3", "Trials by status"), Block("table", counts)]
        failed = df[df["error"].astype(str).str.len() > 0]
        if len(failed):
            errs = failed[["method", "trial_id", "status", "error"]].reset_index(drop=True)
            errs["error"] = errs["error"].str.replace(r"\s+", " ", regex=True).str.slice(0, 160)
            blocks += [Block("p", f"{len(failed)} trial(s) reported an error (first 10):"), Block("table", errs.head(10))]
    if "solver_failures" in df.columns and pd.to_numeric(df["solver_failures"], errors="coerce").fillna(0).sum() > 0:
        sf = df.groupby("method")["solver_failures"].sum().to_frame("solver failures (sum)")
        blocks += [Block("p", "Balancer solver failures were counted:"), Block("table", sf)]
    slug = _slug(name)
    everything = df
    df, reruns = _search_phase(df)
    if reruns:
        blocks.append(Block("p", f"Fronts, hypervolumes, best trials and hyperparameter plots use the {len(df)} search "
                                 f"trials only ({reruns}: their summaries are the search's comparison.csv and "
                                 "preferences.csv); the bars add the seed re-runs of each method's best configuration."))
    scalar = scalar_ranking(df, meta, metrics, modes, rank_by)
    if scalar is not None:
        obj, mode = scalar
        best = best_per_method(df, obj, mode)
        if len(best):
            asked = len(metrics) > 1
            cols = ["method", "trial_id", "seed", obj] + [c for c in hp_columns(best) if best[c].notna().any()]
            blocks += [Block("h3", f"Best trial per method on `{obj}` ({mode})"
                                   + (" — a scalar view asked for with --rank-by" if asked else "")),
                       Block("table", best[[c for c in cols if c in best.columns]].reset_index(drop=True))]
            seeds = best_config_seeds(pd.concat([df, _rows_of_phase(everything, "seeds")]), obj, mode)
            n_seeds = int(seeds["seed"].nunique()) if "seed" in seeds else 1
            spread = "mean ± std over distinct seeds" if n_seeds > 1 else "one seed only: no spread"
            png = plot_method_bars(seeds, obj, out / f"{slug}_bars.png", mode=mode,
                                   title=f"{name}: best configuration per method, {spread}")
            blocks.append(Block("img", png))
    blocks += _pareto_blocks(name, df, meta, bench, metrics, modes, out, include_incomplete)
    blocks += _hp_blocks(name, df, metrics, modes, scalar, out, include_incomplete)
    blocks += _baseline_blocks(name, df, meta, scalar, out)
    return blocks


def _hp_blocks(name, df, metrics, modes, scalar, out, include_incomplete) -> list[Block]:
    """Hyperparameter-vs-objective plots: the scalar objective with its best trial starred, or, for a
    multi-objective sweep, every declared objective with the sweep's non-dominated trials starred."""
    blocks: list[Block] = []
    slug = _slug(name)
    if scalar is not None:
        targets, highlight = [scalar], None
    else:
        targets = list(zip(metrics, modes))
        pool = completed_trials(df, include_incomplete)
        pool = pool[np.isfinite(pool[metrics].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)).all(1)]
        highlight = pd.Series(pareto_mask(pool[metrics], modes) if len(pool) else [], index=pool.index, dtype=bool)
    for method, part in completed_trials(df, include_incomplete).groupby("method"):
        part = expand_list_hps(part)
        hps = [c for c in hp_columns(part) if part[c].nunique(dropna=True) > 1]
        if not hps or len(part) < 2:
            continue
        blocks.append(Block("h3", f"Hyperparameters of {method}"))
        for obj, mode in targets:
            suffix = "" if len(targets) == 1 else f"_{_slug(obj)}"
            png = plot_hp_vs_objective(part, hps, obj, mode, out / f"{slug}_hp_{_slug(method)}{suffix}.png",
                                       color_by=None, highlight=highlight, include_incomplete=include_incomplete,
                                       title=f"{name} / {method}: {obj} vs hyperparameters"
                                             + (" (★ = on the sweep's Pareto front)" if highlight is not None else ""))
            blocks.append(Block("img", png))
    return blocks


def _pareto_blocks(name, df, meta, bench, metrics, modes, out, include_incomplete) -> list[Block]:
    specs = metric_specs(meta)
    if len(metrics) < 2:
        split = metrics[0].split("/", 1)[0]
        prim = [s for s in specs if s.primary] or _registry_primary(bench)
        metrics = [f"{split}/{s.name}" for s in prim]
        modes = [s.mode for s in prim]
        if len(metrics) < 2 or not all(m in df.columns for m in metrics):
            return []
    front = pareto_front(df, metrics, modes, include_incomplete)
    slug = _slug(name)
    ref_front = known_front_points(bench, metrics, (meta.get("args") or {}).get("config"))
    png = plot_pareto_front(df, metrics, modes, out / f"{slug}_pareto.png", title=f"{name}: Pareto front",
                            reference_front=ref_front, include_incomplete=include_incomplete)
    cols = ["method", "trial_id", "seed"] + list(metrics) + hp_columns(front)
    blocks = [Block("h3", "Pareto front over " + ", ".join(f"`{m}` ({d})" for m, d in zip(metrics, modes))),
              Block("img", png), Block("table", front[[c for c in cols if c in front.columns]].reset_index(drop=True))]
    try:
        ref = reference_point(metrics, bench, specs)
    except ValueError as err:
        return blocks + [Block("p", f"Hypervolume not computed: {err}")]
    summary = method_front_summary(df, metrics, modes, ref, include_incomplete=include_incomplete)
    blocks += [Block("h3", "Per-method hypervolume and non-dominated counts"),
               Block("p", "Hypervolume (exact) with the fixed reference point "
                          + ", ".join(f"`{m}` = {r:g}" for m, r in zip(metrics, ref))
                          + "; `n_front` = the method's own non-dominated trials, `on_global_front` = its trials "
                            "on the front of all trials, `beats_reference` = trials better than the reference "
                            "in every objective, `seeds` = distinct seeds:"), Block("table", summary)]
    blocks += [Block("p", note) for note in degenerate_notes(summary, ref, metrics)]
    if "seed" in df.columns:
        per_seed = hypervolume_table(df, metrics, modes, ref, by=["method", "seed"], include_incomplete=include_incomplete)
        per_seed = per_seed.drop(index="(all)")
        per_seed["method"] = [g[0] for g in per_seed.index]
        per_seed["seed"] = [g[1] for g in per_seed.index]
        if per_seed["method"].duplicated().any():
            png = plot_method_bars(per_seed, "hypervolume", out / f"{slug}_hv_bars.png", mode="max",
                                   title=f"{name}: hypervolume of each method's trials per seed, mean ± std over seeds")
            blocks.append(Block("img", png))
    return blocks


def _registry_primary(bench: str) -> list[MetricSpec]:
    cls = registered_benchmark(bench)  # unknown benchmark: no primary metrics, the Pareto section is skipped
    return [s for s in cls.metrics if s.primary] if cls is not None else []


def _baseline_blocks(name, df, meta, scalar, out) -> list[Block]:
    specs = [s for s in metric_specs(meta) if s.baseline is not None]
    split = report_split(df, specs)
    if not specs or split is None:
        return []
    blocks: list[Block] = []
    best = best_per_method(df, *scalar) if scalar is not None else df.iloc[:0]  # a ranking needs a scalar
    if len(best) >= 2:
        table = metric_table(best, specs, split, index="method")
        blocks += [Block("h3", f"Δm% and mean rank of each method's best trial (`{split}` metrics)"),
                   Block("table", summary_table(table, specs).sort_values("delta_m"))]
    done = completed_trials(df)
    if len(done) >= 3:
        table = metric_table(done, specs, split, index="trial_id")
        table = table[np.isfinite(table.to_numpy(dtype=float)).all(axis=1)]
        if len(table) >= 3:
            res = variance_performance_from_metrics(table, specs, n_boot=2000)
            null = permutation_null(res.table[list(dict.fromkeys(s.task for s in specs))], task_weights(specs),
                                    n_perm=2000)
            png = plot_variance_vs_delta_m(res, out / f"{_slug(name)}_variance.png", label_points=len(table) <= 25,
                                           title=f"{name}: cross-task spread vs Δm% over completed trials")
            stats = {**res.as_dict(), "null (independent tasks): mean r": null["null_mean_r"],
                     "null: 95% interval low": null["null_low"], "null: 95% interval high": null["null_high"],
                     "null: P(r_null >= r_obs)": null["p_value"], "null: permutations": null["n_perm"]}
            summary = pd.Series(stats, name="value").to_frame()
            summary.index.name = "statistic"
            blocks += [Block("h3", "Variance–performance correlation (completed trials)"), Block("img", png),
                       Block("table", summary)]
    return blocks


def build_report(df: pd.DataFrame, out: str | Path, include_incomplete: bool = False,
                 rank_by: str | None = None) -> list[Block]:
    """Blocks for every sweep in ``df`` (loaded with :func:`~mtl_tune.analysis.load_sweep`); PNGs go to ``out``.

    Each sweep is summarised on the objectives and directions of its ``sweep.json``: a
    multi-objective sweep by per-method hypervolume and non-dominated counts; a scalar
    ranking only for a scalar objective or the one asked for with ``rank_by``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = [Block("h1", "mtl_tune sweep analysis")]
    names = []
    for name, part, meta in iter_sweeps(df):
        names.append(name)
        blocks += _sweep_blocks(name, part, meta, out, include_incomplete, rank_by)
    if len(names) > 1:
        blocks += _cross_sweep_blocks(df, include_incomplete, rank_by)
    return blocks


def _cross_sweep_blocks(df: pd.DataFrame, include_incomplete: bool, rank_by: str | None) -> list[Block]:
    """Scalar sweeps: best objective per method; multi-objective sweeps: hypervolume per method."""
    best_rows, hv_rows = [], []
    for name, part, meta in iter_sweeps(df):
        part = _search_phase(part)[0]  # the search's trials, as in each sweep's own section
        metrics, modes = objective_of(part, meta)
        scalar = scalar_ranking(part, meta, metrics, modes, rank_by)
        if scalar is not None:
            obj, mode = scalar
            for _, r in best_per_method(part, obj, mode).iterrows():
                best_rows.append({"sweep": f"{name}: {obj} ({mode})", "method": r["method"], "best": r[obj]})
        if len(metrics) > 1:
            try:
                ref = reference_point(metrics, meta.get("benchmark"), metric_specs(meta))
            except ValueError:
                continue
            summary = method_front_summary(part, metrics, modes, ref, include_incomplete).drop(index="(all)")
            label = f"{name}: HV at ({', '.join(f'{r:g}' for r in ref)})"
            hv_rows += [{"sweep": label, "method": m, "hypervolume": v} for m, v in summary["hypervolume"].items()]
    blocks: list[Block] = []
    if best_rows:
        blocks += [Block("h2", "All sweeps: best scalar objective per method"),
                   Block("table", pd.DataFrame(best_rows).pivot_table(index="method", columns="sweep", values="best"))]
    if hv_rows:
        blocks += [Block("h2", "All sweeps: hypervolume per method (multi-objective sweeps)"),
                   Block("table", pd.DataFrame(hv_rows).pivot_table(index="method", columns="sweep",
                                                                    values="hypervolume"))]
    return blocks


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    show_index = not isinstance(df.index, pd.RangeIndex)
    head = ([str(df.index.name or "")] if show_index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in zip(df.index, df.itertuples(index=False)):
        cells = ([cell(idx)] if show_index else []) + [cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(blocks: Sequence[Block], out: str | Path) -> str:
    """Markdown text of the blocks (images linked relative to ``out``)."""
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(b.kind[1]) + " " + str(b.content))
        elif b.kind == "p":
            parts.append(str(b.content))
        elif b.kind == "table":
            parts.append(_md_table(b.content))
        elif b.kind == "img":
            rel = Path(b.content).relative_to(Path(out)) if Path(b.content).is_relative_to(Path(out)) else Path(b.content)
            parts.append(f"![{rel.stem}]({rel.as_posix()})")
    return "\n\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown the blocks use (`code`, **bold**) into tags (headings too)."""
    text = html.escape(text)
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", re.sub(r"`(.+?)`", r"<code>\1</code>", text))


def render_html(blocks: Sequence[Block], out: str | Path) -> str:
    """A standalone HTML page of the blocks (images linked relative to ``out``)."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_html(str(b.content))}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(str(b.content))}</p>")
        elif b.kind == "table":
            body.append(b.content.to_html(float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="tbl"))
        elif b.kind == "img":
            rel = Path(b.content).relative_to(Path(out)) if Path(b.content).is_relative_to(Path(out)) else Path(b.content)
            body.append(f'<img src="{html.escape(rel.as_posix())}" alt="{html.escape(rel.stem)}" style="max-width:100%">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table.tbl{border-collapse:collapse;font-size:12px}"
             ".tbl td,.tbl th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>mtl_tune sweep analysis</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(df: pd.DataFrame, out: str | Path, fmt: str = "md", include_incomplete: bool = False,
                 rank_by: str | None = None) -> Path:
    """Build and write ``report.md`` / ``report.html`` (and its PNGs) into ``out``; returns the report path."""
    if fmt not in ("md", "html"):
        raise ValueError(f"format must be 'md' or 'html', got {fmt!r}")
    out = Path(out)
    blocks = build_report(df, out, include_incomplete, rank_by)
    text = render_markdown(blocks, out) if fmt == "md" else render_html(blocks, out)
    path = out / f"report.{fmt}"
    path.write_text(text, encoding="utf-8")
    return path
