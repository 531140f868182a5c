"""GradDrop: sign-purity dropout of gradient coordinates."""

from __future__ import annotations

import pytest
import torch

from mtl_tune.balancers.graddrop import GradDrop, effective_weights, graddrop_multipliers, purity

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


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


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_graddrop_properties(case):
    # purity P = ½(1 + Σg/Σ|g|) per coordinate is scale-free and symmetric in the tasks, and the
    # uniform draws are per coordinate, not per task: equivariant and (same seed) linear.
    # closed form in float64: K-term sums round at a few eps ≈ 2.2e-16; 1e-12 leaves a wide margin
    step = balancer_step("graddrop")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-12)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [1, 2, 7])
def test_lockstep_uniforms_are_each_rows_one_step_draws(dtype, p):
    # lockstep rows draw a block of steps of uniforms per call (mtl_tune/balancers/_random_rows.py): the
    # same numbers as one draw of P per step, and the generators where those leave them
    seeds = (1, 2, 3)
    jac = torch.randn(3, 2, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    rows = [GradDrop(2, seed=s) for s in seeds]
    alone = [GradDrop(2, seed=s) for s in seeds]
    many = GradDrop(2)
    many.start_rows(rows)
    for _ in range(5):
        out = many.direction_rows(jac, torch.ones(3, 2, dtype=dtype))
        for r, one in enumerate(alone):
            single = one.direction_rows(jac[r], torch.ones(2, dtype=dtype))
            assert torch.equal(out.direction[r], single.direction) and torch.equal(out.weights[r], single.weights)
    assert all(torch.equal(a.generator.get_state(), b.generator.get_state()) for a, b in zip(rows, alone))


@pytest.mark.parametrize("block_entries", [1, 7, 2 ** 16])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_graddrop_direction_does_not_depend_on_the_column_blocks(monkeypatch, block_entries, k):
    """One go (a small Jacobian) or column blocks of any width (a model's) give the same direction, bit for
    bit, as the K×P formulas: every formula is per coordinate and sums over the tasks run task by task.
    The weights too in one go; over blocks their sums are float64 partial sums (equal to rounding)."""
    import mtl_tune.balancers.graddrop as graddrop

    monkeypatch.setattr(graddrop, "BLOCK_ENTRIES", block_entries)
    g = torch.Generator().manual_seed(k)
    scales = torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
    jac = torch.randn(2, k, 33, generator=g, dtype=torch.float64) * scales
    jac[:, 0, :10] = 0.0
    jac[:, -1, -1] = -jac[:, 0, -1]
    uniform = torch.rand(2, 33, generator=g, dtype=torch.float64)
    for leak in (0.0, 0.3):
        d, w = graddrop.masked_sum(jac, uniform, leak)
        m = graddrop_multipliers(jac, uniform, leak)
        expected = m[:, 0] * jac[:, 0]
        for i in range(1, k):
            expected = expected + m[:, i] * jac[:, i]
        assert torch.equal(d, expected)
        if jac.numel() <= block_entries:
            assert torch.equal(w, effective_weights(jac, m))
        else:
            torch.testing.assert_close(w, effective_weights(jac, m), rtol=1e-13, atol=0)
    # P = ½(1 + Σ g / Σ |g|), both sums task by task
    magnitude, total = jac[:, 0].abs(), jac[:, 0]
    for i in range(1, k):
        magnitude, total = magnitude + jac[:, i].abs(), total + jac[:, i]
    assert torch.equal(purity(jac), 0.5 * (1.0 + torch.where(magnitude > 0, total / magnitude, 0.0)))


def test_a_large_jacobian_goes_in_column_blocks(monkeypatch):
    """Above BLOCK_ENTRIES the formulas see column blocks of at most that many entries (cache-sized
    temporaries) that cover every column once; the float32 weights match the one-go ones to float32
    rounding."""
    import mtl_tune.balancers.graddrop as graddrop

    seen = []
    real = graddrop._masked

    def spy(block, keep, leak):
        seen.append(block.shape)
        return real(block, keep, leak)

    monkeypatch.setattr(graddrop, "_masked", spy)
    monkeypatch.setattr(graddrop, "BLOCK_ENTRIES", 64)
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 100, generator=g)
    uniform = torch.rand(100, generator=g)
    d, w = graddrop.masked_sum(jac, uniform)
    assert all(shape[0] == 3 and shape[0] * shape[1] <= 64 for shape in seen)
    assert sum(shape[1] for shape in seen) == 100 and len(seen) == 5
    m = graddrop_multipliers(jac, uniform)
    assert torch.equal(d, m[0] * jac[0] + m[1] * jac[1] + m[2] * jac[2])
    torch.testing.assert_close(w, effective_weights(jac, m), rtol=1e-6, atol=0)
    assert w.dtype == torch.float32


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit up to NaN payloads: the same values, NaNs and signs of zero."""
    nan = a.isnan()
    return (torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
            and torch.equal(a[~nan].signbit(), b[~nan].signbit()))


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_masks_and_default_leak_weights_take_fewer_calls_with_the_same_floats(shape):
    """The masked gradients use [g > 0] = [U < P], which differs from M only at zero (and NaN) entries,
    where g·1 = g·0 (or λ·g = 1·g); with λ = 0 the weights come from (g/s)² and that mask. Direction
    and weights equal, bit for bit, the written-out formulas with the true multipliers
    (graddrop_multipliers, _effective_weights), with ±0, NaN and ±inf entries and zero rows."""
    import mtl_tune.balancers.graddrop as graddrop

    g = torch.Generator().manual_seed(len(shape))
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-310, -1e-300])
    for k in (1, 2, 3):
        jac = torch.randn(*shape, k, 40, generator=g, dtype=torch.float64)
        pick = torch.rand(jac.shape, generator=g)
        jac = torch.where(pick < 0.4, specials[torch.randint(0, 7, jac.shape, generator=g)], jac)
        jac[..., 0, :5] = 0.0
        if shape:
            jac[0] = 0.0                                     # a zero Jacobian row
        uniform = torch.rand(*shape, 40, generator=g, dtype=torch.float64)
        for leak in (0.0, 0.3, 1.0):
            masked = graddrop_multipliers(jac, uniform, leak) * jac
            want_d = graddrop._task_sum(masked)
            want_w = graddrop._effective_weights(jac, masked, jac.abs())
            d, w = graddrop.masked_sum(jac, uniform, leak)
            assert _same_floats(d, want_d) and _same_floats(w, want_w)
