"""Known-answer tests for the loss-based balancers si, rlw, dwa, uw, go4align, gradnorm."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtl_tune.balancers.base import BalancerError, EpochInfo
from mtl_tune.balancers.dwa import DynamicWeightAverage
from mtl_tune.balancers.go4align import GO4Align, kmeans_1d
from mtl_tune.balancers.gradnorm import GradNorm, gradnorm_weight_grad
from mtl_tune.balancers.rlw import RandomLossWeighting, sample_gamma
from mtl_tune.balancers.si import ScaleInvariant
from mtl_tune.balancers.uw import Uncertainty
from mtl_tune.registry import balancer_class, get_balancer

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
METHODS = ("si", "rlw", "dwa", "uw", "go4align", "gradnorm")
TASKS = {"nyuv2": 3, "cityscapes": 2, "celeba": 40, "qm9": 11, "toy": 2}


# ---------------------------------------------------------------- a tiny model
def make_problem(k: int = 3, seed: int = 0):
    """Shared θ (4,), heads h_i (scalars); ℓ_i = (a_iᵀθ − y_i)² h_i² + 0.1 > 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, 4, generator=g, dtype=torch.float64)
    y = torch.randn(k, generator=g, dtype=torch.float64)
    theta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    heads = [torch.tensor(1.0 + 0.1 * i, dtype=torch.float64, requires_grad=True) for i in range(k)]

    def losses(scale: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.stack([((a[i] @ theta - y[i]) ** 2) * heads[i] ** 2 + 0.1 for i in range(k)])
        return out if scale is None else out * scale

    return theta, heads, losses


def grads_of(params):
    return [p.grad.detach().clone() for p in params]


def reference_grads(theta, heads, losses_fn, weights, scale=None):
    """∇ Σ w_i ℓ_i with w detached."""
    for p in [theta, *heads]:
        p.grad = None
    (losses_fn(scale) * weights.detach()).sum().backward()
    out = grads_of([theta, *heads])
    for p in [theta, *heads]:
        p.grad = None
    return out


def run_step(bal, theta, heads, losses_fn, scale=None):
    for p in [theta, *heads]:
        p.grad = None
    info = bal.backward(losses_fn(scale), [theta], [[h] for h in heads])
    return info, grads_of([theta, *heads])


# ---------------------------------------------------------------- si
def test_si_gradient_is_ls_with_inverse_loss_weights():
    theta, heads, losses = make_problem()
    ell = losses().detach()
    info, got = run_step(ScaleInvariant(3), theta, heads, losses)
    want = reference_grads(theta, heads, losses, 1.0 / ell)
    torch.testing.assert_close(info.weights, 1.0 / ell)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_si_invariant_to_rescaling_a_loss():
    theta, heads, losses = make_problem()
    _, plain = run_step(ScaleInvariant(3), theta, heads, losses)
    scale = torch.tensor([37.0, 1.0, 0.01], dtype=torch.float64)
    _, scaled = run_step(ScaleInvariant(3), theta, heads, losses, scale)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b)
    # the Samsung log1p variant is *not* scale invariant
    _, p1 = run_step(ScaleInvariant(3, form="log1p"), theta, heads, losses)
    _, s1 = run_step(ScaleInvariant(3, form="log1p"), theta, heads, losses, scale)
    assert not torch.allclose(p1[0], s1[0])


