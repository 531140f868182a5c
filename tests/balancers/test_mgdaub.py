"""MGDA-UB: MGDA on the gradients of the shared representation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import gram
from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.balancers.mgdaub import MGDAUB

from ._helpers import combine, linear_heads_losses
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


class EncoderHeads(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(k))

    def forward(self, x, y):
        z = self.encoder(x)
        losses = torch.stack([((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)])
        return losses, z


def test_mgdaub_equals_mgda_on_representation_gradients():
    model = EncoderHeads(3)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    losses, z = model(x, y)
    shared = list(model.encoder.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    jz = torch.stack([torch.autograd.grad(l, z, retain_graph=True)[0].flatten() for l in losses])
    w = mgda_weights(gram(jz)).float()
    enc_expected = torch.autograd.grad(z, shared, grad_outputs=(w @ jz).view_as(z), retain_graph=True)
    head_expected = [torch.autograd.grad(losses[i], heads[i], retain_graph=True) for i in range(3)]
    info = MGDAUB(3).backward(losses, shared, heads, representation=z)
    assert torch.allclose(info.weights.float(), w) and info.weights.sum().item() == pytest.approx(1.0)
    for p, g in zip(shared, enc_expected):
        assert torch.allclose(p.grad, g, atol=1e-6)
    for hp, hg in zip(heads, head_expected):  # heads: unweighted task gradients
        for p, g in zip(hp, hg):
            assert torch.allclose(p.grad, g, atol=1e-6)


def test_mgdaub_orthogonal_representation_gradients_give_midpoint():
    theta = torch.zeros(3, requires_grad=True)
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    losses, z = linear_heads_losses(theta, h)
    info = MGDAUB(2).backward(losses, [theta], representation=z)
    assert torch.allclose(info.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(theta.grad, 2 * 0.5 * h.sum(0))  # ∂z/∂θ = 2
    w = combine(MGDAUB(2), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))[1]
    assert torch.allclose(w, torch.tensor([0.8, 0.2], dtype=torch.float64))  # n2²/(n1²+n2²)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_mgdaub_properties(case):
    # MGDA on ∂ℓ/∂z = J (z = θ here): the hull's min-norm point scales with J, its weights do not.
    # a Gram-matrix solve: rounding of eps·cond(A), cond(A) ≲ 1e3 for these K ≤ 4 independent rows
    # with norms ~3× apart, so ≲ 1e-13; 1e-10 leaves a margin
    step = balancer_step("mgdaub")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)
