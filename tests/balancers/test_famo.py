"""FAMO: loss-based weights from softmax logits updated after each optimizer step."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.famo import famo_logit_grad, famo_weights
from mtl_tune.registry import get_balancer

from ._helpers import saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_famo_weights_sum_to_one_and_favour_small_losses():
    w = famo_weights(torch.zeros(2), torch.tensor([1.0, 4.0]), torch.zeros(2))
    assert w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx([0.8, 0.2], rel=1e-6)  # ∝ 1/ℓ with equal logits


def test_famo_moves_weight_to_the_task_whose_loss_falls_slowest():
    k = 2
    balancer = get_balancer("famo", k, gamma=0.0, w_lr=0.1)
    x = torch.zeros(1, requires_grad=True)
    for _ in range(20):
        losses = torch.stack([x.sum() + 2.0, x.sum() + 2.0])
        balancer.backward(losses, [x])
        # task 0 halves its loss each step, task 1 only drops by 1%
        balancer.after_optimizer_step(torch.tensor([1.0, 1.98]))
    z = torch.softmax(balancer.logits.detach(), 0)
    assert z[1] > 0.6 > z[0]


def test_famo_logit_gradient_formula():
    logits = torch.tensor([0.3, -0.2, 0.1])
    g = famo_logit_grad(logits, torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 1.5]), torch.zeros(3))
    delta = torch.log(torch.tensor([2.0, 2.0, 2.0])) - torch.log(torch.tensor([1.0, 2.0, 1.5]))
    jac = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), logits)
    torch.testing.assert_close(g, jac.T @ delta)


def test_famo_state_round_trip_and_min_loss_error():
    a = get_balancer("famo", 2, w_lr=0.05)
    x = torch.zeros(1, requires_grad=True)
    a.backward(torch.stack([x.sum() + 1, x.sum() + 3]), [x])
    a.after_optimizer_step(torch.tensor([0.5, 2.9]))
    b = get_balancer("famo", 2, w_lr=0.05)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(BalancerError, match="min_losses"):
        a.backward(torch.stack([x.sum() - 1, x.sum() + 3]), [x])


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_famo_properties(case):
    # w from the (zero, equal) initial logits and the losses only: linear in J, symmetric.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("famo")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


# ---------------------------------------------------------------------------- batch-first rule, bit for bit
@pytest.mark.parametrize("k,gamma", [(2, 0.0), (2, 1e-3), (5, 1e-3)])
def test_rows_in_lockstep_are_their_one_row_balancers_bit_for_bit(k, gamma):
    """FAMO's logit gradient is a difference of two float32 logs of nearly equal losses: the rows of the
    toy must round every step exactly as a balancer alone does (weights, logits, Adam state)."""
    floor = [-2.1] + [-21.0] * (k - 1)
    make = lambda: get_balancer("famo", k, gamma=gamma, w_lr=0.025, min_losses=floor)  # noqa: E731
    rows = [make() for _ in range(4)]
    alone = [make() for _ in rows]
    many = make()
    many.start_rows(rows)
    rng = np.random.default_rng(k)
    losses = rng.uniform(0.5, 3.0, size=(len(rows), k))
    for _ in range(60):
        new = losses * (1 - rng.uniform(0, 1e-3, size=losses.shape))   # small decreases: δ ≈ 1e-4
        w_many = many.weights_rows(losses).weights
        after = many.after_rows(new).weights
        for r, bal in enumerate(alone):
            assert np.array_equal(w_many[r], bal.weights_rows(losses[r]).weights)
            assert np.array_equal(after[r], bal.after_rows(new[r]).weights)
            assert torch.equal(many.logits[r], bal.logits)
        losses = new
    for r, bal in enumerate(alone):
        assert torch.equal(many.w_optimizer.state[many.logits]["exp_avg_sq"][r],
                           bal.w_optimizer.state[bal.logits]["exp_avg_sq"])


def test_checkpoint_after_steps_continues_identically():
    a = get_balancer("famo", 3, gamma=1e-3, w_lr=0.05)
    x = torch.zeros(1, requires_grad=True)
    rng = np.random.default_rng(0)

    def step(bal, base):
        bal.backward(torch.stack([x.sum() + float(v) for v in base]), [x])
        bal.after_optimizer_step(torch.from_numpy(base * 0.99))
        return bal.logits.detach().clone()

    for _ in range(5):
        step(a, rng.uniform(1, 3, size=3))
    b = get_balancer("famo", 3, gamma=1e-3, w_lr=0.05)
    b.load_state_dict(saved_and_loaded(a.state_dict()))
    for _ in range(5):
        base = rng.uniform(1, 3, size=3)
        assert torch.equal(step(a, base), step(b, base))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_is_refused_before_it_reaches_the_logits(bad):
    """One NaN batch must not leave FAMO's logits NaN for good (they were, silently): the step and the
    post-step update both refuse it before touching the state, and training can go on."""
    a = get_balancer("famo", 2, w_lr=0.05)
    x = torch.zeros(1, requires_grad=True)
    a.backward(torch.stack([x.sum() + 1, x.sum() + 3]), [x])
    a.after_optimizer_step(torch.tensor([0.5, 2.9]))
    kept = {k: v.clone() for k, v in a.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(BalancerError, match="famo: non-finite task loss"):
        a.backward(torch.stack([x.sum() + 1, x.sum() + bad]), [x])
    a.backward(torch.stack([x.sum() + 1, x.sum() + 3]), [x])
    with pytest.raises(BalancerError, match="famo: non-finite task loss"):
        a.after_optimizer_step(torch.tensor([0.5, bad]))
    for k, v in kept.items():
        assert torch.equal(a.state_dict()[k], v), k
    a.after_optimizer_step(torch.tensor([0.5, 2.9]))
    assert torch.isfinite(a.logits).all()
