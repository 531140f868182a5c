"""Parity with TorchJD 0.18.0 (https://github.com/SimplexLab/TorchJD, release 0.18.0 on PyPI), a test-only oracle.

Both sides get identical float64 inputs: random Jacobians (fixed seeds, K = 2, 3, 5) and degenerate
ones (parallel, opposite, a zero gradient, a duplicated row). The project's side is the balancer's
batch-first rule ``weights_rows`` on the Gram matrix (what ``backward`` and the toy run), and for
``mgda`` and ``imtl`` also ``backward`` on a small model. Conventions are mapped before comparing
(docs/methods.md#parity-with-torchjd has the table):

* ×K: ``mgda``, ``cagrad``, ``fairgrad`` report K × the weights TorchJD returns; ``amtl`` reports
  W·1 where TorchJD's default ``AlignedMTL`` gives W·(1/K); ``imtl``, ``nashmtl``, ``pcgrad``,
  ``gradvac``, ``graddrop`` use the same scale.
* ``cagrad``: TorchJD has no ``rescale`` (it is the project's ``rescale=0``).
* random streams: TorchJD's ``PCGrad`` and ``GradDrop`` draw from torch's global generator what the
  project's balancers draw from their own, seeded alike (``torch.randperm(K)`` per task, one
  ``torch.rand(P)`` per step), so seeding both with the same number gives the same draws.
  TorchJD's ``GradVac`` draws ``torch.randperm(K − 1)`` (the other tasks), the project
  ``torch.randperm(K)`` and skips the task itself: for K = 2 the order does not matter and the
  balancers are compared over steps; for K ≥ 3 the project's rule gets TorchJD's orders.

Tolerances follow from the solvers: closed forms and exact solves 1e-10 relative; TorchJD's
Frank–Wolfe MGDA by its own duality gap; its CVXPY solves (CAGrad: Clarabel, relative gap 1e-8;
Nash-MTL: stop when a round moves α by < 1e-6) by those tolerances; its FairGrad least_squares
(default ftol/xtol 1e-8) to 1e-6. Where the two differ, the test asserts the difference and which
side satisfies the method's defining condition.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import numpy as np
import pytest
import torch

torchjd = pytest.importorskip("torchjd")

from torchjd.aggregation import (IMTLG as TjdIMTLG, MGDA as TjdMGDA, AlignedMTL as TjdAlignedMTL,  # noqa: E402
                                 AlignedMTLWeighting, CAGradWeighting, FairGradWeighting, GradDrop as TjdGradDrop,
                                 GradVacWeighting, IMTLGWeighting, MGDAWeighting, NashMTL as TjdNashMTL,
                                 PCGradWeighting)

from mtl_tune.balancers.amtl import AlignedMTL  # noqa: E402
from mtl_tune.balancers.cagrad import CAGrad  # noqa: E402
from mtl_tune.balancers.fairgrad import FairGrad  # noqa: E402
from mtl_tune.balancers.graddrop import GradDrop, masked_sum  # noqa: E402
from mtl_tune.balancers.gradvac import GradVac, gradvac_coefficients  # noqa: E402
from mtl_tune.balancers.imtl import IMTLG  # noqa: E402
from mtl_tune.balancers.mgda import MGDA  # noqa: E402
from mtl_tune.balancers.nashmtl import NashMTL  # noqa: E402
from mtl_tune.balancers.pcgrad import PCGrad  # noqa: E402

TORCHJD_VERSION = importlib.metadata.version("torchjd")
if TORCHJD_VERSION != "0.18.0":  # the conventions below were read from 0.18.0
    pytest.skip(f"parity tests written against torchjd 0.18.0, found {TORCHJD_VERSION}", allow_module_level=True)

P = 7  # parameters of the random Jacobians
RANDOM = [(k, seed) for k in (2, 3, 5) for seed in (0, 1)]


def random_jacobian(k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, P))


def _degenerate() -> dict[str, np.ndarray]:
    v, g1, g2, g3 = np.random.default_rng(7).standard_normal((4, P))
    return {"parallel": np.array([v, 2.0 * v]),          # g2 = 2 g1
            "opposite": np.array([v, -0.5 * v]),         # g2 = −g1/2: 0 is in the convex hull
            "zero": np.array([g1, 0.0 * g1, g3]),         # one exactly zero gradient
            "duplicated": np.array([g1, g2, g1])}         # a duplicated row (rank K − 1)


DEGENERATE = _degenerate()


def gram(j: np.ndarray) -> np.ndarray:
    a = j @ j.T
    return 0.5 * (a + a.T)  # exactly symmetric: TorchJD reads one triangle (eigh 'U'), the project the other


def rel(a, b) -> float:
    """max |a − b| relative to the larger of the two's max |entry|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300))


