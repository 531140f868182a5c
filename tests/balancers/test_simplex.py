"""The shared simplex pieces (mtl_tune/balancers/_simplex.py): min-norm point and projection."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_tune.balancers._simplex import min_norm_simplex, project_to_simplex, project_to_simplex_rows

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
