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
    monkeypatch.setattr(jmod, "AUTO_LOOP_DEVICES", frozenset())  # and so would a CPU
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    engine = JacobianEngine("auto")
    assert engine.mode_on("cpu") == "batched" and not engine.fell_back
    with pytest.warns(RuntimeWarning, match="batched Jacobian unavailable"):
        jac = engine.jacobian(torch.stack([x.sum(), x.prod()]), [x])
    assert engine.fell_back and engine.mode_on("cpu") == "loop"
    torch.testing.assert_close(jac, torch.tensor([[1.0, 1.0], [2.0, 1.0]]))
    with pytest.raises(RuntimeError):
        JacobianEngine("batched").jacobian(torch.stack([x.sum(), x.prod()]), [x])


def test_invalid_mode():
    with pytest.raises(ValueError, match="jacobian mode"):
        JacobianEngine("vmap")


def test_auto_loops_on_a_cpu_and_batches_elsewhere(monkeypatch):
    """``auto`` takes the loop for CPU tensors (measured faster there) without trying the batched pass."""
    import mtl_tune.jacobian as jmod

    def refuse(*a, **k):
        raise AssertionError("auto must not take the batched pass on a CPU")

    monkeypatch.setattr(jmod, "_stream_batched", refuse)
    monkeypatch.setattr(jmod, "LOOP_MAX_ENTRIES", 0)
    engine = JacobianEngine("auto")
    assert engine.mode_on("cpu") == "loop" and engine.mode_on("cuda:0") == "batched"
    assert not engine.can_stream_gram("cpu") and engine.can_stream_gram(torch.device("cuda"))
    assert JacobianEngine("batched").mode_on("cpu") == "batched"
    assert JacobianEngine("loop").mode_on("cuda") == "loop"
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    jac = engine.jacobian(torch.stack([x.sum(), (x * x).sum()]), [x])
    torch.testing.assert_close(jac, torch.tensor([[1.0, 1.0, 1.0], [2.0, 4.0, 6.0]]))
    assert not engine.fell_back


def test_loop_overwrites_every_row_of_the_reused_buffer():
    """The loop's hooks write each parameter's gradient into the buffer while autograd runs (their
    stride-0 returns: tests/test_gradient_paths.py); a parameter a task does not reach gets zeros in
    that row, also over what the previous step left there."""
    import mtl_tune.jacobian as jmod

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = torch.tensor([3.0], requires_grad=True)
    losses = torch.stack([(x * x).sum(), x.prod() * y.sum()])
    engine = jmod.JacobianEngine("loop")
    first = engine.jacobian(losses, [x, y], retain_graph=True, reuse=True)
    first.fill_(5.0)  # stale entries (the row task 0 leaves for y) must be overwritten next step
    jac = engine.jacobian(losses, [x, y], reuse=True)
    assert jac.data_ptr() == first.data_ptr()
    torch.testing.assert_close(jac, torch.tensor([[2.0, 4.0, 0.0], [6.0, 3.0, 2.0]]))


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


def _lstm_losses():
    """Three losses of a small LSTM (as in QM9's Set2Set; its CPU backward, ``mkldnn_rnn_layer_backward``
    in torch 2.14, has no vmap batching rule: vmap runs it through its slow per-row fallback)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, batch_first=True)
    x = torch.randn(5, 7, 4)
    out, _ = lstm(x)
    losses = torch.stack([out.pow(2).mean(), out.sum(), out[:, -1].abs().mean()])
    return losses, list(lstm.parameters())


def test_auto_never_runs_vmaps_slow_per_row_fallback(monkeypatch):
    """An operator without a batching rule makes ``auto`` take the loop (with its one warning) instead
    of vmap's per-row fallback, which is the loop with overhead (3.7× slower on QM9); the rows are the
    loop's. ``batched`` (forced) still runs through the fallback; the fallback setting is restored."""
    import warnings

    from torch._C import _functorch

    import mtl_tune.jacobian as jmod

    monkeypatch.setattr(jmod, "AUTO_LOOP_DEVICES", frozenset())  # as on a GPU: auto tries the batched pass
    losses, params = _lstm_losses()
    want = jacobian_loop(losses, params, retain_graph=True)
    engine = JacobianEngine("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = engine.jacobian(losses, params, retain_graph=True)
        again = engine.jacobian(losses, params, retain_graph=True)
    texts = [str(w.message) for w in caught]
    assert not any("performance drop" in t for t in texts), texts
    if engine.fell_back:  # this torch has no rule for the LSTM's backward
        assert sum("batched Jacobian unavailable" in t for t in texts) == 1, texts
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-6)
    assert _functorch._is_vmap_fallback_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forced = JacobianEngine("batched").jacobian(losses, params, retain_graph=True)
    torch.testing.assert_close(forced, want, rtol=1e-5, atol=1e-6)
    assert _functorch._is_vmap_fallback_enabled()
