"""adam_step: torch.optim.Adam's step, bit for bit, without Optimizer.step's wrapper."""

from __future__ import annotations

import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mtl_tune.balancers import _adam
from mtl_tune.balancers._adam import adam_step


def _grads(shape: tuple[int, ...], steps: int, seed: int) -> list[torch.Tensor]:
    """Gradients over many orders of magnitude (Adam's state then spans them too), some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen) * 10.0 ** float(torch.randint(-6, 4, (), generator=gen))
        out.append(torch.where(torch.rand(shape, generator=gen) < 0.05, torch.zeros(()), g))
    return out


def _pair(shape: tuple[int, ...], requires_grad: bool = False, **options) -> tuple:
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    a, b = start.clone(), start.clone()
    if requires_grad:
        a, b = torch.nn.Parameter(a), torch.nn.Parameter(b)
    return a, torch.optim.Adam([a], **options), b, torch.optim.Adam([b], **options)


def _assert_same_state(oa: torch.optim.Optimizer, ob: torch.optim.Optimizer) -> None:
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key, value in sa["state"][0].items():
        assert value.dtype == sb["state"][0][key].dtype and torch.equal(value, sb["state"][0][key]), key


@pytest.mark.parametrize("shape", [(2,), (7,), (5, 2), (5, 40)], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3, 0.3])
@pytest.mark.parametrize("lr", [0.025, 1.0])
def test_adam_step_is_torch_adam_bit_for_bit(shape, weight_decay, lr):
    a, oa, b, ob = _pair(shape, lr=lr, weight_decay=weight_decay)
    for g in _grads(shape, 400, seed=len(shape) + int(weight_decay * 10)):
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        adam_step(ob)
        assert torch.equal(a, b)
    _assert_same_state(oa, ob)


def test_adam_step_on_a_parameter_that_requires_grad_and_several_groups():
    """UW's case (an nn.Parameter), and two groups with their own lr and betas."""
    x, y = torch.nn.Parameter(torch.randn(5, 2)), torch.nn.Parameter(torch.randn(3))
    x2, y2 = torch.nn.Parameter(x.detach().clone()), torch.nn.Parameter(y.detach().clone())
    groups = lambda p, q: [{"params": [p]}, {"params": [q], "lr": 0.1, "betas": (0.5, 0.9)}]  # noqa: E731
    oa, ob = torch.optim.Adam(groups(x, y), lr=0.025), torch.optim.Adam(groups(x2, y2), lr=0.025)
    for gx, gy in zip(_grads((5, 2), 200, 3), _grads((3,), 200, 4)):
        x.grad, y.grad, x2.grad, y2.grad = gx.clone(), gy.clone(), gx.clone(), gy.clone()
        version = x2._version
        oa.step()
        adam_step(ob)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x2._version > version      # in place, seen by autograd's checks as step()'s update is
        assert x2.requires_grad and x2.grad_fn is None
    _assert_same_state(oa, ob)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_state_dict_after_fast_steps_continues_in_a_fresh_torch_adam(weight_decay):
    a, oa, b, ob = _pair((5, 2), lr=0.025, weight_decay=weight_decay)
    grads = _grads((5, 2), 300, seed=7)
    for g in grads[:150]:
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        adam_step(ob)
    _assert_same_state(oa, ob)
    c = b.detach().clone()
    oc = torch.optim.Adam([c], lr=0.025, weight_decay=weight_decay)
    buffer = io.BytesIO()
    torch.save(ob.state_dict(), buffer)                   # a checkpoint written after fast steps
    buffer.seek(0)
    oc.load_state_dict(torch.load(buffer))
    for g in grads[150:]:
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        oa.step()
        adam_step(ob)
        oc.step()
        assert torch.equal(a, b) and torch.equal(a, c)


def test_parameters_without_a_gradient_are_skipped_as_step_skips_them():
    x, y = torch.zeros(2), torch.zeros(2)
    opt = torch.optim.Adam([x, y], lr=0.1)
    x.grad = y.grad = torch.ones(2)
    opt.step()
    y.grad = None
    before = y.clone()
    x.grad = torch.ones(2)
    adam_step(opt)
    assert torch.equal(y, before) and float(opt.state[y]["step"]) == 1.0 and float(opt.state[x]["step"]) == 2.0


