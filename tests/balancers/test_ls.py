"""Linear scalarisation (ls): the weighted sum of the task losses."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.registry import get_balancer

from ._helpers import linear_problem, shared_grad
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_ls_is_weighted_sum():
    grad, info = shared_grad("ls", [[1.0, 0.0], [0.0, 2.0]], task_weights=[3.0, 0.5])
    assert grad.tolist() == pytest.approx([3.0, 1.0])
    assert info.weights.tolist() == [3.0, 0.5]


def test_ls_default_is_plain_sum_and_rejects_bad_weights():
    grad, _ = shared_grad("ls", [[1.0, 2.0], [3.0, -1.0]])
    assert grad.tolist() == pytest.approx([4.0, 1.0])
    with pytest.raises(ValueError, match="task_weights"):
        get_balancer("ls", 2, task_weights=[1.0, -1.0])


def test_heads_receive_weighted_gradients_for_loss_methods():
    head = torch.zeros(1, requires_grad=True, dtype=torch.float64)
    x, losses = linear_problem([[1.0], [1.0]])
    losses = losses + torch.stack([2 * head.sum(), torch.zeros((), dtype=torch.float64)])
    get_balancer("ls", 2, task_weights=[0.5, 1.0]).backward(losses, [x], [[head], []])
    assert head.grad.item() == pytest.approx(1.0)  # 0.5 · ∂(2h)/∂h


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_ls_properties(case):
    # d = Σ w_i g_i with fixed task weights (all 1 by default): linear in J.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("ls")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
