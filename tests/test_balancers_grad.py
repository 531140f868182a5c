"""Known-answer tests of the gradient balancers mgdaub, graddrop, imtl, gradvac, amtl, amtlub."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mtl_tune.balancers.amtl import AlignedMTL, aligned_mtl_weights, alignment_matrix
from mtl_tune.balancers.amtlub import AlignedMTLUB
from mtl_tune.balancers.base import Balancer, BalancerError, gram
from mtl_tune.balancers.graddrop import GradDrop, graddrop_multipliers, purity
from mtl_tune.balancers.gradvac import GradVac, gradvac_coefficients
from mtl_tune.balancers.imtl import IMTLG, imtl_g_weights
from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.balancers.mgdaub import MGDAUB, RepresentationBalancer
from mtl_tune.balancers.pcgrad import PCGrad, pcgrad_coefficients
from mtl_tune.registry import balancer_class

NAMES = ["mgdaub", "graddrop", "imtl", "gradvac", "amtl", "amtlub"]
ROOT = Path(__file__).resolve().parents[1]
EPS64 = float(torch.finfo(torch.float64).eps)


def combine(bal: Balancer, jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's pure step on a given K×P Jacobian (parameter or representation level)."""
    losses = torch.ones(jac.shape[0], dtype=jac.dtype)
    if isinstance(bal, RepresentationBalancer):
        return bal.combine_representation(jac, losses)
    return bal.combine(jac, losses)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------- imtl
def official_imtl(jac: torch.Tensor) -> torch.Tensor:
    """The paper's closed form α_{2:} = g_1 Uᵀ (D Uᵀ)^{-1}, float64, for comparison."""
    g = jac.double()
    u = unit(g)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = (g[0] @ uu.T) @ torch.linalg.inv(d @ uu.T)
    return torch.cat([(1 - rest.sum()).view(1), rest])


def test_imtl_equal_projections_and_matches_closed_form():
    jac = torch.randn(5, 30, dtype=torch.float64)
    alpha, n_zero, t = imtl_g_weights(gram(jac))
    d = alpha @ jac
    proj = unit(jac) @ d
    assert n_zero == 0
    assert torch.allclose(proj, torch.full_like(proj, t), rtol=1e-9, atol=1e-12)
    assert alpha.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(alpha, official_imtl(jac), rtol=1e-8, atol=1e-10)


def test_imtl_two_tasks_closed_form():
    g1, g2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    alpha, _, t = imtl_g_weights(gram(torch.stack([g1, g2])))
    n1, n2 = 3.0, math.sqrt(2.0)
    assert torch.allclose(alpha, torch.tensor([n2, n1], dtype=torch.float64) / (n1 + n2), atol=1e-12)
    d = alpha[0] * g1.double() + alpha[1] * g2.double()
    expected = n1 * n2 / (n1 + n2) * (unit(g1.double()) + unit(g2.double()))
    assert torch.allclose(d, expected, atol=1e-12)


def test_imtl_opposite_gradients_give_zero_update():
    g1 = torch.tensor([1.0, 2.0, -1.0])
    alpha, _, t = imtl_g_weights(gram(torch.stack([g1, -2 * g1])))
    assert torch.allclose(alpha, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), atol=1e-10)
    assert t == pytest.approx(0.0, abs=1e-10)


def test_imtl_collinear_same_direction_is_finite():
    g1 = torch.tensor([1.0, 2.0, -1.0])
    jac = torch.stack([g1, 3 * g1, torch.tensor([0.0, 1.0, 2.0])])
    alpha, _, t = imtl_g_weights(gram(jac))
    proj = unit(jac.double()) @ (alpha @ jac.double())
    assert torch.isfinite(alpha).all() and alpha.sum().item() == pytest.approx(1.0)
    assert torch.allclose(proj, torch.full_like(proj, t), atol=1e-9)


def test_imtl_zero_gradient_task_is_dropped():
    g2, g3 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    alpha, n_zero, _ = imtl_g_weights(gram(torch.stack([torch.zeros(2), g2, g3])))
    assert n_zero == 1
    assert torch.allclose(alpha, torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64), atol=1e-12)
    all_zero, n_zero, _ = imtl_g_weights(torch.zeros(4, 4))
    assert n_zero == 4 and torch.allclose(all_zero, torch.full((4,), 0.25, dtype=torch.float64))


def test_imtl_undefined_case_raises():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(BalancerError, match="undefined"):
        imtl_g_weights(gram(torch.stack([g1, g2, (g1 + g2) / 2])))


