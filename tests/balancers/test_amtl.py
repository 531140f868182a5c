"""Aligned-MTL: the update from the nearest orthogonal, equal-norm gradient system."""

from __future__ import annotations

import math

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
    weights, rank, sigma2 = aligned_mtl_weights(gram(jac))
    assert rank == 4 and sigma2 == pytest.approx(float(s.min() ** 2))
    assert torch.allclose(weights @ jac, expected, atol=1e-10)


@pytest.mark.parametrize("scale", [[1.0, 1.0, 1.0], [0.01, 1.0, 50.0]])
def test_amtl_equal_projection_on_aligned_gradients_under_rescaling(scale):
    jac = torch.randn(3, 7, dtype=torch.float64) * torch.tensor(scale, dtype=torch.float64).view(3, 1)
    w, rank, sigma2 = alignment_matrix(gram(jac), "min", rel_tol=EPS64)
    aligned = w @ jac  # rows ĝ_i
    d = aligned.sum(0)
    assert torch.allclose(aligned @ aligned.T, sigma2 * torch.eye(3, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    assert torch.allclose(aligned @ d, torch.full((3,), sigma2, dtype=torch.float64), rtol=1e-8)
    prefs = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    d_pref = aligned_mtl_weights(gram(jac), "min", prefs, rel_tol=EPS64)[0] @ jac
    assert torch.allclose(aligned @ d_pref, sigma2 * prefs, rtol=1e-8)


def test_amtl_direction_of_orthogonal_gradients_is_scale_invariant():
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
    base = aligned_mtl_weights(gram(q.T))[0] @ q.T
    scaled_jac = q.T * torch.tensor([[0.1], [3.0], [40.0]], dtype=torch.float64)
    w, _, sigma2 = aligned_mtl_weights(gram(scaled_jac))
    assert sigma2 == pytest.approx(0.01)  # min mode: smallest eigenvalue
    assert torch.allclose(w @ scaled_jac, 0.1 * base, atol=1e-12)


@pytest.mark.parametrize("mode,sigma2", [("min", 1.0), ("median", 4.0), ("rmse", 14 / 3)])
def test_amtl_scale_modes(mode, sigma2):
    jac = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    weights, rank, s2 = aligned_mtl_weights(gram(jac), mode)
    assert s2 == pytest.approx(sigma2)
    assert torch.allclose(weights, math.sqrt(sigma2) / torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_amtl_float32_tolerance_truncates_a_much_smaller_independent_gradient():
    jac = torch.tensor([[1.0, 0.0], [0.0, 1e-4]])  # λ ratio 1e-8 < 2·eps32: rank 1 (official tolerance)
    d, w = AlignedMTL(2).combine(jac, torch.ones(2))
    assert torch.allclose(w, torch.tensor([1.0, 0.0], dtype=torch.float64)) and torch.allclose(d, jac[0])
    d64, w64 = AlignedMTL(2).combine(jac.double(), torch.ones(2))  # float64 gradients keep it
    assert torch.allclose(w64, torch.tensor([1e-4, 1.0], dtype=torch.float64))


def test_amtl_rank_deficient_and_zero():
    g = torch.randn(2, 6, dtype=torch.float64)
    jac = torch.cat([g, (g[0] + g[1]).view(1, -1)])
    weights, rank, _ = aligned_mtl_weights(gram(jac))
    assert rank == 2 and torch.isfinite(weights).all()
    w, rank, sigma2 = aligned_mtl_weights(torch.zeros(3, 3))
    assert rank == 0 and sigma2 == 0.0 and torch.equal(w, torch.zeros(3, dtype=torch.float64))


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
    assert_gram_function_equivariant(lambda a: aligned_mtl_weights(torch.from_numpy(a))[0], case, weight_degree=0,
                                     rtol=1e-10)
