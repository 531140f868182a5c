"""The shared simplex pieces (mtl_tune/balancers/_simplex.py): min-norm point and projection."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mtl_tune.balancers import _simplex
from mtl_tune.balancers._simplex import min_norm_simplex, min_norm_weights, project_to_simplex, project_to_simplex_rows

from ._properties import assert_gram_function_equivariant, property_cases


def test_min_norm_simplex_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(3, 7))
        g = rng.normal(size=(k, 4))
        a = g @ g.T
        w, _ = min_norm_simplex(a)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        samples = rng.dirichlet(np.ones(k), size=20000)
        assert w @ a @ w <= np.einsum("ni,ij,nj->n", samples, a, samples).min() + 1e-9


def test_min_norm_simplex_degenerate_inputs():
    assert min_norm_simplex(np.zeros((3, 3)))[0].sum() == pytest.approx(1.0)
    w, _ = min_norm_simplex(np.ones((4, 4)))  # identical gradients: any simplex point, finite
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    assert min_norm_simplex(np.array([[2.0]]))[0].tolist() == [1.0]


def test_project_to_simplex():
    assert project_to_simplex(np.array([0.2, 0.3, 0.5])).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert project_to_simplex(np.array([2.0, 0.0])).tolist() == pytest.approx([1.0, 0.0])
    assert project_to_simplex(np.array([1.0, 1.0])).tolist() == pytest.approx([0.5, 0.5])


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_min_norm_simplex_properties(case):
    # the min-norm point of the hull is symmetric in the tasks and its weights are scale-free;
    # active-set solve, exact on the support: rounding of eps·cond(A) ≲ 1e-13, hence 1e-10
    assert_gram_function_equivariant(lambda a: min_norm_simplex(a)[0], case, weight_degree=0, rtol=1e-10)


def test_project_to_simplex_rows_equals_the_one_row_projection():
    # the same operations per row (sort, cumulative sums, last index, threshold): bit for bit
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 7):
        v = rng.normal(size=(50, k)) * 3.0
        v[0] = 1.0 / k  # already on the simplex
        got = project_to_simplex_rows(v.reshape(5, 10, k))
        assert np.array_equal(got.reshape(50, k), np.stack([project_to_simplex(x) for x in v]))
        assert np.allclose(got.sum(-1), 1.0, rtol=0, atol=1e-14) and (got >= 0).all()


# ---------------------------------------------------------------------------- min_norm_weights, K ≥ 3
def _objective(a, w):
    return float(w @ a @ w)


@pytest.mark.parametrize("k", [3, 4, 6, 8])
@pytest.mark.parametrize("dim", [1, 2, 3, 9])
def test_min_norm_weights_small_supports_are_the_optimum(k, dim):
    # gradients in `dim` dimensions: the minimiser's support has at most dim + 1 tasks, so for
    # dim ≤ 2 (and for every K = 3) the batched small-support solve must answer every row itself;
    # otherwise rows may go to the active-set solver. Either way: the optimum of the simplex QP
    # (objective equal to the active-set solver's up to rounding of the scaled problem, KKT holds).
    rng = np.random.default_rng(100 * k + dim)
    g = rng.normal(size=(40, k, dim)) * np.exp(rng.normal(size=(40, k, 1)))
    a = g @ g.transpose(0, 2, 1)
    w, ok = min_norm_weights(a)
    assert ok.all() and (w >= 0).all() and np.allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)
    if dim <= 2 or k == 3:
        solved_alone = _simplex._small_supports(a)[1]
        assert solved_alone.all()
    for row, wr in zip(a, w):
        scale = np.abs(np.diag(row)).max()
        reference, _ = min_norm_simplex(row)
        assert _objective(row, wr) <= _objective(row, reference) + 1e-12 * scale
        assert (row @ wr >= _objective(row, wr) - 1e-11 * scale).all()   # KKT: no vertex improves


def test_min_norm_weights_falls_back_when_the_support_has_four_tasks():
    # a regular tetrahedron around the origin: the min-norm point is the origin, all four weights
    # 1/4; no support of at most three tasks reaches it, so the check must reject the best one
    v = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    a = v @ v.T
    assert not _simplex._small_supports(a[None])[1][0]
    w, ok = min_norm_weights(a)
    assert ok and np.allclose(w, 0.25, rtol=0, atol=1e-12)


def test_min_norm_weights_rows_alone_and_together_are_the_same_bits():
    rng = np.random.default_rng(7)
    for k in (3, 5):
        g = rng.normal(size=(30, k, 2))
        a = g @ g.transpose(0, 2, 1)
        together, _ = min_norm_weights(a)
        alone = np.stack([min_norm_weights(row[None])[0][0] for row in a])
        assert np.array_equal(together, alone)


def test_min_norm_weights_degenerate_rows():
    w, ok = min_norm_weights(np.stack([np.zeros((4, 4)), np.ones((4, 4)), np.diag([1.0, 2.0, 3.0, 4.0])]))
    assert ok.all() and np.isfinite(w).all() and np.allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)
    # independent gradients: w ∝ 1/‖gᵢ‖² (the KKT point with every task active)
    assert np.allclose(w[2], (1 / np.arange(1.0, 5.0)) / (1 / np.arange(1.0, 5.0)).sum(), rtol=1e-12)
    for bad in (np.nan, np.inf):   # no answer and no warning: the caller reports the failed row
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w, ok = min_norm_weights(np.full((1, 3, 3), bad))
        assert not ok.any() and np.isnan(w).all()
