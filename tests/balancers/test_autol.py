"""Auto-λ: the meta step's λ gradient against the analytic hypergradient on quadratic losses
(where the central difference is exact), its degenerate cases, state and bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.autol import AutoLambda, finite_difference_hypergradient, step_hyperparameters
from mtl_tune.balancers.base import BalancerError, ForwardOutput
from mtl_tune.registry import get_balancer

from ._properties import assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step, \
    property_cases

P = 5


def quadratic(k: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """ℓᵢ(θ) = ½ θᵀAᵢθ + bᵢᵀθ + 1 with Aᵢ symmetric positive definite (float64)."""
    g = torch.Generator().manual_seed(seed)
    mats, vecs = [], []
    for _ in range(k):
        m = torch.randn(P, P, generator=g, dtype=torch.float64)
        mats.append(m @ m.T / P + torch.eye(P, dtype=torch.float64))
        vecs.append(torch.randn(P, generator=g, dtype=torch.float64))
    return mats, vecs, torch.randn(P, generator=g, dtype=torch.float64)


def losses_of(mats, vecs, theta):
    return torch.stack([0.5 * theta @ a @ theta + b @ theta + 1.0 for a, b in zip(mats, vecs)])


def grads_of(mats, vecs, theta):
    return torch.stack([a @ theta + b for a, b in zip(mats, vecs)])


def analytic(train, meta, theta, lam, alpha, wd):
    """−α ∇ℓᵢ(θ)ᵀ d with θ′ = θ − α(Σ λᵢ∇ℓᵢ(θ) + wd θ) and d = Σᵢ ∇mᵢ(θ′)."""
    g = grads_of(*train, theta)
    theta_ = theta - alpha * (lam @ g + wd * theta)
    d = grads_of(*meta, theta_).sum(0)
    return -alpha * g @ d


def setup(k: int, lr: float = 0.1, wd: float = 0.0, seed: int = 0, **hp):
    *train, theta0 = quadratic(k, seed)
    *meta, _ = quadratic(k, seed + 100)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr, weight_decay=wd)
    balancer = get_balancer("autol", k, **hp)
    forward = lambda: ForwardOutput(losses_of(*train, theta))  # noqa: E731
    meta_forward = lambda: ForwardOutput(losses_of(*meta, theta))  # noqa: E731
    return balancer, theta, opt, forward, meta_forward, train, meta


@pytest.mark.parametrize("k,lr,wd", [(2, 0.1, 0.0), (3, 0.05, 1e-2), (4, 0.3, 1e-4)])
def test_lambda_gradient_is_the_analytic_hypergradient(k, lr, wd):
    """On quadratics (ℓ(θ+εd) − ℓ(θ−εd))/(2ε) = ∇ℓ(θ)ᵀd exactly: float64 rounding only (the
    difference of two O(1) losses divided by 2ε = 0.02/‖d‖ loses ~50‖d‖·eps ≈ 1e-13 relative)."""
    balancer, theta, opt, forward, meta_forward, train, meta = setup(k, lr, wd, weight_init=0.3)
    lam = balancer.lambdas.double().clone()
    got = balancer._hypergradient(forward, meta_forward, opt, [theta], lr, wd, 0.0)
    want = analytic(train, meta, theta.detach(), lam, lr, wd)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_meta_step_takes_one_adam_step_on_that_gradient_and_leaves_theta_unchanged():
    balancer, theta, opt, forward, meta_forward, train, meta = setup(3, 0.1, 1e-3, meta_lr=1e-3)
    before = theta.detach().clone()
    want = analytic(train, meta, before, balancer.lambdas.double(), 0.1, 1e-3)
    balancer.meta_step(forward, meta_forward, opt, [theta])
    assert torch.equal(theta.detach(), before) and theta.grad is None
    # Adam's first step: −lr·g/(|g| + 1e-8) per entry (bias corrections cancel), in float32
    step = -1e-3 * want / (want.abs() + 1e-8)
    torch.testing.assert_close(balancer.lambdas.double(), 0.1 + step, rtol=0, atol=1e-7)
    assert balancer.lambdas.grad is None


def test_sgd_momentum_enters_the_virtual_step():
    """θ′ = θ − α(g + wd θ + μ m) with m the optimizer's momentum buffer (the official virtual step)."""
    balancer, theta, _, forward, meta_forward, train, meta = setup(2)
    opt = torch.optim.SGD([theta], lr=0.1, momentum=0.9)
    theta.grad = torch.ones(P, dtype=torch.float64)
    opt.step()   # momentum buffer = ones
    theta.grad = None
    lam, th = balancer.lambdas.double(), theta.detach()
    g = grads_of(*train, th)
    d = grads_of(*meta, th - 0.1 * (lam @ g + 0.9 * torch.ones(P, dtype=torch.float64))).sum(0)
    got = balancer._hypergradient(forward, meta_forward, opt, [theta], *step_hyperparameters(opt, theta))
    torch.testing.assert_close(got, -0.1 * g @ d, rtol=1e-9, atol=1e-12)


