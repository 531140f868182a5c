"""Per (method, init) table of where each trajectory ends, and search-result loading.

Columns (CSV and Markdown): the final distance to the true front in objective space
(``pareto_distance`` of :mod:`mtl_tune.benchmarks.toy`), the first iteration at which the
trajectory came within ``tol`` of the front (empty = never), the end point x and its
losses (L₁, L₂), the last step's balancer weights, solver failures (the method's own
count) and warnings raised while it ran (for a lockstep unit: all its inits together),
CPU time per step, and the status (ok / failed with the step and error / skipped with the
reason). Nothing is dropped: a method that could not run is a row that says why.
"""

from __future__ import annotations

import csv
import math
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_tune.benchmarks.toy import INITS, pareto_distance, toy_objectives
from .engine import RunResult
from .landscape import FrontDistance

#: distance to the front (in loss space) that counts as "reached" (``iters_to_tol``)
DEFAULT_TOL = 0.05

COLUMNS = ("method", "init", "x1_0", "x2_0", "status", "iters", "final_distance", "iters_to_tol",
           "x1", "x2", "L1", "L2", "weights", "solver_failures", "warnings", "us_per_step", "cpu_us_per_step",
           "path", "reason")


def trajectory_losses(traj: np.ndarray, scale: float) -> np.ndarray:
    """(T, 2) scaled losses along a (T, 2) trajectory (the benchmark's own formula)."""
    with torch.no_grad():
        return toy_objectives(torch.from_numpy(np.ascontiguousarray(traj, dtype=np.float64)), scale).numpy()


def summarize(res: RunResult, scale: float, tol: float, dist: FrontDistance | None = None) -> dict[str, Any]:
    """One table row for a run (see the module docstring)."""
    dist = dist or FrontDistance(scale)
    x0 = res.x0 if res.x0 is not None else INITS[res.init_index]
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(method=res.label, init=res.init_index, x1_0=x0[0], x2_0=x0[1], status=res.status,
               iters=res.iters, path=res.path, reason=res.reason, warnings=res.warnings)
    if res.first_warning and not res.reason:
        row["reason"] = f"warning: {res.first_warning}"
    if res.status == "skipped" or len(res.traj) == 0:
        return row
    if res.reached is None or res.reached[0] != tol or res.end_loss is None:  # not measured in the worker
        _measure(res, scale, tol, dist)
    hit, end_loss = res.reached[1], res.end_loss
    end = res.traj[-1]
    row.update(final_distance=float(pareto_distance(end_loss, scale)),
               iters_to_tol="" if hit is None else hit,
               x1=float(end[0]), x2=float(end[1]), L1=float(end_loss[0]), L2=float(end_loss[1]),
               solver_failures="" if res.solver_failures is None else res.solver_failures,
               weights="" if res.final_weights is None else " ".join(f"{w:.4g}" for w in res.final_weights),
               us_per_step=round(1e6 * res.seconds / max(len(res.traj) - 1, 1), 1),
               cpu_us_per_step=round(1e6 * res.cpu_seconds / max(len(res.traj) - 1, 1), 1))
    return row


def summarize_all(results: Sequence[RunResult], scale: float, tol: float) -> list[dict[str, Any]]:
    dist = FrontDistance(scale)
    return [summarize(r, scale, tol, dist) for r in results]


def measure_runs(results: Sequence[RunResult], scale: float, tol: float = DEFAULT_TOL) -> None:
    """Fill each run's ``reached`` (the first iteration within ``tol`` of the front) and ``end_loss``
    (what :func:`summarize` reads), e.g. in the worker process that ran it, so that the parent does not
    do it for every run one after another."""
    dist = FrontDistance(scale)
    for res in results:
        if res.status != "skipped" and len(res.traj):
            _measure(res, scale, tol, dist)


