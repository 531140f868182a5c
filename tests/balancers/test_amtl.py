"""Aligned-MTL: the update from the nearest orthogonal, equal-norm gradient system."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.amtl import AlignedMTL, aligned_mtl_weights, alignment_matrix
from mtl_tune.balancers.base import gram

from ._helpers import combine
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)


EPS64 = float(torch.finfo(torch.float64).eps)


def test_amtl_orthonormal_gradients_give_their_sum():
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    jac = q.T.float()
    d, w = combine(AlignedMTL(3), jac)
    assert torch.allclose(w.float(), torch.ones(3), atol=1e-6)
    assert torch.allclose(d, jac.sum(0), atol=1e-6)


def test_amtl_matches_procrustes_svd():
    """d = σ Vhᵀ Uᵀ 1 with G = U S Vh (nearest equal-norm orthogonal rows), σ = min singular value."""
    jac = torch.randn(4, 10, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    expected = s.min() * vh.T @ u.T @ torch.ones(4, dtype=torch.float64)
    weights, rank, sigma2 = aligned_mtl_weights(gram(jac).numpy())
    assert rank == 4 and sigma2 == pytest.approx(float(s.min() ** 2))
    assert torch.allclose(torch.from_numpy(weights) @ jac, expected, atol=1e-10)


@pytest.mark.parametrize("scale", [[1.0, 1.0, 1.0], [0.01, 1.0, 50.0]])
def test_amtl_equal_projection_on_aligned_gradients_under_rescaling(scale):
    jac = torch.randn(3, 7, dtype=torch.float64) * torch.tensor(scale, dtype=torch.float64).view(3, 1)
    w, rank, sigma2 = alignment_matrix(gram(jac).numpy(), "min", rel_tol=EPS64)
    sigma2 = float(sigma2)
    aligned = torch.from_numpy(w) @ jac  # rows ĝ_i
    d = aligned.sum(0)
    assert torch.allclose(aligned @ aligned.T, sigma2 * torch.eye(3, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    assert torch.allclose(aligned @ d, torch.full((3,), sigma2, dtype=torch.float64), rtol=1e-8)
    prefs = np.array([1.0, 2.0, 0.5])
    d_pref = torch.from_numpy(aligned_mtl_weights(gram(jac).numpy(), "min", prefs, rel_tol=EPS64)[0]) @ jac
    assert torch.allclose(aligned @ d_pref, sigma2 * torch.from_numpy(prefs), rtol=1e-8)


def test_amtl_direction_of_orthogonal_gradients_is_scale_invariant():
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
    base = torch.from_numpy(aligned_mtl_weights(gram(q.T).numpy())[0]) @ q.T
    scaled_jac = q.T * torch.tensor([[0.1], [3.0], [40.0]], dtype=torch.float64)
    w, _, sigma2 = aligned_mtl_weights(gram(scaled_jac).numpy())
    assert sigma2 == pytest.approx(0.01)  # min mode: smallest eigenvalue
    assert torch.allclose(torch.from_numpy(w) @ scaled_jac, 0.1 * base, atol=1e-12)


@pytest.mark.parametrize("mode,sigma2", [("min", 1.0), ("median", 4.0), ("rmse", 14 / 3)])
def test_amtl_scale_modes(mode, sigma2):
    jac = np.diag([1.0, 2.0, 3.0])
    weights, rank, s2 = aligned_mtl_weights(jac @ jac.T, mode)
    assert s2 == pytest.approx(sigma2)
    np.testing.assert_allclose(weights, math.sqrt(sigma2) / np.array([1.0, 2.0, 3.0]), rtol=1e-14)


def test_amtl_float32_tolerance_truncates_a_much_smaller_independent_gradient():
    jac = torch.tensor([[1.0, 0.0], [0.0, 1e-4]])  # λ ratio 1e-8 < 2·eps32: rank 1 (official tolerance)
    d, w = AlignedMTL(2).combine(jac, torch.ones(2))
    assert torch.allclose(w, torch.tensor([1.0, 0.0], dtype=torch.float64)) and torch.allclose(d, jac[0])
    d64, w64 = AlignedMTL(2).combine(jac.double(), torch.ones(2))  # float64 gradients keep it
    assert torch.allclose(w64, torch.tensor([1e-4, 1.0], dtype=torch.float64))


def test_amtl_rank_deficient_and_zero():
    g = torch.randn(2, 6, dtype=torch.float64)
    jac = torch.cat([g, (g[0] + g[1]).view(1, -1)])
    weights, rank, _ = aligned_mtl_weights(gram(jac).numpy())
    assert rank == 2 and np.isfinite(weights).all()
    w, rank, sigma2 = aligned_mtl_weights(np.zeros((3, 3)))
    assert rank == 0 and sigma2 == 0.0 and np.array_equal(w, np.zeros(3))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_amtl_properties(case):
    # G = U S Vᵀ → aG scales S only: d = σ_min V Uᵀ 1 scales by a, the weights do not.
    # a Gram-matrix solve: rounding of eps·cond(A), cond(A) ≲ 1e3 for these K ≤ 4 independent rows
    # with norms ~3× apart, so ≲ 1e-13; 1e-10 leaves a margin
    step = balancer_step("amtl")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_aligned_mtl_weights_properties(case):
    # d = σ_min V Uᵀ 1 in terms of the gradients: the weights on them do not change with a²A;
    # an eigendecomposition of A: eps·cond(A) ≲ 1e-13, hence 1e-10
    assert_gram_function_equivariant(lambda a: aligned_mtl_weights(a)[0], case, weight_degree=0,
                                     rtol=1e-10)


# ---------------------------------------------------------------------------- the batch-first rule
def _grams(rng: np.random.Generator, k: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Jacobians (n, K, 5) and their Gram matrices: norms up to ~e⁴ apart, every 4th row exactly
    rank K − 1, every 4th nearly (λ_min/λ_max ~ 1e-14, about float64's cut-off), every 8th zero."""
    j = rng.normal(size=(n, k, 5)) * np.exp(rng.normal(size=(n, k, 1)) * 2)
    if k > 1:
        j[1::4, -1] = -0.7 * j[1::4, 0]
        j[2::4, -1] = -0.7 * j[2::4, 0] + 1e-7 * np.abs(j[2::4, 0]).max(-1, keepdims=True) * rng.normal(size=(n // 4, 5))
    j[3::8] = 0.0
    return j, j @ j.swapaxes(-1, -2)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_amtl_rule_rows_are_independent(k, mode):
    """The rule on (4, 16, K, K) rows (the toy's batches) gives each row what it gives that row alone
    (the balancer's call), bit for bit, with and without preferences (one vector or one per row)."""
    rng = np.random.default_rng(k)
    _, g = _grams(rng, k)
    prefs = [None, rng.uniform(0.1, 2.0, size=k), rng.uniform(0.1, 2.0, size=(64, k))]
    for p in prefs:
        for rel_tol in (EPS64, float(np.finfo(np.float32).eps)):
            w, rank, sigma2 = aligned_mtl_weights(g.reshape(4, 16, k, k), mode,
                                                  None if p is None else p.reshape((4, 16, k) if p.ndim == 2 else k),
                                                  rel_tol)
            assert w.shape == (4, 16, k) and rank.shape == sigma2.shape == (4, 16)
            for i in range(64):
                one = aligned_mtl_weights(g[i], mode, None if p is None else (p[i] if p.ndim == 2 else p), rel_tol)
                np.testing.assert_array_equal(w.reshape(64, k)[i], one[0])
                assert rank.reshape(64)[i] == one[1] and sigma2.reshape(64)[i] == one[2]


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("prefs", [None, [0.3, 1.7]])
@pytest.mark.parametrize("rel_tol", [EPS64, float(np.finfo(np.float32).eps)])
def test_amtl_k2_closed_form_matches_the_eigendecomposition(mode, prefs, rel_tol):
    """K = 2 runs in closed form (eigenvalues only, W p = α X p): the same rank and σ² bits as the
    eigh path (both read LAPACK's eigenvalues) and the same weights to rounding. The worst rows are
    the rank-1 ones: W = v₁v₁ᵀ from eigenvectors vs (M − λ₂I)/(λ₁ − λ₂), ~1e-14; 1e-12 leaves a margin."""
    rng = np.random.default_rng(7)
    j, g = _grams(rng, 2, n=400)
    p = None if prefs is None else np.array(prefs)
    w, rank, sigma2 = aligned_mtl_weights(g, mode, p, rel_tol)
    w_ref, rank_ref, sigma2_ref = aligned_mtl_weights(g, mode, p, rel_tol, closed_form=False)
    assert set(np.unique(rank)) == {0, 1, 2}
    np.testing.assert_array_equal(rank, rank_ref)
    np.testing.assert_array_equal(sigma2, sigma2_ref)
    err = np.abs(w - w_ref).max(-1) / np.abs(w_ref).max(-1).clip(1e-300)
    assert err.max() <= 1e-12, (err.max(), int(err.argmax()))


def test_amtl_k2_eigenvalues_are_torchs_bits():
    """The rank cut-off is a jump of the update: the rule's eigenvalues (``np.linalg.eigvalsh``) are the
    bits of the ``torch.linalg.eigh`` the balancer used before, on anti-parallel gradients too."""
    rng = np.random.default_rng(3)
    j = rng.normal(size=(20000, 2, 2)) * np.exp(rng.normal(size=(20000, 2, 1)) * 4)
    j[::2, 1] = -j[::2, 0] * rng.uniform(0.1, 10, size=(10000, 1)) + rng.normal(size=(10000, 2)) * 1e-9
    m = j @ j.swapaxes(-1, -2)
    np.testing.assert_array_equal(np.linalg.eigvalsh(m), torch.linalg.eigh(torch.from_numpy(m))[0].numpy())
    np.testing.assert_array_equal(np.linalg.eigvalsh(m), np.linalg.eigh(m)[0])


@pytest.mark.parametrize("k", [2, 3])
def test_amtl_rule_non_finite_rows(k):
    """A NaN or inf in a row's Gram matrix gives that row non-finite weights (the balancer then reports
    a non-finite update), raises nothing, and leaves the other rows alone."""
    rng = np.random.default_rng(0)
    _, g = _grams(rng, k, n=8)
    bad = g.copy()
    bad[2, 0, 0] = np.nan
    bad[5, k - 1, 0] = bad[5, 0, k - 1] = np.inf
    w = aligned_mtl_weights(bad)[0]
    assert not np.isfinite(w[2]).all() and not np.isfinite(w[5]).all()
    keep = [0, 1, 3, 4, 6, 7]
    np.testing.assert_array_equal(w[keep], aligned_mtl_weights(g[keep])[0])


def test_amtl_median_and_truncation_for_k5():
    """λ = (0, 1, 4, 9, 16): rank 4; σ² = 1 (min), 4 (lower median of four, as torch.median), 7.5 (mean);
    W 1 = σ/√λᵢ on the kept directions and 0 on the dropped (zero) gradient."""
    m = np.diag([16.0, 0.0, 4.0, 9.0, 1.0])
    root = np.array([4.0, np.inf, 2.0, 3.0, 1.0])
    for mode, s2 in (("min", 1.0), ("median", 4.0), ("rmse", 7.5)):
        w, rank, sigma2 = aligned_mtl_weights(m, mode)
        assert rank == 4 and sigma2 == pytest.approx(s2, rel=1e-15)
        np.testing.assert_allclose(w, math.sqrt(s2) / root, rtol=1e-14, atol=1e-300)


def test_amtl_gram_path_cut_off_and_extras():
    """The Gram path takes the cut-off from the gradients' dtype (the losses'), and both paths report the
    rank and σ² of the step."""
    jac = torch.tensor([[1.0, 0.0], [0.0, 1e-4]], dtype=torch.float64)
    a = gram(jac)
    w32 = AlignedMTL(2).gram_weights(a, torch.ones(2))  # float32 gradients: 1e-8 < 2·eps32, rank 1
    w64 = AlignedMTL(2).gram_weights(a, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(w32, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(w64, torch.tensor([1e-4, 1.0], dtype=torch.float64))
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    for path in ("jacobian", "gram"):
        theta.grad = None
        info = AlignedMTL(2, gradient_path=path).backward(jac @ theta, [theta])
        assert info.extras == {"rank": 2, "sigma2": pytest.approx(1e-8)}
        assert torch.allclose(theta.grad, torch.tensor([1e-4, 1e-4], dtype=torch.float64))
