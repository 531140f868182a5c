import pytest
import torch
from torch import nn

from mtl_tune.jacobian import JacobianEngine, jacobian_batched, jacobian_loop


def _model_and_losses():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
    unused = nn.Parameter(torch.randn(3))  # reached by no task: its columns must be zeros
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    z = trunk(torch.randn(5, 3, 8, 8))
    losses = torch.stack([h(z).pow(2).mean() for h in heads])
    return list(trunk.parameters()) + [unused], losses


def test_batched_equals_loop():
    params, losses = _model_and_losses()
    a = jacobian_loop(losses, params, retain_graph=True)
    b = jacobian_batched(losses, params, retain_graph=True)
    assert a.shape == (3, sum(p.numel() for p in params))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(a[:, -3:]) == 0


def test_rows_are_per_task_gradients():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([x[0] ** 2, 3 * x[1], x.sum()])
    for mode in ("batched", "loop", "auto"):
        jac = JacobianEngine(mode).jacobian(losses, [x], retain_graph=True)
        torch.testing.assert_close(jac, torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))


def test_auto_falls_back_loudly_when_batching_fails(monkeypatch):
    import mtl_tune.jacobian as jmod

    def broken(*a, **k):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(jmod, "_stream_batched", broken)
    monkeypatch.setattr(jmod, "LOOP_MAX_ENTRIES", 0)  # this 2 × 2 Jacobian would skip the batched pass
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    engine = JacobianEngine("auto")
    with pytest.warns(RuntimeWarning, match="batched Jacobian unavailable"):
        jac = engine.jacobian(torch.stack([x.sum(), x.prod()]), [x])
    assert engine.effective_mode == "loop"
    torch.testing.assert_close(jac, torch.tensor([[1.0, 1.0], [2.0, 1.0]]))
    with pytest.raises(RuntimeError):
        JacobianEngine("batched").jacobian(torch.stack([x.sum(), x.prod()]), [x])


def test_invalid_mode():
    with pytest.raises(ValueError, match="jacobian mode"):
        JacobianEngine("vmap")


def test_auto_computes_a_tiny_jacobian_row_by_row(monkeypatch):
    import mtl_tune.jacobian as jmod

    def refuse(*a, **k):
        raise AssertionError("a 2 × 2 Jacobian must not take the batched pass")

    monkeypatch.setattr(jmod, "_stream_batched", refuse)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([x.sum(), x.prod()])
    jac = JacobianEngine("auto").jacobian(losses, [x])
    torch.testing.assert_close(jac, torch.tensor([[1.0, 1.0], [2.0, 1.0]]))
    losses.sum().backward()  # the graph is kept, as after the batched pass
