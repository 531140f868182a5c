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


def test_host_softmax_vjp_for_two_tasks_is_torchs_bit_for_bit():
    """after_rows forms J_softmax(ξ)ᵀδ on the host for K = 2 (torch for larger K): the same bits."""
    from mtl_tune.balancers.famo import _softmax_vjp2_host, softmax_vjp

    rng = np.random.default_rng(0)
    for _ in range(500):
        shape = (int(rng.integers(1, 8)), 2) if rng.random() < 0.8 else (2,)
        z = torch.softmax(torch.from_numpy((rng.normal(size=shape) * 4).astype(np.float32)), dim=-1)
        delta = (rng.normal(size=shape) * 10.0 ** rng.integers(-9, 1)).astype(np.float32)
        delta[rng.random(shape) < 0.1] = 0.0
        want = softmax_vjp(z, torch.from_numpy(delta)).numpy()
        got = _softmax_vjp2_host(z.numpy(), delta)
        assert got.dtype == want.dtype and np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))


def test_row_checks_caches_and_loaded_state_take_the_general_paths_alike():
    """A batch with a row below the floor takes the per-row check (the others: no check) and its other
    rows get what they get in a clean batch; a loaded checkpoint (new logits and prev_losses in a
    balancer whose caches hold the old ones) continues exactly as the balancer it came from."""
    floor = [-2.0, -21.0]
    clean, mixed = (get_balancer("famo", 2, w_lr=0.05, min_losses=floor) for _ in range(2))
    clean.start_rows([get_balancer("famo", 2, min_losses=floor) for _ in range(3)])
    mixed.start_rows([get_balancer("famo", 2, min_losses=floor) for _ in range(3)])
    good = np.array([[1.0, 2.0], [0.5, 3.0], [2.0, 0.7]])
    bad = good.copy()
    bad[1, 0] = -2.5
    a, b = clean.weights_rows(good), mixed.weights_rows(bad)
    assert not a.failed.any() and b.failed.tolist() == [False, True, False] and "min_losses" in b.reason_of((1,))
    assert np.array_equal(a.weights[[0, 2]], b.weights[[0, 2]])
    a, b = clean.after_rows(good * 0.99), mixed.after_rows(bad * 0.99)
    assert b.failed.tolist() == [False, True, False] and np.array_equal(a.weights[[0, 2]], b.weights[[0, 2]])

    source, target = (get_balancer("famo", 2, w_lr=0.05, min_losses=floor) for _ in range(2))
    target.weights_rows(np.array([1.5, 1.5]))                      # caches for target's own state
    source.weights_rows(np.array([1.0, 2.0]))
    source.after_rows(np.array([0.9, 1.99]))
    source.weights_rows(np.array([0.9, 1.99]))                     # prev_losses set, then saved
    target.load_state_dict(saved_and_loaded(source.state_dict()))
    target.min_losses.fill_(-3.0)                                  # an in-place change of the floor...
    source.min_losses.fill_(-3.0)                                  # ...in both
    new = np.array([0.8, 1.98])
    assert np.array_equal(target.after_rows(new).weights, source.after_rows(new).weights)
    assert torch.equal(target.logits, source.logits)
    assert np.array_equal(target.weights_rows(new).weights, source.weights_rows(new).weights)
    moved = get_balancer("famo", 2, min_losses=floor)
    moved.weights_rows(new)
    moved.min_losses.fill_(-3.0)                                   # the cached host floor is stale now
    assert np.array_equal(moved.weights_rows(new).weights,
                          get_balancer("famo", 2, min_losses=[-3.0, -3.0]).weights_rows(new).weights)
