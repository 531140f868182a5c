"""Linear scalarisation (ls): the weighted sum of the task losses."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.registry import get_balancer

from ._helpers import linear_problem, shared_grad


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