def test_si_log1p_weights():
    bal = ScaleInvariant(2, form="log1p")
    _, w = bal.objective(torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(w, torch.tensor([1 / 1.5, 1 / 4.0]))


def test_si_rejects_non_positive_loss_and_shift_fixes_it():
    losses = torch.tensor([-1.5, 2.0], requires_grad=True)
    with pytest.raises(BalancerError, match="min_losses"):
        ScaleInvariant(2).backward(losses, [losses])
    bal = ScaleInvariant(2, min_losses=[-2.0, -21.0])
    info = bal.backward(losses, [losses])
    torch.testing.assert_close(info.weights, torch.tensor([1 / 0.5, 1 / 23.0]))
    torch.testing.assert_close(losses.grad, torch.tensor([1 / 0.5, 1 / 23.0]))
    with pytest.raises(ValueError):
        ScaleInvariant(2, min_losses=[0.0])
    with pytest.raises(ValueError):
        ScaleInvariant(2, form="log2")


# ---------------------------------------------------------------- rlw
@pytest.mark.parametrize("dist", ["normal", "dirichlet"])
def test_rlw_weights_on_simplex_and_reproducible(dist):
    a, b, c = (RandomLossWeighting(4, distribution=dist, seed=s, concentration=0.5) for s in (7, 7, 8))
    losses = torch.ones(4)
    wa = torch.stack([a.objective(losses)[1] for _ in range(50)])
    wb = torch.stack([b.objective(losses)[1] for _ in range(50)])
    wc = torch.stack([c.objective(losses)[1] for _ in range(50)])
    assert bool((wa >= 0).all())
    torch.testing.assert_close(wa.sum(1), torch.ones(50))
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)
    assert not torch.allclose(wa, wc)
    assert wa.std(0).min() > 0.01  # actually random


def test_rlw_seed_none_follows_global_seed_and_sigma_limit():
    torch.manual_seed(123)
    a = RandomLossWeighting(3)
    torch.manual_seed(123)
    b = RandomLossWeighting(3)
    assert a.seed == b.seed
    w = RandomLossWeighting(3, sigma=1e-6, seed=0).objective(torch.ones(3))[1]
    torch.testing.assert_close(w, torch.full((3,), 1 / 3), rtol=0, atol=1e-5)


def test_rlw_normal_is_softmax_of_scaled_gaussian():
    bal = RandomLossWeighting(3, sigma=2.0, seed=11)
    z = torch.randn(3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    torch.testing.assert_close(bal.objective(torch.ones(3, dtype=torch.float64))[1], torch.softmax(2.0 * z, 0))


@pytest.mark.parametrize("alpha", [0.3, 1.0, 4.0])
def test_gamma_sampler_moments(alpha):
    x = sample_gamma(alpha, 40000, torch.Generator().manual_seed(0))
    assert bool((x > 0).all())
    assert abs(x.mean().item() - alpha) < 0.03 * alpha + 0.01       # E = α
    assert abs(x.var().item() - alpha) < 0.06 * alpha + 0.01        # Var = α


# ---------------------------------------------------------------- dwa
def test_dwa_epoch_mode_known_weights():
    theta, heads, losses = make_problem(2)
    bal = DynamicWeightAverage(2, temp=2.0)
    for epoch, mean in enumerate(([1.0, 1.0], [0.5, 1.0])):
        info, _ = run_step(bal, theta, heads, losses)
        torch.testing.assert_close(info.weights, torch.ones(2, dtype=torch.float64))  # first two epochs
        bal.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.tensor(mean)))
    e = torch.tensor([math.exp(0.5 / 2), math.exp(1.0 / 2)], dtype=torch.float64)
    want_w = 2 * e / e.sum()
    info, got = run_step(bal, theta, heads, losses)
    torch.testing.assert_close(info.weights, want_w)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w)
    # the next epoch uses the ratio of the last two epochs only: [0.25/0.5, 3/1]
    bal.on_epoch_end(EpochInfo(epoch=2, train_losses=torch.tensor([0.25, 3.0])))
    e = torch.exp(torch.tensor([0.5, 3.0], dtype=torch.float64) / 2)
    torch.testing.assert_close(bal.weights, 2 * e / e.sum())


