"""Coordinate-wise trimmed mean: a ``direction_rows`` rule on the Jacobian (not a combination of the
task gradients). References: hand cases, ``torch.median``, and TorchJD 0.18.0's TrimmedMean. The
direction is a mean of sorted entries: exact up to the rounding of K − 2t additions (1e-15 relative)."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers import trimmedmean as tm
from mtl_tune.registry import get_balancer

from ._helpers import random_jacobian
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)

ONES = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731


def step(jac: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    return get_balancer("trimmedmean", jac.shape[0], trim_number=t).combine(jac, ONES(jac.shape[0]))


def test_known_answers():
    jac = torch.tensor([[1.0, 10.0, -1.0], [2.0, -5.0, 0.0], [30.0, 0.0, 4.0]], dtype=torch.float64)
    d, w = step(jac, 1)                                   # K = 3, t = 1: the coordinate-wise median
    assert torch.equal(d, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(d, jac.median(0).values)
    d0, w0 = step(jac, 0)                                 # t = 0: the mean, every weight 1/K
    assert torch.allclose(d0, jac.mean(0), rtol=1e-15, atol=0)
    assert torch.allclose(w0, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=1e-15, atol=0)


def test_effective_weights():
    # column-wise medians: col 0 keeps task 1 (2), col 1 keeps task 2 (0), col 2 keeps task 1 (0)
    jac = torch.tensor([[1.0, 10.0, -1.0], [2.0, -5.0, 0.0], [30.0, 0.0, 4.0]], dtype=torch.float64)
    _, w = step(jac, 1)
    want = torch.tensor([0.0, 4.0 / 29.0, 0.0], dtype=torch.float64)   # ⟨m ⊙ g, g⟩/‖g‖², m = kept/1
    assert torch.allclose(w, want, rtol=1e-15, atol=0)
    # a zero gradient reports the mean of its multipliers (ties: the stable sort keeps lower indices first)
    z = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, 3.0]], dtype=torch.float64)
    _, w = step(z, 1)
    assert float(w[0]) == pytest.approx(0.5)          # kept in column 1 (the median 0 of (0, −1, 3)), not in 0


def test_validation_against_k():
    with pytest.raises(ValueError, match="K ≥ 2·trim_number \\+ 1 = 3"):
        get_balancer("trimmedmean", 2, trim_number=1)
    with pytest.raises(ValueError, match="non-negative integer"):
        get_balancer("trimmedmean", 5, trim_number=-1)
    with pytest.raises(ValueError, match="Jacobian"):
        get_balancer("trimmedmean", 3, gradient_path="gram")
    get_balancer("trimmedmean", 1)                   # t = 0: the one gradient


def test_blocks_and_rows_give_the_same_numbers(monkeypatch):
    jac = random_jacobian(5, 37, 3)
    d, w = tm.trimmed_mean(jac, 2)
    monkeypatch.setattr(tm, "BLOCK_ENTRIES", 5 * 4)   # column blocks of 4
    d_b, w_b = tm.trimmed_mean(jac, 2)
    assert torch.equal(d, d_b) and torch.allclose(w, w_b, rtol=1e-15, atol=0)
    rows = torch.stack([random_jacobian(5, 37, s) for s in range(4)])
    d_r, w_r = tm.trimmed_mean(rows, 2)
    for r in range(4):
        d1, w1 = tm.trimmed_mean(rows[r], 2)
        assert torch.equal(d_r[r], d1) and torch.allclose(w_r[r], w1, rtol=1e-15, atol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_nothing_trimmed_from_two_skips_the_sort_with_the_same_floats(k, monkeypatch):
    """t = 0 with K ≤ 2: the mean of the sorted entries is the mean in task order bit for bit
    (a + b = b + a), so the sort is skipped; direction and weights equal the sorted path's, in one
    block (the shortcut: the mean and w = 1/K, no energies) and in column blocks (the loop), float64
    and float32, with zero, tiny and non-finite rows."""
    def sorted_path(jac, block):   # the general loop with t = 0: sort, keep all, the same sums
        scale = jac.abs().amax(-1, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        kept_energy = torch.zeros(jac.shape[:-1], dtype=jac.dtype)
        parts = []
        for start in range(0, jac.shape[-1], block):
            part = jac[..., start:start + block]
            parts.append(torch.sort(part, dim=-2, stable=True).values.mean(-2))
            r = part / safe
            kept_energy += (r * r * torch.ones_like(part, dtype=torch.bool)).sum(-1)
        energy = (jac / safe).square().sum(-1)
        w = torch.where(energy > 0, kept_energy / torch.where(energy > 0, energy, torch.ones_like(energy)), 1.0) / k
        return torch.cat(parts, -1), w

    rows = torch.stack([random_jacobian(k, 37, s) for s in range(5)])
    rows[0, 0, :3] = torch.tensor([0.0, -0.0, 1e-300])
    rows[1] = 0.0
    rows[2, -1, 5] = float("nan")
    rows[3, 0, 7] = float("inf")
    for jac in (rows, rows.float(), rows[0]):
        for block in (37, 4):
            monkeypatch.setattr(tm, "BLOCK_ENTRIES", max(1, jac.shape[:-1].numel()) * block)
            d, w = tm.trimmed_mean(jac, 0)
            want_d, want_w = sorted_path(jac, block)
            torch.testing.assert_close(d, want_d, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(w, want_w, rtol=0, atol=0, equal_nan=True)
            if block == 37:   # one block: the kept share is the whole energy, w = 1/K exactly
                assert torch.equal(w, torch.full_like(w, 1.0 / k))


def test_float32_jacobian_stays_float32():
    jac = random_jacobian(3, 6, 1).float()
    d, w = step(jac, 1)
    assert d.dtype == torch.float32 and torch.equal(d, jac.median(0).values)


@pytest.mark.parametrize("case", property_cases(ks=(2, 3, 4)), ids=repr)
def test_trimmedmean_properties(case):
    # order statistics commute with relabelling the tasks and with a positive common scale
    t = (case.k - 1) // 2
    s = balancer_step("trimmedmean", trim_number=t)
    assert_valid_step(*s(case.jac, case.losses), case)
    assert_permutation_equivariant(s, case, rtol=1e-15)
    assert_gradient_scaling(s, case, degree=1, weight_degree=0, rtol=1e-15)


@pytest.mark.parametrize("k,t", [(1, 0), (2, 0), (3, 1), (5, 1), (5, 2), (8, 3), (11, 5)])
def test_parity_with_torchjd(k, t):
    aggregation = pytest.importorskip("torchjd.aggregation")
    for seed in range(3):
        jac = random_jacobian(k, 50, 13 * k + seed)
        d, _ = step(jac, t)
        assert torch.allclose(d, aggregation.TrimmedMean(trim_number=t)(jac), rtol=1e-15, atol=1e-15)
    same = random_jacobian(1, 20, k).repeat(k, 1)      # identical gradients: that gradient
    d, w = step(same, t)
    assert torch.allclose(d, aggregation.TrimmedMean(trim_number=t)(same), rtol=1e-15, atol=0)
    assert torch.allclose(d, same[0], rtol=1e-15, atol=0)
