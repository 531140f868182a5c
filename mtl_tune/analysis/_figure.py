"""Figure plumbing shared by the plotting modules.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never
through ``pyplot``: no global state, no GUI backend needed on a headless cluster node, and
importing this package does not change the backend of a notebook that imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


def new_figure(width: float = 6.5, height: float = 5.0, **kw: Any) -> Figure:
    kw.setdefault("layout", "constrained")  # multi-panel figures: labels never overlap
    fig = Figure(figsize=(width, height), **kw)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` (PNG unless the suffix says otherwise), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


def short(name: str) -> str:
    """Axis label of a metric key: drop the split prefix only when it is the usual ``val/``."""
    return name[4:] if name.startswith("val/") else name


def _label(v: Any) -> str:
    return "n/a" if pd.isna(v) else str(v)


class Colours:
    """Maps the ``color_by`` column to colours.

    Numeric columns with more than 6 distinct values (e.g. ``hp/c``) → viridis with a
    colour bar, rows without a value in grey; anything else → one tab10/tab20 colour per
    category (missing values form the category "n/a").
    """

    MISSING = (0.6, 0.6, 0.6, 1.0)

    def __init__(self, series: pd.Series | None) -> None:
        self.series = series
        self.numeric = (series is not None and pd.api.types.is_numeric_dtype(series)
                        and not pd.api.types.is_bool_dtype(series) and series.nunique() > 6)
        self.categories: list[str] = []
        if series is None:
            return
        if self.numeric:
            finite = pd.to_numeric(series, errors="coerce")
            self.norm = Normalize(float(np.nanmin(finite)), float(np.nanmax(finite)))
            self.cmap = colormaps["viridis"]
        else:
            self.categories = sorted(series.map(_label).unique())
            cmap = colormaps["tab10" if len(self.categories) <= 10 else "tab20"]
            self.lookup = {c: cmap(i % cmap.N) for i, c in enumerate(self.categories)}

    def groups(self, df: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame, Any]]:
        """(label, rows, colour) per category; numeric columns: one group with an (n, 4) colour array."""
        if self.series is None:
            return [(None, df, "tab:blue")]
        if self.numeric:
            vals = pd.to_numeric(self.series.loc[df.index], errors="coerce").to_numpy(dtype=float)
            colours = self.cmap(self.norm(vals))
            colours[~np.isfinite(vals)] = self.MISSING
            return [(None, df, colours)]
        keys = self.series.loc[df.index].map(_label)
        return [(c, df[keys == c], self.lookup[c]) for c in self.categories if (keys == c).any()]

    def colorbar(self, fig: Figure, ax: Any, label: str) -> None:
        if self.numeric:
            from matplotlib.cm import ScalarMappable

            fig.colorbar(ScalarMappable(norm=self.norm, cmap=self.cmap), ax=ax, label=label)


def minmax_columns(arr: np.ndarray, better_up: Sequence[bool]) -> np.ndarray:
    """Scale each column to [0, 1] (constant columns → 0.5), flipped so that 1 = better."""
    lo, hi = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = np.where(hi > lo, (arr - lo) / span, 0.5)
    flip = ~np.asarray(better_up, dtype=bool)
    z[:, flip] = 1.0 - z[:, flip]
    return z


#: label offsets (points) tried in order around a marker: right, left, above, below, then further out
_LABEL_OFFSETS = [(4, 3), (4, -9), (-4, 3), (-4, -9), (4, 11), (-4, 11), (4, -17), (-4, -17), (10, 19), (-10, 19),
                  (10, -25), (-10, -25), (16, 27), (-16, 27), (16, -33), (-16, -33)]


def label_points(ax, xs: Sequence[float], ys: Sequence[float], names: Sequence[str], fontsize: float = 7) -> list:
    """Annotate each point with its name at the first offset whose text box overlaps no label
    placed before it and no other marker (greedy; many crowded points may still need the
    farthest offset). Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()  # final layout first: offsets are judged in display space
    inv = fig.dpi / 72.0
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    placed: list[tuple[float, float, float, float]] = []
    texts = []
    for (px, py), name in zip(pts, names):
        width, height = 0.62 * fontsize * len(str(name)) * inv, 1.2 * fontsize * inv
        choice = _LABEL_OFFSETS[0]
        for dx, dy in _LABEL_OFFSETS:
            x0 = px + dx * inv - (width if dx < 0 else 0.0)
            y0 = py + dy * inv
            box = (x0, y0, x0 + width, y0 + height)
            clash = any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)
            hits_marker = any(box[0] - 2 < qx < box[2] + 2 and box[1] - 2 < qy < box[3] + 2 for qx, qy in pts)
            if not clash and not hits_marker:
                choice = (dx, dy)
                break
        dx, dy = choice
        x0 = px + dx * inv - (width if dx < 0 else 0.0)
        placed.append((x0, py + dy * inv, x0 + width, py + dy * inv + height))
        texts.append(ax.annotate(str(name), ax.transData.inverted().transform((px, py)), xytext=(dx, dy),
                                 textcoords="offset points", fontsize=fontsize, ha="right" if dx < 0 else "left",
                                 va="bottom"))
    return texts
