"""Tests that cover several balancers at once: degenerate inputs, the representation
contract, head gradients, state round trips of the loss methods, and the shared
Pareto-stationary / solver-failure rules of the solver-based methods."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers.amtlub import AlignedMTLUB
from mtl_tune.balancers.base import BalancerError, EpochInfo
from mtl_tune.balancers.consmtl import ConsMTL
from mtl_tune.balancers.fairgrad import FairGrad
from mtl_tune.balancers.mgdaub import MGDAUB
from mtl_tune.balancers.nashmtl import NashMTL
from mtl_tune.balancers.stgu import STGU
from mtl_tune.registry import balancer_class, get_balancer

from ._helpers import (CountingSGD, ScriptedForward, combine, linear_heads_losses, linear_heads_problem, make_problem,
                       near_stationary_gram, random_jacobian, run_step, two_task_gram, unit, written_direction)


GRAD_METHODS = ["mgdaub", "graddrop", "imtl", "gradvac", "amtl", "amtlub"]


def degenerate_cases() -> dict[str, torch.Tensor]:
    g = torch.randn(6)
    return {
        "zero_row": torch.stack([torch.zeros(6), torch.randn(6), torch.randn(6)]),
        "all_zero": torch.zeros(3, 6),
        "parallel": torch.stack([g, 2 * g, 0.5 * g]),
        "opposite": torch.stack([g, -g]),
        "tiny": 1e-12 * unit(torch.randn(3, 6)),
        "huge": 1e12 * unit(torch.randn(3, 6)),
        "mixed_norms": unit(torch.randn(3, 6)) * torch.tensor([[1e-12], [1.0], [1e12]]),
        "k1": torch.randn(1, 6),
        "k40": torch.randn(40, 64),
    }


STATEFUL = [
    ("rlw", {"seed": 1}, {"seed": 99}),
    ("rlw", {"distribution": "dirichlet", "seed": 1}, {"distribution": "dirichlet", "seed": 2}),
    ("dwa", {"mode": "iteration", "window": 2}, None),
    ("dwa", {}, None),
    ("uw", {}, None),
    ("go4align", {"num_groups": 2, "beta": 0.2}, None),
    ("gradnorm", {"last_shared_params": 1, "lr": 0.1}, None),
]


DEGENERATE = {
    "zero": lambda: torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]),
    "parallel": lambda: torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [-1.0, 0.0, 3.0]]),
    "opposite": lambda: torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    "tiny": lambda: 1e-12 * random_jacobian(3, 6, 0).float(),
    "huge": lambda: 1e12 * random_jacobian(3, 6, 0).float(),
    "mixed": lambda: torch.cat([1e-12 * random_jacobian(1, 6, 1), 1e12 * random_jacobian(2, 6, 2)]).float(),
    "k1": lambda: torch.tensor([[3.0, -4.0]]),
    "k40": lambda: random_jacobian(40, 100, 9).float(),
}


@pytest.mark.parametrize("cls", [MGDAUB, AlignedMTLUB])
def test_representation_contract_errors(cls):
    theta = torch.zeros(3, requires_grad=True)
    losses, z = linear_heads_losses(theta, torch.eye(2, 3))
    with pytest.raises(BalancerError, match="representation"):
        cls(2).backward(losses, [theta], representation=None)
    with pytest.raises(BalancerError, match="per-task"):
        cls(2).backward(losses, [theta], representation=[z, z])
    with pytest.raises(BalancerError, match="require grad"):
        cls(2).backward(losses, [theta], representation=z.detach())


@pytest.mark.parametrize("name", ["graddrop", "imtl", "gradvac", "amtl"])
def test_backward_writes_direction_and_head_grads(name):
    torch.manual_seed(1)
    trunk, heads = nn.Linear(3, 4), nn.ModuleList(nn.Linear(4, 1) for _ in range(3))
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    z = trunk(x)
    losses = torch.stack([((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)])
    shared, head_params = list(trunk.parameters()), [list(h.parameters()) for h in heads]
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, shared, retain_graph=True)])
                       for l in losses])
    head_grads = [torch.autograd.grad(losses[i], head_params[i], retain_graph=True) for i in range(3)]
    reference = balancer_class(name)(3)
    expected_d, expected_w = combine(reference, jac)
    info = balancer_class(name)(3).backward(losses, shared, head_params)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in shared]), expected_d, atol=1e-5)
    scale = info.weights.float() if name == "imtl" else torch.ones(3)  # imtl: weighted heads (FAMO-family)
    for i in range(3):
        for p, g in zip(head_params[i], head_grads[i]):
            assert torch.allclose(p.grad, scale[i] * g, atol=1e-6)


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("name", GRAD_METHODS)
def test_degenerate_inputs_give_finite_updates(name, case):
    """Every listed case is well defined for all six methods (imtl's undefined case raises, tested above)."""
    jac = degenerate_cases()[case]
    bal = balancer_class(name)(jac.shape[0])
    d, w = combine(bal, jac)
    assert d.shape == (jac.shape[1],) and w.shape == (jac.shape[0],)
    assert torch.isfinite(d).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("name,kwargs,other_kwargs", STATEFUL)
def test_state_round_trip(name, kwargs, other_kwargs):
    theta, heads, losses = make_problem(3)
    bal = get_balancer(name, 3, **kwargs)
    opt = torch.optim.SGD([*bal.parameters()], lr=0.1) if list(bal.parameters()) else None
    for step in range(6):
        scale = torch.tensor([1.0, 1.0 + step, 2.0], dtype=torch.float64)
        run_step(bal, theta, heads, losses, scale)
        if opt:
            opt.step()
        if name == "dwa" and step % 2 == 1:
            bal.on_epoch_end(EpochInfo(epoch=step // 2))
    state = copy.deepcopy(bal.state_dict())
    fresh = get_balancer(name, 3, **(other_kwargs or kwargs))
    fresh.load_state_dict(state)
    assert fresh.step_count == bal.step_count == 6
    scale = torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64)
    info_a, grads_a = run_step(bal, theta, heads, losses, scale)
    info_b, grads_b = run_step(fresh, theta, heads, losses, scale)
    torch.testing.assert_close(info_a.weights, info_b.weights, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    if name == "dwa" and not kwargs:
        assert not torch.allclose(info_a.weights, torch.ones(3, dtype=torch.float64))  # state mattered


@pytest.mark.parametrize("method", ["fairgrad", "pivrg", "nashmtl", "consmtl"])
def test_opposite_gradients_are_pareto_stationary_not_failures(method):
    """Exactly opposite gradients: no update of the shared parameters, counted as stationary,
    no warning, no failure — for 30 steps in a row (the 20-failures rule must not fire). Heads
    still learn: unweighted for the FairGrad family, with the last α for Nash-MTL (initial 1)."""
    jac = torch.tensor([[1.0, 2.0, 0.0], [-3.0, -6.0, 0.0]], dtype=torch.float64)
    kw = {"lambda_": 0.0} if method == "consmtl" else {}
    bal = get_balancer(method, 2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for step in range(30):
            theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
            heads = [torch.tensor([0.5 * (i + 1)], dtype=torch.float64, requires_grad=True) for i in range(2)]
            losses = jac @ theta + torch.cat([h ** 2 for h in heads])
            info = bal.backward(losses, [theta], [[h] for h in heads])
            assert torch.count_nonzero(theta.grad) == 0, step
            for h in heads:  # ∂(h²)/∂h = 2h, times α = 1 (Nash's initial α, kept) or unweighted
                torch.testing.assert_close(h.grad, 2 * h.detach())
            assert info.extras["stationary_steps"] == step + 1 and info.extras["solver_failures"] == 0
            assert torch.count_nonzero(info.weights) == 0


def test_genuine_non_convergence_still_fails_then_raises():
    """Not stationary (hull gap 1e-3) but the solver is cut off after one iteration: a failure,
    warned, and the 20th in a row raises — for FairGrad (K = 3 general Newton, and K = 2 with
    max_iter = 0 on targets 1e3 apart) and Nash-MTL (optim_niter = 1)."""
    a3 = torch.from_numpy(near_stationary_gram(3, 1e-3, seed=5, spread=2.0))
    jac3 = torch.linalg.cholesky(a3 + 1e-12 * torch.eye(3, dtype=torch.float64))  # rows with Gram a3
    jac2 = torch.from_numpy(np.linalg.cholesky(two_task_gram(1e-3, norms=(1.0, 1e3)))).contiguous()
    for bal, jac in ((FairGrad(3, max_iter=1), jac3), (FairGrad(2, alpha=5.0, max_iter=0), jac2),
                     (NashMTL(3, optim_niter=1), jac3)):
        for i in range(19):
            with pytest.warns(RuntimeWarning, match="solver failed"):
                d = written_direction(bal, jac)
            assert torch.isfinite(d).all() and bal.failures.total == i + 1 and bal.stationary_steps == 0
        with pytest.warns(RuntimeWarning), pytest.raises(BalancerError, match="20 times in a row"):
            written_direction(bal, jac)


@pytest.mark.parametrize("method", ["fairgrad", "pivrg", "nashmtl"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_inputs_give_finite_output_or_clear_error(method, case):
    jac = DEGENERATE[case]()
    bal = get_balancer(method, jac.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failures are allowed here, silence is not
        try:
            d = written_direction(bal, jac)
        except BalancerError as err:
            assert str(err)
            return
    assert torch.isfinite(d).all()
    if case == "opposite":  # 0 = ½g₁ + ½g₂ is in the hull: Pareto-stationary, no update, no failure
        assert bal.failures.total == 0 and bal.stationary_steps == 1
        assert torch.count_nonzero(d) == 0
    elif case in ("zero", "mixed"):  # mixed: a norm ratio of 1e-24 counts as an exactly zero gradient
        # exact for the FairGrad family (d does not involve x_i); α_i undefined for Nash
        assert bal.failures.total == (1 if method == "nashmtl" else 0)
        if method != "nashmtl":
            assert bal._step_extras()["zero_grad_tasks"] == 1
    else:
        assert bal.failures.total == 0
    if case == "k1":  # one task: d ∥ g (FairGrad: x = ‖g‖^{-2α/(α+1)}; Nash: d = g/‖g‖ before the clip)
        torch.testing.assert_close(d / d.norm(), jac[0].to(d) / jac[0].norm())


def test_k1_consmtl_and_stgu():
    trunk, heads, forward = linear_heads_problem(k=1)
    z, losses = forward()
    info = ConsMTL(1).backward(losses, list(trunk.parameters()), [[heads[0]]], z)
    assert torch.isfinite(info.weights).all() and info.extras["solver_failures"] == 0
    script = ScriptedForward([[1.0]])
    opt = CountingSGD([script.param])
    STGU(1, prepos=0).train_step(script, opt, [script.param])
    assert opt.steps == 2  # the single group, stepped twice as in the official code


def test_every_registered_method_has_its_file_and_property_test():
    """The layout of this folder: one test_<method>.py per registered method, each with a
    test_<method>_properties that runs the shared properties of _properties.py."""
    from pathlib import Path

    from mtl_tune.registry import available_balancers

    folder = Path(__file__).resolve().parent
    builtin = [n for n in available_balancers() if balancer_class(n).__module__.startswith("mtl_tune.balancers.")]
    assert len(builtin) >= 22
    for name in builtin:  # installed plug-ins test themselves
        path = folder / f"test_{name}.py"
        assert path.is_file(), f"add {path.relative_to(folder.parents[1])} for the method {name!r}"
        assert f"def test_{name}_properties(" in path.read_text(), f"{path.name}: add test_{name}_properties"
