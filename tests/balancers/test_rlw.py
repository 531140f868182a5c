"""Random loss weighting (rlw): fresh random weights on the simplex each step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers._random_rows import block_steps
from mtl_tune.balancers.rlw import RandomLossWeighting, normal_draws, sample_gamma

from ._properties import assert_gradient_scaling, assert_valid_step, balancer_step, property_cases


@pytest.mark.parametrize("dist", ["normal", "dirichlet"])
def test_rlw_weights_on_simplex_and_reproducible(dist):
    a, b, c = (RandomLossWeighting(4, distribution=dist, seed=s, concentration=0.5) for s in (7, 7, 8))
    losses = torch.ones(4)
    wa = torch.stack([a.objective(losses)[1] for _ in range(50)])
    wb = torch.stack([b.objective(losses)[1] for _ in range(50)])
    wc = torch.stack([c.objective(losses)[1] for _ in range(50)])
    assert bool((wa >= 0).all())
    torch.testing.assert_close(wa.sum(1), torch.ones(50))
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert not torch.allclose(wa, wc)
    assert wa.std(0).min() > 0.01  # actually random


def test_rlw_seed_none_follows_global_seed_and_sigma_limit():
    torch.manual_seed(123)
    a = RandomLossWeighting(3)
    torch.manual_seed(123)
    b = RandomLossWeighting(3)
    assert a.seed == b.seed
    w = RandomLossWeighting(3, sigma=1e-6, seed=0).objective(torch.ones(3))[1]
    torch.testing.assert_close(w, torch.full((3,), 1 / 3), rtol=0, atol=1e-5)


def test_rlw_normal_is_softmax_of_scaled_gaussian():
    bal = RandomLossWeighting(3, sigma=2.0, seed=11)
    z = torch.randn(3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(bal.objective(torch.ones(3, dtype=torch.float64))[1], torch.softmax(2.0 * z, 0))


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_gamma_sampler_moments(alpha):
    x = sample_gamma(alpha, 40000, torch.Generator().manual_seed(0))
    assert bool((x > 0).all())
    assert abs(x.mean().item() - alpha) < 0.03 * alpha + 0.01       # E = α
    assert abs(x.var().item() - alpha) < 0.06 * alpha + 0.01        # Var = α


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_rlw_properties(case):
    # the weights are draws of a seeded generator, independent of J: same seed → d linear in J.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("rlw", seed=3)
    assert_valid_step(*step(case.jac, case.losses), case)
    # not permutation-equivariant: fresh random weights drawn in task order (equivariant only in distribution)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 15])
@pytest.mark.parametrize("steps", [1, 7, 64])
def test_a_block_of_logits_is_the_one_step_draws(k, steps):
    # lockstep rows draw a block of steps per call (mtl_tune/balancers/_random_rows.py): torch's
    # entry-by-entry normal sampler gives the same numbers, and leaves the same state (its cached second
    # Box-Muller value included: odd K)
    block, one = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = normal_draws(block, steps, k)
    expected = torch.stack([torch.empty(k, dtype=torch.float64).normal_(generator=one) for _ in range(steps)])
    assert torch.equal(z, expected)
    assert torch.equal(block.get_state(), one.get_state())


@pytest.mark.parametrize("k,distribution,steps", [(2, "normal", None), (15, "normal", None), (16, "normal", 1),
                                                  (17, "normal", 1), (3, "dirichlet", 1)])
def test_lockstep_rows_draw_blocks_only_where_they_are_the_one_step_draws(k, distribution, steps):
    # from 16 entries torch fills a normal tensor with a sampler whose numbers depend on the call's size, and
    # the Dirichlet's rejection loop takes a data-dependent number of draws: those draw one step at a time
    rows = [RandomLossWeighting(k, distribution=distribution, seed=s, concentration=0.7) for s in (1, 2, 3)]
    alone = [RandomLossWeighting(k, distribution=distribution, seed=s, concentration=0.7) for s in (1, 2, 3)]
    many = RandomLossWeighting(k, distribution=distribution, seed=0, concentration=0.7)
    many.start_rows(rows)
    assert many.row_draws.steps == (steps or block_steps(k))
    for _ in range(4):
        w = many.weights_rows(np.ones((3, k))).weights
        for r, one in enumerate(alone):
            np.testing.assert_array_equal(w[r], one.weights_rows(np.ones(k)).weights)
    assert all(torch.equal(a.generator.get_state(), b.generator.get_state()) for a, b in zip(rows, alone))
