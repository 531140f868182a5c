"""Aligned-MTL-UB: Aligned-MTL on the gradients of the shared representation."""

from __future__ import annotations

import torch

from mtl_tune.balancers.amtlub import AlignedMTLUB

from ._helpers import linear_heads_losses


def test_amtlub_orthonormal_representation_gradients():
    theta = torch.zeros(3, requires_grad=True)
    h = torch.eye(3)
    losses, z = linear_heads_losses(theta, h)
    info = AlignedMTLUB(3).backward(losses, [theta], representation=z)
    assert torch.allclose(info.weights.float(), torch.ones(3)) and info.extras["rank"] == 3
    assert torch.allclose(theta.grad, 2 * h.sum(0))