def test_dwa_epoch_mode_uses_its_own_loss_means_outside_a_trainer():
    bal, ref = DynamicWeightAverage(2), DynamicWeightAverage(2)
    batches = [[[2.0, 1.0], [4.0, 3.0]], [[1.0, 1.0], [2.0, 1.0]]]   # epoch means [3, 2], [1.5, 1]
    for epoch, epoch_batches in enumerate(batches):
        for loss in epoch_batches:
            leaf = torch.tensor(loss, requires_grad=True)
            bal.backward(leaf, [leaf])
        bal.on_epoch_end(EpochInfo(epoch=epoch))
        ref.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.tensor(epoch_batches).mean(0)))
    torch.testing.assert_close(bal.weights, ref.weights)
    e = torch.exp(torch.tensor([0.5, 0.5], dtype=torch.float64) / 2)
    torch.testing.assert_close(bal.weights, 2 * e / e.sum())
    with pytest.raises(BalancerError, match="train_losses"):
        bal.on_epoch_end(EpochInfo(epoch=2))
    with pytest.raises(BalancerError, match="positive"):
        ref.on_epoch_end(EpochInfo(epoch=2, train_losses=torch.tensor([-1.0, 1.0])))
        ref.on_epoch_end(EpochInfo(epoch=3, train_losses=torch.tensor([1.0, 1.0])))


def test_dwa_iteration_mode_window():
    w_size = 3
    bal = DynamicWeightAverage(2, temp=2.0, mode="iteration", window=w_size)
    losses = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    for call in range(1, w_size + 2):  # calls 1..W+1 keep the initial ones
        info = bal.backward(losses, [losses])
        torch.testing.assert_close(info.weights, torch.full((2,), 0.5, dtype=torch.float64))  # w/K
        torch.testing.assert_close(losses.grad, torch.full((2,), 0.5 * call, dtype=torch.float64))
    info = bal.backward(losses, [losses])   # call W+2: buffer = [1, ℓ, ℓ, ℓ, ℓ, ℓ] (one initial row left)
    older = torch.tensor([(1 + 2 + 2) / 3, 1.0], dtype=torch.float64)
    e = torch.exp((torch.tensor([2.0, 1.0], dtype=torch.float64) / older) / 2.0)
    want = 2 * e / e.sum()
    torch.testing.assert_close(info.extras["dwa_weights"], want)
    torch.testing.assert_close(info.weights, want / 2)   # the official loss is the task mean
    bal.on_epoch_end(EpochInfo(epoch=0, train_losses=torch.tensor([9.0, 1.0])))   # ignored
    torch.testing.assert_close(bal.weights, want)


# ---------------------------------------------------------------- uw
@pytest.mark.parametrize("form,factor", [("regression", 1.0), ("classification", 2.0)])
def test_uw_fixed_point(form, factor):
    ell = torch.tensor([0.5, 4.0, 1.0])
    bal = Uncertainty(3, lr=0.05, form=form)
    opt = torch.optim.Adam(bal.param_groups())
    assert opt.param_groups[0]["lr"] == 0.05
    for _ in range(1500):
        opt.zero_grad()
        leaf = ell.clone().requires_grad_(True)
        bal.backward(leaf, [leaf])
        opt.step()
    torch.testing.assert_close(torch.exp(-bal.log_vars.detach()), 1 / (factor * ell), rtol=2e-3, atol=0)


