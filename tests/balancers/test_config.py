"""ConFIG: equal cosine with every task gradient, length = Σ projections, computed in the Gramian.

Tolerances: one K×K pseudo-inverse of a cosine matrix with cond ≲ 1e3 for these cases (rounding
~eps·cond ≲ 1e-13): 1e-10 relative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.config import RCOND, _pinv_hermitian, config_rows
from mtl_tune.registry import get_balancer

from ._helpers import random_jacobian, unit
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)

ONES = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731


def step(jac: torch.Tensor, **hp) -> tuple[torch.Tensor, torch.Tensor]:
    return get_balancer("config", jac.shape[0], **hp).combine(jac, ONES(jac.shape[0]))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_equal_cosines_and_projection_length(k):
    jac = random_jacobian(k, k + 3, 10 + k)
    d, c = step(jac)
    cos = unit(jac) @ unit(d)
    assert torch.allclose(cos, cos.mean().expand(k), rtol=1e-10, atol=0) and float(cos.min()) > 0
    assert float(d.norm()) == pytest.approx(float((jac @ unit(d)).sum()), rel=1e-12)
    assert torch.allclose(c @ jac, d, rtol=0, atol=1e-13 * float(d.norm()))


def test_two_task_closed_form():
    # K = 2: d = ½(‖g₁‖ + ‖g₂‖)(u₁ + u₂), c_i = (‖g₁‖ + ‖g₂‖)/(2‖g_i‖)
    jac = torch.tensor([[3.0, 0.0, 1.0], [-1.0, 2.0, 0.0]], dtype=torch.float64)
    n = jac.norm(dim=1)
    d, c = step(jac)
    assert torch.allclose(c, (n.sum() / (2 * n)), rtol=1e-13, atol=0)
    assert torch.allclose(d, 0.5 * n.sum() * (unit(jac[0]) + unit(jac[1])), rtol=1e-13, atol=1e-15)


def test_two_tasks_share_imtl_gs_direction():
    # both follow the bisector u₁ + u₂ for K = 2; lengths differ: ConFIG ½(n₁ + n₂), IMTL-G n₁n₂/(n₁ + n₂)
    jac = random_jacobian(2, 5, 8)
    n = jac.norm(dim=1)
    d, _ = step(jac)
    d_imtl, _ = get_balancer("imtl", 2).combine(jac, ONES(2))
    ratio = 0.5 * n.sum() / (n.prod() / n.sum())
    assert torch.allclose(d, ratio * d_imtl, rtol=1e-12, atol=0)


def test_degenerate_inputs():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d, c = step(torch.stack([g, -3.0 * g]))              # opposite: d = 0
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64)) and torch.equal(c, torch.zeros(2, dtype=torch.float64))
    d, c = step(g.repeat(4, 1))                          # identical: the sum
    assert torch.allclose(d, 4 * g, rtol=1e-12, atol=0)
    d, c = step(torch.stack([torch.zeros(3, dtype=torch.float64), g]))  # a zero gradient drops out
    assert torch.allclose(d, g, rtol=1e-14, atol=0) and c[0] == 0
    d, c = step(torch.zeros(3, 3, dtype=torch.float64))  # all zero
    assert torch.equal(d, torch.zeros(3, dtype=torch.float64))


def test_batch_rows_match_single_rows():
    grams = np.stack([(j @ j.T) for j in (random_jacobian(3, 4, s).numpy() for s in range(4))])
    batch = config_rows(grams)
    for r in range(4):
        assert np.allclose(batch[r], config_rows(grams[r]), rtol=1e-14, atol=0)


#: the NumPy releases whose ``pinv(hermitian=True)`` _pinv_hermitian restates operation for operation
#: (read in their source): there it must give the same floats. A later NumPy may reorder its pinv;
#: then only the rounding-level agreement is required (ConFIG stays the paper's formula), and the
#: bit-for-bit claim in config.py should be re-read against the new source.
NUMPY_PINV_VERIFIED = tuple(int(p) for p in np.__version__.split(".")[:2]) <= (2, 4)


def test_pinv_without_numpys_wrappers_is_numpys_pinv_bit_for_bit():
    """_pinv_hermitian is NumPy's hermitian pinv without its wrappers: the same floats, both where
    |eigenvalues| rise strictly in every row (the descending order is the reversal, by slicing) and
    where they do not (ties, negative eigenvalues: NumPy's argsort), for any leading shape."""
    rng = np.random.default_rng(0)
    rising, other = 0, 0
    for trial in range(400):
        k, shape = int(rng.integers(1, 6)), [(), (5,), (2, 3)][trial % 3]
        j = rng.normal(size=(*shape, k, k + 2))
        if trial % 4 == 1:
            j[..., 0, :] = 0.0                                # a zero gradient: a zero eigenvalue
        u = j / np.maximum(np.linalg.norm(j, axis=-1, keepdims=True), 1e-300)
        a = u @ np.swapaxes(u, -1, -2)                       # cosine matrices: PSD, |λ| rising bar rounding
        if trial % 4 == 2:
            a = np.broadcast_to(np.eye(k), a.shape).copy()   # orthogonal gradients: equal eigenvalues
        if trial % 4 == 3:
            a = a - 1.5 * np.eye(k)                          # negative eigenvalues: |λ| out of order
        s = np.abs(np.linalg.eigh(a)[0])
        if (s[..., 1:] > s[..., :-1]).all():
            rising += 1
        else:
            other += 1
        mine, numpys = _pinv_hermitian(a, RCOND), np.linalg.pinv(a, rcond=RCOND, hermitian=True)
        # a pseudo-inverse whatever NumPy's version: eigh's backward error is O(eps ‖A‖), so the kept
        # 1/λ move by O(eps κ) relative, κ = λmax / smallest kept |λ| (all matrices here are far from rcond)
        kept = s[s > RCOND * s.max(axis=-1, keepdims=True)] if s.size else s
        kappa = float(s.max() / kept.min()) if kept.size else 1.0
        scale = float(np.abs(numpys).max()) if numpys.size else 0.0
        assert np.abs(mine - numpys).max(initial=0.0) <= 64 * k * np.finfo(float).eps * kappa * scale
        if NUMPY_PINV_VERIFIED:
            assert np.array_equal(mine, numpys)
    assert rising > 100 and other > 100


def test_config_rows_are_the_formula_bit_for_bit():
    """config_rows (masked divisions, the diagonal written in place) against the module docstring's
    formula written with np.where and NumPy's pinv: the same floats, zero and opposite gradients and
    preferences included."""
    rng = np.random.default_rng(1)

    def reference(g, w):
        norms = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
        nonzero = norms > 0.0
        inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
        cos = g * inv[..., :, None] * inv[..., None, :]
        eye = np.eye(g.shape[-1], dtype=bool)
        cos = np.where(eye, nonzero[..., None, :] & eye, cos)
        beta = inv * (np.linalg.pinv(cos, rcond=RCOND, hermitian=True) @ w)
        q = (g @ beta[..., None])[..., 0]
        energy, length = (beta * q).sum(-1), q.sum(-1)
        return np.where(energy > 0.0, length / np.where(energy > 0.0, energy, 1.0), 0.0)[..., None] * beta

    for trial in range(300):
        k, shape = int(rng.integers(1, 6)), [(), (5,), (2, 3)][trial % 3]
        j = rng.normal(size=(*shape, k, 3))
        if trial % 5 == 1:
            j[..., 0, :] = 0.0
        if trial % 5 == 2:
            j[..., -1, :] = -2.0 * j[..., 0, :]
        if trial % 5 == 3:
            j[:] = 0.0
        g = j @ np.swapaxes(j, -1, -2)
        if trial % 2:
            g = np.swapaxes(g, -1, -2)                       # a view, not C-contiguous
        w = np.ones(k) if trial % 3 else rng.random(k)
        assert np.array_equal(config_rows(g, None if trial % 3 else w), reference(g, w))


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_config_properties(case):
    # unit vectors and C⁺ are scale-free, the length is linear: d degree 1, c degree 0
    s = balancer_step("config")
    assert_valid_step(*s(case.jac, case.losses), case)
    assert_permutation_equivariant(s, case, rtol=1e-10)
    assert_gradient_scaling(s, case, degree=1, weight_degree=0, rtol=1e-10)
    assert_gram_function_equivariant(lambda a: config_rows(a), case, weight_degree=0, rtol=1e-10)


@pytest.mark.parametrize("k,p,seed", [(k, p, s) for k in (2, 3, 4, 7) for p in (k, k + 5) for s in range(3)])
def test_parity_with_torchjd(k, p, seed):
    """TorchJD's ConFIG (pinv of the K×P unit-gradient matrix) on the same Jacobian; with preferences
    as its pref_vector. Agreement to the pseudo-inverses' rounding."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(k, p, 7 * k + seed)
    d, _ = step(jac)
    ref = aggregation.ConFIG()(jac)
    assert float((d - ref).norm()) <= 1e-10 * float(ref.norm())
    prefs = torch.linspace(0.2, 2.0, k, dtype=torch.float64)
    d_p, _ = step(jac, preferences=prefs.tolist())
    ref_p = aggregation.ConFIG(pref_vector=prefs)(jac)
    assert float((d_p - ref_p).norm()) <= 1e-10 * float(ref_p.norm())


@pytest.mark.parametrize("name,jac", [
    ("identical", random_jacobian(1, 5, 1).repeat(3, 1)),
    ("zero row", torch.cat([torch.zeros(1, 5, dtype=torch.float64), random_jacobian(2, 5, 2)])),
    ("opposite", torch.cat([random_jacobian(1, 5, 3), -2 * random_jacobian(1, 5, 3)])),
    ("rank 2 of 4", random_jacobian(4, 2, 4)),
])
def test_parity_with_torchjd_on_degenerate_inputs(name, jac):
    """Singular unit-gradient matrices: TorchJD's pinv cut-off (max(K, P)·eps on U's singular values)
    and ours (1e-12 on C's eigenvalues) drop the same exactly-null directions here."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    d, _ = step(jac)
    ref = aggregation.ConFIG()(jac)
    scale = float(jac.norm())
    assert float((d - ref).norm()) <= 1e-10 * scale, (d, ref)
