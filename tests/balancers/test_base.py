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


def test_all_finite_one_reduction_and_its_overflow_case():
    from mtl_tune.balancers._common import all_finite

    assert all_finite(torch.ones(5))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([1.0, float("inf"), -float("inf")]))
    # finite float32 entries whose sum overflows: the elementwise pass decides, not the sum
    big = torch.full((4,), 3e38, dtype=torch.float32)
    assert not torch.isfinite(big.sum()) and all_finite(big)


@pytest.mark.parametrize("method", ["mgda", "nashmtl"])
def test_nonfinite_task_gradient_with_finite_losses_is_an_error(method):
    # sqrt at 0 has an infinite derivative: the loss is finite, its gradient is not
    x = torch.zeros(3, requires_grad=True)
    losses = torch.stack([x.sum() ** 2 + 1.0, torch.sqrt(x[0]) + 1.0])
    with pytest.raises(BalancerError, match=f"{method}: non-finite per-task gradient"):
        get_balancer(method, 2, max_norm=None, gradient_path="jacobian").backward(losses, [x])