def test_zero_learning_rate_never_moves_lambda():
    balancer, theta, opt, forward, meta_forward, *_ = setup(3, lr=0.0)
    calls = []
    for _ in range(5):
        balancer.meta_step(forward, lambda: calls.append(1) or meta_forward(), opt, [theta])
    assert torch.equal(balancer.lambdas, torch.full((3,), 0.1)) and not calls


def test_stationary_meta_loss_gives_a_zero_gradient_not_nan():
    """d = 0 (the official ε = 0.01/‖d‖ would be inf): the exact hypergradient −α∇ℓᵀd = 0."""
    x = torch.ones(2, dtype=torch.float64, requires_grad=True)
    got = finite_difference_hypergradient(lambda _: x.detach() ** 2, [x], [torch.zeros(2, dtype=torch.float64)], 0.1, 2)
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(BalancerError, match="non-finite meta gradient"):
        finite_difference_hypergradient(lambda _: x, [x], [torch.full((2,), math.inf, dtype=torch.float64)], 0.1, 2)


def test_non_finite_meta_loss_raises_and_restores_theta():
    balancer, theta, opt, forward, _, *_ = setup(2)
    before = theta.detach().clone()
    bad = lambda: ForwardOutput(torch.stack([theta.sum(), theta.sum() * math.nan]))  # noqa: E731
    with pytest.raises(BalancerError):
        balancer.meta_step(forward, bad, opt, [theta])
    assert torch.equal(theta.detach(), before)


def test_training_step_is_the_lambda_weighted_sum():
    balancer, theta, opt, forward, *_ = setup(2, weight_init=0.25)
    info = balancer.backward(forward().losses, [theta])
    mats, vecs = quadratic(2, 0)[:2]
    want = 0.25 * grads_of(mats, vecs, theta.detach()).sum(0)
    torch.testing.assert_close(theta.grad, want, rtol=1e-12, atol=0)
    assert info.weights.tolist() == [0.25, 0.25]


def test_state_dict_round_trip_keeps_lambda_and_its_adam_state():
    a, theta, opt, forward, meta_forward, *_ = setup(3)
    for _ in range(3):
        a.meta_step(forward, meta_forward, opt, [theta])
    b = get_balancer("autol", 3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.lambdas, b.lambdas)
    a.meta_step(forward, meta_forward, opt, [theta])
    b.meta_step(forward, meta_forward, opt, [theta])
    assert torch.equal(a.lambdas, b.lambdas) and not torch.equal(a.lambdas, torch.full((3,), 0.1))


def test_not_data_parallel_and_declares_its_meta_batch():
    assert AutoLambda.needs_meta_batch and not AutoLambda.supports_distributed and not AutoLambda.needs_jacobian


