"""MoDo: λ ← Π_Δ(λ − γ(Aλ + ρλ)), d = Gᵀλ (Chen et al., NeurIPS'23), one batch per step.

Parity: TorchJD 0.18's ``MoDoWeighting`` (adapted from the official code) fed the same Gram matrix
gives the same λ sequence; no convention differs (both start at 1/K, neither multiplies by K). The
only difference is the projection's arithmetic (TorchJD loops over the sorted entries, the project
uses cumulative sums), which rounds differently in the last bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.registry import get_balancer

from ._helpers import linear_problem, saved_and_loaded
from ._properties import (assert_permutation_equivariant, assert_valid_step, balancer_step, property_cases)


def step(balancer, rows):
    x, losses = linear_problem(rows)
    info = balancer.backward(losses, [x])
    return x.grad.clone(), info.weights.clone()


def test_modo_first_step_by_hand():
    # g1 = (1, 0), g2 = (0, 2), γ = 0.1, ρ = 0.1: A = diag(1, 4), λ = ½(1, 1);
    # λ − 0.1(Aλ + 0.1λ) = (0.5 − 0.055, 0.5 − 0.205) = (0.445, 0.295); projection shifts by
    # (0.74 − 1)/2 = −0.13 → λ = (0.575, 0.425); d = (0.575, 0.85)
    d, w = step(get_balancer("modo", 2, gamma=0.1, rho=0.1), [[1.0, 0.0], [0.0, 2.0]])
    assert w.tolist() == pytest.approx([0.575, 0.425], rel=1e-14)
    assert d.tolist() == pytest.approx([0.575, 0.85], rel=1e-14)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_modo_matches_torchjd_over_a_sequence(k):
    torchjd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(20 + k)
    ref = torchjd.MoDoWeighting(gamma=0.3, rho=0.1)
    bal = get_balancer("modo", k, gamma=0.3, rho=0.1)
    for _ in range(10):
        jac = torch.randn(k, 6, generator=gen, dtype=torch.float64)
        want = ref(jac @ jac.T)
        d, w = bal.combine(jac, torch.ones(k, dtype=torch.float64))
        # one projected step per call on O(1) numbers; the difference is the projection's rounding
        # (~1e-16), carried along the sequence by a contraction: 1e-13
        torch.testing.assert_close(w, want, rtol=0, atol=1e-13)
        torch.testing.assert_close(d, want @ jac, rtol=0, atol=1e-13)


def test_modo_equals_moco_without_tracking():
    # MoCo with β = 1, β_σ = 0 (y = g), γ_σ = 0 (constant step), the paper's projection and raw
    # gradients takes exactly MoDo's one-batch step: λ ← Π(λ − γ(GGᵀ + ρI)λ), d = Gᵀλ
    rng = np.random.default_rng(1)
    modo = get_balancer("modo", 3, gamma=0.2, rho=0.05)
    moco = get_balancer("moco", 3, beta=1.0, beta_sigma=0.0, gamma=0.2, gamma_sigma=0.0, rho=0.05,
                        lambda_update="project", normalize=False)
    for _ in range(8):
        rows = rng.normal(size=(3, 5)).tolist()
        d1, w1 = step(modo, rows)
        d2, w2 = step(moco, rows)
        # the same formulas, Y Yᵀ built by the engine's blockwise Gram vs the Gram path: ~1e-16
        torch.testing.assert_close(w1, w2, rtol=0, atol=1e-14)
        torch.testing.assert_close(d1, d2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_modo_converges_to_the_min_norm_point_of_the_regularised_gram_matrix(rho):
    # on a fixed Jacobian the λ sequence is projected gradient descent on ½λᵀ(A + ρI)λ with a step
    # below 2/L: it converges linearly to argmin_Δ λᵀ(A + ρI)λ (MGDA's weights for ρ = 0)
    rows = [[1.0, 0.2, 0.0], [0.1, 1.5, 0.3], [-0.4, 0.2, 0.8]]
    bal = get_balancer("modo", 3, gamma=0.3, rho=rho)
    for _ in range(3000):
        _, w = step(bal, rows)
    g = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(w, mgda_weights(g @ g.T + rho * torch.eye(3, dtype=torch.float64)), rtol=0, atol=1e-9)


def test_modo_state_round_trip_and_lockstep_rows():
    rng = np.random.default_rng(2)
    seq = [rng.normal(size=(3, 4)) for _ in range(4)]
    a = get_balancer("modo", 3, gamma=0.5)
    step(a, seq[0].tolist())
    b = get_balancer("modo", 3, gamma=0.5)
    b.load_state_dict(saved_and_loaded(a.state_dict()))
    for rows in seq[1:]:
        assert all(torch.equal(u, v) for u, v in zip(step(a, rows.tolist()), step(b, rows.tolist())))
    # rows in lockstep: the rule on stacked Gram matrices equals one balancer per row
    singles = [get_balancer("modo", 3, gamma=0.5) for _ in range(2)]
    lock = get_balancer("modo", 3, gamma=0.5)
    lock.start_rows(singles)
    for rows in seq:
        grams = np.stack([rows @ rows.T, 2.0 * rows @ rows.T])
        out = lock.weights_rows(grams, np.ones((2, 3)))
        for r, bal in enumerate(singles):
            np.testing.assert_array_equal(out.weights[r], bal.weights_rows(grams[r], np.ones(3)).weights)


def test_modo_rejects_bad_hyperparameters():
    for bad in ({"gamma": 0.0}, {"rho": -0.1}):
        with pytest.raises(ValueError, match="modo"):
            get_balancer("modo", 2, **bad)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_modo_properties(case):
    # one projected step from λ = 1/K: K-term sums, exact up to rounding (1e-12). No scaling law: the
    # step is γ·a²A, so scaling the gradients changes λ (a step-size effect, not a symmetry)
    st = balancer_step("modo", gamma=0.05)
    assert_valid_step(*st(case.jac, case.losses), case)
    assert_permutation_equivariant(st, case, rtol=1e-12)
