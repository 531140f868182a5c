"""MoCo: tracked gradients y ≈ ∇ℓ and simplex weights λ updated on Y Yᵀ (Fernando et al., ICLR'23).

No independent library implements it in the installed oracles (TorchJD 0.18 has no MoCo), so the
multi-step check runs against LibMTL's update written out below from its published formulas
(LibMTL/weighting/MoCo.py @ 8b8f1d03): rescale g ← ℓ g/(‖g‖ + 1e-8), y ← y − β/t^β_σ (y − g),
λ ← softmax(λ − γ/t^γ_σ (YYᵀ + ρI)λ), d = Yᵀλ — in torch, task by task, no shared code with the
balancer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.registry import get_balancer

from ._helpers import linear_problem, saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def step(balancer, rows, offset=1.0):
    x, losses = linear_problem(rows, offset)
    info = balancer.backward(losses, [x])
    return x.grad.clone(), info.weights.clone()


def test_moco_first_step_by_hand():
    # g1 = (1, 0), g2 = (0, 2), raw gradients, projected update. t = 1: y = 0 + 0.5 (g − 0) = g/2,
    # A = YYᵀ = diag(1/4, 1), λ − 0.1·Aλ = (0.5 − 0.0125, 0.5 − 0.05) = (0.4875, 0.45), projected:
    # shift by (0.9375 − 1)/2 → λ = (0.51875, 0.48125); d = Yᵀλ = (0.51875/2, 0.48125).
    bal = get_balancer("moco", 2, normalize=False, lambda_update="project")
    d, w = step(bal, [[1.0, 0.0], [0.0, 2.0]])
    assert w.tolist() == pytest.approx([0.51875, 0.48125], rel=1e-14)
    assert d.tolist() == pytest.approx([0.259375, 0.48125], rel=1e-14)


def libmtl_reference(jacs, losses, beta, beta_sigma, gamma, gamma_sigma, rho):
    """LibMTL's MoCo step sequence (see the module docstring), torch float64."""
    k, p = jacs[0].shape
    y, lam, out = torch.zeros(k, p, dtype=torch.float64), torch.full((k,), 1.0 / k, dtype=torch.float64), []
    for t, (jac, ell) in enumerate(zip(jacs, losses), start=1):
        g = torch.stack([jac[i] / (jac[i].norm() + 1e-8) * ell[i] for i in range(k)])
        y = y - (beta / t ** beta_sigma) * (y - g)
        lam = torch.softmax(lam - (gamma / t ** gamma_sigma) * (y @ y.T + rho * torch.eye(k, dtype=torch.float64)) @ lam, -1)
        out.append((y.T @ lam, lam))
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_moco_matches_libmtl_update_over_a_sequence(k):
    gen = torch.Generator().manual_seed(k)
    jacs = [torch.randn(k, 6, generator=gen, dtype=torch.float64) * (1 + torch.arange(k, dtype=torch.float64))[:, None]
            for _ in range(8)]
    losses = [0.5 + torch.rand(k, generator=gen, dtype=torch.float64) for _ in range(8)]
    hp = dict(beta=0.5, beta_sigma=0.5, gamma=0.7, gamma_sigma=0.5, rho=0.1)
    want = libmtl_reference(jacs, losses, **hp)
    bal = get_balancer("moco", k, **hp)
    for (d_ref, lam_ref), jac, ell in zip(want, jacs, losses):
        d, w = bal.combine(jac, ell)
        bal.step_count += 1   # as backward does after combine (t counts the steps)
        # float64 sums of ≤ 6 terms on O(1) numbers, the same operations in another order: ~1e-15
        torch.testing.assert_close(w, lam_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-14)


def test_moco_without_tracking_converges_to_mgda_weights():
    # β = 1, β_σ = 0: y = g every step (no tracking). With γ_σ = 0, ρ = 0 and the projection the λ
    # sequence is projected gradient descent on ½λᵀAλ with step γ < 2/L; its fixed point is the
    # min-norm point, i.e. MGDA's weights. Linear convergence: 3000 steps put it at ~1e-12.
    rows = [[1.0, 0.2, 0.0], [0.1, 1.5, 0.3], [-0.4, 0.2, 0.8]]
    bal = get_balancer("moco", 3, beta=1.0, beta_sigma=0.0, gamma=0.3, gamma_sigma=0.0, normalize=False,
                       lambda_update="project")
    for _ in range(3000):
        d, w = step(bal, rows)
    g = torch.tensor(rows, dtype=torch.float64)
    w_mgda = mgda_weights(g @ g.T)
    torch.testing.assert_close(w, w_mgda, rtol=0, atol=1e-9)
    torch.testing.assert_close(d, w_mgda @ g, rtol=0, atol=1e-9)


def test_moco_tracking_averages_the_gradients():
    # β_σ = 0, β = 0.25, one task: y_t = (1 − (0.75)^t) g for a constant g (geometric EMA from y = 0)
    bal = get_balancer("moco", 1, beta=0.25, beta_sigma=0.0, normalize=False)
    for t in range(1, 6):
        d, w = step(bal, [[2.0, -1.0]])
        assert w.tolist() == [1.0]
        assert d.tolist() == pytest.approx([2.0 * (1 - 0.75 ** t), -(1 - 0.75 ** t)], rel=1e-14)


def test_moco_state_round_trip_continues_identically():
    rows = [[[1.0, 0.5, 0.0], [0.0, 2.0, -1.0]], [[0.3, 0.5, 0.2], [-1.0, 1.0, 0.0]], [[2.0, 0.0, 1.0], [0.5, 0.5, 0.5]]]
    for update in ("softmax", "project"):
        a = get_balancer("moco", 2, lambda_update=update, gamma=0.5)
        step(a, rows[0])
        b = get_balancer("moco", 2, lambda_update=update, gamma=0.5)
        b.load_state_dict(saved_and_loaded(a.state_dict()))
        assert b.step_count == 1 and torch.equal(b.tracked, a.tracked)
        for r in rows[1:]:
            da, wa = step(a, r)
            db, wb = step(b, r)
            assert torch.equal(da, db) and torch.equal(wa, wb)


