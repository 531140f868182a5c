"""STCH: smooth Tchebycheff scalarisation (ideal-point form and the official log/nadir form)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError, EpochInfo
from mtl_tune.balancers.stch import stch_rows
from mtl_tune.registry import get_balancer

from ._helpers import saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def weights(bal, losses) -> np.ndarray:
    x = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    info = bal.backward(x * 1.0, [x])
    assert torch.allclose(x.grad, info.weights.double(), rtol=0, atol=0)  # ∂f/∂ℓ is what reaches ℓ
    return info.weights.numpy()


def test_small_mu_is_tchebycheff_on_the_argmax():
    # p(ℓ − z) = (0.6, 0.9, 0.3): gaps ≥ 0.3, so with μ = 1e-4 the others' σ ≤ e^{-3000}: exactly 0 in float64
    losses, p, z = np.array([1.0, 2.0, 0.5]), np.array([1.2, 0.6, 1.2]), np.array([0.5, 0.5, 0.25])
    w = stch_rows(losses, p, 1e-4, ideal=z)
    assert w.tolist() == [0.0, 3 * 0.6, 0.0]  # K pᵢ on i = argmax pᵢ(ℓᵢ − zᵢ)
    # log form: argmax of pᵢ log(ℓᵢ/nᵢ) with n = 1: (0, 0.416, −0.832) → task 1, weight K p₁/ℓ₁
    w = stch_rows(losses, p, 1e-4, nadir=np.ones(3))
    assert w.tolist() == [0.0, 3 * 0.6 / 2.0, 0.0]


def test_large_mu_is_the_weighted_sum_and_ties_share():
    losses, p, z = np.array([1.0, 2.0]), np.array([0.5, 1.5]), np.zeros(2)
    # σ = softmax(p(ℓ − z)/μ) = ½ + O(1/μ): w = K σ p = p (1 + O(1e-8))
    np.testing.assert_allclose(stch_rows(losses, p, 1e8, ideal=z), p, rtol=1e-7)
    # a tie p₀(ℓ₀ − z₀) = p₁(ℓ₁ − z₁): σ = ½ each for every μ
    np.testing.assert_allclose(stch_rows(np.array([3.0, 2.0]), np.array([1.0, 2.0]), 0.01, ideal=np.array([1.0, 1.0])),
                               [1.0, 2.0], rtol=1e-15)


def test_one_preference_vertex_trains_that_task_alone():
    # p = (1, 0): f = K μ log(e^{(ℓ₀−z₀)/μ} + 1), w = (K sigmoid((ℓ₀ − z₀)/μ), 0)
    bal = get_balancer("stch", 2, mu=0.5, preferences=[1.0, 0.0], ideal=[0.0, 0.0])
    w = weights(bal, [1.5, 4.0])
    assert w[1] == 0.0
    assert w[0] == pytest.approx(2 / (1 + math.exp(-3.0)), rel=1e-15)


def test_two_tasks_closed_form_ideal_form():
    mu, p, z, ell = 0.7, np.array([2.0, 1.0]), np.array([0.1, -0.4]), np.array([1.1, 0.9])
    s = p * (ell - z) / mu
    sig0 = 1 / (1 + math.exp(s[1] - s[0]))
    want = 2 * np.array([sig0, 1 - sig0]) * p
    bal = get_balancer("stch", 2, mu=mu, preferences=p.tolist(), ideal=z.tolist())
    np.testing.assert_allclose(weights(bal, ell.tolist()), want, rtol=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_torchjd_stch(seed):
    """TorchJD's ``STCH`` scalariser (μ log Σ exp(λᵢ(fᵢ − zᵢ)/μ)) differentiated by autograd, on identical
    inputs; ours is K times it (the official code's ×K). Float64 closed forms: 1e-12."""
    tj = pytest.importorskip("torchjd.scalarization")
    rng = np.random.default_rng(seed)
    k = 2 + seed % 3
    ell, p, z = rng.uniform(0.5, 3, k), rng.dirichlet(np.ones(k)), rng.uniform(-1, 0.4, k)
    mu = float(rng.choice([0.01, 0.1, 1.0]))
    x = torch.tensor(ell, requires_grad=True)
    tj.STCH(mu, weights=torch.tensor(p), reference=torch.tensor(z))(x).backward()
    ours = stch_rows(ell, p, mu, ideal=z)
    np.testing.assert_allclose(ours, k * x.grad.numpy(), rtol=1e-12, atol=1e-300)


def test_official_log_form_warmup_then_nadir():
    """warmup_epochs = w: epochs 0 … w are Σ log ℓ (weights 1/ℓ); the mean losses of epoch w are the
    nadir n; afterwards w = K softmax(p log(ℓ/n)/μ) p / ℓ (official STCH.py, with p = 1 there)."""
    bal = get_balancer("stch", 2, mu=0.5, warmup_epochs=1)
    np.testing.assert_allclose(weights(bal, [2.0, 4.0]), [0.5, 0.25], rtol=1e-15)
    bal.on_epoch_end(EpochInfo(epoch=0))  # epoch 0 ends; no nadir yet (and no train_losses needed)
    assert bal.nadir is None
    np.testing.assert_allclose(weights(bal, [1.0, 3.0]), [1.0, 1 / 3], rtol=1e-15)
    np.testing.assert_allclose(weights(bal, [3.0, 1.0]), [1 / 3, 1.0], rtol=1e-15)
    bal.on_epoch_end(EpochInfo(epoch=1))  # the nadir epoch: the mean of the losses it saw, (2, 2)
    np.testing.assert_allclose(bal.nadir, [2.0, 2.0], rtol=0)
    state = saved_and_loaded(bal.state_dict())
    ell = np.array([1.0, 4.0])
    s = np.log(ell / 2.0) / 0.5
    sig = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    want = 2 * sig / ell
    np.testing.assert_allclose(weights(bal, ell.tolist()), want, rtol=1e-14)
    fresh = get_balancer("stch", 2, mu=0.5, warmup_epochs=1)
    fresh.load_state_dict(state)
    np.testing.assert_allclose(weights(fresh, ell.tolist()), want, rtol=1e-14)
    # train_losses given: they are the nadir (the trainer's epoch means)
    other = get_balancer("stch", 2, warmup_epochs=0)
    other.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.tensor([3.0, 5.0])))
    np.testing.assert_allclose(other.nadir, [3.0, 5.0])


