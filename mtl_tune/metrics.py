"""Metric specifications, Δm% and per-task relative drops (docs/benchmarks.md#delta-m-and-mean-rank)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    """One reported metric of a benchmark.

    ``name``: key without split prefix (``"seg/miou"``); ``task``: the task it measures;
    ``higher_is_better``: its direction; ``baseline``: the single-task (STL) value used
    for Δm% (``None`` when the benchmark has none); ``primary``: the task's headline
    metric (one per task), used as that task's objective in multi-objective search.
    """

    name: str
    task: str
    higher_is_better: bool
    baseline: float | None = None
    primary: bool = False

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"


def relative_drop(value: float, spec: MetricSpec) -> float:
    """100·(−1)^δ (M − B)/B: positive = worse than the baseline (δ = 1 if higher is better)."""
    if spec.baseline is None:
        raise ValueError(f"metric {spec.name!r} has no baseline")
    sign = -1.0 if spec.higher_is_better else 1.0
    return 100.0 * sign * (value - spec.baseline) / spec.baseline


def delta_m(values: Mapping[str, float], specs: Sequence[MetricSpec]) -> float:
    """Δm% = mean over metrics of the relative drop (Nash-MTL / FAMO definition).

    Every spec must have a baseline and a value; negative Δm% = better than STL.
    """
    drops = [relative_drop(float(values[s.name]), s) for s in specs]
    return float(sum(drops) / len(drops)) if drops else math.nan


def task_scores(values: Mapping[str, float], specs: Sequence[MetricSpec], tasks: Sequence[str]) -> list[float]:
    """Per-task mean relative drop (PIVRG's scores; positive = the task is behind STL)."""
    out = []
    for task in tasks:
        drops = [relative_drop(float(values[s.name]), s) for s in specs if s.task == task]
        if not drops:  # 0.0 would say "equal to STL" for a task nothing measured (a misspelt name)
            raise ValueError(f"task {task!r} has no metric among {sorted({s.task for s in specs})}")
        out.append(sum(drops) / len(drops))
    return out
