"""Mistakes a user makes with the balancer API, each a clear error instead of a wrong update.

Passing ``model.named_parameters()``; a parameter in both ``shared_params`` and ``task_params``;
a representation from another forward pass; FAMO's post-step hook called twice or with a list;
a damaged non-tensor state; mixed-precision parameters; half-precision balancers that keep their
loss floor.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import BalancerError
from mtl_tune.registry import available_balancers, get_balancer


def _problem(seed: int = 0, k: int = 2):
    gen = torch.Generator().manual_seed(seed)
    trunk = nn.Linear(4, 3)
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(k)])
    with torch.no_grad():
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, k, generator=gen)

    def forward(z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.tanh(trunk(x)) if z is None else z
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]), z
    return trunk, heads, x, forward


def test_named_parameters_and_strings_are_a_type_error_not_a_recursion():
    trunk, _, _, forward = _problem()
    for name in ("ls", "mgda", "famo"):
        losses, _ = forward()
        with pytest.raises(TypeError, match="named_parameters"):
            get_balancer(name, 2).backward(losses, trunk.named_parameters())
        with pytest.raises(TypeError, match="got str"):
            get_balancer(name, 2).backward(forward()[0], "trunk")


@pytest.mark.parametrize("name", ["mgda", "pcgrad", "nashmtl", "graddrop", "gradnorm", "mgdaub", "consmtl"])
def test_a_parameter_in_both_lists_is_refused(name):
    """Heads given as ``model.parameters()``: the shared tensors would get the plain loss sum's gradient
    on top of the method's direction (MGDA's update doubled, silently)."""
    trunk, heads, _, forward = _problem()
    losses, z = forward()
    heads_params = [list(h.parameters()) for h in heads]
    if name != "consmtl":
        heads_params = [p for group in heads_params for p in group] + list(trunk.parameters())
    else:
        heads_params[0] = heads_params[0] + [trunk.weight]
    with pytest.raises(ValueError, match=f"{name}: 2 tensor|{name}: 1 tensor"):
        get_balancer(name, 2).backward(losses, list(trunk.parameters()), heads_params, representation=z)
    assert trunk.weight.grad is None


@pytest.mark.parametrize("name", ["mgdaub", "amtlub"])
def test_a_representation_the_losses_do_not_use_is_refused(name):
    """A second forward's z (or any tensor not in the losses' graph): the Jacobian w.r.t. z is zero and
    the encoder would get no update at all; a genuine zero row with the right z still passes."""
    trunk, heads, x, forward = _problem()
    losses, _ = forward()
    shared, task = list(trunk.parameters()), [p for h in heads for p in h.parameters()]
    with pytest.raises(BalancerError, match="do not depend on the representation"):
        get_balancer(name, 2).backward(losses, shared, task, representation=torch.tanh(trunk(x)))
    assert trunk.weight.grad is None
    z = torch.tanh(trunk(x))
    dead = torch.stack([(heads[0](z) * 0).sum(), ((heads[1](z).squeeze(1)) ** 2).mean()])  # row 0 is zero
    get_balancer(name, 2).backward(dead, shared, task, representation=z)
    assert trunk.weight.grad is not None and torch.isfinite(trunk.weight.grad).all()


def test_famo_post_step_hook_once_per_backward_and_checks_its_losses():
    trunk, _, _, forward = _problem()
    famo = get_balancer("famo", 2)
    famo.backward(forward()[0], list(trunk.parameters()))
    new = forward()[0].detach()
    with pytest.raises(BalancerError, match="famo: losses must be one tensor"):
        famo.after_optimizer_step(new.tolist())
    with pytest.raises(BalancerError, match=r"famo: expected a loss vector of shape \(2,\)"):
        famo.after_optimizer_step(new[:1])
    famo.after_optimizer_step(new)
    logits = famo.logits.clone()
    with pytest.raises(BalancerError, match="twice after one"):
        famo.after_optimizer_step(new)
    assert torch.equal(famo.logits, logits)  # the second call changed nothing


def _float_leaves(obj, path=()):
    """Paths to the float tensors and arrays in a nested state."""
    if torch.is_tensor(obj):
        return [path] if obj.is_floating_point() and obj.numel() else []
    if isinstance(obj, np.ndarray):
        return [path] if obj.dtype.kind == "f" and obj.size else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _float_leaves(v, (*path, k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _float_leaves(v, (*path, i))]
    return []


def _stepped(name: str):
    trunk, heads, _, forward = _problem()
    balancer = get_balancer(name, 2)
    params = [*trunk.parameters(), *heads.parameters(), *[p for g in balancer.param_groups() for p in g["params"]]]
    opt = torch.optim.SGD(params, lr=0.01)
    for _ in range(3):
        if balancer.needs_meta_batch:
            balancer.meta_step(lambda: _output(forward), lambda: _output(forward), opt, list(trunk.parameters()))
        balancer.train_step(lambda: _output(forward), opt, list(trunk.parameters()),
                            [list(h.parameters()) for h in heads])
    return balancer


def _output(forward):
    from mtl_tune.balancers.base import ForwardOutput
    losses, z = forward()
    return ForwardOutput(losses, representation=z)


def test_a_non_finite_entry_anywhere_in_the_extra_state_is_refused():
    """Moving averages, warm starts, scores, private optimizers' moments: a NaN there made every later
    step fail with a misleading message (FAMO: "non-finite task loss" for finite losses) or was never
    noticed (DWA's history, Nash-MTL's warm start). Refused on load, and nothing is loaded."""
    checked = []
    for name in available_balancers():
        balancer = _stepped(name)
        state = balancer.state_dict()
        leaves = _float_leaves({k: v for k, v in state["_extra_state"].items() if k != "failures"})
        if not leaves:
            continue
        checked.append(name)
        for path in leaves[:3]:
            bad = balancer.state_dict()
            node = bad["_extra_state"]
            for key in path[:-1]:
                node = node[key]
            leaf = node[path[-1]]
            node[path[-1]] = leaf.clone().fill_(math.nan) if torch.is_tensor(leaf) else np.full_like(leaf, np.nan)
            fresh = get_balancer(name, 2)
            before = fresh.state_dict()
            with pytest.raises(ValueError, match=f"{name}: the balancer state's _extra_state.* non-finite"):
                fresh.load_state_dict(bad)
            assert fresh.step_count == before["_extra_state"]["step_count"]
            get_balancer(name, 2).load_state_dict(balancer.state_dict())  # the finite state loads
    assert {"famo", "dwa", "nashmtl", "gradvac", "go4align", "pivrg"} <= set(checked), checked


@pytest.mark.parametrize("name", ["si", "gls", "dbmtl", "famo"])
def test_half_precision_keeps_the_loss_floor_and_steps(name):
    """``model.bfloat16()`` with the balancer inside: ℓ* is a hyperparameter, not rounded to bfloat16's
    2–3 digits (−2.1 stayed −2.09375), and the step runs (si/gls failed: NumPy has no bfloat16)."""
    balancer = get_balancer(name, 2, min_losses=[-2.1, -2.1]).to(torch.bfloat16)
    assert balancer.min_losses.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(balancer.min_losses.double(), torch.tensor([-2.1, -2.1], dtype=torch.float64),
                               rtol=1e-7, atol=0)
    w = nn.Parameter(torch.tensor([0.5, -0.25], dtype=torch.bfloat16))
    info = balancer.backward(torch.stack([(w ** 2).sum(), ((w - 1) ** 2).sum()]), [w])
    assert torch.isfinite(info.weights).all() and torch.isfinite(w.grad).all()


def test_mixed_precision_parameters_share_a_buffer_wide_enough_for_all():
    """A float16 parameter listed first made the Jacobian buffer float16: the float32 parameter's
    gradient (2e5) overflowed, and the step failed or not depending on the order of the list."""
    a = torch.ones(2, dtype=torch.float16, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    grads = []
    for order in ([a, b], [b, a]):
        a.grad = b.grad = None
        losses = torch.stack([a.float().sum() + (b ** 2).sum() * 1e5, a.float().sum() + b.sum()])
        get_balancer("imtl", 2).backward(losses, order)
        assert a.grad.dtype == torch.float16 and b.grad.dtype == torch.float32
        grads.append((a.grad.clone(), b.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["amtl", "amtlub", "config", "upgrad", "dualproj"])
def test_all_zero_preferences_are_refused(name):
    """All-zero preferences weight every task by 0: a zero update on every step, silently."""
    with pytest.raises(ValueError, match=f"{name}: preferences must be 2 finite non-negative numbers, not all 0"):
        get_balancer(name, 2, preferences=[0.0, 0.0])
    get_balancer(name, 2, preferences=[0.0, 1.0])  # one task alone is a preference


def test_autol_without_its_meta_step_warns_once():
    """A loop that never calls meta_step trains with λ fixed at weight_init: not Auto-λ, and not silent."""
    trunk, _, _, forward = _problem()
    autol = get_balancer("autol", 2)
    with pytest.warns(RuntimeWarning, match="autol: backward without a meta_step"):
        autol.backward(forward()[0], list(trunk.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autol.backward(forward()[0], list(trunk.parameters()))  # once per balancer
        opt = torch.optim.SGD(trunk.parameters(), lr=0.1)
        fresh = get_balancer("autol", 2)
        for _ in range(2):  # with the meta step before every backward: no warning
            fresh.meta_step(lambda: _output(forward), lambda: _output(forward), opt, list(trunk.parameters()))
            fresh.backward(forward()[0], list(trunk.parameters()))
        assert not torch.equal(fresh.lambdas, torch.full((2,), 0.1))


@pytest.mark.parametrize("name", ["dwa", "pivrg", "stch"])
def test_the_epoch_hook_takes_an_epoch_info(name):
    with pytest.raises(TypeError, match=f"{name}: on_epoch_end takes an EpochInfo"):
        get_balancer(name, 2).on_epoch_end(0)  # was an AttributeError from inside


@pytest.mark.parametrize("name", ["dbmtl", "moco"])
def test_a_huge_decay_exponent_decays_to_zero_instead_of_overflowing(name):
    """β/t^σ with σ = 1e30: Python's ** raised OverflowError at the second step."""
    from mtl_tune.balancers._common import power_decay

    assert power_decay(0.5, 2.0, 1e30) == 0.0 and power_decay(0.5, 1.0, 1e30) == 0.5
    assert power_decay(0.9, 7.0, 0.5) == 0.9 / 7.0 ** 0.5  # the same float as before otherwise
    trunk, _, _, forward = _problem()
    balancer = get_balancer(name, 2, beta_sigma=1e30)
    for _ in range(3):
        balancer.backward(forward()[0], list(trunk.parameters()))
    assert torch.isfinite(trunk.weight.grad).all()
