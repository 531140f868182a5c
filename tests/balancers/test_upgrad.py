"""UPGrad and the shared dual-cone projection (mtl_tune/balancers/_dual_cone.py).

Reference for the projection: an independent brute force over all 2^K active sets (KKT), and
TorchJD 0.18.0's quadprog projector (test-only). Tolerances: the projection is a finite sequence of
K×K least-squares solves on a trace-normalised Gramian, so its KKT residuals are ~K·eps·cond(G);
for the random cases here (cond ≲ 1e4) 1e-9 relative bounds them with margin; quadprog's own
answers agree with an exact solve to ~1e-12 on these cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mtl_tune.balancers import upgrad as upgrad_module
from mtl_tune.balancers._dual_cone import (_project_2, _project_2_regular, kkt_ok, normalized_gram, project_one,
                                           project_weights)
from mtl_tune.balancers.upgrad import upgrad_rows
from mtl_tune.registry import get_balancer

from ._helpers import random_jacobian
from ._properties import (assert_gradient_scaling, assert_gram_function_equivariant, assert_permutation_equivariant,
                          assert_valid_step, balancer_step, property_cases)

ONES = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731


def brute_force_projection(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """v = argmin_{v ≥ u} vᵀGv by trying every active set S (λ_S from G_SS λ_S = −(Gu)_S, λ elsewhere
    0) and keeping the feasible KKT point of least objective: exact, exponential, independent."""
    k = len(u)
    best, best_obj = None, np.inf
    p = g @ u
    for r in range(k + 1):
        for s in itertools.combinations(range(k), r):
            lam = np.zeros(k)
            if s:
                idx = list(s)
                lam[idx] = np.linalg.lstsq(g[np.ix_(idx, idx)], -p[idx], rcond=1e-13)[0]
            v = u + lam
            if (lam >= -1e-12).all() and (g @ v >= -1e-10 * np.abs(u).max()).all():
                obj = v @ g @ v
                if obj < best_obj - 1e-14:
                    best, best_obj = v, obj
    return best




@pytest.mark.parametrize("k,p,seed", [(k, p, s) for k in (2, 3, 4, 6) for p in (1, k - 1, k + 3) if p >= 1
                                      for s in range(3)])
def test_projection_matches_brute_force_and_kkt(k, p, seed):
    jac = random_jacobian(k, p, seed, spread=1.0).numpy()
    g = normalized_gram(jac @ jac.T)
    jn = jac / np.sqrt(np.trace(jac @ jac.T))          # rows of norm ≤ 1: Jnᵀ(v − v') ≤ Σ|v − v'|
    rng = np.random.default_rng(seed)
    us = np.concatenate([np.eye(k) / k, rng.uniform(-1, 1, (3, k))])
    v, ok = project_weights(g, us)
    assert ok
    for u, vi in zip(us, v):
        ref = brute_force_projection(g, u)
        assert kkt_ok(g, u, vi)
        # the projection Jᵀv is unique, v is not when G is singular (p < K; the brute force may take
        # another, larger v): compare the directions on J itself, not through the rounded G, whose
        # ~1e-17 eigenvalues would weigh a null-space difference of size |v| by 1e-8
        scale = np.abs(u).max() + np.abs(vi).max() + np.abs(ref).max()
        assert np.linalg.norm(jn.T @ (vi - ref)) <= 1e-9 * scale
        if k == 2:  # the closed form and the general active-set solver give the same coefficients
            general, good = project_one(g, u, 20)
            assert good and np.allclose(general, vi, rtol=1e-10, atol=1e-12)


def test_projection_of_a_cone_member_is_itself_and_batches_match_rows():
    # an element of the cone (u ≥ 0 with G u ≥ 0, no conflict) projects to itself, exactly
    jac = np.abs(random_jacobian(4, 5, 1).numpy())
    v, ok = project_weights(jac @ jac.T, np.eye(4) / 4)
    assert ok and np.array_equal(v, np.eye(4) / 4)
    # batch-first: stacked rows give exactly the per-row answers (K = 2 closed form and K = 4 loop)
    for k in (2, 4):
        grams = np.stack([(j @ j.T) for j in (random_jacobian(k, 3, s).numpy() for s in range(5))])
        batch, ok = upgrad_rows(grams)
        assert ok.shape == (5,) and ok.all()
        for r in range(5):
            assert np.array_equal(batch[r], upgrad_rows(grams[r])[0])


def _bits(x: np.ndarray) -> np.ndarray:
    """x's bytes with every NaN made +NaN (exactness up to the sign of a NaN, which nothing reads)."""
    return np.where(np.isnan(x), np.nan, x).view(np.uint8) if x.dtype.kind == "f" else x.view(np.uint8)


