"""Known-answer tests for ls, famo, mgda, pcgrad, cagrad and the base-class plumbing."""

import numpy as np
import pytest
import torch

from mtl_tune.balancers._simplex import min_norm_simplex, project_to_simplex
from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.cagrad import cagrad_coefficients
from mtl_tune.balancers.famo import famo_logit_grad, famo_weights
from mtl_tune.balancers.mgda import mgda_weights
from mtl_tune.balancers.pcgrad import pcgrad_coefficients
from mtl_tune.registry import UnknownNameError, get_balancer


def linear_problem(rows, offset=1.0):
    """Losses ℓ_i = g_iᵀx + offset at x = 0, so the Jacobian rows are exactly ``rows``."""
    g = torch.tensor(rows, dtype=torch.float64)
    x = torch.zeros(g.shape[1], dtype=torch.float64, requires_grad=True)
    return x, g @ x + offset


def shared_grad(name, rows, **hp):
    x, losses = linear_problem(rows)
    info = get_balancer(name, len(rows), **hp).backward(losses, [x])
    return x.grad, info


# ----------------------------------------------------------------------------- ls
def test_ls_is_weighted_sum():
    grad, info = shared_grad("ls", [[1.0, 0.0], [0.0, 2.0]], task_weights=[3.0, 0.5])
    assert grad.tolist() == pytest.approx([3.0, 1.0])
    assert info.weights.tolist() == [3.0, 0.5]


def test_ls_default_is_plain_sum_and_rejects_bad_weights():
    grad, _ = shared_grad("ls", [[1.0, 2.0], [3.0, -1.0]])
    assert grad.tolist() == pytest.approx([4.0, 1.0])
    with pytest.raises(ValueError, match="task_weights"):
        get_balancer("ls", 2, task_weights=[1.0, -1.0])


def test_heads_receive_weighted_gradients_for_loss_methods():
    head = torch.zeros(1, requires_grad=True, dtype=torch.float64)
    x, losses = linear_problem([[1.0], [1.0]])
    losses = losses + torch.stack([2 * head.sum(), torch.zeros((), dtype=torch.float64)])
    get_balancer("ls", 2, task_weights=[0.5, 1.0]).backward(losses, [x], [[head], []])
    assert head.grad.item() == pytest.approx(1.0)  # 0.5 · ∂(2h)/∂h


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid methods: .*cagrad.*ls"):
        get_balancer("nope", 2)


def test_wrong_loss_shape_is_a_clear_error():
    x, losses = linear_problem([[1.0], [1.0]])
    with pytest.raises(BalancerError, match=r"shape \(3,\)"):
        get_balancer("ls", 3).backward(losses, [x])


# ----------------------------------------------------------------------------- mgda
def test_mgda_orthogonal_unit_gradients_give_midpoint():
    grad, info = shared_grad("mgda", [[1.0, 0.0], [0.0, 1.0]])
    assert info.weights.tolist() == pytest.approx([1.0, 1.0])  # ½ each, ×K
    assert grad.tolist() == pytest.approx([1.0, 1.0])


def test_mgda_two_task_closed_form_and_dominated_case():
    # g1 = (1, 0), g2 = (0, 2): γ = (4 − 0)/(1 + 4) = 0.8 on g1 → min-norm point (0.8, 0.4)
    w = mgda_weights(torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.8, 0.2])
    # g2 = 2 g1: the min-norm point of the segment is g1 itself
    w = mgda_weights(torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1.0, 0.0])


def test_mgda_direction_decreases_every_task():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(5, 20)) + 2.0  # positively correlated tasks → a common descent direction exists
    grad, _ = shared_grad("mgda", g.tolist())
    assert np.all(g @ grad.numpy() > 0)


def test_min_norm_simplex_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        k = int(rng.integers(3, 7))
        g = rng.normal(size=(k, 4))
        a = g @ g.T
        w, _ = min_norm_simplex(a)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        samples = rng.dirichlet(np.ones(k), size=20000)
        assert w @ a @ w <= np.einsum("ni,ij,nj->n", samples, a, samples).min() + 1e-9


def test_min_norm_simplex_degenerate_inputs():
    assert min_norm_simplex(np.zeros((3, 3)))[0].sum() == pytest.approx(1.0)
    w, _ = min_norm_simplex(np.ones((4, 4)))  # identical gradients: any simplex point, finite
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)
    assert min_norm_simplex(np.array([[2.0]]))[0].tolist() == [1.0]


def test_project_to_simplex():
    assert project_to_simplex(np.array([0.2, 0.3, 0.5])).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert project_to_simplex(np.array([2.0, 0.0])).tolist() == pytest.approx([1.0, 0.0])
    assert project_to_simplex(np.array([1.0, 1.0])).tolist() == pytest.approx([0.5, 0.5])


# ----------------------------------------------------------------------------- pcgrad
def test_pcgrad_removes_the_conflicting_component():
    # g1 = (1, 0), g2 = (−1, 1): ⟨g1, g2⟩ = −1 < 0
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    g1_pc = g1 - (g1 @ g2) / (g2 @ g2) * g2          # (0.5, 0.5)
    g2_pc = g2 - (g2 @ g1) / (g1 @ g1) * g1          # (0, 1)
    grad, _ = shared_grad("pcgrad", [g1.tolist(), g2.tolist()])
    assert grad.tolist() == pytest.approx((g1_pc + g2_pc).tolist())
    assert float(g1_pc @ g2) == pytest.approx(0.0)


