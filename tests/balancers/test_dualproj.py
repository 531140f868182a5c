"""DualProj: the mean gradient projected onto the dual cone (the projection itself is tested against
a brute force in test_upgrad.py). Tolerances as there: K×K solves on a trace-normalised Gramian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.dualproj import dualproj_rows
from mtl_tune.registry import get_balancer

from ._helpers import random_jacobian
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)

ONES = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731


def test_mean_in_the_cone_is_kept_exactly():
    jac = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)   # g₁ᵀg₂ < 0, but g_iᵀ mean > 0
    assert bool((jac @ jac.mean(0) > 0).all())
    d, w = get_balancer("dualproj", 2).combine(jac, ONES(2))
    assert torch.equal(w, torch.full((2,), 0.5, dtype=torch.float64))


def test_two_task_closed_form_when_the_mean_conflicts():
    # mean m with g₁ᵀm < 0 ≤ g₂ᵀ(m − (g₁ᵀm/‖g₁‖²) g₁): the projection on the half-space g₁ᵀx ≥ 0
    jac = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    m = jac.mean(0)
    assert float(jac[0] @ m) < 0
    want = m - (jac[0] @ m) / (jac[0] @ jac[0]) * jac[0]
    assert float(jac[1] @ want) >= 0
    d, w = get_balancer("dualproj", 2).combine(jac, ONES(2))
    assert torch.allclose(d, want, rtol=1e-14, atol=1e-15)
    assert abs(float(jac[0] @ d)) <= 1e-15


def test_opposite_gradients_give_zero_and_cone_is_respected():
    g = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    d, _ = get_balancer("dualproj", 2).combine(torch.stack([g, -2.0 * g]), ONES(2))
    assert float(d.abs().max()) <= 1e-15
    for seed in range(5):
        jac = random_jacobian(5, 3, seed)
        d, _ = get_balancer("dualproj", 5).combine(jac, ONES(5))
        assert float((jac @ d).min()) >= -1e-12 * float(jac.norm()) ** 2


def test_batch_rows_match_single_rows():
    for k in (2, 4):
        grams = np.stack([(j @ j.T) for j in (random_jacobian(k, 2, s).numpy() for s in range(4))])
        batch, ok = dualproj_rows(grams)
        assert ok.all()
        for r in range(4):
            assert np.array_equal(batch[r], dualproj_rows(grams[r])[0])


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_dualproj_properties(case):
    step = balancer_step("dualproj")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)
    assert_gram_function_equivariant(lambda a: dualproj_rows(a)[0], case, weight_degree=0, rtol=1e-10)


@pytest.mark.parametrize("k,p,seed", [(k, p, s) for k in (2, 3, 5) for p in (1, 2, k + 2) for s in range(3)])
def test_parity_with_torchjd(k, p, seed):
    """TorchJD's reg_eps = norm_eps = 1e-4 reproduced to the solvers' tolerance (quadprog vs exact
    active set); with preferences p TorchJD's pref_vector is p/K. Default (both 0) vs TorchJD with both
    0 where quadprog accepts G (p ≥ K)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd._linalg import QuadprogProjector
    jac = random_jacobian(k, p, 50 * k + seed)
    ours, _ = get_balancer("dualproj", k, reg_eps=1e-4, norm_eps=1e-4).combine(jac, ONES(k))
    ref = aggregation.DualProj()(jac)
    assert float((ours - ref).norm()) <= 1e-9 * float(ref.norm()) + 1e-15
    prefs = torch.linspace(0.5, 1.5, k, dtype=torch.float64)
    ours_p, _ = get_balancer("dualproj", k, preferences=prefs.tolist(), reg_eps=1e-4, norm_eps=1e-4).combine(jac, ONES(k))
    ref_p = aggregation.DualProj(pref_vector=prefs / k)(jac)
    assert float((ours_p - ref_p).norm()) <= 1e-9 * float(ref_p.norm()) + 1e-15
    if p >= k:
        exact, _ = get_balancer("dualproj", k).combine(jac, ONES(k))
        ref0 = aggregation.DualProj(projector=QuadprogProjector(reg_eps=0.0, norm_eps=0.0))(jac)
        assert float((exact - ref0).norm()) <= 1e-9 * float(ref0.norm()) + 1e-15


def test_parity_with_torchjd_on_identical_gradients():
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(1, 4, 7).repeat(3, 1)
    ours, w = get_balancer("dualproj", 3).combine(jac, ONES(3))
    assert torch.equal(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(ours, aggregation.DualProj()(jac), rtol=1e-12, atol=0)
