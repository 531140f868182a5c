"""Dynamic weight average (dwa): weights from the rate of loss decrease."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_tune.balancers.base import BalancerError, EpochInfo
from mtl_tune.balancers.dwa import DynamicWeightAverage

from ._helpers import make_problem, reference_grads, run_step
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_dwa_epoch_mode_known_weights():
    theta, heads, losses = make_problem(2)
    bal = DynamicWeightAverage(2, temp=2.0)
    for epoch, mean in enumerate(([1.0, 1.0], [0.5, 1.0])):
        info, _ = run_step(bal, theta, heads, losses)
        torch.testing.assert_close(info.weights, torch.ones(2, dtype=torch.float64))  # first two epochs
        bal.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.tensor(mean)))
    e = torch.tensor([math.exp(0.5 / 2), math.exp(1.0 / 2)], dtype=torch.float64)
    want_w = 2 * e / e.sum()
    info, got = run_step(bal, theta, heads, losses)
    torch.testing.assert_close(info.weights, want_w)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w)
    # the next epoch uses the ratio of the last two epochs only: [0.25/0.5, 3/1]
    bal.on_epoch_end(EpochInfo(epoch=2, train_losses=torch.tensor([0.25, 3.0])))
    e = torch.exp(torch.tensor([0.5, 3.0], dtype=torch.float64) / 2)
    torch.testing.assert_close(bal.weights, 2 * e / e.sum())


def test_dwa_epoch_mode_uses_its_own_loss_means_outside_a_trainer():
    bal, ref = DynamicWeightAverage(2), DynamicWeightAverage(2)
    batches = [[[2.0, 1.0], [4.0, 3.0]], [[1.0, 1.0], [2.0, 1.0]]]   # epoch means [3, 2], [1.5, 1]
    for epoch, epoch_batches in enumerate(batches):
        for loss in epoch_batches:
            leaf = torch.tensor(loss, requires_grad=True)
            bal.backward(leaf, [leaf])
        bal.on_epoch_end(EpochInfo(epoch=epoch))
        ref.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.tensor(epoch_batches).mean(0)))
    torch.testing.assert_close(bal.weights, ref.weights)
    e = torch.exp(torch.tensor([0.5, 0.5], dtype=torch.float64) / 2)
    torch.testing.assert_close(bal.weights, 2 * e / e.sum())
    with pytest.raises(BalancerError, match="train_losses"):
        bal.on_epoch_end(EpochInfo(epoch=2))
    with pytest.raises(BalancerError, match="positive"):
        ref.on_epoch_end(EpochInfo(epoch=2, train_losses=torch.tensor([-1.0, 1.0])))
        ref.on_epoch_end(EpochInfo(epoch=3, train_losses=torch.tensor([1.0, 1.0])))


def test_dwa_reported_weights_stay_those_of_their_step():
    """Epoch mode multiplies by a kept copy of w (no host copy per step); the epoch end replaces it, so
    the weights a step reported are not changed afterwards."""
    leaf = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    bal = DynamicWeightAverage(2)
    for epoch, mean in enumerate(([1.0, 1.0], [0.5, 1.0])):
        info = bal.backward(leaf, [leaf])
        bal.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.tensor(mean)))
    torch.testing.assert_close(info.weights, torch.ones(2, dtype=torch.float64))
    assert not torch.equal(bal.weights, info.weights)


def test_dwa_iteration_mode_window():
    w_size = 3
    bal = DynamicWeightAverage(2, temp=2.0, mode="iteration", window=w_size)
    losses = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    for call in range(1, w_size + 2):  # calls 1..W+1 keep the initial ones
        info = bal.backward(losses, [losses])
        torch.testing.assert_close(info.weights, torch.full((2,), 0.5, dtype=torch.float64))  # w/K
        torch.testing.assert_close(losses.grad, torch.full((2,), 0.5 * call, dtype=torch.float64))
    info = bal.backward(losses, [losses])   # call W+2: buffer = [1, ℓ, ℓ, ℓ, ℓ, ℓ] (one initial row left)
    older = torch.tensor([(1 + 2 + 2) / 3, 1.0], dtype=torch.float64)
    e = torch.exp((torch.tensor([2.0, 1.0], dtype=torch.float64) / older) / 2.0)
    want = 2 * e / e.sum()
    torch.testing.assert_close(info.extras["dwa_weights"], want)
    torch.testing.assert_close(info.weights, want / 2)   # the official loss is the task mean
    bal.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.tensor([9.0, 1.0])))   # ignored
    torch.testing.assert_close(bal.weights, want)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_dwa_properties(case):
    # a fresh balancer has no loss history: w = 1 on the first step (the method's own rule), linear.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("dwa")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


def test_non_finite_epoch_losses_are_refused_before_the_history_takes_them():
    """A NaN epoch mean used to enter the history and make every later weight NaN, silently."""
    theta, heads, losses = make_problem(2)
    bal = DynamicWeightAverage(2, temp=2.0)
    run_step(bal, theta, heads, losses)
    bal.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.tensor([1.0, 1.0])))
    with pytest.raises(BalancerError, match="dwa: non-finite epoch losses"):
        bal.on_epoch_end(EpochInfo(epoch=1, train_losses=torch.tensor([0.5, float("nan")])))
    bal.on_epoch_end(EpochInfo(epoch=1, train_losses=torch.tensor([0.5, 1.0])))
    info, _ = run_step(bal, theta, heads, losses)
    assert torch.isfinite(info.weights).all()
