"""The two pictures every MTL paper draws for the toy problem (docs/benchmarks.md#toy-figures).

* **Parameter space** (CAGrad's ``toy.py``): contour lines of the mean loss ½(L₁ + L₂) of
  the losses the methods optimise, the exact Pareto set {(x₁, x₂*(x₁))} as a grey line,
  the inits as black dots and each trajectory as points coloured red → yellow with time.
* **Objective space** (Nash-MTL / FAMO ``plot_2d_pareto``): the exact front as a thick grey
  line (``#72727A``, width 8), each trajectory's (L₁, L₂) as small points coloured along
  ``magma_r`` from 0.1 (early, light) to 0.6 (late, dark), the inits as big black dots.
  Optionally a toy search's trials on top.

Both carry a colour bar keying the colours to the iteration (the step count when all runs
in the figure have the same length, otherwise start → end of each run).

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state), so they can be
drawn in worker processes and in tests without a display.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mtl_tune.benchmarks.toy import pareto_front, pareto_set
from .engine import RunResult
from .landscape import loss_grid
from .report import SearchTrials, non_dominated, trajectory_losses

FRONT_COLOUR = "#72727A"
MAX_POINTS = 1500   # per trajectory; 35 000 points per run would only make the PNGs slow
#: per trajectory in the gallery, whose panels are ~260 px wide: 1 500 points there are ~600 000
#: markers in one figure (~3 s of drawing) and look the same as 400
GALLERY_POINTS = 400
LIM = 10.0


def subsample(traj: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Every k-th row (first and last always kept) so that at most ``max_points`` remain."""
    step = max(1, int(np.ceil(len(traj) / max_points)))
    idx = np.unique(np.r_[np.arange(0, len(traj), step), len(traj) - 1])
    return traj[idx]


def draw_parameter_space(ax: Axes, runs: Sequence[RunResult], grid: tuple[np.ndarray, ...],
                         title: str = "", colorbar: bool = True, fontsize: int = 10,
                         max_points: int = MAX_POINTS) -> None:
    x1, x2, losses = grid
    cs = ax.contour(x1, x2, losses.mean(-1), levels=20, cmap="viridis", linewidths=1.0)
    if colorbar:
        ax.figure.colorbar(cs, ax=ax, fraction=0.046, pad=0.02, label="½(L₁ + L₂)")
    ps = pareto_set()
    ax.plot(ps[:, 0], ps[:, 1], color=FRONT_COLOUR, lw=4, label="Pareto set", zorder=2)
    for r in runs:
        if len(r.traj) == 0:
            continue
        t = subsample(r.traj, max_points)
        ax.scatter(t[:, 0], t[:, 1], c=matplotlib.colormaps["autumn"](np.linspace(0, 1, len(t))), s=3,
                   zorder=3, rasterized=True)
        ax.scatter(*t[0], color="black", s=40, zorder=4)
        ax.scatter(*t[-1], marker="*", color="black", s=70, zorder=5)
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(-LIM, LIM)
    ax.set_xlabel("x₁", fontsize=fontsize)
    ax.set_ylabel("x₂", fontsize=fontsize)
    if title:
        ax.set_title(title, fontsize=fontsize + 2)


def draw_objective_space(ax: Axes, runs: Sequence[RunResult], scale: float, title: str = "",
                         trials: np.ndarray | None = None, fontsize: int = 10, legend: bool = True,
                         max_points: int = MAX_POINTS) -> None:
    front = pareto_front(scale)
    ax.plot(front[:, 0], front[:, 1], lw=8, color=FRONT_COLOUR, label="Pareto front", zorder=1)
    cmap = matplotlib.colormaps["magma_r"]
    for r in runs:
        if len(r.traj) == 0:
            continue
        loss = trajectory_losses(subsample(r.traj, max_points), scale)
        ax.scatter(loss[:, 0], loss[:, 1], c=cmap(np.linspace(0.1, 0.6, len(loss))), s=5, zorder=3,
                   rasterized=True)
    inits = [trajectory_losses(r.traj[:1], scale)[0] for r in runs if len(r.traj)]
    if inits:
        pts = np.array(inits)
        ax.scatter(pts[:, 0], pts[:, 1], color="black", s=80, zorder=4, label="Initial point")
    if trials is not None and len(trials):
        ax.scatter(trials[:, 0], trials[:, 1], marker="x", color="tab:blue", s=18, lw=1, zorder=5,
                   label="search trials")
    ax.set_xlabel("L₁", fontsize=fontsize)
    ax.set_ylabel("L₂", fontsize=fontsize)
    ax.spines[["top", "right"]].set_visible(False)
    if legend:
        ax.legend(fontsize=fontsize - 2, loc="lower right", frameon=False)
    if title:
        ax.set_title(title, fontsize=fontsize + 2)


