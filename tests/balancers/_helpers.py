"""Problems and small drivers shared by several files of tests/balancers/.

Linear losses ℓ_i = g_iᵀθ + b_i at θ = 0 make the per-task gradients exactly the rows of a
chosen matrix, so every written gradient has a closed form."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import nn

from mtl_tune.balancers._fairness import pareto_gap, scaled_gram
from mtl_tune.balancers._simplex import min_norm_simplex
from mtl_tune.balancers.base import Balancer, ForwardOutput
from mtl_tune.balancers._representation import RepresentationBalancer
from mtl_tune.registry import get_balancer


def linear_problem(rows, offset=1.0):
    """Losses ℓ_i = g_iᵀx + offset at x = 0, so the Jacobian rows are exactly ``rows``."""
    g = torch.tensor(rows, dtype=torch.float64)
    x = torch.zeros(g.shape[1], dtype=torch.float64, requires_grad=True)
    return x, g @ x + offset


def shared_grad(name, rows, **hp):
    x, losses = linear_problem(rows)
    info = get_balancer(name, len(rows), **hp).backward(losses, [x])
    return x.grad, info


def combine(bal: Balancer, jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's pure step on a given K×P Jacobian (parameter or representation level)."""
    losses = torch.ones(jac.shape[0], dtype=jac.dtype)
    if isinstance(bal, RepresentationBalancer):
        return bal.combine_representation(jac, losses)
    return bal.combine(jac, losses)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def linear_heads_losses(theta: torch.Tensor, h: torch.Tensor):
    """z = 2θ (non-leaf); ℓ_i = ⟨h_i, z⟩, so ∂ℓ_i/∂z = h_i exactly."""
    z = 2 * theta
    return h @ z, z


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


def random_jacobian(k: int, p: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """K×P Gaussian rows with log-normal norms (spread = std of log-norm)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=g, dtype=torch.float64)
    return rows * torch.exp(spread * torch.randn(k, 1, generator=g, dtype=torch.float64))


def linear_losses(jac: torch.Tensor):
    """θ = 0 (P,) and ℓ = Jθ + 1: per-task gradients are exactly the rows of ``jac``."""
    theta = torch.zeros(jac.shape[1], dtype=jac.dtype, requires_grad=True)
    return theta, jac @ theta + 1.0


def written_direction(balancer, jac: torch.Tensor) -> torch.Tensor:
    theta, losses = linear_losses(jac)
    balancer.backward(losses, [theta])
    return theta.grad.detach().clone()


def two_task_gram(h: float, norms: tuple[float, float] = (1.0, 1.0), p: int = 4, seed: int = 0) -> np.ndarray:
    """Gram matrix of two gradients whose unit-gradient hull lies at squared distance h from 0
    (cosine ρ = 2h − 1), in a random orientation of R^p, with the given norms."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(p, 2)))
    rho = 2.0 * h - 1.0
    g = np.stack([q[:, 0], rho * q[:, 0] + math.sqrt(max(1.0 - rho * rho, 0.0)) * q[:, 1]])
    g *= np.asarray(norms)[:, None]
    return g @ g.T


def near_stationary_gram(k: int, h_target: float, seed: int, spread: float = 1.0) -> np.ndarray:
    """K gradients (norms log-normal with std ``spread``) whose unit hull is ~``h_target`` from 0:
    random unit vectors shifted by −(1 − s)·m (m = their min-norm point), which puts the hull's
    nearest point at s·m, then renormalised; s is bisected until h is within 10 % of the target."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(k, 2 * k + 10))  # more dimensions than tasks: 0 is not in the hull to start with
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w, _ = min_norm_simplex(u @ u.T)
    m = w @ u
    norms = np.exp(spread * rng.normal(size=(k, 1)))

    def gram_at(s: float) -> np.ndarray:
        g = (u - (1.0 - s) * m) * norms
        return g @ g.T

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e3
        h = pareto_gap(scaled_gram(gram_at(mid))[0], tol=0.0)
        if abs(h / h_target - 1) < 0.1:
            return gram_at(mid)
        lo, hi = (mid, hi) if h < h_target else (lo, mid)
    raise AssertionError("could not place the hull")


def linear_heads_problem(k=2, n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Linear(4, d).double()
    with torch.no_grad():
        trunk.weight.copy_(torch.randn(d, 4, generator=g, dtype=torch.float64))
    heads = [torch.randn(d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(k)]
    inputs = torch.randn(n, 4, generator=g, dtype=torch.float64)
    targets = torch.randn(k, n, generator=g, dtype=torch.float64)

    def forward():
        z = trunk(inputs)
        losses = torch.stack([0.5 * ((z @ heads[i] - targets[i]) ** 2).mean() for i in range(k)])
        return z, losses

    forward.targets = targets
    return trunk, heads, forward


class ScriptedForward:
    """A forward that returns scripted losses (via a dummy parameter) and counts calls."""

    def __init__(self, rows):
        self.rows, self.calls = [torch.tensor(r) for r in rows], 0
        self.param = nn.Parameter(torch.zeros(()))

    def __call__(self):
        row = self.rows[min(self.calls, len(self.rows) - 1)]
        self.calls += 1
        return ForwardOutput(losses=row + 0.0 * self.param)


class CountingSGD(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def saved_and_loaded(state: dict) -> dict:
    """``state`` through torch.save / torch.load, as a checkpoint (in-process, torch's
    ``Optimizer.load_state_dict`` would share the private Adam's state tensors between the two)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)