def _counting_step(monkeypatch) -> list[int]:
    calls = []
    real = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return calls


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}, {"foreach": True},
                                    {"differentiable": True}, {"decoupled_weight_decay": True, "weight_decay": 0.1}],
                         ids=lambda o: next(iter(o)))
def test_other_configurations_fall_back_to_step(monkeypatch, option):
    a, oa, b, ob = _pair((5, 2), lr=0.05, **option)
    calls = _counting_step(monkeypatch)
    for g in _grads((5, 2), 20, seed=11):
        a.grad, b.grad = g.clone(), g.clone()
        with torch.no_grad():
            oa.step()
        adam_step(ob)
        assert torch.equal(a, b)
    assert len(calls) == 40                               # every fast call went to step()


def test_first_step_hooks_and_patched_step_fall_back(monkeypatch):
    x = torch.zeros(3)
    opt = torch.optim.Adam([x], lr=0.1)
    calls = _counting_step(monkeypatch)
    x.grad = torch.ones(3)
    adam_step(opt)                                        # no state yet: torch creates it
    assert len(calls) == 1
    adam_step(opt)
    assert len(calls) == 1                                # plain from then on
    handle = opt.register_step_post_hook(lambda *args: None)
    adam_step(opt)
    assert len(calls) == 2
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *args: None)
    adam_step(opt)
    assert len(calls) == 3
    handle.remove()
    assert _adam._plain_work(opt) is not None


def test_a_scheduler_patched_step_falls_back():
    x = torch.zeros(3)
    opt = torch.optim.Adam([x], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x.grad = torch.ones(3)
    opt.step()
    assert "step" in opt.__dict__                         # the scheduler wraps the bound method (its counter)
    assert _adam._plain_work(opt) is None
    sched.step()


def test_clear_grads_is_zero_grad_set_to_none_and_defers_to_an_overridden_one():
    x, y, z = torch.zeros(2), torch.zeros(3), torch.zeros(1)
    opt = torch.optim.Adam([{"params": [x]}, {"params": [y, z], "lr": 0.5}], lr=0.1)
    x.grad, y.grad = torch.ones(2), torch.ones(3)
    _adam.clear_grads(opt)
    assert x.grad is None and y.grad is None and z.grad is None

    class Counting(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            Counting.calls += 1
            super().zero_grad(set_to_none)

    sgd = Counting([x], lr=0.1)
    x.grad = torch.ones(2)
    _adam.clear_grads(sgd)
    assert Counting.calls == 1 and x.grad is None
    patched = []
    opt.zero_grad = lambda set_to_none=True: patched.append(set_to_none)   # replaced on the object
    x.grad = torch.ones(2)
    _adam.clear_grads(opt)
    assert patched == [True] and x.grad is not None       # the replacement ran, not ours


def test_the_training_step_uses_the_fast_path_with_the_same_results_and_honours_hooks(monkeypatch):
    """Balancer.train_step (every trial's step) through clear_grads/adam_step: the same parameters as
    zero_grad()/step() after many steps; an optimizer step hook still runs (step() is taken)."""
    from mtl_tune.balancers import get_balancer
    from mtl_tune.balancers.base import ForwardOutput

    def run(fast: bool, hook: bool = False) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2, dtype=torch.float64)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        calls = []
        if hook:
            opt.register_step_post_hook(lambda *args: calls.append(1))
        balancer = get_balancer("mgda", n_tasks=2)
        x = torch.randn(8, 3, dtype=torch.float64)

        def forward() -> ForwardOutput:
            out = model(x)
            return ForwardOutput(torch.stack([(out[:, 0] - 1).pow(2).mean(), (out[:, 1] + x[:, 0]).pow(2).mean()]))

        if not fast:
            monkeypatch.setattr("mtl_tune.balancers.base.adam_step", lambda o: o.step())
            monkeypatch.setattr("mtl_tune.balancers.base.clear_grads", lambda o: o.zero_grad(set_to_none=True))
        for _ in range(50):
            balancer.train_step(forward, opt, list(model.parameters()))
        monkeypatch.undo()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), len(calls)

    plain, _ = run(fast=False)
    fast, _ = run(fast=True)
    assert torch.equal(plain, fast)
    hooked, calls = run(fast=True, hook=True)
    assert torch.equal(plain, hooked) and calls == 50