def _measure(res: RunResult, scale: float, tol: float, dist: FrontDistance) -> None:
    losses = trajectory_losses(res.traj, scale)
    res.reached, res.end_loss = (tol, dist.first_within(losses, tol)), losses[-1]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``'s file (an .npz NumPy reads back) at zlib level 1 instead of 6: the
    trajectories compress to the same size (38 MB for the whole gallery) in a third of the time."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(array), allow_pickle=False)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], tol: float) -> str:
    """The per-(method, init) table in Markdown, then a per-method summary."""
    head = ("| method | init | status | dist. to front | iters to ≤ %g | end x | end (L1, L2) | weights | notes |"
            % tol)
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        init = f"{r['init']} ({_fmt(r['x1_0'])}, {_fmt(r['x2_0'])})"
        if r["status"] == "skipped":
            lines.append(f"| {r['method']} | {init} | skipped | | | | | | {_md(r['reason'])} |")
            continue
        hit = "never" if r["iters_to_tol"] == "" else str(r["iters_to_tol"])
        notes = r["reason"]
        if r["solver_failures"] not in ("", 0):
            notes = f"{r['solver_failures']} solver failures; {notes}"
        lines.append(f"| {r['method']} | {init} | {r['status']} | {_fmt(r['final_distance'], 3)} | {hit} | "
                     f"({_fmt(r['x1'])}, {_fmt(r['x2'])}) | ({_fmt(r['L1'])}, {_fmt(r['L2'])}) | "
                     f"{r['weights']} | {_md(notes)} |")
    lines += ["", "| method | inits reaching the front | mean final distance | CPU µs per step and init |",
              "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["status"] != "skipped"]
        if not mine:
            lines.append(f"| {method} | skipped | | |")
            continue
        reached = sum(1 for r in mine if r["final_distance"] != "" and r["final_distance"] <= tol)
        dists = [r["final_distance"] for r in mine]
        us = [r["cpu_us_per_step"] for r in mine if r["cpu_us_per_step"] != ""]
        lines.append(f"| {method} | {reached}/{len(mine)} | {np.mean(dists):.3g} | "
                     f"{np.mean(us):.0f} |" if us else f"| {method} | {reached}/{len(mine)} | | |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:200]


@dataclass
class SearchTrials:
    """Finite (val/loss1, val/loss2) points of a toy search and the method of each trial."""

    points: np.ndarray                    # (n, 2)
    methods: np.ndarray                   # (n,) method names ("" when the file has no column)
    dropped: int = 0                      # diverged / non-finite rows left out

    def of(self, method: str) -> np.ndarray:
        """The points of one method's trials (all points when the file names no methods)."""
        if not self.methods.size or not any(self.methods):
            return self.points
        return self.points[self.methods == method]


def load_search_trials(path: str | Path, scale: float) -> SearchTrials:
    """Trials of ``python -m mtl_tune.search --benchmark toy`` from its ``trials.csv``.

    Keeps rows of the toy benchmark (``benchmark`` column, when present) whose
    ``val/loss1``/``val/loss2`` are finite; diverged trials (``diverged`` = 1 or the
    trainer's 1e6 penalty values) are dropped and counted. If the file records the toy
    ``scale`` of its trials (a ``config…scale`` column) and it differs from ``scale`` we
    raise: the points would be drawn against the wrong front.
    """
    import pandas as pd

    df = pd.read_csv(path)
    pair = next((c for c in (("val/loss1", "val/loss2"), ("loss1", "loss2")) if set(c) <= set(df.columns)), None)
    if pair is None:
        raise ValueError(f"{path}: needs columns val/loss1 and val/loss2 (a toy search's trials.csv); "
                         f"found {list(df.columns)[:20]}")
    if "benchmark" in df.columns:
        df = df[df["benchmark"].astype(str) == "toy"]
        if df.empty:
            raise ValueError(f"{path}: no trial of the toy benchmark")
    for c in [c for c in df.columns if c.startswith("config") and re.split(r"[/.]", c)[-1] == "scale"]:
        seen = set(pd.to_numeric(df[c], errors="coerce").dropna().round(12))
        if seen and seen != {round(scale, 12)}:
            raise ValueError(f"{path}: trials ran with scale {sorted(seen)} but --scale is {scale}")
    n = len(df)
    if "diverged" in df.columns:
        df = df[pd.to_numeric(df["diverged"], errors="coerce").fillna(0) == 0]
    pts = df[list(pair)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    keep = np.isfinite(pts).all(axis=1) & (np.abs(pts) < 1e5).all(axis=1)
    methods = df["method"].astype(str).to_numpy() if "method" in df.columns else np.full(len(df), "", dtype=object)
    return SearchTrials(pts[keep], np.asarray(methods)[keep], n - int(keep.sum()))


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (both losses ≤, one <)."""
    pts = np.asarray(points, dtype=np.float64)
    le = (pts[None, :, :] <= pts[:, None, :]).all(-1)
    lt = (pts[None, :, :] < pts[:, None, :]).any(-1)
    return ~(le & lt).any(axis=1)
