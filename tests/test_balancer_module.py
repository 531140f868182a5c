"""Balancers as ``torch.nn.Module``: state in parameters/buffers, ``.to()``, versioned state.

The step-exact ``state_dict`` round trip of every registered method is in
``test_balancer_contract.py``; here: what being a module adds (dtype/device moves, a
balancer inside a model's ``state_dict``, the format version, format-0 checkpoints).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import STATE_FORMAT, Balancer, EpochInfo
from mtl_tune.registry import available_balancers, get_balancer

METHODS = available_balancers()
#: methods whose state includes float tensors that follow ``.to(dtype)`` (buffer or parameter names)
FLOAT_STATE = {"famo": ("logits", "min_losses"), "gradnorm": ("weights",), "uw": ("log_vars",),
               "dwa": ("weights", "costs"), "ls": ("task_weights",), "si": ("min_losses",), "gls": ("min_losses",),
               "imtll": ("scales",), "imtlfull": ("scales",), "dbmtl": ("min_losses",), "autol": ("lambdas",)}


def _problem(dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    trunk = nn.Linear(3, 4).to(dtype)
    heads = nn.ModuleList([nn.Linear(4, 1).to(dtype) for _ in range(2)])
    with torch.no_grad():
        for p in [*trunk.parameters(), *heads.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(8, 3, generator=gen, dtype=dtype)
    y = torch.randn(8, 2, generator=gen, dtype=dtype) * torch.tensor([1.0, 5.0], dtype=dtype)
    trunk, heads, x, y = trunk.to(device), heads.to(device), x.to(device), y.to(device)

    def losses() -> torch.Tensor:
        z = torch.tanh(trunk(x))
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() + 0.1 for i, h in enumerate(heads)])
    return trunk, heads, losses


@pytest.mark.parametrize("name", METHODS)
def test_every_balancer_is_a_module_with_versioned_state(name):
    bal = get_balancer(name, 2)
    assert isinstance(bal, nn.Module)
    state = bal.state_dict()
    extra = state["_extra_state"]
    assert extra["format"] == STATE_FORMAT and extra["method"] == name and extra["n_tasks"] == 2
    for key in FLOAT_STATE.get(name, ()):
        assert key in state, f"{name}: {key} should be a buffer or parameter"


@pytest.mark.parametrize("name", sorted(FLOAT_STATE))
def test_float_state_follows_to_dtype_and_steps_in_float64(name):
    bal = get_balancer(name, 2).to(torch.float64)
    for key in FLOAT_STATE[name]:
        assert getattr(bal, key).dtype == torch.float64, key
    trunk, heads, losses = _problem(torch.float64)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters(), *bal.parameters()], lr=0.01)
    for _ in range(3):
        bal.train_step(lambda: _forward(losses), opt, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    for key in FLOAT_STATE[name]:  # a step keeps the state in the module's dtype (no silent float32)
        assert getattr(bal, key).dtype == torch.float64, key
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in trunk.parameters())


def _forward(losses):
    from mtl_tune.balancers.base import ForwardOutput
    return ForwardOutput(losses())


def test_private_optimizer_follows_the_move_and_keeps_its_state():
    famo = get_balancer("famo", 2)
    trunk, heads, losses = _problem()
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01)
    famo.train_step(lambda: _forward(losses), opt, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    steps_before = famo.w_optimizer.state_dict()["state"][0]["exp_avg"].clone()
    famo.double()
    assert famo.w_optimizer.param_groups[0]["params"][0] is famo.logits
    state = famo.w_optimizer.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float64
    torch.testing.assert_close(state["exp_avg"], steps_before.double())


@pytest.mark.parametrize("name", ["famo", "gradnorm", "autol"])
def test_state_a_private_adam_steps_stays_float32_under_half(name):
    """``model.half()`` casts a balancer that is a submodule: the buffers its own Adam steps stay float32
    (Adam's eps is 0 in float16: FAMO's logits went to ±inf, then every weight NaN, silently)."""
    bal = get_balancer(name, 2)
    bal.half()
    for key in bal.float32_state:
        assert getattr(bal, key).dtype == torch.float32, key
    if name == "famo":
        trunk, heads, losses = _problem(torch.float16)
        opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01)
        for _ in range(4):
            _, info = bal.train_step(lambda: _forward(losses), opt, list(trunk.parameters()),
                                     [list(h.parameters()) for h in heads])
            assert torch.isfinite(info.weights).all() and torch.isfinite(bal.logits).all()
        assert bal.w_optimizer.param_groups[0]["params"][0] is bal.logits


def test_balancer_inside_a_model_state_dict_round_trips():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 2)
            self.balancer = get_balancer("famo", 2)

    a, b = Net(), Net()
    with torch.no_grad():
        a.balancer.logits.copy_(torch.tensor([0.3, -0.2]))
    a.balancer.step_count = 7
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))  # torch's safe default reads it
    torch.testing.assert_close(b.balancer.logits, torch.tensor([0.3, -0.2]))
    assert b.balancer.step_count == 7


def test_loading_another_methods_or_a_newer_state_is_a_clear_error():
    famo_state = get_balancer("famo", 2).state_dict()
    with pytest.raises((ValueError, RuntimeError), match="famo"):
        get_balancer("ls", 2).load_state_dict(famo_state, strict=False)
    newer = get_balancer("cagrad", 2).state_dict()
    newer["_extra_state"] = {**newer["_extra_state"], "format": STATE_FORMAT + 1}
    with pytest.raises(ValueError, match="newer"):
        get_balancer("cagrad", 2).load_state_dict(newer)
    with pytest.raises(ValueError, match="3 tasks"):
        get_balancer("cagrad", 2).load_state_dict(get_balancer("cagrad", 3).state_dict())


def test_malformed_states_are_a_clear_error():
    """Not a mapping, a missing or non-dict extra state, a non-integer format, a state without a key
    the method needs: a ValueError naming the method and the problem (they were TypeError /
    AttributeError / KeyError from inside)."""
    famo = get_balancer("famo", 2)
    state = famo.state_dict()
    extra = state["_extra_state"]
    cases = [(None, "needs a state_dict"), ({**state, "_extra_state": None}, "must be a dict"),
             ({**state, "_extra_state": {**extra, "format": "1.0"}}, "format must be an integer"),
             ({**state, "_extra_state": {k: v for k, v in extra.items() if k != "w_optimizer"}},
              "lacks 'w_optimizer'")]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=f"famo: .*{pattern}"):
            get_balancer("famo", 2).load_state_dict(bad)


@pytest.mark.parametrize("name", sorted(FLOAT_STATE))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_float_state_is_refused_alone_and_inside_a_model(name, bad):
    """A NaN or ±inf in a weight, logit, floor or log-variance never comes from a step (the trainer
    stops at the first non-finite loss); loading it would make every later step NaN. The balancer's
    own load and a model's load (which reaches the balancer through _load_from_state_dict) refuse it,
    naming the method and the key, and the balancer keeps its state."""
    key = FLOAT_STATE[name][0]
    balancer = get_balancer(name, 2)
    before = {k: v.clone() for k, v in balancer.state_dict().items() if torch.is_tensor(v)}
    state = balancer.state_dict()
    state[key] = state[key].clone()
    state[key][-1] = bad
    with pytest.raises(ValueError, match=f"{name}: .*'{key}' holds non-finite"):
        balancer.load_state_dict(state)
    for k, v in before.items():
        torch.testing.assert_close(balancer.state_dict()[k], v)
    model = nn.Module()
    model.balancer = get_balancer(name, 2)
    nested = model.state_dict()
    nested[f"balancer.{key}"] = state[key]
    with pytest.raises(ValueError, match=f"'balancer.{key}' holds non-finite"):
        model.load_state_dict(nested)
    model.load_state_dict({**nested, f"balancer.{key}": before[key]})  # the finite state still loads


def test_format_0_checkpoint_still_loads():
    """The flat dict written before balancers were modules (a resumed old trial)."""
    old = {"step_count": 4, "weights": torch.tensor([0.5, 1.5], dtype=torch.float64),
           "history": [torch.tensor([1.0, 2.0], dtype=torch.float64)], "epoch_sum": None,
           "epoch_batches": 0, "costs": torch.ones(50, 2, dtype=torch.float64), "calls": 0}
    dwa = get_balancer("dwa", 2)
    dwa.load_state_dict(old)
    assert dwa.step_count == 4 and len(dwa.history) == 1
    torch.testing.assert_close(dwa.weights, old["weights"])
    dwa.on_epoch_end(EpochInfo(epoch=1, train_losses=torch.tensor([1.0, 1.0])))  # continues from that history
    assert len(dwa.history) == 2


def test_hooks_have_defaults_on_the_base_class():
    """The trainer calls every hook unconditionally (no hasattr probes)."""
    for name in ("ls", "cagrad", "nashmtl", "famo", "uw"):
        bal = get_balancer(name, 2)
        assert isinstance(bal.param_groups(), list)
        assert bal.failures.total == 0
        bal.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.ones(2)))
    assert get_balancer("ls", 2).param_groups() == []
    assert get_balancer("uw", 2, lr=0.3).param_groups()[0]["lr"] == 0.3
    assert Balancer.after_optimizer_step is get_balancer("ls", 2).after_optimizer_step.__func__
    assert Balancer.meta_step is get_balancer("ls", 2).meta_step.__func__ and not Balancer.needs_meta_batch


@pytest.mark.parametrize("name", METHODS)
def test_class_docstring_documents_every_hyperparameter(name):
    """``help(CAGrad)`` must say what ``c`` is: every constructor argument is in the class's own docstring."""
    import inspect

    from mtl_tune.registry import balancer_class
    cls = balancer_class(name)
    doc = cls.__doc__ or ""
    assert "Args:" in doc or not [p for p in inspect.signature(cls.__init__).parameters
                                  if p not in ("self", "n_tasks", "kw")], f"{name}: no Args section"
    for param in inspect.signature(cls.__init__).parameters:
        if param not in ("self", "kw"):
            assert f"{param}:" in doc, f"{name}: docstring does not document {param!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FLOAT_STATE) + ["nashmtl", "cagrad", "graddrop"])
def test_state_follows_to_cuda_and_loads_a_cpu_checkpoint(name):
    bal = get_balancer(name, 2).to("cuda")
    for key in FLOAT_STATE.get(name, ()):
        assert getattr(bal, key).is_cuda, key
    trunk, heads, losses = _problem(device="cuda")
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters(), *bal.parameters()], lr=0.01)
    bal.train_step(lambda: _forward(losses), opt, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    fresh = get_balancer(name, 2)
    fresh.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in bal.state_dict().items()})
    assert fresh.step_count == 1
