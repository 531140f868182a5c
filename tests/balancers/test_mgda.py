"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.mgda import mgda_weights

from ._helpers import shared_grad
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_mgda_orthogonal_unit_gradients_give_midpoint():
    grad, info = shared_grad("mgda", [[1.0, 0.0], [0.0, 1.0]])
    assert info.weights.tolist() == pytest.approx([1.0, 1.0])  # ½ each, ×K
    assert grad.tolist() == pytest.approx([1.0, 1.0])


def test_mgda_two_task_closed_form_and_dominated_case():
    # g1 = (1, 0), g2 = (0, 2): γ = (4 − 0)/(1 + 4) = 0.8 on g1 → min-norm point (0.8, 0.4)
    w = mgda_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.8, 0.2])
    # g2 = 2 g1: the min-norm point of the segment is g1 itself
    w = mgda_weights(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1.0, 0.0])


def test_mgda_direction_decreases_every_task():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 20)) + 2.0  # positively correlated tasks → a common descent direction exists
    grad, _ = shared_grad("mgda", g.tolist())
    assert np.all(g @ grad.numpy() > 0)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("normalization,degree", [("none", 1), ("loss", 1), ("loss+", 0), ("norm", 0)])
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_mgda_properties(case, normalization, degree):
    # the min-norm point of the hull of g_i/n_i, weights mapped back to raw gradients (w_i/n_i):
    # n_i = 1 or ℓ_i (fixed by J → aJ): the point scales with J, d is linear (degree 1, weights 0);
    # n_i = ‖g_i‖ or ℓ_i‖g_i‖: the normalised problem is scale-free, d is too (degree 0, weights −1).
    # a Gram-matrix solve: rounding of eps·cond(A), cond(A) ≲ 1e3 for these K ≤ 4 independent rows
    # with norms ~3× apart, so ≲ 1e-13; 1e-10 leaves a margin
    step = balancer_step("mgda", normalization=normalization)
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=degree, weight_degree=degree - 1, rtol=1e-10)