def test_moco_rows_in_lockstep_equal_single_balancers():
    gen = torch.Generator().manual_seed(3)
    jacs = torch.randn(6, 4, 3, 5, generator=gen, dtype=torch.float64)        # (steps, rows, K, P)
    losses = 0.5 + torch.rand(6, 4, 3, generator=gen, dtype=torch.float64)
    singles = [get_balancer("moco", 3, lambda_update="project") for _ in range(4)]
    rows = get_balancer("moco", 3, lambda_update="project")
    rows.start_rows(singles)
    for t in range(6):
        out = rows.direction_rows(jacs[t], losses[t])
        rows.step_count += 1
        for r, bal in enumerate(singles):
            d, w = bal.combine(jacs[t, r], losses[t, r])
            bal.step_count += 1
            torch.testing.assert_close(out.direction[r], d, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(out.weights[r], w, rtol=1e-13, atol=1e-15)


def test_moco_lockstep_rows_on_the_host_skip_casts_with_the_same_numbers():
    """float64 rows on the host take Y Yᵀ and λ as they are (no cast, no copy): the same numbers, bit for
    bit, as the general path host(Y.double() @ Y.double()ᵀ) written out; float32 rows go the general way."""
    from mtl_tune.balancers._rows import host
    from mtl_tune.balancers.moco import moco_lambda_step, rescaled_gradients

    gen = torch.Generator().manual_seed(5)
    jacs = torch.randn(6, 4, 2, 3, generator=gen, dtype=torch.float64)        # (steps, rows, K, P)
    losses = 0.5 + torch.rand(6, 4, 2, generator=gen, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        rows = get_balancer("moco", 2)
        rows.start_rows([get_balancer("moco", 2) for _ in range(4)])
        y, lam = torch.zeros(4, 2, 3, dtype=dtype), np.full((4, 2), 0.5)
        for t in range(6):
            jac, ell = jacs[t].to(dtype), losses[t].to(dtype)
            out = rows.direction_rows(jac, ell)
            rows.step_count += 1
            y = y - (0.5 / (t + 1) ** 0.5) * (y - rescaled_gradients(jac, ell))
            lam = moco_lambda_step(host(y.double() @ y.double().transpose(-1, -2)), lam, 0.1 / (t + 1) ** 0.5, 0.0,
                                   "softmax")
            w = torch.from_numpy(lam).to(dtype)
            assert out.weights.dtype == out.direction.dtype == dtype
            assert torch.equal(out.weights, w) and torch.equal(out.direction, (w.unsqueeze(-2) @ y).squeeze(-2))


def test_moco_refuses_negative_losses_when_rescaling_by_them():
    bal = get_balancer("moco", 2)
    with pytest.raises(BalancerError, match="negative loss"):
        step(bal, [[1.0, 0.0], [0.0, 1.0]], offset=-0.5)
    assert bal.tracked is None  # nothing changed
    d, _ = step(get_balancer("moco", 2, normalize=False), [[1.0, 0.0], [0.0, 1.0]], offset=-0.5)
    assert d.tolist() == pytest.approx([0.25, 0.25])  # raw gradients: y = g/2, λ = ½ each
    # in lockstep only the row with the negative loss fails
    rows = get_balancer("moco", 2)
    rows.start_rows([get_balancer("moco", 2) for _ in range(2)])
    out = rows.direction_rows(torch.ones(2, 2, 3, dtype=torch.float64),
                              torch.tensor([[1.0, 2.0], [1.0, -2.0]], dtype=torch.float64))
    assert out.failed.tolist() == [False, True]


def test_moco_refuses_a_jacobian_of_another_size():
    bal = get_balancer("moco", 2)
    step(bal, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(BalancerError, match="shape"):
        step(bal, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def test_moco_rejects_bad_hyperparameters():
    for bad in ({"beta": 0.0}, {"beta": 1.5}, {"gamma": 0.0}, {"rho": -1.0}, {"lambda_update": "mirror"}):
        with pytest.raises(ValueError, match="moco"):
            get_balancer("moco", 2, **bad)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_moco_properties(case):
    # one step of a fresh balancer: y = g/2 (or ℓg/(2‖g‖)), one λ update, d = Yᵀλ; K-term float64
    # sums of O(1) numbers: 1e-12. Rescaled gradients ℓ g/‖g‖ ignore the gradients' size (degree 0,
    # up to the 1e-8 added to ‖g‖: relative 1e-8/‖g‖ ≲ 1e-7 here, hence the tolerance); raw
    # gradients scale d linearly but not λ (the λ step is γ·a²A), so no scaling law holds there.
    st = balancer_step("moco", gamma=0.5)
    assert_valid_step(*st(case.jac, case.losses), case)
    assert_permutation_equivariant(st, case, rtol=1e-12)
    assert_gradient_scaling(st, case, degree=0, weight_degree=0, rtol=1e-7)
    raw = balancer_step("moco", normalize=False, lambda_update="project")
    assert_permutation_equivariant(raw, case, rtol=1e-12)


def test_moco_weights_stay_on_the_simplex():
    rng = np.random.default_rng(0)
    for update in ("softmax", "project"):
        bal = get_balancer("moco", 4, lambda_update=update, gamma=5.0, gamma_sigma=0.0)
        for _ in range(20):
            _, w = step(bal, rng.normal(size=(4, 6)).tolist())
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-14) and bool((w >= 0).all())