def test_pcgrad_keeps_non_conflicting_gradients():
    grad, _ = shared_grad("pcgrad", [[1.0, 0.0], [1.0, 1.0]])
    assert grad.tolist() == pytest.approx([2.0, 1.0])


def test_pcgrad_coefficients_mean_reduction_and_zero_gradient():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    c = pcgrad_coefficients(a, [[0, 1, 2]] * 3, "mean")
    assert c.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_pcgrad_is_reproducible_per_seed():
    rows = np.random.default_rng(3).normal(size=(4, 6)).tolist()
    a, _ = shared_grad("pcgrad", rows, seed=7)
    b, _ = shared_grad("pcgrad", rows, seed=7)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- cagrad
def test_cagrad_c0_is_the_mean_gradient_times_k():
    rows = [[1.0, 2.0, 0.0], [-3.0, 0.5, 1.0], [0.0, 0.0, 4.0]]
    grad, _ = shared_grad("cagrad", rows, c=0.0)
    assert grad.tolist() == pytest.approx(np.sum(rows, axis=0).tolist())


def test_cagrad_matches_the_dual_solution_on_two_orthogonal_gradients():
    # g1 = (1, 0), g2 = (0, 1): by symmetry w = (½, ½), g_w = g0 = (½, ½),
    # λ = c‖g0‖/‖g_w‖ = c, d = (1 + c) g0, rescale 1 → d/(1 + c²)
    c = 0.5
    coef, ok, _ = cagrad_coefficients(np.eye(2), c, rescale=1)
    assert ok
    assert coef.tolist() == pytest.approx([(1 + c) / 2 / (1 + c * c)] * 2, rel=1e-6)


def test_cagrad_improves_the_worst_task_over_the_mean():
    g = np.array([[1.0, 0.0], [-0.9, 0.2]])
    mean = g.mean(0)
    coef, ok, _ = cagrad_coefficients(g @ g.T, 0.8, rescale=0)
    d = coef @ g
    assert ok
    # CAGrad maximises the minimum task improvement within a ball around g0
    assert (g @ d).min() > (g @ mean).min()
    assert np.linalg.norm(d - mean) <= 0.8 * np.linalg.norm(mean) + 1e-6


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_cagrad_finite_at_extreme_scales(scale):
    g = np.array([[1.0, 0.0, 0.2], [-0.5, 1.0, 0.0], [0.0, 0.3, -1.0]]) * scale
    coef, ok, _ = cagrad_coefficients(g @ g.T, 0.4)
    assert np.isfinite(coef).all() and ok


# ----------------------------------------------------------------------------- famo
def test_famo_weights_sum_to_one_and_favour_small_losses():
    w = famo_weights(torch.zeros(2), torch.tensor([1.0, 4.0]), torch.zeros(2))
    assert w.sum().item() == pytest.approx(1.0)
    assert w.tolist() == pytest.approx([0.8, 0.2], rel=1e-6)  # ∝ 1/ℓ with equal logits


def test_famo_moves_weight_to_the_task_whose_loss_falls_slowest():
    k = 2
    balancer = get_balancer("famo", k, gamma=0.0, w_lr=0.1)
    x = torch.zeros(1, requires_grad=True)
    for _ in range(20):
        losses = torch.stack([x.sum() + 2.0, x.sum() + 2.0])
        balancer.backward(losses, [x])
        # task 0 halves its loss each step, task 1 only drops by 1%
        balancer.after_optimizer_step(torch.tensor([1.0, 1.98]))
    z = torch.softmax(balancer.logits.detach(), 0)
    assert z[1] > 0.6 > z[0]


def test_famo_logit_gradient_formula():
    logits = torch.tensor([0.3, -0.2, 0.1])
    g = famo_logit_grad(logits, torch.tensor([2.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 1.5]), torch.zeros(3))
    delta = torch.log(torch.tensor([2.0, 2.0, 2.0])) - torch.log(torch.tensor([1.0, 2.0, 1.5]))
    jac = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), logits)
    torch.testing.assert_close(g, jac.T @ delta)


def test_famo_state_round_trip_and_min_loss_error():
    a = get_balancer("famo", 2, w_lr=0.05)
    x = torch.zeros(1, requires_grad=True)
    a.backward(torch.stack([x.sum() + 1, x.sum() + 3]), [x])
    a.after_optimizer_step(torch.tensor([0.5, 2.9]))
    b = get_balancer("famo", 2, w_lr=0.05)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(BalancerError, match="min_losses"):
        a.backward(torch.stack([x.sum() - 1, x.sum() + 3]), [x])


# ----------------------------------------------------------------------------- clipping
def test_max_norm_clips_the_shared_gradient_after_writing_it():
    grad, _ = shared_grad("ls", [[3.0, 0.0], [0.0, 4.0]], max_norm=1.0)
    assert torch.linalg.norm(grad).item() == pytest.approx(1.0)
    assert grad.tolist() == pytest.approx([0.6, 0.8])


def test_blocked_gram_equals_the_full_product():
    from mtl_tune.balancers.base import gram

    j = torch.randn(4, 1000)
    full = j.double() @ j.double().T
    torch.testing.assert_close(gram(j, block=64), full)
    torch.testing.assert_close(gram(j), full)
