"""Aligned-MTL-UB: Aligned-MTL on the gradients of the shared representation."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.amtlub import AlignedMTLUB

from ._helpers import linear_heads_losses
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_amtlub_orthonormal_representation_gradients():
    theta = torch.zeros(3, requires_grad=True)
    h = torch.eye(3)
    losses, z = linear_heads_losses(theta, h)
    info = AlignedMTLUB(3).backward(losses, [theta], representation=z)
    assert torch.allclose(info.weights.float(), torch.ones(3)) and info.extras["rank"] == 3
    assert torch.allclose(theta.grad, 2 * h.sum(0))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_amtlub_properties(case):
    # Aligned-MTL on ∂ℓ/∂z = J (z = θ here): as amtl.
    # a Gram-matrix solve: rounding of eps·cond(A), cond(A) ≲ 1e3 for these K ≤ 4 independent rows
    # with norms ~3× apart, so ≲ 1e-13; 1e-10 leaves a margin
    step = balancer_step("amtlub")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)
