"""The Gram path (streamed K×K Gram matrix + one backward of Σ cᵢ ℓᵢ) against the Jacobian path.

Tolerances. Both paths differentiate the same float32 graph with the same batched backward, so
the per-task gradients are bitwise equal; the Gram matrices differ only by float64 summation order
(≤ ~1e-15 relative). The update differs by how Σ cᵢ gᵢ is formed: ``c @ J`` on the stored rows
versus autograd's backward of Σ cᵢ ℓᵢ, which scales the cotangent by cᵢ before the chain rule.
Each is a float32 computation a few roundings deep (ε₃₂ ≈ 6e-8 per operation), so entries agree to
a small multiple of ε₃₂ · Σᵢ|cᵢ||gᵢ| — we allow 2e-5 of the update's largest entry (≈ 300 ε₃₂,
generous for the ~10 chained operations of this small model, and far below any difference a
wrong coefficient or a missed task would make: those are O(1) of the entries).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import GradientBalancer, choose_gradient_path
from mtl_tune.jacobian import JacobianEngine, gram_of
from mtl_tune.registry import balancer_class

GRAM_METHODS = ["mgda", "cagrad", "imtl", "fairgrad", "pivrg", "pcgrad", "gradvac", "amtl", "nashmtl", "consmtl", "imtlfull",
                "epo", "pmgda", "paretomtl", "sdmgrad", "modo", "upgrad", "dualproj", "config", "krum"]
K = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(6 * 6 * 6, 16), nn.Tanh())
        self.unused = nn.Parameter(torch.randn(4))  # reached by no task
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(K))

    def shared(self) -> list[torch.Tensor]:
        return [*self.trunk.parameters(), self.unused]

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)]), z


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, K, generator=g) * torch.tensor([1.0, 3.0, 0.3])


def step(name: str, path: str, seeds=(1, 2, 3)) -> list[list[torch.Tensor]]:
    """Three training-free steps (same model, fresh grads) with one balancer; the grads of each."""
    net = Net()
    cls = balancer_class(name)
    bal = cls(K, gradient_path=path, max_norm=None)
    out = []
    for s in seeds:
        net.zero_grad(set_to_none=True)
        losses, z = net.losses(*batch(s))
        bal.backward(losses, net.shared(), [list(h.parameters()) for h in net.heads], representation=z)
        out.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()])
    return out


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_gram_path_gives_the_jacobian_paths_update(name):
    jac_steps, gram_steps = step(name, "jacobian"), step(name, "gram")
    for a_step, b_step in zip(jac_steps, gram_steps):
        scale = max(float(g.abs().max()) for g in a_step)
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(b, a, rtol=0, atol=2e-5 * scale)


def test_gram_path_is_not_the_plain_sum():
    """A guard for the test above: MGDA's update differs from LS's by far more than the tolerance."""
    mgda = step("mgda", "gram")[0]
    net = Net()
    losses, _ = net.losses(*batch(1))
    losses.sum().backward()
    scale = max(float(g.abs().max()) for g in mgda)
    diff = max(float((p.grad - g).abs().max()) for p, g in zip(net.parameters(), mgda) if p.grad is not None)
    assert diff > 1e-2 * scale


def test_streamed_gram_equals_the_jacobians():
    net = Net()
    losses, _ = net.losses(*batch(4))
    engine = JacobianEngine("batched")
    a = engine.gram(losses, net.shared())
    scale = float(a.diagonal().max())
    assert a.dtype == torch.float64
    # the same batched backward gives bitwise the same gradients: only float64 summation order differs
    jac = JacobianEngine("batched").jacobian(losses, net.shared(), retain_graph=True)
    torch.testing.assert_close(a, gram_of(jac), rtol=0, atol=1e-12 * scale)
    # the loop's gradients differ by float32 rounding (other kernels): |ΔAᵢⱼ| ≲ ε₃₂·‖gᵢ‖‖gⱼ‖·small
    jac = JacobianEngine("loop").jacobian(losses, net.shared(), retain_graph=True)
    torch.testing.assert_close(a, gram_of(jac), rtol=0, atol=1e-5 * scale)


def test_jacobian_buffer_is_reused_and_fully_overwritten():
    net = Net()
    engine = JacobianEngine("auto")
    losses, _ = net.losses(*batch(5))
    first = engine.jacobian(losses, net.shared(), reuse=True)
    first.fill_(7.0)  # stale values must not survive into the next step
    losses, _ = net.losses(*batch(6))
    second = engine.jacobian(losses, net.shared(), reuse=True)
    assert second.data_ptr() == first.data_ptr()
    expected = JacobianEngine("loop").jacobian(*reversed((net.shared(), net.losses(*batch(6))[0])))
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(second[:, -4:]) == 0  # the unused parameter


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_engine_returns_no_memory_to_autograd(monkeypatch, mode):
    """What autograd.grad hands back from the hooked passes is a stride-0 zero, not a K×n copy (batched)
    or a task's P-sized gradient list next to the buffer (loop): the hooks took the gradients."""
    import mtl_tune.jacobian as jmod

    net = Net()
    losses, _ = net.losses(*batch(7))
    seen = []
    real = torch.autograd.grad

    def spy(*a, **k):
        out = real(*a, **k)
        seen.extend(g for g in out if g is not None)
        return out

    monkeypatch.setattr(torch.autograd, "grad", spy)
    engine = jmod.JacobianEngine(mode)
    if mode == "batched":
        engine.gram(losses, net.shared())
    else:
        engine.jacobian(losses, net.shared(), reuse=True)
    assert seen and all(all(s == 0 for s in g.stride()) for g in seen)


