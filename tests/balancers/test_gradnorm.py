"""GradNorm: weights trained so that weighted gradient norms follow the loss ratios."""

from __future__ import annotations


import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.gradnorm import GradNorm, gradnorm_weight_grad

from ._helpers import saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


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


def test_gradnorm_renormalise_names_the_actual_problem():
    from mtl_tune.balancers.base import BalancerError
    from mtl_tune.balancers.gradnorm import renormalise

    assert torch.allclose(renormalise(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 1.5]))
    assert torch.allclose(renormalise(torch.tensor([-2.0, 1.0])), torch.tensor([0.0, 2.0]))  # clamped at 0
    with pytest.raises(BalancerError, match="non-finite task weights"):
        renormalise(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(BalancerError, match="reached 0"):
        renormalise(torch.tensor([0.0, -1.0]))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_gradnorm_properties(case):
    # the step uses w(t) = 1 (the learned weights change after it): linear in J.
    # last_shared_params=1: the linear problem has one shared tensor.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("gradnorm", last_shared_params=1)
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


# ---------------------------------------------------------------------------- batch-first rule, bit for bit
def _rule_inputs(rows: int, k: int, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, k, 3, generator=gen, dtype=torch.float64)
             * torch.rand(rows, k, 1, generator=gen, dtype=torch.float64) * 3,
             torch.rand(rows, k, generator=gen, dtype=torch.float64) + 0.2) for _ in range(steps)]


@pytest.mark.parametrize("k", [2, 7, 40])
def test_rows_in_lockstep_are_their_one_row_balancers_bit_for_bit(k):
    """The toy's B rows and B balancers stepping alone: the same weights, directions and Adam states,
    to the bit (the sign of G − target flips on one ulp near balance, so rounding must agree)."""
    rows = [GradNorm(k, alpha=a, lr=0.05) for a in (1.5, 1.5, 1.5)]
    alone = [GradNorm(k, alpha=1.5, lr=0.05) for _ in rows]
    many = GradNorm(k, alpha=1.5, lr=0.05)
    many.start_rows(rows)
    for jac, losses in _rule_inputs(len(rows), k, 25, seed=k):
        out = many.direction_rows(jac, losses)
        assert not out.failed.any()
        for r, bal in enumerate(alone):
            one = bal.direction_rows(jac[r], losses[r])
            assert torch.equal(out.weights[r], one.weights) and torch.equal(out.direction[r], one.direction)
            assert torch.equal(many.weights[r], bal.weights)
    for r, bal in enumerate(alone):
        state = bal.w_optimizer.state[bal.weights]
        assert torch.equal(many.w_optimizer.state[many.weights]["exp_avg_sq"][r], state["exp_avg_sq"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 2), (5, 40), (3, 17), (2, 3, 9), (1, 33)], ids=str)
def test_pow_per_row_is_one_call_per_row(shape, dtype):
    from mtl_tune.balancers.gradnorm import _pow_per_row

    gen = torch.Generator().manual_seed(len(shape))
    for alpha in (0.12, 0.5, 1.5, 2.7):
        r = torch.rand(shape, generator=gen, dtype=dtype) * 3
        want = torch.stack([row ** alpha for row in r.reshape(-1, shape[-1]).unbind(0)]).reshape(shape)
        assert torch.equal(_pow_per_row(r, alpha), want)


def test_failed_rows_fail_alone_with_their_reason():
    rows = [GradNorm(2) for _ in range(3)]
    many = GradNorm(2)
    many.start_rows(rows)
    jac, losses = _rule_inputs(3, 2, 1, seed=0)[0]
    many.direction_rows(jac, losses)
    jac[1, 0, 0] = float("inf")                    # row 1: an infinite gradient norm → NaN weights
    losses[2, 1] = -1.0                            # row 2: a non-positive loss
    out = many.direction_rows(jac, losses)
    assert out.failed.tolist() == [False, True, True]
    assert "non-finite task weights" in out.reason_of((1,))
    assert "positive losses" in out.reason_of((2,))
    assert torch.isfinite(many.weights[0]).all() and float(many.weights[0].sum()) == pytest.approx(2.0)


def test_checkpoint_after_steps_continues_identically():
    a, w, losses = gradnorm_problem((10.0, 1.0))
    bal = GradNorm(2, alpha=1.5, lr=0.1, last_shared_params=1)
    for _ in range(5):
        bal.backward(losses(), [a, w])
    twin = GradNorm(2, alpha=1.5, lr=0.1, last_shared_params=1)
    twin.load_state_dict(saved_and_loaded(bal.state_dict()))
    for _ in range(5):
        x, y = bal.backward(losses(), [a, w]), twin.backward(losses(), [a, w])
        assert torch.equal(x.weights, y.weights) and torch.equal(bal.weights, twin.weights)
        assert torch.equal(x.extras["target_norms"], y.extras["target_norms"])


def test_renormalise_rows_common_case_agrees_with_the_masked_path():
    """Rows whose sums are all positive and finite take the unmasked path; one NaN row or one all-zero
    row sends the batch through the masked one. The good rows get the same bits either way."""
    from mtl_tune.balancers.gradnorm import renormalise_rows

    gen = torch.Generator().manual_seed(4)
    good = torch.rand(4, 3, generator=gen) * 2 - 0.3          # some negative entries: clamped
    plain, nonfinite, dead = renormalise_rows(good)
    assert not nonfinite.any() and not dead.any()
    for bad, flag in ((torch.tensor([float("nan"), 1.0, 1.0]), "nonfinite"), (torch.tensor([0.0, -1.0, 0.0]), "dead")):
        batch = torch.cat([good[:2], bad[None], good[2:]])
        out = batch.clone()
        got, nonfinite, dead = renormalise_rows(out, out=out)
        assert got is out and torch.equal(got[[0, 1, 3, 4]], plain)
        assert torch.equal(got[2].nan_to_num(), bad.nan_to_num())   # the failing row is left as it was
        assert (nonfinite if flag == "nonfinite" else dead).tolist() == [False, False, True, False, False]
        assert not (dead if flag == "nonfinite" else nonfinite).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_the_cheaper_forms_of_mean_and_k_over_are_torch_s_own_bit_for_bit(dtype, k):
    """``_mean_last`` (sum, then divide by K) is ``mean(-1, keepdim=True)`` and ``_k_over`` (K as a 0-d
    tensor) is ``k / total``, to the bit, on values of every magnitude."""
    from mtl_tune.balancers.gradnorm import _k_over, _mean_last

    gen = torch.Generator().manual_seed(k)
    for scale in (1e-30, 1e-3, 1.0, 7.0, 1e30):
        x = torch.randn(5000, k, generator=gen, dtype=dtype) * scale
        assert torch.equal(_mean_last(x), x.mean(-1, keepdim=True))
        assert torch.equal(_mean_last(x[0]), x[0].mean(-1, keepdim=True))
        total = x.abs().sum(-1, keepdim=True)
        assert torch.equal(_k_over(total, k), k / total) and _k_over(total, k).dtype == dtype
