"""SDMGrad: min_{w∈Δ} ½‖Gᵀ(w + λw̃)‖², d = K·Gᵀ(w* + λw̃)/(1 + λ) (Xiao et al., NeurIPS'23).

Parity: the official inner loop (``inner="official"``) against TorchJD 0.18's ``SDMGradWeighting``
(adapted from the official code) on identical inputs over a sequence of steps. Differences, all
conventions: TorchJD returns (w + λw̃)/(1 + λ), the balancer K times that (the official
``overwrite_grad`` multiplies by K); TorchJD scales A by mean(√max(A_ii, 0))² + 1e-8, the official
code (and the balancer) by mean(√(A_ii + 1e-4))² — so the parity test feeds both loops the same
scaled matrix, and checks the balancer's scaling against the official formula separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.balancers.sdmgrad import official_scale, sdmgrad_exact, sdmgrad_inner_sgd
from mtl_tune.registry import get_balancer

from ._helpers import saved_and_loaded, shared_grad
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_sdmgrad_two_task_known_answer():
    # g1 = (1, 0), g2 = (0, 2), λ = 0.3: g̃ = (0.5, 1), h1 = g1 + 0.3 g̃ = (1.15, 0.3), h2 = (0.15, 2.3).
    # min-norm point of [h1, h2]: γ = (‖h2‖² − h1·h2)/‖h1 − h2‖² = (5.3125 − 0.8625)/(1 + 4) = 0.89,
    # w* = (0.89, 0.11); c = 2(w* + 0.3/2)/1.3 = (1.6, 0.4); d = c₁g1 + c₂g2 = (1.6, 0.8).
    grad, info = shared_grad("sdmgrad", [[1.0, 0.0], [0.0, 2.0]], lamda=0.3)
    assert info.weights.tolist() == pytest.approx([1.6, 0.4], rel=1e-13)
    assert grad.tolist() == pytest.approx([1.6, 0.8], rel=1e-13)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_sdmgrad_lambda_zero_is_mgda(case):
    # λ = 0: the inner problem is MGDA's min-norm problem and d = K·Gᵀw*, MGDA's ×K update. The same
    # solver on the same matrix (M = I exactly): identical up to the matrix products' rounding.
    grad, info = shared_grad("sdmgrad", case.jac.tolist(), lamda=0.0, max_norm=None)
    want = case.k * mgda_weights(case.jac @ case.jac.T)
    torch.testing.assert_close(info.weights, want, rtol=1e-10, atol=1e-12)
    mgda_grad, mgda_info = shared_grad("mgda", case.jac.tolist())
    torch.testing.assert_close(grad, mgda_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_sdmgrad_large_lambda_tends_to_the_mean_gradient(case):
    # c − 1 = K(w* − w̃)/(1 + λ) with w*, w̃ on the simplex: |cᵢ − 1| ≤ K/(1 + λ), so the weights of
    # the mean direction (×K: all ones) are reached at rate 1/λ
    for lam in (10.0, 1e3, 1e6):
        _, info = shared_grad("sdmgrad", case.jac.tolist(), lamda=lam)
        err = float((info.weights - 1.0).abs().max())
        assert err <= case.k / (1.0 + lam), (lam, err)
    assert err < 1e-5


@pytest.mark.parametrize("k", [3, 4, 6])
def test_sdmgrad_exact_minimises_the_inner_objective(k):
    rng = np.random.default_rng(k)
    g = rng.normal(size=(k, 8)) * np.exp(rng.normal(size=(k, 1)))
    a, pref, lam = g @ g.T, np.full(k, 1.0 / k), 0.7
    w, ok = sdmgrad_exact(a, lam, pref)
    assert ok and abs(w.sum() - 1.0) < 1e-14 and (w >= 0).all()

    def f(v):
        u = v + lam * pref
        return u @ a @ u

    others = rng.dirichlet(np.ones(k), size=2000)
    assert f(w) <= min(f(v) for v in others) + 1e-12 * f(w)
    # KKT: every task's partial derivative is ≥ the active ones' (equal on the support)
    grad = a @ (w + lam * pref)
    active = w > 1e-12
    assert np.all(grad >= grad[active].max() - 1e-10 * np.abs(grad).max())
    assert np.ptp(grad[active]) <= 1e-10 * np.abs(grad).max()


def test_official_loop_converges_to_the_exact_solution_with_a_small_step():
    # the official loop's fixed points are the exact minimiser; with a step below 2/L (here 0.05)
    # and enough iterations it gets there (linear rate): the two modes solve the same problem
    rng = np.random.default_rng(5)
    g = rng.normal(size=(4, 6))
    a = g @ g.T
    a = a / official_scale(a)
    pref = np.full(4, 0.25)
    w = sdmgrad_inner_sgd(a, pref.copy(), 0.3, pref, niter=20000, lr=0.05)
    w_exact, ok = sdmgrad_exact(a, 0.3, pref)
    assert ok
    np.testing.assert_allclose(w, w_exact, rtol=0, atol=1e-9)


def test_official_scale_is_the_official_formula():
    a = np.array([[4.0, 1.0, 0.0], [1.0, 9.0, 2.0], [0.0, 2.0, 0.25]])
    s = (np.sqrt(4.0 + 1e-4) + np.sqrt(9.0 + 1e-4) + np.sqrt(0.25 + 1e-4)) / 3
    assert official_scale(a) == pytest.approx(s * s, rel=1e-15)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_official_loop_matches_torchjd_over_a_sequence(k):
    torchjd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(10 + k)
    ref = torchjd.SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    w = np.full(k, 1.0 / k)
    pref = np.full(k, 1.0 / k)
    for _ in range(6):
        jac = torch.randn(k, 7, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(k, 1, generator=gen,
                                                                                         dtype=torch.float64))
        a = jac @ jac.T
        out = ref(a)
        # TorchJD's own scaling, given to the balancer's loop (see the module docstring)
        scaled = (a / (torch.diag(a).clamp(min=0).sqrt().mean() ** 2 + 1e-8)).numpy()
        w = sdmgrad_inner_sgd(scaled, w, 0.3, pref, niter=20)
        # 20 projected steps of float64 arithmetic in another order (TorchJD's projection loops over
        # the sorted entries, ours uses cumulative sums): rounding ~1e-15 per step, amplified by the
        # steps' Lipschitz constant (lr·‖A‖ ≤ ~50) only where a projection changes its active set
        np.testing.assert_allclose(w, ref._w.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose((w + 0.3 * pref) / 1.3, out.numpy(), rtol=0, atol=1e-10)


def test_official_mode_balancer_runs_the_official_scaling_and_state_round_trip():
    rows = [[[1.0, 0.2, 0.0], [0.0, 2.0, 0.5], [0.3, -1.0, 1.0]],
            [[0.5, 0.2, 0.1], [1.0, 1.0, 0.0], [0.0, -1.0, 2.0]],
            [[2.0, 0.0, 0.0], [0.1, 0.1, 0.1], [0.0, 0.0, 1.0]]]
    a = get_balancer("sdmgrad", 3, inner="official", max_norm=None)
    w = np.full(3, 1.0 / 3)
    for r in rows[:2]:
        _, info = shared_grad_with(a, r)
        g = np.array(r)
        gram = g @ g.T
        w = sdmgrad_inner_sgd(gram / official_scale(gram), w, 0.3, np.full(3, 1 / 3), 20)
        np.testing.assert_allclose(info.weights.numpy(), 3 * (w + 0.1) / 1.3, rtol=1e-12)
    b = get_balancer("sdmgrad", 3, inner="official", max_norm=None)
    b.load_state_dict(saved_and_loaded(a.state_dict()))
    da, ia = shared_grad_with(a, rows[2])
    db, ib = shared_grad_with(b, rows[2])
    assert torch.equal(da, db) and torch.equal(ia.weights, ib.weights)


def shared_grad_with(balancer, rows):
    x = torch.zeros(len(rows[0]), dtype=torch.float64, requires_grad=True)
    losses = torch.tensor(rows, dtype=torch.float64) @ x + 1.0
    info = balancer.backward(losses, [x])
    return x.grad.clone(), info


def test_sdmgrad_rejects_bad_hyperparameters():
    for bad in ({"lamda": -0.1}, {"inner": "adam"}, {"niter": 0}):
        with pytest.raises(ValueError, match="sdmgrad"):
            get_balancer("sdmgrad", 2, **bad)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_sdmgrad_properties(case):
    # exact inner solve on M A Mᵀ (a Gram-matrix solve: rounding ~eps·cond ≲ 1e-13 for these cases,
    # as mgda's); w* ignores a positive scaling of A, so d is linear in J (degree 1, weights 0)
    st = balancer_step("sdmgrad")
    assert_valid_step(*st(case.jac, case.losses), case)
    assert_permutation_equivariant(st, case, rtol=1e-10)
    assert_gradient_scaling(st, case, degree=1, weight_degree=0, rtol=1e-10)


def test_official_loop_need_not_reach_the_minimiser():
    # The documented difference between the two modes, on the K = 2 known-answer case above
    # (g1 = (1, 0), g2 = (0, 2), λ = 0.3): the minimiser is w* = (0.89, 0.11), but the official step 10
    # is ~20× the 2/L of the scaled problem (curvature along the simplex (1 + 4)/s², s² ≈ 2.25), and
    # with the momentum reset every call the 20-step loop settles on a periodic orbit whose end point,
    # warm start after warm start, is w ≈ (0.034, 0.966) — most weight on the other task
    g = np.array([[1.0, 0.0], [0.0, 2.0]])
    a = g @ g.T
    a = a / official_scale(a)
    pref = np.full(2, 0.5)
    w = pref.copy()
    for _ in range(50):
        w = sdmgrad_inner_sgd(a, w, 0.3, pref, niter=20)
    np.testing.assert_allclose(sdmgrad_exact(a, 0.3, pref)[0], [0.89, 0.11], rtol=1e-13)
    np.testing.assert_allclose(w, [0.03421996, 0.96578004], atol=1e-8)