def test_k2_regular_path_equals_the_general_closed_form_bit_for_bit():
    # _project_2_regular (no zero gradient, a feasible candidate among λ = 0 and the one non-zero λ)
    # must give exactly what _project_2 gives, and decline (None) the rest, which project_weights then
    # hands to _project_2: conflicting, nearly opposite, zero-gradient, non-finite and nearly orthogonal
    # Gramians, with u ≥ 0 (the methods' weights), signed u (both pᵢ < 0) and ±0 entries
    rng = np.random.default_rng(7)
    us = [np.eye(2) / 2, np.full((1, 2), 0.5), np.diag([0.3, 0.0]), np.array([[0.0, -0.0], [1.0, 0.25]]),
          rng.uniform(-1, 1, (3, 2))]
    taken = {True: 0, False: 0}
    for trial in range(600):
        jac = rng.normal(size=(4, 2, 3))
        kind = trial % 5
        if kind == 1:   # nearly opposite: on the Pareto front
            jac[:, 1] = -rng.uniform(0.2, 5) * jac[:, 0] + 1e-9 * rng.normal(size=(4, 3))
        elif kind == 2:  # one zero gradient in one row
            jac[rng.integers(4), rng.integers(2)] = 0.0
        elif kind == 4:  # orthogonal up to a conflict below the tolerance: pᵢ < 0 and still λ = 0
            jac = np.zeros((4, 2, 3))
            jac[:, 0, 0], jac[:, 1, 1] = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
            jac[:, 1, 0] = -10.0 ** rng.uniform(-15, -9, 4)
        gram = np.einsum("bkp,bjp->bkj", jac, jac)
        if kind == 3:   # a non-finite entry
            gram[rng.integers(4), 0, 1] = [np.nan, np.inf][trial % 2]
        u = us[(trial // 5) % len(us)]   # every kind of Gramian with every u
        with np.errstate(all="ignore"):
            g = normalized_gram(gram)
            fast = _project_2_regular(g, u)
            v_ref, ok_ref = _project_2(g, np.broadcast_to(u, (4, *u.shape)))
            v, ok = project_weights(gram, u)
        taken[fast is not None] += 1
        if fast is not None:
            assert np.array_equal(_bits(fast[0]), _bits(v_ref)) and np.array_equal(fast[1], ok_ref.all(-1))
        assert np.array_equal(_bits(v), _bits(v_ref)) and np.array_equal(ok, ok_ref.all(-1))
    assert min(taken.values()) >= 100   # both branches exercised


def test_normalized_gram_plain_quotient_equals_the_zero_guarded_form():
    # rows of trace > 0 take the plain quotient; a zero / below-norm_eps / NaN trace the guarded form
    rng = np.random.default_rng(8)
    jac = rng.normal(size=(5, 3, 4))
    gram = np.einsum("bkp,bjp->bkj", jac, jac)
    for norm_eps in (0.0, 1e-4, 3.0):
        for zero_row in (None, 2):
            g = gram.copy()
            if zero_row is not None:
                g[zero_row] = 0.0
            trace = np.trace(g, axis1=-2, axis2=-1)[..., None, None]
            zero = (trace < norm_eps) | (trace <= 0.0)
            with np.errstate(all="ignore"):
                want = np.where(zero, 0.0, g / np.where(zero, 1.0, trace))
            assert np.array_equal(_bits(normalized_gram(g, 0.0, norm_eps)), _bits(want))
    g = gram.copy()
    g[1, 0, 0] = np.nan
    out = normalized_gram(g)
    assert np.isnan(out[1]).all() and np.array_equal(out[0], gram[0] / np.trace(gram[0]))


def test_solver_reports_running_out_of_iterations():
    jac = random_jacobian(5, 2, 0).numpy()   # rank 2: most of the 5 constraints conflict
    g = jac @ jac.T
    _, ok = project_weights(g, np.eye(5)[None] / 5, max_iter=1)
    assert not ok.all()


# ------------------------------------------------------------------ UPGrad known answers
def test_no_conflict_gives_the_mean_exactly():
    jac = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64)  # Gᵢⱼ ≥ 0
    d, w = get_balancer("upgrad", 3).combine(jac, ONES(3))
    assert torch.equal(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    orth = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)  # orthogonal: no conflict either
    d, w = get_balancer("upgrad", 2).combine(orth, ONES(2))
    assert torch.equal(d, orth.mean(0))


def test_two_opposite_gradients_give_zero():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for scale in (1.0, 3.0):
        d, _ = get_balancer("upgrad", 2).combine(torch.stack([g, -scale * g]), ONES(2))
        assert float(d.abs().max()) <= 1e-15


def test_two_conflicting_gradients_closed_form():
    # K = 2 with g₁ᵀg₂ < 0: π(g₁) = g₁ − (a₁₂/a₂₂) g₂, π(g₂) = g₂ − (a₁₂/a₁₁) g₁, d = their mean, so
    # w = ½ (1 − a₁₂/a₁₁, 1 − a₁₂/a₂₂) (= PCGrad's two-task update / 2)
    jac = torch.tensor([[3.0, 1.0], [-2.0, 2.0]], dtype=torch.float64)
    a = jac @ jac.T
    want = 0.5 * torch.stack([1 - a[0, 1] / a[0, 0], 1 - a[0, 1] / a[1, 1]])
    d, w = get_balancer("upgrad", 2).combine(jac, ONES(2))
    assert torch.allclose(w, want, rtol=1e-14, atol=0)
    pcgrad, _ = get_balancer("pcgrad", 2).combine(jac, ONES(2))
    assert torch.allclose(d, pcgrad / 2, rtol=1e-14, atol=1e-15)
    assert bool((jac @ d >= 0).all())


def test_update_lies_in_the_dual_cone():
    # Jd ≥ 0 up to the rounding of d's coefficients (|c| ≲ 1, rows of J: ‖gᵢ‖²-sized products);
    # with 6 gradients in R³ the cone is often {0} and d is rounding noise
    nonzero = 0
    for seed in range(8):
        jac = random_jacobian(6, 3 + seed % 2, seed)   # rank < K: conflicts everywhere
        d, w = get_balancer("upgrad", 6).combine(jac, ONES(6))
        assert float((jac @ d).min()) >= -1e-12 * float(jac.norm()) ** 2
        nonzero += float(d.norm()) > 1e-6 * float(jac.norm())
    assert nonzero >= 2


def test_preferences_weight_the_projections():
    jac = random_jacobian(3, 2, 4)
    a = (jac @ jac.T).numpy()
    p = np.array([2.0, 0.5, 0.5])
    w = get_balancer("upgrad", 3, preferences=p.tolist()).weights_rows(a, np.ones(3)).weights
    v, _ = project_weights(a, np.diag(p / 3))
    assert np.array_equal(w, v.sum(0))


def test_failed_projection_is_counted_not_silent(monkeypatch):
    real = upgrad_module.project_weights
    monkeypatch.setattr(upgrad_module, "project_weights",
                        lambda *a, **k: (real(*a, **k)[0], np.zeros(a[0].shape[:-2], dtype=bool)))
    jac = random_jacobian(3, 2, 0)
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    balancer = get_balancer("upgrad", 3)
    with pytest.warns(RuntimeWarning, match="upgrad: solver failed"):
        balancer.backward(jac @ theta + 1.0, [theta])
    assert balancer.failures.total == 1


def test_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="reg_eps"):
        get_balancer("upgrad", 2, reg_eps=-1.0)
    with pytest.raises(ValueError, match="preferences"):
        get_balancer("upgrad", 2, preferences=[1.0])


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_upgrad_properties(case):
    # projections are positively homogeneous and the weights depend on G only up to scale: d has
    # degree 1, w degree 0; solves on a trace-normalised G of cond ≲ 1e3: 1e-10 relative
    step = balancer_step("upgrad")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-10)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-10)
    assert_gram_function_equivariant(lambda a: upgrad_rows(a)[0], case, weight_degree=0, rtol=1e-10)