def _iteration_key(fig: Figure, axes, cmap_name: str, low: float, high: float, steps: int | None, **kw) -> None:
    """A colour bar saying which colour is which iteration (points are coloured by their step,
    start → end); ``steps=None``: runs of different lengths, so the key is in fractions."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    cmap = ListedColormap(matplotlib.colormaps[cmap_name](np.linspace(low, high, 256)))
    sm = ScalarMappable(norm=Normalize(0, steps or 1), cmap=cmap)
    bar = fig.colorbar(sm, ax=axes, **kw)
    if steps:
        bar.set_label("iteration")
    else:
        bar.set_ticks([0, 1], labels=["start", "end"])
        bar.set_label("iteration (of each run)")


def skip_note(runs: Sequence[RunResult]) -> str | None:
    """The reason a method did not run on the toy (shared by its runs), or None if any run ran.

    A skipped method still gets its gallery panels, with this reason written in them, so the
    figure says why it is empty (ConsMTL: the toy has no task heads)."""
    reasons = {r.reason for r in runs if r.status == "skipped"}
    if not runs or len(reasons) != 1 or any(r.status != "skipped" for r in runs):
        return None
    return f"skipped: {reasons.pop()}"


def draw_note(ax: Axes, note: str, width: int = 34, fontsize: int = 8) -> None:
    """``note`` wrapped in a white box across the middle of ``ax``."""
    ax.text(0.5, 0.5, textwrap.fill(note, width), transform=ax.transAxes, ha="center", va="center",
            fontsize=fontsize, zorder=10, bbox={"facecolor": "white", "edgecolor": FRONT_COLOUR, "alpha": 0.9})


def plot_method(label: str, runs: Sequence[RunResult], scale: float, path: Path,
                trials: np.ndarray | None = None, grid: tuple[np.ndarray, ...] | None = None) -> Path:
    """``<label>.png``: parameter space (left) and objective space (right) for one method;
    ``trials``: search points to draw on the front (this method's, see :class:`SearchTrials`)."""
    grid = grid or loss_grid(LIM, 250, scale)
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_p, ax_o = fig.subplots(1, 2)
    draw_parameter_space(ax_p, runs, grid, title=f"{label}: parameter space")
    draw_objective_space(ax_o, runs, scale, title=f"{label}: objective space (scale {scale:g})", trials=trials)
    lengths = {len(r.traj) - 1 for r in runs if len(r.traj)}
    steps = lengths.pop() if len(lengths) == 1 else None
    _iteration_key(fig, ax_p, "autumn", 0.0, 1.0, steps, fraction=0.046, pad=0.02)
    _iteration_key(fig, ax_o, "magma_r", 0.1, 0.6, steps, fraction=0.046, pad=0.02)
    note = skip_note(runs)
    if note:
        draw_note(ax_p, note, width=60, fontsize=10)
    fig.savefig(path, dpi=110, facecolor="white")
    return path


def plot_gallery(groups: dict[str, Sequence[RunResult]], scale: float, path: Path, ncols: int = 6) -> Path:
    """All methods side by side: parameter space above objective space, ``ncols`` methods per row."""
    gallery_figure(groups, scale, ncols).savefig(path, dpi=80, facecolor="white")
    return path


def gallery_figure(groups: dict[str, Sequence[RunResult]], scale: float, ncols: int = 6) -> Figure:
    """The figure of :func:`plot_gallery`; a skipped method's panel carries its reason (:func:`skip_note`)."""
    labels = list(groups)
    ncols = max(1, min(ncols, len(labels)))
    nrows = 2 * int(np.ceil(len(labels) / ncols))
    grid = loss_grid(LIM, 150, scale)
    fig = Figure(figsize=(3.3 * ncols, 3.2 * nrows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    for k, label in enumerate(labels):
        r, c = 2 * (k // ncols), k % ncols
        runs = groups[label]
        status = {x.status for x in runs}
        title = label if status == {"ok"} else f"{label} ({'/'.join(sorted(status))})"
        draw_parameter_space(axes[r, c], runs, grid, title=title, colorbar=False, fontsize=8,
                             max_points=GALLERY_POINTS)
        draw_objective_space(axes[r + 1, c], runs, scale, fontsize=8, legend=False, max_points=GALLERY_POINTS)
        note = skip_note(runs)
        if note:
            draw_note(axes[r, c], note, fontsize=6)
    for k in range(len(labels), (nrows // 2) * ncols):
        axes[2 * (k // ncols), k % ncols].set_axis_off()
        axes[2 * (k // ncols) + 1, k % ncols].set_axis_off()
    # one key for the figure: methods run different step counts, so colours are fractions of each run
    _iteration_key(fig, axes[0, :].tolist(), "autumn", 0.0, 1.0, None, location="right", shrink=0.9)
    _iteration_key(fig, axes[1, :].tolist(), "magma_r", 0.1, 0.6, None, location="right", shrink=0.9)
    return fig


def plot_search_overlay(trials: SearchTrials, scale: float, path: Path,
                        end_points: np.ndarray | None = None) -> Path:
    """The true front, a toy search's trials by method (non-dominated ones ringed) and,
    optionally, the trajectories' end points — how close a hyperparameter search gets."""
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    front = pareto_front(scale)
    ax.plot(front[:, 0], front[:, 1], lw=8, color=FRONT_COLOUR, label="true Pareto front")
    pts = trials.points
    for k, method in enumerate(dict.fromkeys(trials.methods.tolist())):
        mine = pts[trials.methods == method]
        ax.scatter(mine[:, 0], mine[:, 1], marker="xo^sv<>dP*"[k % 10], color=f"C{k % 10}", s=20,
                   label=f"{method or 'search'} trials ({len(mine)})")
    if len(pts):
        nd = pts[non_dominated(pts)]
        ax.scatter(nd[:, 0], nd[:, 1], facecolors="none", edgecolors="tab:red", s=70,
                   label=f"non-dominated trials ({len(nd)})")
    if end_points is not None and len(end_points):
        ax.scatter(end_points[:, 0], end_points[:, 1], marker="*", color="black", s=40,
                   label="trajectory end points")
    ax.set_xlabel("L₁")
    ax.set_ylabel("L₂")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, facecolor="white")
    return path
