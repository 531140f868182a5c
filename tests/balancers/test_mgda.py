"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.mgda import mgda_weights

from ._helpers import shared_grad


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