def test_log_form_needs_positive_losses():
    with pytest.raises(BalancerError, match="positive losses"):
        weights(get_balancer("stch", 2), [1.0, -0.5])
    bal = get_balancer("stch", 2, warmup_epochs=0)
    with pytest.raises(BalancerError, match="nadir"):
        bal.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.tensor([1.0, 0.0])))
    # the ideal form takes any losses above or below z
    assert np.isfinite(weights(get_balancer("stch", 2, ideal=[-2.0, -3.0]), [-1.0, -0.5])).all()


def test_rejects_bad_arguments():
    for kw in ({"mu": 0.0}, {"preferences": [1.0, -1.0]}, {"preferences": [0.0, 0.0]}, {"ideal": [1.0]},
               {"warmup_epochs": -1}):
        with pytest.raises(ValueError):
            get_balancer("stch", 2, **kw)


def test_rows_match_one_row_each():
    bal = get_balancer("stch", 3, mu=0.3, preferences=[1.0, 2.0, 0.5], ideal=[0.0, 0.1, -0.2])
    rows = np.random.default_rng(0).uniform(0.2, 3, (4, 5, 3))
    np.testing.assert_array_equal(bal.weights_rows(rows).weights,
                                  np.stack([[bal.weights_rows(r).weights for r in b] for b in rows]))


@pytest.mark.parametrize("case", property_cases(), ids=repr)
@pytest.mark.parametrize("form", [{"warmup_epochs": 0}, {"ideal": [0.0] * 4}])
def test_stch_properties(case, form):
    # a function of the losses only: weights do not change with J (degree 0), d = Jᵀw is linear in J;
    # softmax of permuted entries: equivariant to rounding (1e-12)
    hp = dict(form, ideal=form["ideal"][:case.k]) if "ideal" in form else form
    step = balancer_step("stch", **hp)
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)
