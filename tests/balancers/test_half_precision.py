"""float16 models: weights far beyond float16's range (FairGrad-like 1/‖g‖ for small gradients) must
still give the finite direction Σ cᵢ gᵢ on both gradient paths (they gave inf/NaN, on the Gram path
silently)."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers import get_balancer
from mtl_tune.balancers._common import half_scale, weighted_rows

#: per-task gradients of ≈ 1e-4: ordinary in float16 training, and FairGrad's weights are then ≈ 1e5
GRADS = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, 1.0]]) * 1e-4


def _direction(method: str, path: str, dtype: torch.dtype) -> torch.Tensor:
    p = torch.zeros(4, dtype=dtype, requires_grad=True)
    losses = GRADS.to(dtype) @ p + torch.tensor([1.0, 2.0], dtype=dtype)   # ∇ℓᵢ = GRADS[i] exactly
    get_balancer(method, n_tasks=2, gradient_path=path, max_norm=None).backward(losses, [p])
    return p.grad


@pytest.mark.parametrize("path", ["jacobian", "gram"])
@pytest.mark.parametrize("method", ["fairgrad", "pivrg", "nashmtl"])
def test_float16_direction_matches_float32_when_weights_exceed_its_range(method, path):
    want = _direction(method, path, torch.float32)
    got = _direction(method, path, torch.float16)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=1e-3)


def test_the_scale_is_a_power_of_two_only_where_float16_needs_it():
    big = torch.tensor([1.1e5, -3.0], dtype=torch.float64)
    assert half_scale(torch.float32, big) == 1.0 and half_scale(torch.float16, torch.tensor([0.5, 1.0])) == 1.0
    assert half_scale(torch.float16, big) == 2.0 ** 17
    jac = torch.randn(2, 5)
    assert torch.equal(weighted_rows(big, jac), big.float() @ jac)   # other dtypes: the plain product, bit for bit
