"""ConsMTL: FairGrad's shared update plus a consistency term on the heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.consmtl import ConsMTL
from mtl_tune.balancers.fairgrad import FairGrad

from ._helpers import linear_heads_problem
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def test_consmtl_lambda0_equals_fairgrad_and_plain_heads():
    trunk, heads, forward = linear_heads_problem()
    z, losses = forward()
    ConsMTL(2, lambda_=0.0).backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    cons_shared = [p.grad.clone() for p in trunk.parameters()]
    cons_heads = [h.grad.clone() for h in heads]
    for p in [*trunk.parameters(), *heads]:
        p.grad = None
    z, losses = forward()
    FairGrad(2, alpha=2.0).backward(losses, list(trunk.parameters()), [[h] for h in heads])
    for a, p in zip(cons_shared, trunk.parameters()):
        torch.testing.assert_close(a, p.grad)
    for a, h in zip(cons_heads, heads):
        torch.testing.assert_close(a, h.grad)


@pytest.mark.parametrize("tilt", [0.0, 0.5])
def test_consmtl_pareto_stationary_step_gives_heads_no_consistency_term(tilt):
    """ℓ₁ = mean(z)·h₁ + 10, ℓ₂ = −mean(z)·h₂ + 10 with h₂ = h₁ (tilt 0): the shared gradients are
    exactly opposite, the step is Pareto-stationary (x = 0, d = 0), Δ = 0 and each head gets its
    plain gradient ±mean(z). Tilting h₂ leaves the stationary set: then the consistency term acts."""
    g = torch.Generator().manual_seed(3)
    trunk = nn.Linear(4, 3).double()
    inputs = torch.randn(6, 4, generator=g, dtype=torch.float64)
    h1 = torch.randn(3, generator=g, dtype=torch.float64)
    heads = [h1.clone().requires_grad_(), (h1 + tilt * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
             .requires_grad_()]
    z = trunk(inputs)
    losses = torch.stack([z.mean(0) @ heads[0] + 10, -(z.mean(0) @ heads[1]) + 10])
    info = ConsMTL(2, lambda_=5.0, head_clip=1e6).backward(losses, list(trunk.parameters()),
                                                            [[h] for h in heads], z)
    if tilt == 0.0:
        assert info.extras["stationary_steps"] == 1 and torch.all(info.weights == 0)
        torch.testing.assert_close(info.extras["head_extra_norm"], torch.zeros(2, dtype=torch.float64))
        mean_z = z.detach().mean(0)
        torch.testing.assert_close(heads[0].grad, mean_z)
        torch.testing.assert_close(heads[1].grad, -mean_z)
        for p in trunk.parameters():
            assert p.grad is None or torch.all(p.grad == 0)
    else:
        assert info.extras["stationary_steps"] == 0 and bool((info.extras["head_extra_norm"] > 0).all())


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_consmtl_head_gradient_matches_hand_derivation(clip):
    # ℓ_i = ½ mean_b (z_b·w_i − y_ib)²: δ_i = r_i w_iᵀ / n and
    # ∇_{w_i}(−λ⟨δ_i, Δ⟩) = −λ/n Σ_b [z_b (w_iᵀΔ_b) + r_ib Δ_b]
    lam, n = 3.0, 5
    trunk, heads, forward = linear_heads_problem(n=n)
    z, losses = forward()
    cons = ConsMTL(2, lambda_=lam, head_clip=clip, max_norm=None)
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    x = info.weights.numpy() / 2
    with torch.no_grad():
        r = [z @ heads[i] - forward.targets[i] for i in range(2)]
        deltas = [torch.outer(r[i], heads[i]) / n for i in range(2)]
        joint = x[0] * deltas[0] + x[1] * deltas[1]
        for i in range(2):
            g1 = (r[i][:, None] * z).mean(0)
            g2 = -lam / n * ((z * (joint @ heads[i])[:, None]).sum(0) + (r[i][:, None] * joint).sum(0))
            g2 = g2 * min(1.0, clip * float(g1.norm()) / float(g2.norm()))
            torch.testing.assert_close(heads[i].grad, g1 + g2)


def test_consmtl_per_task_representations_and_contract_errors():
    trunk, heads, forward = linear_heads_problem()
    z, losses = forward()
    cons = ConsMTL(2, head_clip=[0.05, 0.0])
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], [z, z])
    assert float(info.extras["head_extra_norm"][1]) == 0.0  # c = 0: no extra gradient for task 1
    assert float(info.extras["head_extra_norm"][0]) > 0.0
    z, losses = forward()
    with pytest.raises(BalancerError, match="representation"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], None)
    with pytest.raises(BalancerError, match="task_params"):
        cons.backward(losses, list(trunk.parameters()), None, z)
    with pytest.raises(BalancerError, match="does not require grad"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z.detach())
    with pytest.raises(ValueError, match="head_clip"):
        ConsMTL(2, head_clip=[0.1, 0.1, 0.1])


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_consmtl_properties(case):
    # the shared update is FairGrad's with α = 2 (the consistency term acts on the heads only):
    # degree (1−α)/(1+α) = −1/3, weights −2α/(α+1) = −4/3.
    # Newton to relative residual 1e-10 (the solver's tol): the weights move by ≲ cond·1e-10 with
    # cond ≲ 100 on these well-posed problems, hence 1e-8
    step = balancer_step("consmtl")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-8)
    assert_gradient_scaling(step, case, degree=-1 / 3, weight_degree=-4 / 3, rtol=1e-8)


def test_consmtl_reads_head_groups_given_as_generators_as_every_method_does():
    """``[h.parameters() for h in heads]`` (each group a generator) and a generator of lists were
    refused ("must be one list ... per task" / a TypeError); they are the same heads."""
    torch.manual_seed(0)
    enc, heads = nn.Linear(4, 5), [nn.Linear(5, 1) for _ in range(3)]
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def step(task_params) -> list[torch.Tensor]:
        for p in [*enc.parameters(), *[q for h in heads for q in h.parameters()]]:
            p.grad = None
        z = torch.tanh(enc(x))
        losses = torch.stack([((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)])
        ConsMTL(3).backward(losses, list(enc.parameters()), task_params, z)
        return [p.grad.clone() for p in [*enc.parameters(), *[q for h in heads for q in h.parameters()]]]

    lists = step([list(h.parameters()) for h in heads])
    for other in (step([h.parameters() for h in heads]), step(list(h.parameters()) for h in heads)):
        assert all(torch.equal(a, b) for a, b in zip(lists, other))
    with pytest.raises(BalancerError, match="one list of head parameters per task"):
        step([list(h.parameters()) for h in heads[:2]])