def test_imtl_extreme_norms():
    dirs = unit(torch.randn(3, 8, dtype=torch.float64))
    jac = dirs * torch.tensor([[1e-12], [1.0], [1e12]], dtype=torch.float64)
    alpha, _, t = imtl_g_weights(gram(jac))
    proj = unit(jac) @ (alpha @ jac)
    assert torch.isfinite(alpha).all()
    assert torch.allclose(proj, torch.full_like(proj, t), rtol=1e-6)


# ---------------------------------------------------------------------------- amtl
def test_amtl_orthonormal_gradients_give_their_sum():
    q, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    jac = q.T.float()
    d, w = combine(AlignedMTL(3), jac)
    assert torch.allclose(w.float(), torch.ones(3), atol=1e-6)
    assert torch.allclose(d, jac.sum(0), atol=1e-6)


def test_amtl_matches_procrustes_svd():
    """d = σ Vhᵀ Uᵀ 1 with G = U S Vh (nearest equal-norm orthogonal rows), σ = min singular value."""
    jac = torch.randn(4, 10, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    expected = s.min() * vh.T @ u.T @ torch.ones(4, dtype=torch.float64)
    weights, rank, sigma2 = aligned_mtl_weights(gram(jac))
    assert rank == 4 and sigma2 == pytest.approx(float(s.min() ** 2))
    assert torch.allclose(weights @ jac, expected, atol=1e-10)


@pytest.mark.parametrize("scale", [[1.0, 1.0, 1.0], [0.01, 1.0, 50.0]])
def test_amtl_equal_projection_on_aligned_gradients_under_rescaling(scale):
    jac = torch.randn(3, 7, dtype=torch.float64) * torch.tensor(scale, dtype=torch.float64).view(3, 1)
    w, rank, sigma2 = alignment_matrix(gram(jac), "min", rel_tol=EPS64)
    aligned = w @ jac  # rows ĝ_i
    d = aligned.sum(0)
    assert torch.allclose(aligned @ aligned.T, sigma2 * torch.eye(3, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    assert torch.allclose(aligned @ d, torch.full((3,), sigma2, dtype=torch.float64), rtol=1e-8)
    prefs = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    d_pref = aligned_mtl_weights(gram(jac), "min", prefs, rel_tol=EPS64)[0] @ jac
    assert torch.allclose(aligned @ d_pref, sigma2 * prefs, rtol=1e-8)


def test_amtl_direction_of_orthogonal_gradients_is_scale_invariant():
    q, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))
    base = aligned_mtl_weights(gram(q.T))[0] @ q.T
    scaled_jac = q.T * torch.tensor([[0.1], [3.0], [40.0]], dtype=torch.float64)
    w, _, sigma2 = aligned_mtl_weights(gram(scaled_jac))
    assert sigma2 == pytest.approx(0.01)  # min mode: smallest eigenvalue
    assert torch.allclose(w @ scaled_jac, 0.1 * base, atol=1e-12)


@pytest.mark.parametrize("mode,sigma2", [("min", 1.0), ("median", 4.0), ("rmse", 14 / 3)])
def test_amtl_scale_modes(mode, sigma2):
    jac = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    weights, rank, s2 = aligned_mtl_weights(gram(jac), mode)
    assert s2 == pytest.approx(sigma2)
    assert torch.allclose(weights, math.sqrt(sigma2) / torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_amtl_float32_tolerance_truncates_a_much_smaller_independent_gradient():
    jac = torch.tensor([[1.0, 0.0], [0.0, 1e-4]])  # λ ratio 1e-8 < 2·eps32: rank 1 (official tolerance)
    d, w = AlignedMTL(2).combine(jac, torch.ones(2))
    assert torch.allclose(w, torch.tensor([1.0, 0.0], dtype=torch.float64)) and torch.allclose(d, jac[0])
    d64, w64 = AlignedMTL(2).combine(jac.double(), torch.ones(2))  # float64 gradients keep it
    assert torch.allclose(w64, torch.tensor([1e-4, 1.0], dtype=torch.float64))


def test_amtl_rank_deficient_and_zero():
    g = torch.randn(2, 6, dtype=torch.float64)
    jac = torch.cat([g, (g[0] + g[1]).view(1, -1)])
    weights, rank, _ = aligned_mtl_weights(gram(jac))
    assert rank == 2 and torch.isfinite(weights).all()
    w, rank, sigma2 = aligned_mtl_weights(torch.zeros(3, 3))
    assert rank == 0 and sigma2 == 0.0 and torch.equal(w, torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------- graddrop
def test_graddrop_purity_and_masks_known_answer():
    jac = torch.tensor([[1.0], [-3.0]])
    assert purity(jac).item() == pytest.approx(0.25)
    keep_pos = graddrop_multipliers(jac, torch.tensor([0.2]))
    keep_neg = graddrop_multipliers(jac, torch.tensor([0.3]))
    assert (keep_pos * jac).sum().item() == 1.0 and (keep_neg * jac).sum().item() == -3.0
    leaky = graddrop_multipliers(jac, torch.tensor([0.2]), leak=0.5)
    assert (leaky * jac).sum().item() == pytest.approx(1.0 - 1.5)


def test_graddrop_expectation():
    """E[d] = P·Σ(positive) + (1 − P)·Σ(negative) = 0.25·1 + 0.75·(−3) = −2 per coordinate."""
    jac = torch.tensor([[1.0], [-3.0]]).repeat(1, 20000)
    d, w = GradDrop(2, seed=3).combine(jac, torch.ones(2))
    assert d.mean().item() == pytest.approx(-2.0, abs=0.05)
    assert w[0].item() == pytest.approx(0.25, abs=0.02) and w[1].item() == pytest.approx(0.75, abs=0.02)


def test_graddrop_leak_one_is_plain_sum():
    jac = torch.randn(4, 100)
    d, w = GradDrop(4, leak=1.0).combine(jac, torch.ones(4))
    assert torch.allclose(d, jac.sum(0)) and torch.allclose(w, torch.ones(4))


@pytest.mark.parametrize("seed", range(5))
def test_graddrop_same_signs_keep_everything(seed):
    signs = torch.where(torch.rand(1, 500) < 0.5, -1.0, 1.0)
    jac = torch.rand(3, 500) * signs  # every coordinate has one sign across tasks
    jac[1, :10] = 0.0
    d, w = GradDrop(3, seed=seed).combine(jac, torch.ones(3))
    assert torch.equal(d, jac.sum(0)) and torch.allclose(w, torch.ones(3))


def test_graddrop_state_round_trip_reproduces_draws():
    jac = torch.randn(3, 50)
    a = GradDrop(3, seed=7)
    a.combine(jac, torch.ones(3))
    state = a.state_dict()
    first = a.combine(jac, torch.ones(3))[0]
    b = GradDrop(3, seed=123)
    b.load_state_dict(state)
    assert torch.equal(b.combine(jac, torch.ones(3))[0], first)


# ---------------------------------------------------------------------------- gradvac
def conflicting_jacobian(k: int = 4, p: int = 12) -> torch.Tensor:
    jac = torch.randn(k, p, dtype=torch.float64)
    jac[1] = -0.7 * jac[0] + 0.3 * jac[1]  # make sure some pairs conflict
    return jac


def test_gradvac_zero_targets_beta_zero_is_pcgrad():
    jac = conflicting_jacobian()
    orders = [torch.randperm(4).tolist() for _ in range(4)]
    coef, targets = gradvac_coefficients(gram(jac).numpy(), np.zeros((4, 4)), orders, beta=0.0)
    expected = pcgrad_coefficients(gram(jac), orders).numpy()
    assert np.allclose(coef, expected, atol=1e-12) and not np.allclose(coef, np.ones(4))
    assert np.all(targets == 0.0)
    d_vac = GradVac(4, beta=0.0, seed=5).combine(jac, torch.ones(4))[0]
    d_pc = PCGrad(4, seed=5).combine(jac, torch.ones(4))[0]
    assert torch.allclose(d_vac, d_pc, atol=1e-12)


def test_gradvac_correction_reaches_target_and_ema():
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    jac = torch.stack([g1, g2])
    targets = np.array([[0.0, 0.5], [0.5, 0.0]])
    coef, new = gradvac_coefficients(gram(jac).numpy(), targets, [[1], []], beta=0.1)
    g1_new = g1 + (coef[1] - 1.0) * g2  # coef = c_1 + c_2 and task 2 is untouched (empty order): c_2 = e_2
    assert coef[0] == 1.0
    assert float(unit(g1_new) @ unit(g2)) == pytest.approx(0.5, abs=1e-12)
    assert new[0, 1] == pytest.approx(0.9 * 0.5 + 0.1 * 0.0) and new[1, 0] == 0.5


def test_gradvac_paper_vs_official_target_update():
    jac = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # cos = 0.6 ≥ target 0: no correction
    orders = [[0, 1], [1, 0]]
    coef_p, paper = gradvac_coefficients(gram(jac).numpy(), np.zeros((2, 2)), orders, 0.5, "paper")
    coef_o, official = gradvac_coefficients(gram(jac).numpy(), np.zeros((2, 2)), orders, 0.5, "official")
    assert np.allclose(coef_p, [1, 1]) and np.allclose(coef_o, [1, 1])
    assert np.allclose(paper, [[0, 0.3], [0.3, 0]]) and np.all(official == 0.0)


def test_gradvac_official_targets_never_rise_and_state_round_trip():
    bal = GradVac(3, beta=0.3, target_update="official", seed=1)
    for _ in range(10):
        bal.combine(torch.randn(3, 9), torch.ones(3))
    assert bool((bal.targets <= 0).all()) and bool((bal.targets < 0).any())
    state = bal.state_dict()
    jac = torch.randn(3, 9)
    expected = bal.combine(jac, torch.ones(3))[0]
    other = GradVac(3, beta=0.3, target_update="official", seed=99)
    other.load_state_dict(state)
    assert torch.equal(other.combine(jac, torch.ones(3))[0], expected)
    assert torch.equal(other.targets, bal.targets)


# ---------------------------------------------------------------------------- representation methods
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


def linear_heads_losses(theta: torch.Tensor, h: torch.Tensor):
    """z = 2θ (non-leaf); ℓ_i = ⟨h_i, z⟩, so ∂ℓ_i/∂z = h_i exactly."""
    z = 2 * theta
    return h @ z, z


def test_mgdaub_orthogonal_representation_gradients_give_midpoint():
    theta = torch.zeros(3, requires_grad=True)
    h = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    losses, z = linear_heads_losses(theta, h)
    info = MGDAUB(2).backward(losses, [theta], representation=z)
    assert torch.allclose(info.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(theta.grad, 2 * 0.5 * h.sum(0))  # ∂z/∂θ = 2
    w = combine(MGDAUB(2), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))[1]
    assert torch.allclose(w, torch.tensor([0.8, 0.2], dtype=torch.float64))  # n2²/(n1²+n2²)


def test_amtlub_orthonormal_representation_gradients():
    theta = torch.zeros(3, requires_grad=True)
    h = torch.eye(3)
    losses, z = linear_heads_losses(theta, h)
    info = AlignedMTLUB(3).backward(losses, [theta], representation=z)
    assert torch.allclose(info.weights.float(), torch.ones(3)) and info.extras["rank"] == 3
    assert torch.allclose(theta.grad, 2 * h.sum(0))


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


# ---------------------------------------------------------------------------- shared-parameter integration
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


# ---------------------------------------------------------------------------- degenerate inputs, all methods
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


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_inputs_give_finite_updates(name, case):
    """Every listed case is well defined for all six methods (imtl's undefined case raises, tested above)."""
    jac = degenerate_cases()[case]
    bal = balancer_class(name)(jac.shape[0])
    d, w = combine(bal, jac)
    assert d.shape == (jac.shape[1],) and w.shape == (jac.shape[0],)
    assert torch.isfinite(d).all() and torch.isfinite(w).all()


def test_gradvac_extreme_targets_stay_finite():
    g = torch.randn(8, dtype=torch.float64)
    bal = GradVac(2, beta=1.0)
    for jac in (torch.stack([g, 3 * g]), torch.stack([g, -g]), torch.stack([g, 3 * g])):
        d, _ = bal.combine(jac, torch.ones(2))
        assert torch.isfinite(d).all()
    assert float(bal.targets.max()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- search spaces
@pytest.mark.parametrize("name", NAMES)
def test_search_space_params_are_constructor_args(name):
    spec = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    assert spec["method"] == name
    cls = balancer_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    accepted |= set(inspect.signature(Balancer.__init__).parameters)  # max_norm etc. reach it via **kw
    params = spec.get("params") or {}
    assert set(params) <= accepted - {"self", "n_tasks", "kw"}
    defaults = {k: v["default"] for k, v in params.items() if v.get("default") is not None}
    cls(3, **defaults)


@pytest.mark.parametrize("name", NAMES)
def test_search_space_loads(name):
    spaces = pytest.importorskip("mtl_tune.spaces")
    for benchmark in (None, "nyuv2"):
        space = spaces.load_space(name, benchmark)
        assert space.method == name