# ------------------------------------------------------------------ parity with TorchJD 0.18.0
def _cases():
    out = []
    for k in (2, 3, 4, 6):
        for p in (1, 2, k, k + 4):
            for seed in range(3):
                out.append((k, p, seed))
    return out


@pytest.mark.parametrize("k,p,seed", _cases())
def test_parity_with_torchjd(k, p, seed):
    """With TorchJD's reg_eps = norm_eps = 1e-4 the directions agree to the solvers' tolerance
    (quadprog vs our exact active set: observed ≤ 1e-12 relative), rank-deficient J (p < K) included;
    with both 0 (our default) they agree with TorchJD run with both 0 wherever quadprog accepts the
    matrix (p ≥ K: G positive definite)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    from torchjd._linalg import QuadprogProjector
    jac = random_jacobian(k, p, 100 * k + seed, spread=1.0)
    ours, _ = get_balancer("upgrad", k, reg_eps=1e-4, norm_eps=1e-4).combine(jac, ONES(k))
    ref = aggregation.UPGrad()(jac)
    assert float((ours - ref).norm()) <= 1e-9 * float(ref.norm()) + 1e-15
    if p >= k:
        exact, _ = get_balancer("upgrad", k).combine(jac, ONES(k))
        ref0 = aggregation.UPGrad(projector=QuadprogProjector(reg_eps=0.0, norm_eps=0.0))(jac)
        assert float((exact - ref0).norm()) <= 1e-9 * float(ref0.norm()) + 1e-15


def test_parity_with_torchjd_on_identical_gradients():
    aggregation = pytest.importorskip("torchjd.aggregation")
    g = random_jacobian(1, 5, 3)
    jac = g.repeat(4, 1)
    ours, w = get_balancer("upgrad", 4).combine(jac, ONES(4))
    assert torch.equal(w, torch.full((4,), 0.25, dtype=torch.float64))   # no conflict: the mean
    assert torch.allclose(ours, aggregation.UPGrad()(jac), rtol=1e-12, atol=0)


def test_torchjd_norm_eps_makes_small_gradients_the_mean():
    """The documented difference: TorchJD treats ‖J‖²_F < 1e-4 as zero and returns the mean even
    when the gradients conflict; the default (norm_eps = 0) projects at every scale, and
    norm_eps = 1e-4 reproduces TorchJD."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = 1e-3 * torch.tensor([[1.0, 0.2], [-1.0, 0.5]], dtype=torch.float64)   # g₁ᵀg₂ < 0
    assert torch.equal(aggregation.UPGrad()(jac), jac.mean(0))
    ours, _ = get_balancer("upgrad", 2).combine(jac, ONES(2))
    big, _ = get_balancer("upgrad", 2).combine(jac * 1e3, ONES(2))
    assert torch.allclose(ours * 1e3, big, rtol=1e-13) and not torch.allclose(ours, jac.mean(0))
    torchjd_like, _ = get_balancer("upgrad", 2, reg_eps=1e-4, norm_eps=1e-4).combine(jac, ONES(2))
    assert torch.equal(torchjd_like, jac.mean(0))