def test_path_validation_and_choice():
    with pytest.raises(ValueError, match="needs the Jacobian"):
        balancer_class("graddrop")(K, gradient_path="gram")
    with pytest.raises(ValueError, match="gradient_path"):
        balancer_class("mgda")(K, gradient_path="fast")
    assert choose_gradient_path(3, 1000, can_stream=True) == "jacobian"
    assert choose_gradient_path(3, 2**30, can_stream=True) == "gram"
    assert choose_gradient_path(40, 1000, can_stream=True) == "gram"
    assert choose_gradient_path(40, 2**30, can_stream=False) == "jacobian"
    # a device whose memory is known: the Jacobian buffer up to 1/16 of it (NYUv2's 3 × 168 MiB on an
    # H200) keeps the Jacobian path; a large share of a small GPU, or K >= 8, takes the Gram path
    h200, small = 141 * 10**9, 4 * 2**30
    nyuv2 = 44_100_000 * 4
    assert choose_gradient_path(3, nyuv2, True, h200) == "jacobian"
    assert choose_gradient_path(3, nyuv2, True, small) == "gram"
    assert choose_gradient_path(3, nyuv2, True, None) == "gram"          # unknown memory: the fixed limit
    assert choose_gradient_path(3, 1000, True, 2**20) == "jacobian"     # never below the fixed limit
    assert choose_gradient_path(3, h200 // 16 // 3 + 1, True, h200) == "gram"
    assert choose_gradient_path(40, 1000, True, h200) == "gram"
    assert choose_gradient_path(3, nyuv2, False, small) == "jacobian"
    for name in GRAM_METHODS:
        cls = balancer_class(name)
        assert not issubclass(cls, GradientBalancer) or cls.supports_gram, name
    assert not balancer_class("graddrop").supports_gram


def test_graddrop_row_by_row_equals_the_kxp_formulation():
    """GradDrop's step works one row at a time (P-sized temporaries); same as the K×P formulas."""
    from mtl_tune.balancers.graddrop import effective_weights, graddrop_multipliers, masked_sum

    g = torch.Generator().manual_seed(3)
    jac = torch.randn(5, 300, generator=g) * torch.tensor([1.0, 1e-3, 10.0, 1.0, 0.0])[:, None]
    jac[1, :50] = 0.0
    uniform = torch.rand(300, generator=g)
    for leak in (0.0, 0.3):
        mult = graddrop_multipliers(jac, uniform, leak)
        d, w = masked_sum(jac, uniform, leak)
        torch.testing.assert_close(d, (mult * jac).sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w, effective_weights(jac, mult), rtol=1e-6, atol=1e-7)
        assert w[4] == 1.0  # zero gradient


def test_gradient_step_bench_runs_and_reports_every_entry(tmp_path, capsys):
    """bench/gradient_step.py at a tiny size: every entry gets a time, a memory figure and ratios."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gradient_step.py"
    spec = importlib.util.spec_from_file_location("gradient_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.md"
    mod.main(["--width", "32", "--depth", "2", "--batch-size", "16", "--threads", "1", "--reps", "2",
              "--warmup", "1", "--methods", "mgda@gram,mgda@jacobian,graddrop", "--out", str(out)])
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    for entry in ("ls", "official", "official:graddrop", "mgda@gram", "mgda@jacobian", "graddrop"):
        assert entry in rows, rows.keys()
        assert "Error" not in rows[entry]
    assert "| gram |" in rows["mgda@gram"] and "| jacobian |" in rows["mgda@jacobian"]
    assert "kept Jacobian buffer" in rows["mgda@jacobian"]


def test_data_parallel_steps_take_the_jacobian_path_and_refuse_a_forced_gram():
    """Under DDP the ranks must combine the rank-mean Jacobian; its Gram matrix is not the mean
    of the ranks' Gram matrices, so the Gram path is never taken there."""
    from mtl_tune.balancers.base import BalancerError, pick_gradient_path

    shared = [torch.zeros(2**20)]
    group = object()  # any non-None process group
    assert pick_gradient_path("mgda", "auto", True, 40, shared, True, None) == "gram"
    assert pick_gradient_path("mgda", "auto", True, 40, shared, True, group) == "jacobian"
    assert pick_gradient_path("mgda", "jacobian", True, 40, shared, True, group) == "jacobian"
    with pytest.raises(BalancerError, match="data-parallel"):
        pick_gradient_path("mgda", "gram", True, 40, shared, True, group)


def test_auto_asks_the_device_for_its_memory_only_where_the_gram_can_stream(monkeypatch):
    """``pick_gradient_path`` hands the shared parameters' device memory to the choice when the
    engine streams (a GPU's batched pass); meta tensors stand in for NYUv2's 44 M parameters."""
    import mtl_tune.balancers._common as common

    asked = []

    def memory(device):
        asked.append(torch.device(device).type)
        return 141 * 10**9

    monkeypatch.setattr(common, "device_memory_bytes", memory)
    shared = [torch.empty(44_100_000, device="meta")]
    assert common.pick_gradient_path("mgda", "auto", True, 3, shared, True) == "jacobian"
    assert asked == ["meta"]
    assert common.pick_gradient_path("mgda", "auto", True, 3, shared, False) == "jacobian"
    assert asked == ["meta"]                                   # not asked: nothing to stream
    monkeypatch.setattr(common, "device_memory_bytes", lambda device: 2 * 2**30)
    assert common.pick_gradient_path("mgda", "auto", True, 3, shared, True) == "gram"
    assert common.pick_gradient_path("mgda", "gram", True, 3, shared, True) == "gram"


def test_device_memory_is_known_for_cuda_only(monkeypatch):
    """A CUDA device's memory from torch, for the device named or else the current one (a stand-in
    for torch.cuda here, so it runs without a GPU)."""
    import types

    import mtl_tune.balancers._common as common

    assert common.device_memory_bytes("cpu") is None and common.device_memory_bytes(torch.device("meta")) is None
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=1000 + i))
    common._cuda_memory.cache_clear()
    try:
        assert common.device_memory_bytes("cuda") == 1001
        assert common.device_memory_bytes("cuda:0") == 1000
        assert common.device_memory_bytes(torch.device("cuda", 2)) == 1002
    finally:
        common._cuda_memory.cache_clear()


def test_gram_blocks_are_cache_sized_on_a_cpu_and_large_elsewhere():
    """Block sizes change only the float64 summation order: any block gives the Gram matrix to
    float64 rounding (P · ε₆₄ relative at worst, far below the float32 entries' own error)."""
    from mtl_tune.jacobian import GRAM_BLOCK, GRAM_BLOCK_ENTRIES_GPU, gram_columns

    assert gram_columns(3, "cpu") == GRAM_BLOCK
    assert gram_columns(3, torch.device("cuda")) == GRAM_BLOCK_ENTRIES_GPU // 3
    assert gram_columns(40, "cuda:1") == GRAM_BLOCK_ENTRIES_GPU // 40
    assert gram_columns(2**30, "cuda") == 1                  # the temporary stays 2^24 entries for any K
    for columns, blocks in ((5_003, (1, 7, 4096)), (200_003, (GRAM_BLOCK, 10**6, None))):
        jac = torch.randn(3, columns, generator=torch.Generator().manual_seed(columns))
        exact = jac.double() @ jac.double().T
        for block in blocks:
            torch.testing.assert_close(gram_of(jac, block), exact, rtol=1e-12, atol=1e-12 * float(exact.abs().max()))