def test_uw_model_gradient_and_weights():
    theta, heads, losses = make_problem()
    bal = Uncertainty(3, init=0.0)
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.0, 1.0, -2.0]))
    info, got = run_step(bal, theta, heads, losses)
    want_w = 0.5 * torch.exp(-torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(info.weights, want_w)
    for g, w in zip(got, reference_grads(theta, heads, losses, want_w)):
        torch.testing.assert_close(g, w)
    # ∂L/∂s_i = ½(1 − e^{−s_i} ℓ_i)
    ell = losses().detach().float()
    torch.testing.assert_close(bal.log_vars.grad, 0.5 * (1 - torch.exp(-bal.log_vars.detach()) * ell))
    assert list(bal.parameters()) == [bal.log_vars]


# ---------------------------------------------------------------- go4align
def brute_force_sse(x, m):
    best = math.inf
    for labels in itertools.product(range(m), repeat=len(x)):
        lab = np.array(labels)
        if len(set(labels)) < m:
            continue
        best = min(best, sum(((x[lab == g] - x[lab == g].mean()) ** 2).sum() for g in range(m)))
    return best


def test_kmeans_1d_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n = int(rng.integers(1, 7))
        m = int(rng.integers(1, n + 1))
        x = rng.exponential(size=n) if rng.random() < 0.5 else rng.normal(size=n).round(1)  # ties too
        labels, centres, sse = kmeans_1d(x, m)
        assert sse == pytest.approx(brute_force_sse(x, m), abs=1e-10)
        assert sorted(set(labels.tolist())) == list(range(m))
        assert np.all(np.diff(centres) >= 0)
        assert sum(((x[labels == g] - centres[g]) ** 2).sum() for g in range(m)) == pytest.approx(sse, abs=1e-10)
    labels, centres, _ = kmeans_1d(np.array([10.0, 1.0, 11.0, 1.1]), 2)
    assert labels.tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(centres, [1.05, 10.5])
    with pytest.raises(ValueError):
        kmeans_1d(np.ones(3), 4)


def test_go4align_first_step_limits():
    ell = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    gamma = (ell.mean() / ell) / 3    # Q_1 = uniform when β = 0
    w_k = GO4Align(3, num_groups=3, beta=0.0).objective(ell)[1]
    torch.testing.assert_close(w_k, gamma)                       # M = K: every task its own group
    w_1 = GO4Align(3, num_groups=1, beta=0.0).objective(ell)[1]
    torch.testing.assert_close(w_1, gamma.mean().expand(3))      # M = 1: one global scale
    w_sum = GO4Align(3, num_groups=3, beta=0.0, scale="sum").objective(ell)[1]
    torch.testing.assert_close(w_sum, 3 * gamma)                 # official code: K× the paper
    w_2 = GO4Align(3, num_groups=2, beta=0.0).objective(ell)[1]  # γ ∝ [4, 2, 1]: {2,1} vs {4}
    torch.testing.assert_close(w_2, torch.stack([gamma[0], (gamma[1] + gamma[2]) / 2, (gamma[1] + gamma[2]) / 2]))


def test_go4align_q_smoothing_and_errors():
    bal = GO4Align(2, num_groups=2, beta=0.1)
    seq = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 5.0])]
    for ell in seq:
        leaf = ell.clone().requires_grad_(True)
        bal.backward(leaf, [leaf])
    q = torch.softmax(-0.1 * torch.stack(seq).sum(0).double(), 0)
    torch.testing.assert_close(bal.log_q.exp(), q)
    w = bal.objective(torch.tensor([1.0, 1.0], dtype=torch.float64))[1]
    torch.testing.assert_close(w, torch.softmax(-0.1 * (torch.stack(seq).sum(0).double() + 1), 0))
    with pytest.raises(ValueError, match="1..2"):
        GO4Align(2, num_groups=3)
    with pytest.raises(ValueError):
        GO4Align(2, num_groups=0)
    with pytest.raises(BalancerError, match="positive"):
        bal.objective(torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- gradnorm
def gradnorm_problem(norm_scale=(10.0, 1.0)):
    """Shared [A (unused by the norms), W]; ‖∇_W ℓ_i‖ ∝ norm_scale_i at W = 1."""
    a = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(norm_scale, dtype=torch.float64)

    def losses(base=(1.0, 1.0)):
        b = torch.tensor(base, dtype=torch.float64)
        # ℓ_i = base_i + s_i (w_i − 1)² + ... linear term gives ∇_w ℓ_i = s_i e_i at w = 1
        return b + s * (w - 1) ** 2 + s * (w - 1) + 0.0 * a.sum() + (a - 1).pow(2).sum()

    return a, w, losses


def test_gradnorm_moves_weight_to_smaller_gradient_and_sums_to_k():
    a, w, losses = gradnorm_problem((10.0, 1.0))
    bal = GradNorm(2, alpha=1.5, lr=0.1, last_shared_params=1)
    info = bal.backward(losses(), [a, w])
    torch.testing.assert_close(info.weights, torch.ones(2))      # the step used w(t) = 1
    torch.testing.assert_close(info.extras["grad_norms"], torch.tensor([10.0, 1.0]))
    # Adam's first step moves each weight by exactly lr·sign(grad); then Σw is set back to K
    raw = torch.tensor([1 - 0.1, 1 + 0.1])
    torch.testing.assert_close(bal.weights.detach(), 2 * raw / raw.sum())
    for _ in range(20):
        bal.backward(losses(), [a, w])
        assert bal.weights.detach().sum().item() == pytest.approx(2.0)
    assert bal.weights[1] > 1.5 > bal.weights[0]


def test_gradnorm_favours_slower_task_and_uses_only_last_layer():
    a, w, losses = gradnorm_problem((1.0, 1.0))
    bal = GradNorm(2, alpha=1.0, lr=0.05, last_shared_params=1)
    bal.backward(losses((1.0, 1.0)), [a, w])                       # sets ℓ(0); balanced → no move
    torch.testing.assert_close(bal.weights.detach(), torch.ones(2))
    for p in (a, w):
        p.grad = None
    info = bal.backward(losses((0.5, 1.0)), [a, w])               # task 1 decreases slower
    r = torch.tensor([0.5, 1.0]) / 0.75
    torch.testing.assert_close(info.extras["target_norms"], r)     # Ḡ = 1, α = 1
    assert bal.weights[1] > 1 > bal.weights[0]
    # the model got Σ w_i(t) ∇ℓ_i with w(t) = 1 on every shared tensor (no double counting)
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(a.grad, torch.zeros(2, dtype=torch.float64))
    g = gradnorm_weight_grad(torch.ones(2), torch.ones(2), torch.tensor([0.5, 1.0]), torch.ones(2), 1.0)
    torch.testing.assert_close(g, torch.tensor([1.0, -1.0]))


def official_structure_weight_grad(weights, norms, losses, initial, alpha):
    """The official code's graph, differentiated by autograd: G_i = ‖w̃_i ∇_W ℓ_i‖ with the
    renormalised w̃ = w·K/Σw, the target Ḡ·r^α detached, L_grad = Σ|G − target|, backward to w."""
    w = weights.clone().requires_grad_(True)
    w_tilde = w * len(w) / w.sum()
    g = w_tilde * norms
    ratio = losses / initial
    target = (g.mean() * (ratio / ratio.mean()) ** alpha).detach()
    (g - target).abs().sum().backward()
    return w.grad


@pytest.mark.parametrize("seed", range(8))
def test_gradnorm_weight_grad_is_autograd_through_the_renormalisation(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    weights = torch.rand(k, generator=gen, dtype=torch.float64) * 2 + 0.05
    if seed % 2:  # normalised (as the balancer keeps them) and unnormalised weights
        weights = weights * k / weights.sum()
    norms = torch.rand(k, generator=gen, dtype=torch.float64) * 10 + 0.1
    losses, initial = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1, torch.rand(k, generator=gen,
                                                                                        dtype=torch.float64) + 0.1
    alpha = float(seed % 3) * 0.75
    got = gradnorm_weight_grad(weights, norms, losses, initial, alpha)
    want = official_structure_weight_grad(weights, norms, losses, initial, alpha)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # centred: orthogonal to w (the direction the renormalisation removes), and not the raw sign·n
    assert abs(float(got @ weights)) <= 1e-12 * float(norms.sum() * weights.sum())
    raw = torch.sign(weights * k / weights.sum() * norms - (weights * k / weights.sum() * norms).mean()
                     * ((losses / initial) / (losses / initial).mean()) ** alpha) * norms
    assert not torch.allclose(got, raw)


def test_gradnorm_adam_step_follows_the_centred_gradient():
    """Second step, norms (10, 1), ℓ(0) = ℓ: u = (+10, −1) at w = 1 → centred (5.5, −5.5); with
    the uncentred u Adam's per-coordinate scaling would give another step after the first."""
    a, w, losses = gradnorm_problem((10.0, 1.0))
    bal = GradNorm(2, alpha=0.0, lr=0.1, last_shared_params=1)
    bal.backward(losses(), [a, w])
    w1 = bal.weights.detach().clone()                               # (0.9, 1.1): a sign step
    state = bal.w_optimizer.state[bal.weights]
    grad2 = gradnorm_weight_grad(w1, torch.tensor([10.0, 1.0]), torch.ones(2), torch.ones(2), 0.0)
    # w1 = (0.9, 1.1): G = (9, 1.1), Ḡ = 5.05, u = (10, −1), Σ w̃u/K = (9 − 1.1)/2 = 3.95
    torch.testing.assert_close(grad2, torch.tensor([6.05, -4.95]))
    m = 0.9 * state["exp_avg"] + 0.1 * grad2
    v = 0.999 * state["exp_avg_sq"] + 0.001 * grad2 ** 2
    step = 0.1 * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8)
    raw = w1 - step
    bal.backward(losses(), [a, w])
    torch.testing.assert_close(bal.weights.detach(), 2 * raw / raw.sum())


def test_gradnorm_rejects_non_positive_losses():
    a, w, losses = gradnorm_problem()
    with pytest.raises(BalancerError, match="positive"):
        GradNorm(2, last_shared_params=1).backward(losses((-5.0, 1.0)), [a, w])


# ---------------------------------------------------------------- state round trip
STATEFUL = [
    ("rlw", {"seed": 1}, {"seed": 99}),
    ("rlw", {"distribution": "dirichlet", "seed": 1}, {"distribution": "dirichlet", "seed": 2}),
    ("dwa", {"mode": "iteration", "window": 2}, None),
    ("dwa", {}, None),
    ("uw", {}, None),
    ("go4align", {"num_groups": 2, "beta": 0.2}, None),
    ("gradnorm", {"last_shared_params": 1, "lr": 0.1}, None),
]


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


# ---------------------------------------------------------------- search spaces
@pytest.mark.parametrize("method", METHODS)
def test_search_space_params_are_ctor_args(method):
    space = yaml.safe_load((SPACES / f"{method}.yaml").read_text())
    assert space["method"] == method
    cls = balancer_class(method)
    ctor = inspect.signature(cls.__init__).parameters
    for key in space["params"]:
        assert key in ctor, f"{method}.yaml: {key} is not a constructor argument of {cls.__name__}"

    def build(params: dict, k: int):
        kwargs = {key: spec["default"] for key, spec in params.items() if spec.get("default") is not None}
        bal = cls(k, **kwargs)
        for key, spec in params.items():  # every categorical choice and the numeric bounds are accepted
            for value in spec.get("choices", []):
                cls(k, **{**kwargs, key: value})
            for bound in ("low", "high"):
                if spec.get(bound) is not None:
                    cls(k, **{**kwargs, key: spec[bound]})
        return bal

    assert build(space["params"], 3).name == method
    for bench, overrides in (space.get("benchmarks") or {}).items():
        assert bench in TASKS, bench
        params = copy.deepcopy(space["params"])
        for key, fields in overrides.items():
            assert key in params
            params[key].update(fields)
        build(params, TASKS[bench])


def test_gradnorm_renormalise_names_the_actual_problem():
    from mtl_tune.balancers.base import BalancerError
    from mtl_tune.balancers.gradnorm import renormalise

    assert torch.allclose(renormalise(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 1.5]))
    assert torch.allclose(renormalise(torch.tensor([-2.0, 1.0])), torch.tensor([0.0, 2.0]))  # clamped at 0
    with pytest.raises(BalancerError, match="non-finite task weights"):
        renormalise(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(BalancerError, match="reached 0"):
        renormalise(torch.tensor([0.0, -1.0]))
