"""toy.preference_fronts: the front measures on known point sets (the runs themselves are the toy engine's)."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_tune.benchmarks.toy import pareto_front
from toy.preference_fronts import METHODS, front_metrics, specs_for


def test_points_on_the_front_measure_as_on_it():
    ends = pareto_front(0.1, 5)                     # the two ends and three points between, on the front
    m = front_metrics(ends, 0.1)
    assert m["max dist."] < 1e-3 and m["spread"] == pytest.approx(1.0) and m["distinct"] == 5
    assert 0.5 < m["HV"] < 1.0                       # five points cover part of the sampled front's HV
    one = front_metrics(np.repeat(ends[2:3], 4, axis=0), 0.1)
    assert one["spread"] == 0.0 and one["distinct"] == 1 and one["HV"] < m["HV"]
    off = front_metrics(ends + [0.0, 1.0], 0.1)     # one unit worse in L₂: off the front
    assert off["mean dist."] > 0.1 and off["HV"] < m["HV"]


def test_every_compared_method_sweeps_its_preference_argument():
    specs = specs_for(list(METHODS), [[0.5, 1.5], [1.5, 0.5]], 10, 0.1)
    assert len(specs) == 2 * len(METHODS)
    for spec in specs:
        arg = "task_weights" if spec.name == "ls" else "preferences"
        assert spec.hparams[arg] in ([0.5, 1.5], [1.5, 0.5])