@pytest.mark.parametrize("kw,match", [({"weight_init": math.nan}, "weight_init"), ({"weight_init": "x"}, "weight_init"),
                                      ({"meta_lr": 0.0}, "meta_lr"), ({"meta_lr": -1e-3}, "meta_lr"),
                                      ({"meta_lr": math.inf}, "meta_lr")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        get_balancer("autol", 2, **kw)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_autol_properties(case):
    # without a meta step the weights are the constant λ = weight_init: d = λ Σ gᵢ, linear in J;
    # K-term float64 sums round at a few eps
    step = balancer_step("autol")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


def test_lambda_and_its_adam_state_follow_to_double():
    balancer, theta, opt, forward, meta_forward, *_ = setup(2)
    balancer.meta_step(forward, meta_forward, opt, [theta])
    moments = balancer.meta_optimizer.state_dict()["state"][0]["exp_avg"].clone()
    balancer.double()
    assert balancer.meta_optimizer.param_groups[0]["params"][0] is balancer.lambdas
    torch.testing.assert_close(balancer.meta_optimizer.state_dict()["state"][0]["exp_avg"], moments.double())
    balancer.meta_step(forward, meta_forward, opt, [theta])
    assert balancer.lambdas.dtype == torch.float64


# ---------------------------------------------------------------- the batch-first meta rule (the toy's)
def quadratic_landscape(mats, vecs):
    """losses (B, K) and Jacobians (B, K, P) of the quadratics at points (B, P), in NumPy."""
    a = torch.stack(mats).numpy()
    b = torch.stack(vecs).numpy()

    def evaluate(points):
        grads = np.einsum("kpq,bq->bkp", a, points) + b
        return 0.5 * np.einsum("bp,bkp->bk", points, grads - b) + points @ b.T + 1.0, grads
    return evaluate


@pytest.mark.parametrize("k", [2, 3])
def test_meta_rows_equal_meta_step_on_each_row_and_the_analytic_hypergradient(k):
    """``meta_rows`` (the toy's rule: the meta batch is the training batch) on 4 rows: each row's λ
    after one and after three meta steps equals that of a one-row balancer stepped by ``meta_step``
    on the same quadratic with forward = meta_forward and plain SGD(lr α); the first step's λ moves
    by Adam's first step on the analytic hypergradient −α∇ℓᵢ(θ)ᵀΣⱼ∇ℓⱼ(θ′)."""
    mats, vecs, _ = quadratic(k, 3)
    landscape = quadratic_landscape(mats, vecs)
    rng = np.random.default_rng(k)
    points = rng.normal(size=(4, P))
    alpha = 0.05
    singles = [get_balancer("autol", k, weight_init=0.2, meta_lr=1e-2) for _ in range(4)]
    many = get_balancer("autol", k, weight_init=0.2, meta_lr=1e-2)
    many.start_rows(singles)
    for step in range(3):
        losses, jac = landscape(points)
        out = many.meta_rows(landscape, points, losses, jac, alpha)
        assert not out.failed.any()
        for r, one in enumerate(singles):
            theta = torch.tensor(points[r], requires_grad=True)
            if step == 0:
                want = analytic((mats, vecs), (mats, vecs), theta.detach(), one.lambdas.double(), alpha, 0.0)
                first = 0.2 - 1e-2 * want / (want.abs() + 1e-8)
            forward = lambda theta=theta: ForwardOutput(losses_of(mats, vecs, theta))  # noqa: E731
            one.meta_step(forward, forward, torch.optim.SGD([theta], lr=alpha), [theta])
            # the same float64 operations up to the order of K-term sums: λ's float32 agrees to an ulp
            torch.testing.assert_close(many.lambdas[r], one.lambdas, rtol=2e-7, atol=0)
            if step == 0:
                torch.testing.assert_close(one.lambdas.double(), first, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(out.weights, many.lambdas.double().numpy())
        np.testing.assert_array_equal(many.weights_rows(losses).weights, many.lambdas.double().numpy())


def test_meta_rows_take_the_losses_alone_from_losses_at_when_given():
    """The finite difference's two evaluations read only losses: ``losses_at`` gives them (the toy's
    cheaper forward), both points in one call; with the same numbers λ steps the same bits, and the
    Jacobian-returning landscape is then called once (at θ′), not three times."""
    mats, vecs, _ = quadratic(2, 1)
    landscape = quadratic_landscape(mats, vecs)
    calls = {"full": 0, "losses": 0}

    def counted(points):
        calls["full"] += 1
        return landscape(points)

    def losses_at(points):
        calls["losses"] += 1
        assert points.shape == (2, 3, P)   # x + εd and x − εd of the 3 rows
        # each side as the separate evaluations of meta_rows without losses_at (the same floats)
        return np.stack([landscape(side)[0] for side in points])

    points = np.random.default_rng(5).normal(size=(3, P))
    plain, cheap = (get_balancer("autol", 2, meta_lr=1e-2) for _ in range(2))
    plain.start_rows([get_balancer("autol", 2, meta_lr=1e-2) for _ in range(3)])
    cheap.start_rows([get_balancer("autol", 2, meta_lr=1e-2) for _ in range(3)])
    for _ in range(3):
        losses, jac = landscape(points)
        want = plain.meta_rows(landscape, points, losses, jac, 0.05)
        got = cheap.meta_rows(counted, points, losses, jac, 0.05, losses_at)
        assert torch.equal(cheap.lambdas, plain.lambdas)
        np.testing.assert_array_equal(got.weights, want.weights)
    assert calls == {"full": 3, "losses": 3}


def test_meta_rows_fail_a_row_with_the_meta_steps_message_and_spare_the_others():
    mats, vecs, _ = quadratic(2, 0)
    landscape = quadratic_landscape(mats, vecs)
    many = get_balancer("autol", 2)
    many.start_rows([get_balancer("autol", 2) for _ in range(3)])
    points = np.zeros((3, P))
    losses, jac = landscape(points)
    losses[1, 0] = math.nan
    out = many.meta_rows(landscape, points, losses, jac, 0.1)
    assert out.failed.tolist() == [False, True, False]
    assert out.reason_of((1,)).startswith("autol: non-finite task loss [nan")
    assert torch.isfinite(many.lambdas).all() and not torch.equal(many.lambdas[0], torch.full((2,), 0.1))


def elementwise_landscape(target: np.ndarray, curvatures: np.ndarray):
    """ℓₖ(x) = Σₚ cₖₚ (xₚ − tₚ)² + 1 at points (..., P): every row's numbers from its own entries alone (no
    matrix product), so a row gets the same bits in a batch of any size."""
    def evaluate(points):
        diff = (points - target)[..., None, :]
        return (curvatures * diff * diff).sum(-1) + 1.0, 2.0 * curvatures * diff
    return evaluate


@pytest.mark.parametrize("cheap", [False, True])
def test_meta_rows_common_case_agrees_with_the_masked_path(cheap):
    """Every row finite and moving takes the unmasked path; a failed row (a NaN loss) or a row whose d
    is 0 (at the tasks' common minimum) takes the masked one. The other rows' λ are the same bits
    either way, and a masked row steps on a zero gradient."""
    rng = np.random.default_rng(3)
    target, curvatures = rng.normal(size=P), rng.uniform(0.5, 2.0, size=(2, P))
    landscape = elementwise_landscape(target, curvatures)   # both tasks minimal at ``target``
    losses_at = (lambda points: landscape(points)[0]) if cheap else None
    points = np.concatenate([rng.normal(size=(2, P)), target[None], rng.normal(size=(1, P))])
    kept = [0, 3]   # rows 1 (a NaN loss from the second step) and 2 (d = 0: ∇ℓₖ = 0 at x = θ′) masked
    masked, plain = get_balancer("autol", 2, meta_lr=1e-2), get_balancer("autol", 2, meta_lr=1e-2)
    masked.start_rows([get_balancer("autol", 2, meta_lr=1e-2) for _ in range(4)])
    plain.start_rows([get_balancer("autol", 2, meta_lr=1e-2) for _ in range(3)])
    for step in range(3):
        losses, jac = landscape(points)
        if step >= 1:
            losses[1, 0] = math.nan
        out = masked.meta_rows(landscape, points, losses, jac, 0.05, losses_at)
        both = [0, 1, 3]   # the plain run's rows: row 1 stays finite there (the unmasked path)
        want = plain.meta_rows(landscape, points[both], landscape(points[both])[0], jac[both], 0.05, losses_at)
        assert not want.failed.any() and out.failed.tolist() == [False, step >= 1, False, False]
        np.testing.assert_array_equal(out.weights[kept], want.weights[[0, 2]])
        if step == 0:   # row 1 before it fails: the unmasked numbers too
            np.testing.assert_array_equal(out.weights[1], want.weights[1])
    assert torch.equal(masked.lambdas[2], torch.full((2,), 0.1))   # zero gradients: λ where it started