def tjd(weighting, a: np.ndarray) -> np.ndarray:
    return weighting(torch.from_numpy(a)).detach().numpy().astype(np.float64)


def case_ids(cases):
    return [f"K{k}-seed{s}" for k, s in cases]


#: random (K, seed) and degenerate (name, None) cases
MIXED = RANDOM + [(name, None) for name in DEGENERATE]
MIXED_IDS = [str(c) if s is None else f"K{c}-seed{s}" for c, s in MIXED]


def mixed_jacobian(case, seed) -> np.ndarray:
    return DEGENERATE[case] if seed is None else random_jacobian(case, seed)


# ---------------------------------------------------------------------------------------------- MGDA
def fw_gap(a: np.ndarray, w: np.ndarray) -> float:
    """Frank–Wolfe duality gap of wᵀAw on the simplex: f(w) − f* ≤ 2(wᵀAw − min_i (Aw)_i)."""
    aw = a @ w
    return 2.0 * float(w @ aw - aw.min())


def assert_min_norm_parity(j: np.ndarray, w_p: np.ndarray, w_t: np.ndarray) -> None:
    """The project's solve is exact; TorchJD's Frank–Wolfe iterate is within its own duality gap. For the
    min-norm point d* of the hull, ‖d − d*‖² ≤ ‖d‖² − ‖d*‖² for any hull point d: that bounds the directions
    even where the weights are not unique (duplicated rows)."""
    a = gram(j)
    scale = float(np.max(np.diag(a)))
    f_p, f_t = float(w_p @ a @ w_p), float(w_t @ a @ w_t)
    assert abs(w_p.sum() - 1.0) < 1e-12 and (w_p >= 0).all()
    assert f_p <= f_t + 1e-12 * scale                         # the exact solve is never worse
    assert f_t - f_p <= fw_gap(a, w_t) + 1e-12 * scale        # TorchJD is as close as its gap says
    d_p, d_t = w_p @ j, w_t @ j
    assert float(np.sum((d_p - d_t) ** 2)) <= (f_t - f_p) + 1e-12 * scale


@pytest.mark.parametrize("k,seed", RANDOM, ids=case_ids(RANDOM))
def test_mgda_random(k, seed):
    j = random_jacobian(k, seed)
    a = gram(j)
    w_p = MGDA(k).weights_rows(a, np.ones(k)).weights / k          # ×K in the project
    w_t = tjd(MGDAWeighting(epsilon=1e-12, max_iters=300), a)
    assert_min_norm_parity(j, w_p, w_t)
    if k == 2:  # from ½·1, Frank–Wolfe's exact line search along the segment is the closed form
        assert rel(w_p, w_t) < 1e-10


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_mgda_degenerate(name):
    j = DEGENERATE[name]
    k = len(j)
    a = gram(j)
    w_p = MGDA(k).weights_rows(a, np.ones(k)).weights / k
    w_t = tjd(MGDAWeighting(epsilon=1e-12, max_iters=300), a)
    assert_min_norm_parity(j, w_p, w_t)
    if k == 2:
        assert rel(w_p, w_t) < 1e-10
    if name in ("opposite", "zero"):  # 0 is in the hull: d = 0 on both sides
        assert np.linalg.norm(w_p @ j) < 1e-12 * np.linalg.norm(j)
        assert np.linalg.norm(w_t @ j) < 1e-12 * np.linalg.norm(j)


