"""Base-class plumbing shared by every balancer: registry errors, loss-shape checks, clipping, Gram blocks."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.registry import UnknownNameError, get_balancer

from ._helpers import linear_problem, shared_grad


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid methods: .*cagrad.*ls"):
        get_balancer("nope", 2)


def test_wrong_loss_shape_is_a_clear_error():
    x, losses = linear_problem([[1.0], [1.0]])
    with pytest.raises(BalancerError, match=r"shape \(3,\)"):
        get_balancer("ls", 3).backward(losses, [x])


def test_max_norm_clips_the_shared_gradient_after_writing_it():
    grad, _ = shared_grad("ls", [[3.0, 0.0], [0.0, 4.0]], max_norm=1.0)
    assert torch.linalg.norm(grad).item() == pytest.approx(1.0)
    assert grad.tolist() == pytest.approx([0.6, 0.8])


def test_blocked_gram_equals_the_full_product():
    from mtl_tune.balancers.base import gram

    j = torch.randn(4, 1000)
    full = j.double() @ j.double().T
    torch.testing.assert_close(gram(j, block=64), full)
    torch.testing.assert_close(gram(j), full)


def test_state_like_starts_moves_and_refuses_another_shape():
    from mtl_tune.balancers._common import state_like

    jac = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(state_like(None, jac, "m", "state"), torch.zeros_like(jac))
    moved = state_like(torch.ones(3, 5), jac, "m", "state")          # a float32 checkpoint
    assert moved.dtype == torch.float64 and torch.equal(moved, torch.ones_like(jac))
    kept = torch.full_like(jac, 2.0)
    assert state_like(kept, jac, "m", "state") is kept                # no copy when it already fits
    with pytest.raises(BalancerError, match=r"m: .*\(3, 5\), the state \(3, 4\)"):
        state_like(torch.zeros(3, 4), jac, "m", "state")
