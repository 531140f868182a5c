"""CAGrad: the dual solve (SLSQP for K > 2, the closed form for K = 2) and the balancer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import gram
from mtl_tune.balancers.cagrad import cagrad_coefficients

from ._helpers import shared_grad, written_direction
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)


def _cagrad_two_task_grams() -> list[tuple[str, np.ndarray]]:
    """2-task Gram matrices of the hard kinds: random, nearly opposite / parallel, exactly
    parallel, norms 1e-4…1e4 apart, overall scales 1e-12…1e12."""
    rng = np.random.default_rng(11)
    out = []
    for kind in ("random", "opposite", "parallel", "exactly-parallel", "unequal"):
        for _ in range(12):
            g1 = rng.normal(size=6)
            g2 = {"random": lambda: rng.normal(size=6),
                  "opposite": lambda: -g1 * np.exp(rng.normal()) + 1e-5 * rng.normal(size=6),
                  "parallel": lambda: g1 * np.exp(rng.normal()) + 1e-5 * rng.normal(size=6),
                  "exactly-parallel": lambda: g1 * 3.0,
                  "unequal": lambda: rng.normal(size=6) * 10.0 ** rng.choice([-4, -2, 2, 4])}[kind]()
            g = np.stack([g1, g2]) * 10.0 ** rng.uniform(-6, 6)
            out.append((kind, g @ g.T))
    return out


CAGRAD_CS = (0.0, 0.1, 0.4, 0.9, 3.0, 50.0, 900.0)


def _cagrad_dual_mp(a: np.ndarray, c: float, x):
    """The K = 2 dual φ(x) = wᵀAb + c‖g₀‖√(wᵀAw + 1e-8) in 50-digit arithmetic (exact inputs)."""
    import mpmath as mp

    with mp.workdps(50):
        a11, a12, a22 = (mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        x = mp.mpf(x)
        wab = (x * (a11 + a12) + (1 - x) * (a12 + a22)) / 2
        g0 = mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))
        return wab + mp.mpf(c) * g0 * mp.sqrt(x * x * a11 + 2 * x * (1 - x) * a12 + (1 - x) ** 2 * a22
                                              + mp.mpf(1e-8))


def _cagrad_exact_x(a: np.ndarray, c: float) -> float:
    """argmin_{x ∈ [0,1]} φ by bisection on φ' (differentiated term by term, not the closed
    form's reparametrisation) in 50-digit arithmetic: φ' is increasing (φ is convex)."""
    import mpmath as mp

    with mp.workdps(50):
        a11, a12, a22 = (mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1]))
        c0 = mp.mpf(c) * mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))

        def slope(x):
            q = x * x * a11 + 2 * x * (1 - x) * a12 + (1 - x) ** 2 * a22 + mp.mpf(1e-8)
            dq = 2 * x * a11 + 2 * (1 - 2 * x) * a12 - 2 * (1 - x) * a22
            return (a11 - a22) / 2 + c0 * dq / (2 * mp.sqrt(q))

        if slope(mp.mpf(0)) >= 0:
            return 0.0
        if slope(mp.mpf(1)) <= 0:
            return 1.0
        lo, hi = mp.mpf(0), mp.mpf(1)
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if slope(mid) > 0 else (mid, hi)
        return float((lo + hi) / 2)


def _cagrad_root_condition(a: np.ndarray, c: float, x: float) -> float:
    """Condition of the interior minimiser x* (φ'(x*) = 0) under relative perturbations of the
    Gram entries: Σ_ij |∂φ'/∂a_ij · a_ij| / φ''(x*), in 50-digit arithmetic. Entries known to a
    few ulp (they come from a float64 matrix product, whose rounding differs between BLAS
    kernels and thread counts) move x* by up to ~eps times this."""
    import mpmath as mp

    if x in (0.0, 1.0):
        return 0.0
    with mp.workdps(50):
        def slope(t, a11, a12, a22):
            c0 = mp.mpf(c) * mp.sqrt((a11 + 2 * a12 + a22) / 4 + mp.mpf(1e-8))
            q = t * t * a11 + 2 * t * (1 - t) * a12 + (1 - t) ** 2 * a22 + mp.mpf(1e-8)
            dq = 2 * t * a11 + 2 * (1 - 2 * t) * a12 - 2 * (1 - t) * a22
            return (a11 - a22) / 2 + c0 * dq / (2 * mp.sqrt(q))

        entries, xm = [mp.mpf(float(v)) for v in (a[0, 0], a[0, 1], a[1, 1])], mp.mpf(x)
        curvature = mp.diff(lambda t: slope(t, *entries), xm)
        sensitivity = mp.fsum(abs(mp.diff(lambda v, i=i: slope(xm, *(entries[:i] + [v] + entries[i + 1:])),
                                          entries[i]) * entries[i]) for i in range(3))
        return float(sensitivity / curvature)


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


@pytest.mark.parametrize("c", [c for c in CAGRAD_CS if c > 0])
def test_cagrad_two_task_closed_form_is_the_exact_minimiser(c):
    from mtl_tune.balancers.cagrad import cagrad_dual_2

    eps = np.finfo(np.float64).eps
    for kind, a in _cagrad_two_task_grams():
        x = float(cagrad_dual_2(a[0, 0], a[0, 1], a[1, 1], c))
        exact = _cagrad_exact_x(a, c)
        # 1e-12, plus what a few-ulp change of the entries does to x* (near-opposite gradients make
        # x* ill-conditioned: the combined gradient almost vanishes there)
        tol = 1e-12 + 8 * eps * _cagrad_root_condition(a, c, exact)
        assert abs(x - exact) <= tol, (kind, c, a.tolist(), tol)


@pytest.mark.parametrize("c", CAGRAD_CS)
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_two_task_closed_form_agrees_with_slsqp(c, rescale):
    """Same dual minimiser as SLSQP to SLSQP's own accuracy (ftol 1e-12 on a flat objective:
    ~1e-6 in x), never a worse objective in exact arithmetic, and the same direction: the
    difference of the two updates is ≤ 1e-4 × Σ|γᵢ|‖gᵢ‖ (the observed worst is ~3e-5, at
    c = 900 with norms 1e4 apart; 1e-8 where SLSQP's iterate is exact, e.g. parallel gradients)."""
    import mpmath

    from mtl_tune.balancers.cagrad import cagrad_coefficients, cagrad_dual_2, cagrad_dual_slsqp

    for kind, a in _cagrad_two_task_grams():
        where = (kind, c, rescale, a.tolist())
        closed, ok_c, _ = cagrad_coefficients(a, c, rescale)
        slsqp, ok_s, msg = cagrad_coefficients(a, c, rescale, solver="slsqp")
        assert ok_c and ok_s, (msg, where)
        x = float(cagrad_dual_2(a[0, 0], a[0, 1], a[1, 1], c))
        w_s = cagrad_dual_slsqp(a, c)[0]
        assert abs(x - w_s[0]) <= 1e-5, where
        if c > 0:
            # x carries float64 rounding (φ excess ~ φ''·1e-32); SLSQP's x is ~1e-7 off
            with mpmath.workdps(50):
                excess = float(_cagrad_dual_mp(a, c, x) - _cagrad_dual_mp(a, c, w_s[0]))
            assert excess <= 1e-24 * abs(a).max(), where
        diff = closed - slsqp
        terms = float(np.abs(slsqp) @ np.sqrt(np.diag(a)))
        assert math.sqrt(max(diff @ a @ diff, 0.0)) <= 1e-4 * terms, where
        if c == 0:  # no dual term: both give the mean exactly
            np.testing.assert_allclose(closed, [0.5, 0.5], rtol=1e-15)
            np.testing.assert_allclose(slsqp, [0.5, 0.5], rtol=1e-15)


def test_cagrad_closed_form_is_batched_and_matches_scalar_calls():
    from mtl_tune.balancers.cagrad import cagrad_coefficients_2

    grams = np.stack([a for _, a in _cagrad_two_task_grams()])
    n = len(grams)
    c = np.resize(np.array(CAGRAD_CS), n)
    rescale = np.resize(np.array([0, 1, 2]), n)
    batched = cagrad_coefficients_2(grams[:, 0, 0], grams[:, 0, 1], grams[:, 1, 1], c, rescale)
    assert batched.shape == (n, 2)
    for i in range(n):
        one = cagrad_coefficients_2(grams[i, 0, 0], grams[i, 0, 1], grams[i, 1, 1], c[i], int(rescale[i]))
        assert one.shape == (2,)
        np.testing.assert_array_equal(one, batched[i])
    # a (2, 3) grid of problems keeps its shape
    grid = cagrad_coefficients_2(grams[:6, 0, 0].reshape(2, 3), grams[:6, 0, 1].reshape(2, 3),
                                 grams[:6, 1, 1].reshape(2, 3), 0.4)
    np.testing.assert_array_equal(grid.reshape(6, 2), cagrad_coefficients_2(grams[:6, 0, 0], grams[:6, 0, 1],
                                                                         grams[:6, 1, 1], 0.4))


def test_cagrad_closed_form_known_answers_and_degenerate_inputs():
    from mtl_tune.balancers.cagrad import cagrad_coefficients_2, cagrad_dual_2

    # orthogonal equal norms: symmetric, x = ½; λ = c‖g₀‖/‖g_w‖ = c (up to the 1e-8 terms)
    assert float(cagrad_dual_2(1.0, 0.0, 1.0, 0.5)) == 0.5
    np.testing.assert_allclose(cagrad_coefficients_2(1.0, 0.0, 1.0, 0.5, 0), [0.75, 0.75], rtol=1e-7)
    # small c: the dual's linear term wins and all weight goes to the smaller gradient (x = 1)
    assert float(cagrad_dual_2(1.0, 0.0, 4.0, 0.1)) == 1.0
    assert float(cagrad_dual_2(4.0, 0.0, 1.0, 0.1)) == 0.0
    # identical gradients (D = 0): any x, SLSQP stays at b; c = 0: w = b
    assert float(cagrad_dual_2(2.0, 2.0, 2.0, 0.4)) == 0.5
    assert float(cagrad_dual_2(1.0, -0.3, 4.0, 0.0)) == 0.5
    # zero gradients: finite, the mean (λ = c·1e-4/1e-8 multiplies w, but g_w = 0: d = 0 anyway)
    coef = cagrad_coefficients_2(0.0, 0.0, 0.0, 0.4)
    assert np.isfinite(coef).all()
    # one zero gradient: x = 1 puts the dual on it; finite
    assert np.isfinite(cagrad_coefficients_2(0.0, 0.0, 1.0, 0.4)).all()


def test_cagrad_balancer_uses_the_closed_form_for_two_tasks(monkeypatch):
    import mtl_tune.balancers.cagrad as cagrad_mod
    from mtl_tune.balancers.cagrad import CAGrad, cagrad_coefficients

    def no_slsqp(*args, **kw):
        raise AssertionError("SLSQP called for K = 2")

    monkeypatch.setattr(cagrad_mod, "minimize", no_slsqp)
    jac = torch.tensor([[1.0, 0.2, -0.5], [-0.8, 0.1, 0.4]], dtype=torch.float64)
    bal = CAGrad(2, c=0.7, rescale=2)
    got = written_direction(bal, jac)
    coef, ok, msg = cagrad_coefficients(gram(jac).numpy(), 0.7, 2)
    assert ok and msg == "closed form"
    np.testing.assert_allclose(got.numpy(), 2 * coef @ jac.numpy(), rtol=1e-14)
    with pytest.raises(AssertionError, match="SLSQP called"):  # K = 3 still goes through SLSQP
        written_direction(CAGrad(3), torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="solver"):
        cagrad_coefficients(np.eye(2), 0.4, solver="newton")


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_cagrad_properties(case):
    # the dual (wᵀAb + c‖g₀‖√(wᵀAw)) scales as a² jointly, so w* and λ are scale-free and d = g₀ + λg_w
    # is linear — up to the official 1e-8 smoothing, which is not scaled, and SLSQP's ftol 1e-12
    # (~1e-6 in w for K > 2, see test_cagrad_two_task_closed_form_agrees_with_slsqp): rtol 1e-6
    step = balancer_step("cagrad")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-6)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-6)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_cagrad_coefficients_properties(case):
    # the dual scales as a² (w*, λ scale-free), up to the unscaled 1e-8 smoothing and SLSQP's
    # ftol (see test_cagrad_properties): rtol 1e-6
    assert_gram_function_equivariant(lambda a: cagrad_coefficients(a, 0.4)[0], case, weight_degree=0, rtol=1e-6)
