"""DB-MTL (dbmtl): log-losses, moving averages of the task gradients rescaled to the largest norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.dbmtl import EPS, DBMTL

from ._helpers import linear_heads_problem, random_jacobian, saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def step(bal: DBMTL, jac: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """One backward on ℓ = J θ + losses at θ = 0 (per-task gradients exactly the rows of J)."""
    theta = torch.zeros(jac.shape[1], dtype=jac.dtype, requires_grad=True)
    bal.backward(jac @ theta + losses, [theta])
    return theta.grad.detach().clone()


def by_hand(jacs, losses, beta, beta_sigma):
    """The update of the paper / LibMTL written out step by step (float64 NumPy): h = g/(ℓ + ε),
    ĝ ← h + β/t^{β_σ}(ĝ − h), α = max‖ĝ‖/(‖ĝ‖ + ε), d = Σ α_i ĝ_i."""
    avg, out = np.zeros_like(jacs[0]), []
    for t, (g, ell) in enumerate(zip(jacs, losses), start=1):
        h = g / (ell[:, None] + EPS)
        avg = h + beta / t ** beta_sigma * (avg - h)
        n = np.linalg.norm(avg, axis=1)
        out.append((n.max() / (n + EPS)) @ avg)
    return out


def test_dbmtl_equal_norm_gradients_first_step():
    # ℓ = 1, ‖g_i‖ = 1: ĝ = (1 − β)h, h = g/(1 + ε), every norm the same, α = m/(m + ε) with m = (1 − β)/(1 + ε)
    jac = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, -1.0, 0.0]], dtype=torch.float64)
    bal = DBMTL(3, beta=0.9)
    d = step(bal, jac, torch.ones(3, dtype=torch.float64))
    m = 0.1 / (1 + EPS)
    torch.testing.assert_close(d, m * m / (m + EPS) * jac.sum(0), rtol=1e-14, atol=0)


def test_dbmtl_matches_the_update_written_out():
    """Six steps with changing gradients and losses, β_σ = 0.5 (a decaying β/√t): the in-place
    r·ĝ + (1 − r)·h against h + r(ĝ − h), float64: one rounding per step apart (checked at 1e-12)."""
    rng = np.random.default_rng(0)
    jacs = [random_jacobian(3, 5, seed=s).numpy() for s in range(6)]
    losses = [rng.uniform(0.1, 5.0, size=3) for _ in range(6)]
    bal = DBMTL(3, beta=0.7, beta_sigma=0.5)
    got = [step(bal, torch.from_numpy(j), torch.from_numpy(ell)).numpy() for j, ell in zip(jacs, losses)]
    for t, (a, b) in enumerate(zip(got, by_hand(jacs, losses, 0.7, 0.5))):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=f"step {t + 1}")


def test_dbmtl_ignores_loss_scales():
    # ℓ_i → c_i ℓ_i with its gradient: h_i = c_i g_i/(c_i ℓ_i + ε) is unchanged up to ε/ℓ ≈ 1e-8
    jac, ell = random_jacobian(3, 5, seed=1), torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    c = torch.tensor([100.0, 1.0, 0.01], dtype=torch.float64)
    plain, scaled = DBMTL(3), DBMTL(3)
    for _ in range(3):
        torch.testing.assert_close(step(scaled, c[:, None] * jac, c * ell), step(plain, jac, ell), rtol=1e-6, atol=0)


def test_dbmtl_state_round_trip():
    jacs = [random_jacobian(2, 4, seed=s) for s in range(6)]
    ell = torch.tensor([0.7, 3.0], dtype=torch.float64)
    whole = DBMTL(2, beta=0.8, beta_sigma=0.3)
    want = [step(whole, j, ell) for j in jacs]
    first = DBMTL(2, beta=0.8, beta_sigma=0.3)
    fresh = DBMTL(2, beta=0.8, beta_sigma=0.3)
    fresh.load_state_dict(saved_and_loaded(first.state_dict()))   # before the first step: no average yet
    assert fresh.average is None
    for j in jacs[:3]:
        step(first, j, ell)
    resumed = DBMTL(2, beta=0.8, beta_sigma=0.3)
    resumed.load_state_dict(saved_and_loaded(first.state_dict()))
    assert resumed.step_count == 3 and torch.equal(resumed.average, first.average)
    for j, w in zip(jacs[3:], want[3:]):
        assert torch.equal(step(resumed, j, ell), w)


def test_dbmtl_rows_in_lockstep_equal_each_row_alone():
    rows = 4
    jacs = [torch.stack([random_jacobian(2, 3, seed=10 * s + r) for r in range(rows)]) for s in range(3)]
    losses = [torch.from_numpy(np.random.default_rng(s).uniform(0.5, 2.0, size=(rows, 2))) for s in range(3)]
    alone = [DBMTL(2, beta_sigma=0.5) for _ in range(rows)]
    many = DBMTL(2, beta_sigma=0.5)
    many.start_rows(alone)
    for j, ell in zip(jacs, losses):
        out = many.direction_rows(j, ell)
        many.step_count += 1
        for r, bal in enumerate(alone):
            single = bal.direction_rows(j[r], ell[r])
            bal.step_count += 1
            torch.testing.assert_close(out.direction[r], single.direction, rtol=1e-14, atol=1e-16)
            torch.testing.assert_close(out.weights[r], single.weights, rtol=1e-14, atol=0)


def test_dbmtl_heads_get_the_log_loss_gradients():
    trunk, heads, forward = linear_heads_problem(k=2)
    z, losses = forward()
    bal = DBMTL(2)
    bal.backward(losses, list(trunk.parameters()), [[h] for h in heads])
    got = [h.grad.clone() for h in heads]
    for h in heads:
        h.grad = None
    z, losses = forward()
    (losses.detach() + EPS).reciprocal().mul(losses).sum().backward(inputs=heads)
    for g, h in zip(got, heads):
        torch.testing.assert_close(g, h.grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_dbmtl_non_positive_loss_raises_and_keeps_state(bad):
    jac = random_jacobian(2, 4, seed=0)
    bal = DBMTL(2)
    step(bal, jac, torch.tensor([1.0, 2.0], dtype=torch.float64))
    before = bal.average.clone()
    with pytest.raises(BalancerError, match="min_losses"):
        step(bal, jac, torch.tensor([bad, 2.0], dtype=torch.float64))
    assert torch.equal(bal.average, before) and bal.step_count == 1
    shifted = DBMTL(2, min_losses=[-1.0, 0.0])
    assert torch.isfinite(step(shifted, jac, torch.tensor([bad, 2.0], dtype=torch.float64))).all()


def test_dbmtl_arguments():
    for bad in ({"beta": 1.0}, {"beta": -0.1}, {"beta_sigma": -1.0}, {"min_losses": [0.0]}):
        with pytest.raises(ValueError):
            DBMTL(2, **bad)
    with pytest.raises(ValueError, match="Jacobian"):
        DBMTL(2, gradient_path="gram")
    bal = DBMTL(2)
    step(bal, random_jacobian(2, 4, seed=0), torch.ones(2, dtype=torch.float64))
    with pytest.raises(BalancerError, match="must stay the same"):
        step(bal, random_jacobian(2, 5, seed=0), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_dbmtl_properties(case):
    # α = max‖ĝ‖/(‖ĝ‖ + ε) is symmetric in the tasks; J → aJ scales ĝ by a and leaves α unchanged up to
    # the official ε = 1e-8 in its denominator: relative change ≲ ε/‖ĝ‖ ≈ 1e-7 here (‖ĝ‖ = 0.1‖g‖/ℓ ≥ 0.05)
    step_ = balancer_step("dbmtl")
    assert_valid_step(*step_(case.jac, case.losses), case)
    assert_permutation_equivariant(step_, case, rtol=1e-12)
    assert_gradient_scaling(step_, case, degree=1, weight_degree=0, rtol=1e-6)


def test_dbmtl_host_rescaling_is_torchs_bit_for_bit():
    """K = 2 on float64 CPU tensors forms α and d in NumPy (_rescaled_host); torch's calls
    (_rescaled, every other case) give the same bits, zeros and their signs included."""
    from mtl_tune.balancers.dbmtl import _rescaled, _rescaled_host

    rng = np.random.default_rng(0)
    for it in range(300):
        shape = (int(rng.integers(1, 6)), 2, int(rng.integers(1, 5))) if it % 5 else (2, 3)
        avg = rng.normal(size=shape) * 10.0 ** rng.uniform(-8, 8, size=(*shape[:-1], 1))
        avg[rng.random(shape) < 0.15] = 0.0
        if it % 9 == 0:
            avg[..., 0, :] = 0.0                                  # a task with a zero average
        avg_t = torch.from_numpy(avg)
        norms = torch.linalg.vector_norm(avg_t, dim=-1)
        for a, b in zip(_rescaled(norms, avg_t), _rescaled_host(norms, avg_t)):
            assert a.shape == b.shape and torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


def test_dbmtl_row_check_fast_path_and_failed_rows_agree():
    """Every shifted loss finite and > 0 skips the per-row check; a batch with a failing row takes it,
    and its other rows step exactly as they do in a batch where no row fails."""
    jac = torch.stack([random_jacobian(2, 2, seed=s) for s in range(3)])
    good = torch.tensor([[1.0, 2.0], [0.5, 3.0], [2.0, 0.7]], dtype=torch.float64)
    with_bad = good.clone()
    with_bad[1, 0] = -1.0
    clean, mixed = DBMTL(2), DBMTL(2)
    clean.start_rows([DBMTL(2) for _ in range(3)])
    mixed.start_rows([DBMTL(2) for _ in range(3)])
    for losses_mixed in (good, with_bad):
        a, b = clean.direction_rows(jac, good), mixed.direction_rows(jac, losses_mixed)
        clean.step_count += 1
        mixed.step_count += 1
        assert a.failed is None
    assert b.failed.tolist() == [False, True, False] and "min_losses" in b.reason_of((1,))
    for r in (0, 2):
        assert torch.equal(a.direction[r], b.direction[r]) and torch.equal(a.weights[r], b.weights[r])