# ---------------------------------------------------------------------------------------------- IMTL-G
def projections(j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u_iᵀd for the non-zero gradients (IMTL-G's condition: all equal)."""
    norms = np.linalg.norm(j, axis=1)
    keep = norms > 0
    return (j[keep] @ (w @ j)) / norms[keep]


@pytest.mark.parametrize("k,seed", RANDOM, ids=case_ids(RANDOM))
def test_imtl_random(k, seed):
    # TorchJD: α ∝ A⁺‖g‖ (pseudo-inverse), normalised to Σα = 1; the project: the paper's closed form (K = 2)
    # or its linear system in β = ‖g‖α. On full-rank Jacobians both are the unique solution.
    a = gram(random_jacobian(k, seed))
    w_p = IMTLG(k).weights_rows(a, np.ones(k)).weights
    assert rel(w_p, tjd(IMTLGWeighting(), a)) < 1e-10


@pytest.mark.parametrize("name", ["zero", "duplicated"])
def test_imtl_degenerate_same(name):
    # a zero gradient: both drop the task (weight 0; A⁺ has a zero row there); duplicated rows: both give the
    # minimum-norm weights, so the same α (and d)
    j = DEGENERATE[name]
    k = len(j)
    a = gram(j)
    w_p, w_t = IMTLG(k).weights_rows(a, np.ones(k)).weights, tjd(IMTLGWeighting(), a)
    assert rel(w_p, w_t) < 1e-10
    p = projections(j, w_p)
    assert np.ptp(p) < 1e-10 * np.abs(p).max()


def test_imtl_parallel_differs_and_the_project_is_the_limit():
    # g2 = 2 g1: every α has equal projections. The project keeps the K = 2 closed form
    # α = (‖g2‖, ‖g1‖)/(‖g1‖ + ‖g2‖) = (2/3, 1/3), the limit of nearly parallel gradients; TorchJD's A⁺‖g‖
    # gives (1/3, 2/3) at exactly parallel gradients and the closed form as soon as they are not.
    j = DEGENERATE["parallel"]
    a = gram(j)
    w_p, w_t = IMTLG(2).weights_rows(a, np.ones(2)).weights, tjd(IMTLGWeighting(), a)
    assert rel(w_p, [2 / 3, 1 / 3]) < 1e-12
    assert rel(w_t, [1 / 3, 2 / 3]) < 1e-10
    for w in (w_p, w_t):
        p = projections(j, w)
        assert np.ptp(p) < 1e-12 * np.abs(p).max()
    other = np.random.default_rng(8).standard_normal(P)
    other -= (other @ j[0]) / (j[0] @ j[0]) * j[0]
    near = j.copy()
    near[1] += 1e-3 * np.linalg.norm(j[0]) * other / np.linalg.norm(other)  # cos θ ≈ 1 − 1e-7
    w_near = tjd(IMTLGWeighting(), gram(near))
    # A⁺ of cond ~1e7: rounding ~1e-9; the closed form moves by ~1e-7 between the two Jacobians
    assert rel(w_near, IMTLG(2).weights_rows(gram(near), np.ones(2)).weights) < 1e-8
    assert rel(w_near, w_p) < 1e-6


def test_imtl_opposite_project_has_equal_projections_torchjd_not():
    # g2 = −g1/2: only d = 0 has equal projections (u1ᵀd = −u2ᵀd); the closed form (1/3, 2/3) gives d = 0.
    # TorchJD's A⁺‖g‖ = (2, −1) gives d = 2.5 g1, whose projections are ±2.5‖g1‖.
    j = DEGENERATE["opposite"]
    a = gram(j)
    w_p, w_t = IMTLG(2).weights_rows(a, np.ones(2)).weights, tjd(IMTLGWeighting(), a)
    assert rel(w_p, [1 / 3, 2 / 3]) < 1e-12
    assert np.abs(projections(j, w_p)).max() < 1e-12 * np.linalg.norm(j[0])
    assert rel(w_t, [2.0, -1.0]) < 1e-10
    p_t = projections(j, w_t)
    assert p_t[0] == pytest.approx(2.5 * np.linalg.norm(j[0]), rel=1e-10) and p_t[1] == pytest.approx(-p_t[0])


# ---------------------------------------------------------------------------------------------- backward
def tiny_model(k: int, seed: int):
    """A float64 two-layer encoder and K linear heads; returns (shared, heads, losses(), jacobian())."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, k, generator=g, dtype=torch.float64)
    w1 = torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_()
    b1 = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    heads = [torch.randn(5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(k)]
    shared = [w1, b1]

    def losses() -> torch.Tensor:
        z = torch.tanh(x @ w1.T + b1)
        return torch.stack([((z @ heads[i] - y[:, i]) ** 2).mean() for i in range(k)])

    def jacobian() -> torch.Tensor:
        ls = losses()
        rows = [torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(ls[i], shared, retain_graph=True)])
                for i in range(k)]
        return torch.stack(rows)

    return shared, heads, losses, jacobian


@pytest.mark.parametrize("method", ["mgda", "imtl"])
@pytest.mark.parametrize("k", [2, 3])
def test_backward_matches_torchjd_aggregator(method, k):
    # the public path: balancer.backward writes the shared gradient; TorchJD's aggregator gets the same
    # Jacobian (∂ℓ_i/∂θ_shared by autograd). mgda: ×K; imtl: same scale.
    shared, heads, losses, jacobian = tiny_model(k, seed=10 + k)
    j = jacobian()
    balancer = MGDA(k) if method == "mgda" else IMTLG(k)
    balancer.backward(losses(), shared, heads)
    d_p = torch.cat([p.grad.reshape(-1) for p in shared]).numpy()
    if method == "imtl":
        assert rel(d_p, TjdIMTLG()(j).detach().numpy()) < 1e-10
    else:
        d_t = TjdMGDA(epsilon=1e-12, max_iters=300)(j).detach().numpy() * k
        jn = j.detach().numpy()
        w_t = tjd(MGDAWeighting(epsilon=1e-12, max_iters=300), gram(jn))
        if k == 2:
            assert rel(d_p, d_t) < 1e-10
        else:  # ‖d_p/K − d_t/K‖² ≤ FW gap of TorchJD's iterate (assert_min_norm_parity)
            assert float(np.sum((d_p / k - d_t / k) ** 2)) <= fw_gap(gram(jn), w_t) + 1e-12 * np.max(np.diag(gram(jn)))


# ---------------------------------------------------------------------------------------------- CAGrad
def cagrad_check(j: np.ndarray, c: float, norm_eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(project, TorchJD) mean-scale coefficients b + λw* for the same Jacobian (project: rescale 0, /K)."""
    k = len(j)
    a = gram(j)
    w_p = CAGrad(k, c=c, rescale=0).weights_rows(a, np.ones(k)).weights / k
    return w_p, tjd(CAGradWeighting(c=c, norm_eps=norm_eps), a)


def cagrad_dual(j: np.ndarray, coef: np.ndarray, c: float) -> float:
    """The dual objective F(w) = wᵀA b + c‖g0‖‖Gw‖ at the w* behind coefficients b + λw* (w* = (coef − b)/Σ)."""
    a, b = gram(j), np.full(len(j), 1.0 / len(j))
    w = (coef - b) / (coef - b).sum()
    return float(w @ a @ b + c * np.sqrt(b @ a @ b) * np.sqrt(max(w @ a @ w, 0.0)))


@pytest.mark.parametrize("c", [0.4, 0.8])
@pytest.mark.parametrize("k,seed", RANDOM, ids=case_ids(RANDOM))
def test_cagrad_random(k, seed, c):
    # The dual min_{w ∈ Δ} F(w): the project solves it exactly (K = 2) or by SLSQP (ftol 1e-12), TorchJD by
    # Clarabel (gap 1e-8 on the trace-normalised Gram: 1e-8·tr(A)). F agrees to that gap; the minimiser, and
    # with it d = g0 + λGw* and CAGrad's worst-task rate ψ(d) = min_i g_iᵀd, only to its square root
    # (F is flat to second order at w*): 1e-4, with a margin 1e-3. Both d lie on the ball ‖d − g0‖ = c‖g0‖.
    j = random_jacobian(k, seed)
    w_p, w_t = cagrad_check(j, c)
    tr = float(np.trace(gram(j)))
    f_p, f_t = cagrad_dual(j, w_p, c), cagrad_dual(j, w_t, c)
    assert f_p <= f_t + 1e-9 * tr                 # the project's solve is never worse than Clarabel's
    assert f_t - f_p <= 1e-7 * tr
    d_p, d_t = w_p @ j, w_t @ j
    g0 = j.mean(0)
    for d in (d_p, d_t):
        assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-6)
    psi_p, psi_t = float((j @ d_p).min()), float((j @ d_t).min())
    s = np.linalg.norm(g0) * np.linalg.norm(j, axis=1).max()
    assert psi_p >= psi_t - 1e-8 * s              # (the project's 1e-8 smoothing, EPS, costs ≲ 1e-8 relative)
    assert psi_p - psi_t <= 1e-3 * s
    assert np.linalg.norm(d_p - d_t) <= 1e-3 * np.linalg.norm(g0)
    if k == 2:  # the closed form against Clarabel: the same, to Clarabel's √gap
        assert rel(w_p, w_t) < 1e-6


@pytest.mark.parametrize("name", ["parallel", "opposite", "duplicated"])
def test_cagrad_degenerate_same(name):
    j = DEGENERATE[name]
    w_p, w_t = cagrad_check(j, 0.4)
    tr = float(np.trace(gram(j)))
    assert abs(cagrad_dual(j, w_p, 0.4) - cagrad_dual(j, w_t, 0.4)) <= 1e-7 * tr
    assert np.linalg.norm(w_p @ j - w_t @ j) <= 1e-3 * np.linalg.norm(j.mean(0))


def test_cagrad_zero_gradient_torchjd_leaves_the_ball():
    # With g2 = 0 the dual's minimiser is w* = e2 and G w* = 0. TorchJD returns all-zero weights whenever
    # ‖G w*‖ < norm_eps (1e-4, on the trace-normalised Gram): d = 0, which is outside CAGrad's ball
    # ‖d − g0‖ ≤ c‖g0‖ (c < 1). The project (as the official code, which smooths λ's denominator) keeps
    # d = g0 + λ G w* ≈ g0, inside the ball; its reported weight of the zero task is then meaningless
    # (λ·1 with λ = c‖g0‖/1e-8) but multiplies a zero gradient.
    j = DEGENERATE["zero"]
    w_p, w_t = cagrad_check(j, 0.4)
    d_p, d_t = w_p @ j, w_t @ j
    g0 = j.mean(0)
    assert np.all(d_t == 0.0)
    assert np.linalg.norm(d_t - g0) > 0.4 * np.linalg.norm(g0)
    assert np.linalg.norm(d_p - g0) <= 0.4 * np.linalg.norm(g0)


def test_cagrad_small_gradients_neither_side_is_scale_equivariant():
    # The paper's rule is scale-equivariant: J → sJ gives d → s·d. Both implementations guard with absolute
    # constants, differently:
    # * TorchJD returns d = 0 when ‖J‖_F² < norm_eps = 1e-4 (it zeroes the trace-normalised Gram matrix); with
    #   norm_eps = 0 it is exactly scale-equivariant;
    # * the project keeps the official code's 1e-8 guards (in ‖g0‖, in √(wᵀAw + 1e-8), in λ's denominator):
    #   once ‖G w*‖² or ‖g0‖² nears 1e-8 the direction turns, and at ‖g‖ ~ 1e-5 it leaves CAGrad's ball
    #   ‖d − g0‖ ≤ c‖g0‖. A documented choice (faithful to the official code), shown here.
    j = random_jacobian(2, 0)
    w_t1 = cagrad_check(j, 0.4, norm_eps=0.0)[1]
    for s in (1e-3, 1e-5):
        js = s * j
        w_p, w_t = cagrad_check(js, 0.4, norm_eps=0.0)
        assert rel(w_t, w_t1) < 1e-6                                   # TorchJD, norm_eps = 0: same weights
        assert np.all(cagrad_check(js, 0.4)[1] == 0.0)                 # TorchJD's default: ‖J‖_F < 1e-2 → d = 0
        g0 = js.mean(0)
        d_p, d_t = w_p @ js, w_t @ js
        assert np.linalg.norm(d_t - g0) == pytest.approx(0.4 * np.linalg.norm(g0), rel=1e-6)
        # the project's direction has turned: at s = 1 the two agree to 1e-8 (test_cagrad_random)
        assert np.linalg.norm(d_p - d_t) > 1e-4 * np.linalg.norm(g0)
    assert np.linalg.norm(d_p - g0) > 1.0 * np.linalg.norm(g0)          # s = 1e-5: outside the ball (c = 0.4)


# ---------------------------------------------------------------------------------------------- Aligned-MTL
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("case,seed", MIXED, ids=MIXED_IDS)
def test_amtl(case, seed, scale_mode):
    # Same eigendecomposition, same rank cut-off (λ ≤ λ_max·K·eps of float64 on float64 input), same
    # σ² per mode (median: the lower one, both). TorchJD's default weighting is W·(1/K), the project's W·1;
    # a preference vector p is W·p on both sides.
    j = mixed_jacobian(case, seed)
    k = len(j)
    a = gram(j)
    w_p = AlignedMTL(k, scale_mode=scale_mode).weights_rows(a, np.ones(k)).weights
    assert rel(w_p / k, tjd(AlignedMTLWeighting(scale_mode=scale_mode), a)) < 1e-10
    pref = np.linspace(0.5, 2.0, k)
    w_p = AlignedMTL(k, scale_mode=scale_mode, preferences=pref).weights_rows(a, np.ones(k)).weights
    assert rel(w_p, tjd(AlignedMTLWeighting(pref_vector=torch.from_numpy(pref), scale_mode=scale_mode), a)) < 1e-10


def test_amtl_aggregator_direction():
    j = random_jacobian(3, 4)
    w_p = AlignedMTL(3).weights_rows(gram(j), np.ones(3)).weights
    assert rel(w_p @ j / 3, TjdAlignedMTL()(torch.from_numpy(j)).numpy()) < 1e-10


# ---------------------------------------------------------------------------------------------- FairGrad
def fair_residual(a: np.ndarray, x: np.ndarray, alpha: float) -> float:
    """max_i |(A x)_i x_i^{1/α} − 1| on the tasks with a non-zero gradient."""
    keep = np.diag(a) > 0
    return float(np.max(np.abs((a @ x)[keep] * x[keep] ** (1.0 / alpha) - 1.0)))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("k,seed", RANDOM, ids=case_ids(RANDOM))
def test_fairgrad_random(k, seed, alpha):
    # both solve (A x)_i = x_i^{−1/α}; the project to relative residual 1e-10 (×K), TorchJD by scipy's
    # least_squares with its default tolerances (1e-8, finite-difference Jacobian): 1e-6 relative.
    a = gram(random_jacobian(k, seed))
    x_p = FairGrad(k, alpha=alpha).weights_rows(a, np.ones(k)).weights / k
    x_t = tjd(FairGradWeighting(alpha=alpha), a)
    assert fair_residual(a, x_p, alpha) < 1e-9
    assert rel(x_p, x_t) < 1e-6


@pytest.mark.parametrize("name", ["parallel", "duplicated", "zero"])
def test_fairgrad_degenerate_same_direction(name):
    # parallel / duplicated rows: a unique root, found by both. A zero gradient: its equation has no root;
    # TorchJD's x_i drifts up (unchecked), the project reports 0; the direction is the same.
    j = DEGENERATE[name]
    k = len(j)
    a = gram(j)
    x_p = FairGrad(k, alpha=2.0).weights_rows(a, np.ones(k)).weights / k
    x_t = tjd(FairGradWeighting(alpha=2.0), a)
    assert fair_residual(a, x_p, 2.0) < 1e-9
    assert rel(x_p @ j, x_t @ j) < 1e-6
    if name == "zero":
        assert x_p[1] == 0.0 and x_t[1] > 1e2


def test_fairgrad_opposite_is_stationary_torchjd_returns_a_non_root():
    # 0 in the hull: no x > 0 solves the equation. The project calls the step Pareto-stationary (d = 0);
    # TorchJD's least_squares stops at a large x that does not solve it either, with d ≠ 0.
    j = DEGENERATE["opposite"]
    a = gram(j)
    fair = FairGrad(2, alpha=2.0)
    x_p = fair.weights_rows(a, np.ones(2)).weights / 2
    assert bool(fair.stationary_rows) and np.all(x_p == 0.0)
    x_t = tjd(FairGradWeighting(alpha=2.0), a)
    assert fair_residual(a, x_t, 2.0) > 1e-3 and np.linalg.norm(x_t @ j) > 0


# ---------------------------------------------------------------------------------------------- Nash-MTL
@pytest.fixture
def nash_oracle(monkeypatch):
    """TorchJD's NashMTL with its convex rounds solved by Clarabel: it asks for ECOS, which cvxpy ≥ 1.6 no
    longer ships (not installed here). The algorithm (the official sequential convex program) is unchanged."""
    import cvxpy as cp
    from torchjd.aggregation import _nash_mtl

    monkeypatch.setattr(_nash_mtl._NashMTLWeighting, "_REQUIRED_DEPS", ["numpy", "cvxpy"])
    solve = cp.Problem.solve

    def clarabel(self, *args, solver=None, warm_start=False, max_iters=None, **kw):
        return solve(self, solver=cp.CLARABEL, **kw)

    monkeypatch.setattr(cp.Problem, "solve", clarabel)

    def run(j: np.ndarray) -> np.ndarray:
        agg = TjdNashMTL(n_tasks=len(j), max_norm=0.0, optim_niter=20)  # max_norm 0: no clipping of α
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy: the official problem is not DPP
            agg(torch.from_numpy(j))
        return np.asarray(agg.weighting.prvs_alpha, dtype=np.float64)

    return run


def nash_residual(a: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.abs(alpha * (a @ alpha) - 1.0)


@pytest.mark.parametrize("case", [(2, 3), (3, 0), (5, 1), "parallel", "duplicated"], ids=str)
def test_nashmtl_same_root(case, nash_oracle):
    # α_i (Aα)_i = 1: the project by Newton to 1e-10; TorchJD's rounds stop when α moves by < 1e-6 (its
    # other test, on the normalised Gram, is looser): α agrees to 1e-5 relative. Cases where A·1 > 0 (the
    # official start α = 1 is a valid linearisation point).
    j = DEGENERATE[case] if isinstance(case, str) else random_jacobian(*case)
    k = len(j)
    a = gram(j)
    assert np.all(a @ np.ones(k) > 0)
    alpha_p = NashMTL(k).weights_rows(a, np.ones(k)).weights      # same scale (no ×K)
    alpha_t = nash_oracle(j)
    assert nash_residual(a, alpha_p).max() < 1e-9
    assert rel(alpha_p, alpha_t) < 1e-5


@pytest.mark.parametrize("name", ["opposite", "zero"])
def test_nashmtl_torchjd_returns_a_non_root_without_a_word(name, nash_oracle):
    # (A·1)_i ≤ 0 for some i (opposite gradients) or a zero gradient: no α > 0 solves α_i (Aα)_i = 1, and the
    # official start α = 1 is no valid linearisation point. TorchJD (as the official code) returns whatever the
    # rounds left — its initial α = 1 (the summed loss) or a drifting iterate — without a word. The project:
    # opposite → Pareto-stationary (d = 0, counted as such); zero gradient → the other tasks' α solves the
    # reduced system exactly, and the step counts as a solver failure (α_i → ∞ for the zero task).
    j = DEGENERATE[name]
    k = len(j)
    a = gram(j)
    alpha_t = nash_oracle(j)
    nash = NashMTL(k)
    out = nash.weights_rows(a, np.ones(k))
    if name == "opposite":
        assert bool(nash.stationary) and np.all(out.weights == 0.0)
        assert nash_residual(a, alpha_t).max() > 0.5
    else:
        assert bool(out.solver_failed)
        live = [0, 2]
        sub = a[np.ix_(live, live)]
        assert nash_residual(sub, out.weights[live]).max() < 1e-9
        assert nash_residual(sub, alpha_t[live]).max() > 0.5


# ---------------------------------------------------------------------------------------------- PCGrad
@pytest.mark.parametrize("case,seed", MIXED, ids=MIXED_IDS)
def test_pcgrad(case, seed):
    # the balancer's own generator (seed 3) and torch's global one seeded 3 draw the same K orders per step
    # (torch.randperm(K) per task); three steps check that the streams stay in step. Same projections on the
    # Gram matrix, summed (the project's default reduction): equal to rounding.
    j = mixed_jacobian(case, seed)
    k = len(j)
    rng = np.random.default_rng(11)
    balancer = PCGrad(k, seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        weighting = PCGradWeighting()
        for step in range(3):
            jj = j if step == 0 else j * rng.uniform(0.5, 2.0, size=(k, 1))  # rescaled rows: new projections
            a = gram(jj)
            assert rel(balancer.weights_rows(a, np.ones(k)).weights, tjd(weighting, a)) < 1e-12


# ---------------------------------------------------------------------------------------------- GradDrop
@pytest.mark.parametrize("leak", [0.0, 0.3])
@pytest.mark.parametrize("case,seed", MIXED, ids=MIXED_IDS)
def test_graddrop(case, seed, leak):
    # one torch.rand(P) per step from the same seed on both sides; the same purity and masks (they differ
    # only where U_c = P_c exactly: test_graddrop_tie), the leak λ as TorchJD's per-task leak vector
    j = torch.from_numpy(mixed_jacobian(case, seed))
    k = j.shape[0]
    balancer = GradDrop(k, leak=leak, seed=5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        agg = TjdGradDrop(leak=torch.full((k,), leak, dtype=torch.float64))
        for _ in range(3):
            d_p = balancer.direction_rows(j, torch.ones(k, dtype=torch.float64)).direction
            assert rel(d_p.numpy(), agg(j).numpy()) < 1e-12


def test_graddrop_tie(monkeypatch):
    # at U_c = P_c TorchJD keeps neither sign ((P > U)·[g > 0] + (P < U)·[g < 0]); the project keeps the
    # negative one (U ≥ P), so that the two sign groups partition [0, 1). A column (1, −1) has P = ½.
    j = torch.tensor([[1.0, 2.0], [-1.0, 3.0]], dtype=torch.float64)
    half = torch.full((2,), 0.5, dtype=torch.float64)
    d_p, _ = masked_sum(j, half)
    monkeypatch.setattr(torch, "rand", lambda *args, **kw: half.clone())
    d_t = TjdGradDrop()(j)
    assert d_p.tolist() == [-1.0, 5.0] and d_t.tolist() == [0.0, 5.0]


# ---------------------------------------------------------------------------------------------- GradVac
@pytest.mark.parametrize("case", [(2, 0), (2, 1), "parallel", "opposite"], ids=str)
def test_gradvac_two_tasks_over_steps(case):
    # K = 2: one other task, so the orders cannot differ. TorchJD's eps = 0 (its default 1e-8 is added to
    # two denominators); the paper's target update (every visited pair) on both sides. Four steps: the
    # targets φ̂ (state) must stay equal too.
    j0 = DEGENERATE[case] if isinstance(case, str) else random_jacobian(*case)
    rng = np.random.default_rng(12)
    balancer = GradVac(2, beta=0.5, seed=0)
    weighting = GradVacWeighting(beta=0.5, eps=0.0)
    with torch.random.fork_rng():
        for step in range(4):
            j = j0 if step == 0 else j0 * rng.uniform(0.5, 2.0, size=(2, 1)) + (0 if isinstance(case, str) else
                                                                                  0.3 * rng.standard_normal((2, P)))
            a = gram(j)
            assert rel(balancer.weights_rows(a, np.ones(2)).weights, tjd(weighting, a)) < 1e-12
            assert np.max(np.abs(balancer.targets.numpy() - weighting._phi_t.numpy())) < 1e-12


def torchjd_gradvac_orders(k: int) -> list[list[int]]:
    """The task orders TorchJD's GradVac draws next from the global generator: randperm(K − 1) of the others."""
    orders = []
    for i in range(k):
        others = [t for t in range(k) if t != i]
        orders.append([others[p] for p in torch.randperm(k - 1).tolist()])
    return orders


@pytest.mark.parametrize("case", [(3, 0), (5, 1), "duplicated"], ids=str)
def test_gradvac_rule_with_torchjd_orders(case):
    j0 = DEGENERATE[case] if isinstance(case, str) else random_jacobian(*case)
    k = len(j0)
    rng = np.random.default_rng(13)
    weighting = GradVacWeighting(beta=0.5, eps=0.0)
    targets = np.zeros((k, k))
    with torch.random.fork_rng():
        for step in range(4):
            j = j0 if step == 0 else j0 + 0.3 * rng.standard_normal(j0.shape)
            a = gram(j)
            torch.manual_seed(100 + step)
            orders = torchjd_gradvac_orders(k)
            torch.manual_seed(100 + step)
            w_t = tjd(weighting, a)
            w_p, targets = gradvac_coefficients(a, targets, orders, 0.5)
            assert rel(w_p, w_t) < 1e-12
            assert np.max(np.abs(targets - weighting._phi_t.numpy())) < 1e-12


def test_gradvac_zero_gradient_targets_differ():
    # a zero g_j has no cosine. The project skips the pair (no correction, φ̂_ij unchanged); TorchJD (default
    # eps = 1e-8) reads cos = 0/eps = 0 and moves φ̂_ij towards 0 (with eps = 0 it would store NaN), and with
    # φ̂_ij > 0 adds a huge multiple (‖g_i'‖φ̂/eps) of the zero gradient: its weight for that task is
    # meaningless, the direction unchanged. From targets 0.2, the directions agree and the targets do not.
    j = DEGENERATE["zero"]
    a = gram(j)
    weighting = GradVacWeighting(beta=0.5)
    weighting._ensure_state(3, torch.float64)
    weighting._phi_t.fill_(0.2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        orders = torchjd_gradvac_orders(3)
        torch.manual_seed(0)
        w_t = tjd(weighting, a)
    w_p, targets = gradvac_coefficients(a, np.full((3, 3), 0.2), orders, 0.5)
    phi_t = weighting._phi_t.numpy()
    off = ~np.eye(3, dtype=bool)
    zero_pairs = off & ((np.arange(3)[:, None] == 1) | (np.arange(3)[None, :] == 1))
    assert np.all(targets[zero_pairs] == 0.2)                   # pairs with the zero task: untouched
    assert np.allclose(phi_t[zero_pairs], 0.1, rtol=0, atol=1e-15)   # TorchJD: ½·0.2 + ½·0
    # the other pairs: equal up to TorchJD's eps = 1e-8 in the cosine's denominator (‖g‖ ~ 1 here)
    assert np.max(np.abs(targets[off & ~zero_pairs] - phi_t[off & ~zero_pairs])) < 1e-7
    assert abs(w_t[1]) > 1e6 and w_p[1] == 1.0
    assert rel(w_p @ j, w_t @ j) < 1e-7
