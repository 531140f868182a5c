"""Known-answer tests of the solver-based balancers: nashmtl, fairgrad, pivrg, consmtl, stgu.

Most tests use *linear* losses ℓ_i = g_iᵀθ + b_i, whose per-task gradients are exactly the
rows g_i of a chosen matrix G, so every written gradient has a closed form.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers._fairness import fair_residual, solve_fair
from mtl_tune.balancers.base import BalancerError, EpochInfo, ForwardOutput, gram
from mtl_tune.balancers.consmtl import ConsMTL
from mtl_tune.balancers.fairgrad import FairGrad
from mtl_tune.balancers.nashmtl import CCCPSolver, NashMTL, nash_weights
from mtl_tune.balancers.pivrg import PIVRG, performance_priorities
from mtl_tune.balancers.stgu import STGU, affinity_similarity, affinity_update, group_tasks
from mtl_tune.registry import get_balancer

METHODS = ("nashmtl", "fairgrad", "pivrg", "consmtl", "stgu")


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


# ---------------------------------------------------------------------------- FairGrad solver
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k,p", [(2, 10), (3, 50), (11, 200), (40, 400)])
def test_fair_residual_vanishes_and_solvers_agree(alpha, k, p):
    for seed in range(3):
        a = gram(random_jacobian(k, p, seed + 10 * k)).numpy()
        sol = solve_fair(a, alpha)
        assert sol.converged, sol.message
        assert np.all(sol.x > 0)
        assert np.max(np.abs(fair_residual(a, sol.x, alpha))) < 1e-7
        ref = solve_fair(a, alpha, method="least_squares")
        assert ref.converged, ref.message
        np.testing.assert_allclose(sol.x, ref.x, rtol=1e-6)


def test_fair_orthogonal_unit_gradients_closed_form():
    # A = I: x_i · 1 = x_i^{-1/α} ⇒ x_i = 1 for every α (for α = 1: x·1 = 1/x)
    for alpha in (0.25, 1.0, 2.0, 10.0):
        sol = solve_fair(np.eye(3), alpha)
        np.testing.assert_allclose(sol.x, np.ones(3), rtol=1e-10)
    # A = diag(a): x_i = p_i^{1/(α+1)} a_i^{-α/(α+1)}
    a, p, alpha = np.array([4.0, 0.25, 9.0]), np.array([1.0, 2.0, 0.5]), 2.0
    sol = solve_fair(np.diag(a), alpha, p)
    np.testing.assert_allclose(sol.x, p ** (1 / 3) * a ** (-2 / 3), rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fair_scaling_law(alpha):
    # A → A/s ⇒ x → s^{α/(α+1)} x (the map the scaled formulation relies on)
    a = gram(random_jacobian(4, 30, 3)).numpy()
    for s in (1e-12, 1e-3, 1e6, 1e20):
        np.testing.assert_allclose(solve_fair(a / s, alpha).x, s ** (alpha / (alpha + 1)) * solve_fair(a, alpha).x,
                                   rtol=1e-8)


def test_fair_two_parallel_gradients():
    g = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # g2 = 2 g1
    sol = solve_fair(gram(g).numpy(), 1.0)
    assert sol.converged
    np.testing.assert_allclose(fair_residual(gram(g).numpy(), sol.x, 1.0), 0, atol=1e-9)


def test_fair_zero_gradient_task_is_dropped_exactly():
    jac = random_jacobian(3, 20, 1)
    jac[1] = 0.0
    sol = solve_fair(gram(jac).numpy(), 2.0)
    assert sol.converged and sol.zero_tasks == (1,) and sol.x[1] == 0
    reduced = solve_fair(gram(jac[[0, 2]]).numpy(), 2.0)
    np.testing.assert_allclose(sol.x[[0, 2]], reduced.x, rtol=1e-12)
    all_zero = solve_fair(np.zeros((3, 3)), 2.0)
    assert all_zero.converged and np.all(all_zero.x == 0)


# ---------------------------------------------------------------------------- FairGrad balancer
def test_fairgrad_direction_is_k_times_gx_and_clipped():
    jac = random_jacobian(3, 8, 0)
    fg = FairGrad(3, alpha=2.0, max_norm=None)
    d = written_direction(fg, jac)
    x = solve_fair(gram(jac).numpy(), 2.0).x
    torch.testing.assert_close(d, 3 * torch.from_numpy(x) @ jac)
    clipped = written_direction(FairGrad(3, alpha=2.0), jac)  # default max_norm = 1.0
    # torch clips to max_norm/(‖g‖ + 1e-6), hence the tolerance
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0, dtype=clipped.dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), d / d.norm())


def test_fairgrad_alpha1_equals_nash_weights_from_official_cccp():
    # independent check: Newton (FairGrad α=1) vs the official sequential convex program
    checked = 0
    for seed in range(6):
        for k in (2, 3):
            a = gram(random_jacobian(k, 20, seed, spread=0.5)).numpy()
            alpha, ok, _, _ = CCCPSolver(k).solve(a, np.ones(k))
            if not ok:  # the official CCCP sometimes stalls; that is what the failure counter is for
                continue
            checked += 1
            np.testing.assert_allclose(solve_fair(a, 1.0).x, alpha, rtol=1e-4)
    assert checked >= 8


def test_fairgrad_alpha1_equals_nashmtl_balancer():
    jac = random_jacobian(3, 12, 7)
    fg = FairGrad(3, alpha=1.0)
    _, w = fg.combine(jac, torch.ones(3))
    nash = NashMTL(3)
    nash.solve(gram(jac))
    np.testing.assert_allclose(w.numpy() / 3, nash.alpha, rtol=1e-9)


def test_fairgrad_heads_get_unweighted_gradients():
    trunk, heads = nn.Linear(4, 3), nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    z = trunk(torch.randn(6, 4))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    expected = [torch.autograd.grad(losses[i], list(heads[i].parameters()), retain_graph=True) for i in range(2)]
    FairGrad(2).backward(losses, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    for i in range(2):
        for p, g in zip(heads[i].parameters(), expected[i]):
            torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------------------- failures
def test_fairgrad_opposite_gradients_fail_loudly_then_raise():
    # 0 lies in the hull of {g, −g}: no x > 0 solves A x = x^{-1/α}
    jac = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    fg = FairGrad(2)
    for i in range(19):
        with pytest.warns(RuntimeWarning, match="solver failed"):
            direction, _ = fg.combine(jac, torch.ones(2))
        assert torch.isfinite(direction).all()
        assert fg._step_extras()["solver_failures"] == i + 1
    with pytest.warns(RuntimeWarning), pytest.raises(BalancerError, match="20 times in a row"):
        fg.combine(jac, torch.ones(2))


def test_mocked_solver_failure_is_counted(monkeypatch):
    import mtl_tune.balancers._fairness as fair

    real = fair.solve_fair

    def failing(*args, **kw):
        sol = real(*args, **kw)
        sol.converged, sol.message = False, "mocked failure"
        return sol

    monkeypatch.setattr(fair, "solve_fair", failing)
    pv = PIVRG(3)
    theta, losses = linear_losses(random_jacobian(3, 5, 0))
    with pytest.warns(RuntimeWarning, match="mocked failure"):
        info = pv.backward(losses, [theta])
    assert info.extras["solver_failures"] == 1 and pv.failures.consecutive == 1


def test_nash_zero_gradient_task_counts_failure_keeps_previous_alpha():
    jac = random_jacobian(3, 10, 2)
    nash = NashMTL(3, max_norm=None)
    nash.solve(gram(jac))
    before = nash.alpha.copy()
    jac0 = jac.clone()
    jac0[2] = 0.0
    with pytest.warns(RuntimeWarning, match="zero gradient"):
        alpha = nash.solve(gram(jac0))
    assert nash.failures.total == 1
    assert alpha[2] == before[2]  # no finite solution: keeps its previous weight
    exact = nash_weights(gram(jac0[:2]).numpy())[0]
    np.testing.assert_allclose(alpha[:2], exact, rtol=1e-9)  # the others: exact reduced solution
    for _ in range(18):
        with pytest.warns(RuntimeWarning):
            nash.solve(gram(jac0))
    with pytest.warns(RuntimeWarning), pytest.raises(BalancerError):
        nash.solve(gram(jac0))


# ---------------------------------------------------------------------------- Nash-MTL
def test_nash_solution_satisfies_bargaining_equation():
    for k in (1, 2, 3, 11, 40):
        jac = random_jacobian(k, 3 * k + 5, k)
        nash = NashMTL(k)
        alpha = nash.solve(gram(jac))
        a = gram(jac).numpy()
        np.testing.assert_allclose(a @ alpha, 1.0 / alpha, rtol=1e-8)
        assert nash.failures.total == 0


def test_nash_invariant_to_per_task_gradient_scaling():
    jac = random_jacobian(3, 15, 4)
    c = torch.tensor([1e-3, 1.0, 250.0], dtype=torch.float64)
    d1 = written_direction(NashMTL(3, max_norm=None), jac)
    d2 = written_direction(NashMTL(3, max_norm=None), c[:, None] * jac)
    torch.testing.assert_close(d1, d2, rtol=1e-7, atol=1e-10)
    a1, a2 = NashMTL(3), NashMTL(3)
    np.testing.assert_allclose(a2.solve(gram(c[:, None] * jac)), a1.solve(gram(jac)) / c.numpy(), rtol=1e-8)


def test_nash_heads_weighted_and_clip_default():
    trunk, heads = nn.Linear(4, 3), nn.ModuleList(nn.Linear(3, 1) for _ in range(2))
    z = trunk(torch.randn(6, 4))
    losses = torch.stack([(h(z) ** 2).mean() for h in heads])
    plain = [torch.autograd.grad(losses[i], list(heads[i].parameters()), retain_graph=True) for i in range(2)]
    nash = NashMTL(2)
    info = nash.backward(losses, list(trunk.parameters()), [list(h.parameters()) for h in heads])
    for i in range(2):
        for p, g in zip(heads[i].parameters(), plain[i]):
            torch.testing.assert_close(p.grad, float(info.weights[i]) * g)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in trunk.parameters()))
    assert float(norm) <= 1.0 + 1e-6


def test_nash_update_every_reuses_alpha_without_jacobian():
    jac = random_jacobian(2, 6, 5)
    nash = NashMTL(2, update_weights_every=3, max_norm=None)
    calls = []
    real = nash.engine.jacobian
    nash.engine.jacobian = lambda *a, **k: calls.append(1) or real(*a, **k)
    dirs = [written_direction(nash, jac) for _ in range(4)]
    assert len(calls) == 2  # steps 0 and 3
    for d in dirs[1:]:
        torch.testing.assert_close(d, dirs[0])


def test_nash_cccp_solver_option_matches_newton():
    jac = random_jacobian(2, 8, 1, spread=0.3)
    cccp = NashMTL(2, solver="cccp")
    alpha = cccp.solve(gram(jac))
    assert cccp.failures.total == 0
    np.testing.assert_allclose(alpha, NashMTL(2).solve(gram(jac)), rtol=1e-4)


def test_nash_state_round_trip_and_warm_start():
    jac = random_jacobian(3, 9, 3)
    a = NashMTL(3)
    a.solve(gram(jac))
    b = NashMTL(3)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.alpha, b.alpha)
    # warm start from the saved α: the same problem converges immediately
    b.solve(gram(jac))
    assert b._iterations <= 1


# ---------------------------------------------------------------------------- PIVRG
def test_pivrg_equal_scores_equals_fairgrad_alpha2():
    jac = random_jacobian(3, 10, 6)
    pv = PIVRG(3, bound=1.8, mintemp=20.0)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([7.0, 7.0, 7.0])))
    torch.testing.assert_close(written_direction(pv, jac), written_direction(FairGrad(3, alpha=2.0), jac))


def test_pivrg_priorities_respect_bound():
    rng = np.random.default_rng(0)
    for bound in (1.1, 1.8, 2.0, 5.0):
        for spread in (0.1, 10.0, 1e3):
            s = rng.normal(size=6) * spread
            p = performance_priorities(s, bound, mintemp=1.0)
            assert math.isclose(p.sum(), 6.0, rel_tol=1e-12)
            assert p.max() / p.min() <= bound * (1 + 1e-12)
            assert np.argmax(p) == np.argmax(s)  # the task furthest behind STL gets the most weight
    # a large spread saturates the bound exactly; a small one is tempered by mintemp (T = 10)
    p = performance_priorities(np.array([0.0, 100.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], 2.0)
    p = performance_priorities(np.array([0.0, 1.0]), 2.0, 10.0)
    assert math.isclose(p[1] / p[0], math.exp(0.1))


def test_pivrg_solution_uses_priorities():
    # orthogonal unit gradients: x_i = sqrt(p_i / x_i) ⇒ x_i = p_i^{1/3}
    pv = PIVRG(2, bound=2.0, mintemp=1.0, max_norm=None)
    pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([0.0, 50.0])))
    _, w = pv.combine(torch.eye(2, dtype=torch.float64), torch.ones(2))
    np.testing.assert_allclose(w.numpy() / 2, pv.task_priorities() ** (1 / 3), rtol=1e-9)


def test_pivrg_validation_and_state():
    with pytest.raises(ValueError, match="bound"):
        PIVRG(3, bound=1.0)
    pv = PIVRG(3)
    with pytest.raises(BalancerError):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=torch.tensor([1.0, float("nan"), 0.0])))
    with pytest.warns(RuntimeWarning, match="no per-task scores"):
        pv.on_epoch_end(EpochInfo(epoch=0, scores=None))
    pv.on_epoch_end(EpochInfo(epoch=1, scores=torch.tensor([3.0, -2.0, 10.0])))
    other = PIVRG(3)
    other.load_state_dict(pv.state_dict())
    np.testing.assert_array_equal(other.task_priorities(), pv.task_priorities())


# ---------------------------------------------------------------------------- ConsMTL
def _linear_heads_problem(k=2, n=5, d=3, seed=0):
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


def test_consmtl_lambda0_equals_fairgrad_and_plain_heads():
    trunk, heads, forward = _linear_heads_problem()
    z, losses = forward()
    ConsMTL(2, lambda_=0.0).backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    cons_shared = [p.grad.clone() for p in trunk.parameters()]
    cons_heads = [h.grad.clone() for h in heads]
    for p in [*trunk.parameters(), *heads]:
        p.grad = None
    z, losses = forward()
    FairGrad(2, alpha=2.0).backward(losses, list(trunk.parameters()), [[h] for h in heads])
    for a, p in zip(cons_shared, trunk.parameters()):
        torch.testing.assert_close(a, p.grad)
    for a, h in zip(cons_heads, heads):
        torch.testing.assert_close(a, h.grad)


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_consmtl_head_gradient_matches_hand_derivation(clip):
    # ℓ_i = ½ mean_b (z_b·w_i − y_ib)²: δ_i = r_i w_iᵀ / n and
    # ∇_{w_i}(−λ⟨δ_i, Δ⟩) = −λ/n Σ_b [z_b (w_iᵀΔ_b) + r_ib Δ_b]
    lam, n = 3.0, 5
    trunk, heads, forward = _linear_heads_problem(n=n)
    z, losses = forward()
    cons = ConsMTL(2, lambda_=lam, head_clip=clip, max_norm=None)
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z)
    x = info.weights.numpy() / 2
    with torch.no_grad():
        r = [z @ heads[i] - forward.targets[i] for i in range(2)]
        deltas = [torch.outer(r[i], heads[i]) / n for i in range(2)]
        joint = x[0] * deltas[0] + x[1] * deltas[1]
        for i in range(2):
            g1 = (r[i][:, None] * z).mean(0)
            g2 = -lam / n * ((z * (joint @ heads[i])[:, None]).sum(0) + (r[i][:, None] * joint).sum(0))
            g2 = g2 * min(1.0, clip * float(g1.norm()) / float(g2.norm()))
            torch.testing.assert_close(heads[i].grad, g1 + g2)


def test_consmtl_per_task_representations_and_contract_errors():
    trunk, heads, forward = _linear_heads_problem()
    z, losses = forward()
    cons = ConsMTL(2, head_clip=[0.05, 0.0])
    info = cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], [z, z])
    assert float(info.extras["head_extra_norm"][1]) == 0.0  # c = 0: no extra gradient for task 1
    assert float(info.extras["head_extra_norm"][0]) > 0.0
    z, losses = forward()
    with pytest.raises(BalancerError, match="representation"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], None)
    with pytest.raises(BalancerError, match="task_params"):
        cons.backward(losses, list(trunk.parameters()), None, z)
    with pytest.raises(BalancerError, match="does not require grad"):
        cons.backward(losses, list(trunk.parameters()), [[h] for h in heads], z.detach())
    with pytest.raises(ValueError, match="head_clip"):
        ConsMTL(2, head_clip=[0.1, 0.1, 0.1])


# ---------------------------------------------------------------------------- degenerate inputs
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
    if case == "opposite":
        assert bal.failures.total == 1  # no solution exists: reported, not hidden
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
    trunk, heads, forward = _linear_heads_problem(k=1)
    z, losses = forward()
    info = ConsMTL(1).backward(losses, list(trunk.parameters()), [[heads[0]]], z)
    assert torch.isfinite(info.weights).all() and info.extras["solver_failures"] == 0
    script = _Script([[1.0]])
    opt = _CountingSGD([script.param])
    STGU(1, prepos=0).train_step(script, opt, [script.param])
    assert opt.steps == 2  # the single group, stepped twice as in the official code


# ---------------------------------------------------------------------------- STGU
def test_stgu_affinity_update_matches_formula():
    aff = np.full((3, 3), 0.1)
    before, after = np.array([2.0, 4.0, 1.0]), np.array([1.0, 5.0, 0.5])  # a = (0.5, −0.25, 0.5)/|g|
    out = affinity_update(aff, [0, 1], before, after, decay=0.2)
    a = np.array([0.5, -0.25, 0.5]) / 2
    exp = aff.copy()
    exp[0, 0] = 0.8 * 0.1 + 0.2 * a[0]            # self, a ≥ 0
    exp[0, 1] = 0.8 * 0.1 + 0.2 * -max(a[1], a[0])  # intra-group, opposite signs
    exp[0, 2] = 0.8 * 0.1 + 0.2 * a[2]            # outside the group
    exp[1, 0] = 0.8 * 0.1 + 0.2 * -max(a[0], a[1])
    exp[1, 1] = 0.1                               # self with a < 0: not updated
    exp[1, 2] = 0.8 * 0.1 + 0.2 * a[2]
    np.testing.assert_allclose(out, exp)
    skipped = affinity_update(aff, [2], np.array([np.nan, 1.0, 1.0]), np.array([1.0, 0.5, 0.5]), 0.5)
    assert skipped[2, 0] == 0.1  # target without a previous loss: skipped
    with pytest.raises(BalancerError, match="positive"):
        affinity_update(aff, [0], np.array([-1.0, 1.0, 1.0]), np.ones(3), 0.1)


def test_stgu_block_diagonal_affinity_gives_blocks():
    # three pairs: the median similarity (official preference) is the between-block value
    aff = np.full((6, 6), -0.2)
    for block in ([0, 3], [1, 4], [2, 5]):
        aff[np.ix_(block, block)] = 0.6
    np.fill_diagonal(aff, 1.0)
    assert group_tasks(affinity_similarity(aff)) == [[0, 3], [1, 4], [2, 5]]
    assert group_tasks(affinity_similarity(0.01 * aff)) == [[0, 3], [1, 4], [2, 5]]  # column-normalised
    # blocks covering most entries put the median inside a block: a lower quantile recovers them
    aff = np.full((5, 5), -0.5)
    for block in ([0, 2], [1, 3, 4]):
        aff[np.ix_(block, block)] = 0.8
    np.fill_diagonal(aff, 1.0)
    assert sorted(group_tasks(affinity_similarity(aff), preference_quantile=0.3)) == [[0, 2], [1, 3, 4]]
    assert group_tasks(np.ones((1, 1))) == [[0]]


def test_stgu_zero_diagonal_guard():
    aff = np.array([[0.0, 0.3], [0.2, 0.0]])
    s = affinity_similarity(aff)
    assert np.all(np.isfinite(s)) and np.all(np.abs(s) <= 1.0)
    assert np.all(affinity_similarity(np.zeros((3, 3))) == 0)


class _Script:
    """A forward that returns scripted losses (via a dummy parameter) and counts calls."""

    def __init__(self, rows):
        self.rows, self.calls = [torch.tensor(r) for r in rows], 0
        self.param = nn.Parameter(torch.zeros(()))

    def __call__(self):
        row = self.rows[min(self.calls, len(self.rows) - 1)]
        self.calls += 1
        return ForwardOutput(losses=row + 0.0 * self.param)


class _CountingSGD(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_attribution_on_scripted_losses(attribution):
    rows = [[2.0, 2.0], [1.0, 3.0], [1.5, 1.5]]  # before g0, after g0 / before g1, after g1
    script = _Script(rows)
    st = STGU(2, affin_decay=0.5, prepos=10, attribution=attribution)
    st._plan = lambda: [[0], [1]]
    st.train_step(script, _CountingSGD([script.param]), [script.param])
    zero = np.zeros((2, 2))
    r = [np.array(x) for x in rows]
    if attribution == "paper":  # each group credited with its own step's effect, plus a lookahead forward
        expected = affinity_update(affinity_update(zero, [0], r[0], r[1], 0.5), [1], r[1], r[2], 0.5)
        assert script.calls == 3
    else:  # the change before g1's forward is credited to g1; g0 is never measured
        expected = affinity_update(zero, [1], r[0], r[1], 0.5)
        assert script.calls == 2
    np.testing.assert_allclose(st.affinity, expected)


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_one_group_takes_two_optimizer_steps(attribution):
    script = _Script([[1.0, 1.0]])
    opt = _CountingSGD([script.param])
    st = STGU(2, prepos=0, attribution=attribution)
    st.next_groups = lambda: [[0, 1]]
    losses, info = st.train_step(script, opt, [script.param])
    assert opt.steps == 2 and info.extras["group_steps"] == 2
    torch.testing.assert_close(info.weights, torch.tensor([2.0, 2.0]))
    single = STGU(2, prepos=0, repeat_single_group=False)
    single.next_groups = lambda: [[0, 1]]
    opt = _CountingSGD([script.param])
    single.train_step(script, opt, [script.param])
    assert opt.steps == 1


def test_stgu_trains_a_small_model_and_round_trips_state():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    data = torch.randn(16, 4)
    targets = torch.stack([data.sum(1), data[:, 0], -data[:, 1]])
    params = [*trunk.parameters(), *heads.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def forward():
        z = torch.relu(trunk(data))
        return ForwardOutput(torch.stack([((h(z).squeeze(1) - targets[i]) ** 2).mean() + 0.01
                                          for i, h in enumerate(heads)]))

    st = STGU(3, prepos=3, affin_decay=0.1)
    first, _ = st.train_step(forward, opt, list(trunk.parameters()))
    for _ in range(9):
        last, info = st.train_step(forward, opt, list(trunk.parameters()))
    assert float(last.sum()) < float(first.sum())
    assert np.any(st.affinity != 0) and 1 <= info.extras["n_groups"] <= 3
    other = STGU(3, prepos=3, affin_decay=0.1)
    other.load_state_dict(st.state_dict())
    np.testing.assert_array_equal(other.affinity, st.affinity)
    assert other._plan() == st._plan()  # same groups and same shuffled order
    with pytest.raises(BalancerError, match="train_step"):
        st.backward(first, list(trunk.parameters()))


# ---------------------------------------------------------------------------- search spaces
@pytest.mark.parametrize("method", METHODS)
def test_search_space_params_build_the_method(method):
    from mtl_tune.search.spaces import load_space

    for bench, k in ((None, 3), ("nyuv2", 3), ("cityscapes", 2), ("celeba", 40), ("qm9", 11)):
        space = load_space(method, bench)
        values = {p.name: p.default for p in space.params if p.default is not None}
        bal = get_balancer(method, k, **values)
        for name, value in values.items():
            if name != "max_norm":
                assert getattr(bal, name) == value or getattr(bal, name) == [value] * k
