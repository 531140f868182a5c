"""What the analysis asks of a sweep's benchmark, by name: its class when this installation
knows it, and its true Pareto front when it has one (drawn under the trials in front plots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtl_tune.registry import UnknownNameError, benchmark_class


def bare_metric(key: str) -> str:
    """``val/seg/miou`` → ``seg/miou`` (drop the split prefix when there is one)."""
    head, _, rest = key.partition("/")
    return rest if rest and (head in ("val", "test", "train") or head.startswith("test_last")) else key


def registered_benchmark(name: str | None) -> type | None:
    """The registered benchmark class, or None for no name or a name this installation does not
    know (a sweep of a plug-in benchmark opened elsewhere)."""
    if not name:
        return None
    try:
        return benchmark_class(name)
    except UnknownNameError:
        return None


def known_front_points(benchmark: str | None, metrics: Sequence[str],
                       config: Mapping[str, Any] | None = None) -> np.ndarray | None:
    """The benchmark's true front in the columns ``metrics`` (keys with or without a split
    prefix), or None when it has none or its front is over other metrics."""
    cls = registered_benchmark(benchmark)
    known = cls.known_front(config) if cls is not None else None
    if known is None:
        return None
    names, points = known
    wanted = [bare_metric(m) for m in metrics]
    if sorted(wanted) != sorted(names) or len(set(wanted)) != len(wanted):
        return None
    return np.asarray(points)[:, [list(names).index(m) for m in wanted]]
