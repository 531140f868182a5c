"""The shared simplex pieces (mtl_tune/balancers/_simplex.py): min-norm point and projection."""

from __future__ import annotations

import itertools
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


def _small_supports_written_out(rows):
    """_small_supports's formulas written out candidate kind by candidate kind, entry by entry (the
    implementation gathers them lane-major to make fewer NumPy calls): the same operations per element."""
    n, k = rows.shape[0], rows.shape[-1]
    pairs = np.array(list(itertools.combinations(range(k), 2))).reshape(-1, 2)
    triples = np.array(list(itertools.combinations(range(k), 3))).reshape(-1, 3)
    with np.errstate(all="ignore"):
        diag = np.diagonal(rows, axis1=-2, axis2=-1)
        scale = np.maximum(np.abs(diag).max(-1), 1e-300)
        a = rows / scale[:, None, None]
        d = diag / scale[:, None]
        i, j = pairs.T
        aii, ajj, aij = a[:, i, i], a[:, j, j], a[:, i, j]
        gamma = (ajj - aij) / (aii + ajj - 2.0 * aij)
        gamma = np.where((gamma > 0) & (gamma < 1), gamma, np.nan)
        rest = 1.0 - gamma
        edge_obj = aii * gamma * gamma + 2.0 * aij * gamma * rest + ajj * rest * rest
        x, y, z = triples.T
        p_, s_, u_, q_, r_, t_ = a[:, x, x], a[:, y, y], a[:, z, z], a[:, x, y], a[:, x, z], a[:, y, z]
        c_xy, c_xz, c_yz = r_ * t_ - q_ * u_, q_ * t_ - r_ * s_, q_ * r_ - p_ * t_
        wx = (s_ * u_ - t_ * t_) + c_xy + c_xz
        wy = c_xy + (p_ * u_ - r_ * r_) + c_yz
        wz = c_xz + c_yz + (p_ * s_ - q_ * q_)
        total = wx + wy + wz
        wx, wy, wz = wx / total, wy / total, wz / total
        inside = (wx > 0) & (wy > 0) & (wz > 0)
        wx, wy, wz = np.where(inside, wx, np.nan), np.where(inside, wy, np.nan), np.where(inside, wz, np.nan)
        tri_obj = (p_ * wx * wx + s_ * wy * wy + u_ * wz * wz + 2.0 * (q_ * wx * wy + r_ * wx * wz + t_ * wy * wz))
    obj = np.concatenate([d, edge_obj, tri_obj], axis=1)
    best = np.argmin(np.where(np.isnan(obj), np.inf, obj), axis=1)
    w = np.zeros((n, k))
    for r in range(n):
        c = best[r]
        if c < k:
            w[r, c] = 1.0
        elif c < k + len(pairs):
            w[r, pairs[c - k]] = gamma[r, c - k], rest[r, c - k]
        else:
            w[r, triples[c - k - len(pairs)]] = [v[r, c - k - len(pairs)] for v in (wx, wy, wz)]
    obj_best = obj[np.arange(n), best]
    grad = (a * w[:, None, :]).sum(-1)
    ok = np.isfinite(obj_best) & (grad >= obj_best[:, None] - _simplex.KKT_TOL).all(-1)
    return np.where(ok[:, None], w, np.nan), ok


@pytest.mark.parametrize("k", [3, 4, 5, 8])
def test_small_supports_are_the_formulas_bit_for_bit(k):
    # gradients in 1–4 dimensions (vertex, edge and triangle minimisers, supports of four that fail the
    # check), repeated and zero gradients (ties, flat edges), a row of zeros and non-finite rows
    rng = np.random.default_rng(k)
    for dim in (1, 2, 3, 4):
        g = rng.normal(size=(30, k, dim)) * np.exp(2 * rng.normal(size=(30, k, 1)))
        g[1, 1], g[2, 0], g[3] = g[1, 0], 0.0, np.round(g[3])
        rows = g @ g.transpose(0, 2, 1)
        rows[4] = 0.0
        rows[5, 0, 0], rows[6, 1, 2] = np.nan, np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # non-finite rows: NaN candidates, quietly
            got, ok = _simplex._small_supports(rows)
        with np.errstate(invalid="ignore"):
            want, want_ok = _small_supports_written_out(rows)
        np.testing.assert_array_equal(ok, want_ok)
        assert np.array_equal(got, want, equal_nan=True) and np.array_equal(np.signbit(got), np.signbit(want))


def test_min_norm_weights_two_tasks_rows_alone_and_with_a_flat_row_are_the_same_bits():
    # identical gradients (denominator 0: the midpoint) take the guarded lines; a batch without such a
    # row takes the unguarded ones: the ordinary rows must not see the difference
    rng = np.random.default_rng(3)
    g = rng.normal(size=(8, 2, 3))
    g[2, 1] = g[2, 0]
    a = g @ g.transpose(0, 2, 1)
    together, ok = min_norm_weights(a)
    assert ok.all() and together[2].tolist() == [0.5, 0.5]
    for i in range(8):
        assert np.array_equal(min_norm_weights(a[i])[0], together[i])
    assert np.array_equal(min_norm_weights(np.delete(a, 2, axis=0))[0], np.delete(together, 2, axis=0))


def test_min_norm_weights_active_set_rows_among_small_support_rows():
    # the tetrahedron's row needs the active-set solver; the other rows return from the small supports
    # alone (no active-set pass) and must be the same bits among it
    v = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    rng = np.random.default_rng(4)
    g = rng.normal(size=(5, 4, 2))
    a = np.concatenate([g @ g.transpose(0, 2, 1), (v @ v.T)[None]])
    together, ok = min_norm_weights(a)
    assert ok.all() and np.allclose(together[-1], 0.25, rtol=0, atol=1e-12)
    alone, ok_alone = min_norm_weights(a[:-1])
    assert ok_alone.all() and np.array_equal(alone, together[:-1])
