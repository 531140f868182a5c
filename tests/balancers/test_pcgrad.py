"""PCGrad: projection of conflicting gradients, in a random order per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.pcgrad import order_draws, pcgrad_coefficients, random_orders, shuffle, swap_modulus

from ._helpers import shared_grad
from ._properties import assert_gradient_scaling, assert_valid_step, balancer_step, property_cases


def test_pcgrad_removes_the_conflicting_component():
    # g1 = (1, 0), g2 = (−1, 1): ⟨g1, g2⟩ = −1 < 0
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    g1_pc = g1 - (g1 @ g2) / (g2 @ g2) * g2          # (0.5, 0.5)
    g2_pc = g2 - (g2 @ g1) / (g1 @ g1) * g1          # (0, 1)
    grad, _ = shared_grad("pcgrad", [g1.tolist(), g2.tolist()])
    assert grad.tolist() == pytest.approx((g1_pc + g2_pc).tolist())
    assert float(g1_pc @ g2) == pytest.approx(0.0)


def test_pcgrad_keeps_non_conflicting_gradients():
    grad, _ = shared_grad("pcgrad", [[1.0, 0.0], [1.0, 1.0]])
    assert grad.tolist() == pytest.approx([2.0, 1.0])


def test_pcgrad_coefficients_mean_reduction_and_zero_gradient():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    c = pcgrad_coefficients(a, [[0, 1, 2]] * 3, "mean")
    assert c.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_pcgrad_is_reproducible_per_seed():
    rows = np.random.default_rng(3).normal(size=(4, 6)).tolist()
    a, _ = shared_grad("pcgrad", rows, seed=7)
    b, _ = shared_grad("pcgrad", rows, seed=7)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_pcgrad_properties(case):
    # projection coefficients depend on cosines and norm ratios only; same seed → same order.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("pcgrad")
    assert_valid_step(*step(case.jac, case.losses), case)
    # not permutation-equivariant: the random projection order is drawn per task index
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 22, 23])
def test_random_orders_are_the_randperm_draws(k):
    # K ≤ 22 replays randperm's shuffle from one bounded draw per row (random_orders' docstring), K = 23
    # calls randperm: the orders and the generator states after must be torch.randperm's exactly
    mine = [torch.Generator().manual_seed(s) for s in (0, 5, 17)]
    theirs = [torch.Generator().manual_seed(s) for s in (0, 5, 17)]
    for _ in range(3):
        orders = random_orders(mine, k)
        expected = [[torch.randperm(k, generator=g).tolist() for _ in range(k)] for g in theirs]
        assert orders.tolist() == expected
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 22, 23])
def test_a_block_of_orders_is_the_one_step_draws(k):
    # lockstep rows draw a block of steps per call (mtl_tune/balancers/_random_rows.py): the same orders,
    # and the generator where the one-step draws leave it
    block, one = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    orders = order_draws(block, k, steps=7)
    assert orders.shape == (7, k, k)
    assert orders.tolist() == [order_draws(one, k)[0].tolist() for _ in range(7)]
    assert torch.equal(block.get_state(), one.get_state())


@pytest.mark.parametrize("k", [2, 3, 6, 22])
def test_orders_are_our_fisher_yates_on_bounded_draws(k):
    # the documented shuffle, written out in Python: it needs only random_'s draws, not torch.randperm
    generator = torch.Generator().manual_seed(9)
    orders = order_draws(generator, k, steps=3)
    draws = torch.empty(3, k, k - 1, dtype=torch.int64).random_(0, swap_modulus(k),
                                                                  generator=torch.Generator().manual_seed(9))
    for step, per_task in zip(orders, draws.tolist()):
        for order, swaps in zip(step, per_task):
            p = list(range(k))
            for s, u in enumerate(swaps):
                t = s + u % (k - s)
                p[s], p[t] = p[t], p[s]
            assert order.tolist() == p
    np.testing.assert_array_equal(shuffle(np.zeros((4, k - 1), dtype=np.int64), k), np.tile(np.arange(k), (4, 1)))
