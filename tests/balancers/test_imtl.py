"""IMTL-G: weights that give every task the same projection of the update."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_tune.balancers.base import BalancerError, gram
from mtl_tune.balancers.imtl import imtl_g_weights

from ._helpers import unit
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)


def official_imtl(jac: torch.Tensor) -> torch.Tensor:
    """The paper's closed form α_{2:} = g_1 Uᵀ (D Uᵀ)^{-1}, float64, for comparison."""
    g = jac.double()
    u = unit(g)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = (g[0] @ uu.T) @ torch.linalg.inv(d @ uu.T)
    return torch.cat([(1 - rest.sum()).view(1), rest])


def test_imtl_equal_projections_and_matches_closed_form():
    jac = torch.randn(5, 30, dtype=torch.float64)
    alpha, n_zero, t = imtl_g_weights(gram(jac))
    d = alpha @ jac
    proj = unit(jac) @ d
    assert n_zero == 0
    assert torch.allclose(proj, torch.full_like(proj, t), rtol=1e-9, atol=1e-12)
    assert alpha.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(alpha, official_imtl(jac), rtol=1e-8, atol=1e-10)


def test_imtl_two_tasks_closed_form():
    g1, g2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    alpha, _, t = imtl_g_weights(gram(torch.stack([g1, g2])))
    n1, n2 = 3.0, math.sqrt(2.0)
    assert torch.allclose(alpha, torch.tensor([n2, n1], dtype=torch.float64) / (n1 + n2), atol=1e-12)
    d = alpha[0] * g1.double() + alpha[1] * g2.double()
    expected = n1 * n2 / (n1 + n2) * (unit(g1.double()) + unit(g2.double()))
    assert torch.allclose(d, expected, atol=1e-12)


def test_imtl_opposite_gradients_give_zero_update():
    g1 = torch.tensor([1.0, 2.0, -1.0])
    alpha, _, t = imtl_g_weights(gram(torch.stack([g1, -2 * g1])))
    assert torch.allclose(alpha, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), atol=1e-10)
    assert t == pytest.approx(0.0, abs=1e-10)


def test_imtl_collinear_same_direction_is_finite():
    g1 = torch.tensor([1.0, 2.0, -1.0])
    jac = torch.stack([g1, 3 * g1, torch.tensor([0.0, 1.0, 2.0])])
    alpha, _, t = imtl_g_weights(gram(jac))
    proj = unit(jac.double()) @ (alpha @ jac.double())
    assert torch.isfinite(alpha).all() and alpha.sum().item() == pytest.approx(1.0)
    assert torch.allclose(proj, torch.full_like(proj, t), atol=1e-9)


def test_imtl_zero_gradient_task_is_dropped():
    g2, g3 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    alpha, n_zero, _ = imtl_g_weights(gram(torch.stack([torch.zeros(2), g2, g3])))
    assert n_zero == 1
    assert torch.allclose(alpha, torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64), atol=1e-12)
    all_zero, n_zero, _ = imtl_g_weights(torch.zeros(4, 4))
    assert n_zero == 4 and torch.allclose(all_zero, torch.full((4,), 0.25, dtype=torch.float64))


def test_imtl_undefined_case_raises():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(BalancerError, match="undefined"):
        imtl_g_weights(gram(torch.stack([g1, g2, (g1 + g2) / 2])))


def test_imtl_extreme_norms():
    dirs = unit(torch.randn(3, 8, dtype=torch.float64))
    jac = dirs * torch.tensor([[1e-12], [1.0], [1e12]], dtype=torch.float64)
    alpha, _, t = imtl_g_weights(gram(jac))
    proj = unit(jac) @ (alpha @ jac)
    assert torch.isfinite(alpha).all()
    assert torch.allclose(proj, torch.full_like(proj, t), rtol=1e-6)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_imtl_properties(case):
    # the equal-projection conditions are homogeneous in J: α is scale-free, d = Σ α_i g_i.
    # a Gram-matrix solve: rounding of eps·cond(A), cond(A) ≲ 1e3 for these K ≤ 4 independent rows
    # with norms ~3× apart, so ≲ 1e-13; 1e-10 leaves a margin
    step = balancer_step("imtl")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_imtl_g_weights_properties(case):
    # α on the simplex from homogeneous equal-projection conditions: scale-free, symmetric;
    # a K×K solve: eps·cond(A) ≲ 1e-13, hence 1e-10
    assert_gram_function_equivariant(lambda a: imtl_g_weights(torch.from_numpy(a))[0], case, weight_degree=0,
                                     rtol=1e-10)


def test_imtl_two_task_rows_fast_path_is_the_general_closed_form_bit_for_bit():
    """K = 2: rows whose gradients are all nonzero take the branch-free path; a batch with a zero
    gradient anywhere takes the general one (np.where over the cases). Both give the same bits
    where both apply, and a mixed batch gives each row what it gets alone."""
    import numpy as np

    from mtl_tune.balancers import imtl as module

    rng = np.random.default_rng(0)
    jac = rng.normal(size=(200, 2, 3)) * 10.0 ** rng.uniform(-6, 6, size=(200, 2, 1))
    a = (jac[..., :, None, :] * jac[..., None, :, :]).sum(-1)
    norms = np.sqrt(np.maximum(np.diagonal(a, axis1=-2, axis2=-1), 0.0))
    fast, general = module._imtl2_nonzero(a, norms), module._imtl2(a, norms)
    for x, y in zip(fast, general):
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)
    assert np.array_equal(module.imtl_rows(a)[0], fast[0])          # the fast path is taken
    for one, one_norms in zip(a[:20], norms):                       # one row (no leading dimension) too
        assert all(np.array_equal(x, y) for x, y in zip(module.imtl_rows(one), module._imtl2(one, one_norms)))
    mixed = a[:6].copy()
    mixed[2, 0, :] = mixed[2, :, 0] = 0.0                           # row 2: task 1's gradient is zero
    alpha, n_zero, t, ok = module.imtl_rows(mixed)                  # the general path
    assert n_zero.tolist() == [0, 0, 1, 0, 0, 0] and ok.all() and alpha[2].tolist() == [0.0, 1.0]
    for r in (0, 1, 3, 4, 5):
        assert np.array_equal(alpha[r], fast[0][r]) and t[r] == fast[2][r]
