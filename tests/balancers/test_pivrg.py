"""PIVRG: FairGrad (α = 2) with performance priorities from per-task scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError, EpochInfo
from mtl_tune.balancers.fairgrad import FairGrad
from mtl_tune.balancers.pivrg import PIVRG, performance_priorities

from ._helpers import random_jacobian, written_direction
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_pivrg_equal_scores_equals_fairgrad_alpha2():
    jac = random_jacobian(3, 10, 6)
    pv = PIVRG(3, bound=1.8, mintemp=20.0)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([7.0, 7.0, 7.0])))
    torch.testing.assert_close(written_direction(pv, jac), written_direction(FairGrad(3, alpha=2.0), jac))


def test_pivrg_priorities_respect_bound():
    rng = np.random.default_rng(0)
    for bound in (1.1, 1.8, 2.0, 5.0):
        for spread in (0.1, 10.0, 1e3):
            s = rng.normal(size=6) * spread
            p = performance_priorities(s, bound, mintemp=1.0)
            assert math.isclose(p.sum(), 6.0, rel_tol=1e-12)
            assert p.max() / p.min() <= bound * (1 + 1e-12)
            assert np.argmax(p) == np.argmax(s)  # the task furthest behind STL gets the most weight
    # a large spread saturates the bound exactly; a small one is tempered by mintemp (T = 10)
    p = performance_priorities(np.array([0.0, 100.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], 2.0)
    p = performance_priorities(np.array([0.0, 1.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], math.exp(0.1))


def test_pivrg_solution_uses_priorities():
    # orthogonal unit gradients: x_i = sqrt(p_i / x_i) ⇒ x_i = p_i^{1/3}
    pv = PIVRG(2, bound=2.0, mintemp=1.0, max_norm=None)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([0.0, 50.0])))
    _, w = pv.combine(torch.eye(2, dtype=torch.float64), torch.ones(2))
    np.testing.assert_allclose(w.numpy() / 2, pv.task_priorities() ** (1 / 3), rtol=1e-9)


def test_pivrg_validation_and_state():
    with pytest.raises(ValueError, match="bound"):
        PIVRG(3, bound=1.0)
    pv = PIVRG(3)
    with pytest.raises(BalancerError):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([1.0, float("nan"), 0.0])))
    with pytest.warns(RuntimeWarning, match="no per-task scores"):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=None))
    pv.on_epoch_end(EpochInfo(epoch=1, scores=torch.tensor([3.0, -2.0, 10.0])))
    other = PIVRG(3)
    other.load_state_dict(pv.state_dict())
    np.testing.assert_array_equal(other.task_priorities(), pv.task_priorities())


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_pivrg_properties(case):
    # without scores the priorities are equal: FairGrad with α = 2, x → a^{−2α/(α+1)} x = a^{−4/3} x,
    # d = K Σ x_i g_i → a^{(1−α)/(1+α)} d = a^{−1/3} d.
    # Newton to relative residual 1e-10 (the solver's tol): the weights move by ≲ cond·1e-10 with
    # cond ≲ 100 on these well-posed problems, hence 1e-8
    step = balancer_step("pivrg")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-8)
    assert_gradient_scaling(step, case, degree=-1 / 3, weight_degree=-4 / 3, rtol=1e-8)
