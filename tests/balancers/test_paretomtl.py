"""Pareto MTL: min-norm steps with the gradients of the active subregion constraints."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import mtl_tune.balancers.paretomtl as pmtl
from mtl_tune.balancers.base import BalancerError
from mtl_tune.balancers.paretomtl import (active_constraints, circle_points, constraint_rows, lattice_directions,
                                          reference_vectors)
from mtl_tune.registry import get_balancer

from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)

#: float64 rounding of the few K-term sums and the closed-form two-vector solve
TIGHT = 1e-12


def test_reference_grids():
    c = circle_points(5)
    np.testing.assert_allclose(np.arctan2(c[:, 1], c[:, 0]), np.linspace(0, np.pi / 2, 5), atol=TIGHT)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=TIGHT)
    assert lattice_directions(3, 5).shape == (3, 3)     # 6 points with 2 divisions > 5: the axes
    assert lattice_directions(40, 5).shape == (40, 40)  # never fewer than the K axes
    d = lattice_directions(3, 6)          # (2,0,0)… and (1,1,0)…: 3 + 3 directions
    assert d.shape == (6, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=TIGHT)
    assert {tuple(np.round(v * np.sqrt(2), 12)) for v in d if (v > 0).sum() == 2} == {(1, 1, 0), (1, 0, 1), (0, 1, 1)}
    np.testing.assert_allclose(reference_vectors(2, [[3.0, 4.0]]), [[0.6, 0.8]], rtol=TIGHT)
    np.testing.assert_array_equal(reference_vectors(2, 4), circle_points(4))


def test_a_reference_in_the_preference_direction_is_no_constraint():
    w = constraint_rows(np.array([2.0, 2.0]), circle_points(5))
    assert w.shape == (4, 2)          # the 45° reference is u_k itself
    b = get_balancer("paretomtl", 2, preferences=[1.0, 1.0], references=[[3.0, 3.0]])
    assert b.constraints.shape == (0, 2)
    out = b.weights_rows(np.diag([1.0, 4.0]), np.array([1.0, 5.0]))   # no constraint at all: MGDA
    np.testing.assert_allclose(out.weights, 2 * np.array([0.8, 0.2]), rtol=TIGHT)


def test_active_constraints_strict_threshold_and_zero_losses():
    w = np.array([[-1.0, 1.0], [1.0, -1.0]])
    np.testing.assert_array_equal(active_constraints(np.array([1.0, 2.0]), w), [True, False])
    np.testing.assert_array_equal(active_constraints(np.array([1.0, 1.0]), w), [False, False])  # gx = 0: inactive
    np.testing.assert_array_equal(active_constraints(np.zeros(2), w), [False, False])


@pytest.mark.parametrize("k", [2, 3])
def test_on_the_preference_ray_it_is_mgda(k):
    # ℓ ∥ u_k: (u_j − u_k)ᵀu_k = cos∠ − 1 < 0 for every other reference, so nothing is active, phase 1
    # ends at once and the step is the min-norm point of the task gradients: mgda's K·w*
    rng = np.random.default_rng(k)
    jac = rng.normal(size=(4, k, 6))
    gram = np.einsum("bkp,blp->bkl", jac, jac)
    pref = np.array([1.0, 3.0, 2.0][:k])
    b = get_balancer("paretomtl", k, preferences=pref.tolist())
    out = b.weights_rows(gram, np.broadcast_to(0.7 * pref, (4, k)).copy())
    want = get_balancer("mgda", k).weights_rows(gram, np.ones((4, k))).weights
    np.testing.assert_allclose(out.weights, want, rtol=1e-10)
    assert (out.extras["paretomtl_phase"] == 2).all() and (out.extras["paretomtl_active"] == 0).all()
    assert not np.asarray(b.initialising).any()


def test_orthogonal_gradients_by_hand():
    # u_k = e₁, the only other reference e₂: one constraint G = ℓ₂ − ℓ₁ (w = (−1, 1)); ℓ = (1, 2) violates it.
    b = get_balancer("paretomtl", 2, preferences=[1.0, 0.0], references=[[1.0, 0.0], [0.0, 1.0]])
    gram = np.diag([2.0, 1.0])        # g₁ ⟂ g₂, ‖g₁‖² = a = 2, ‖g₂‖² = b = 1
    first = b.weights_rows(gram, np.array([1.0, 2.0]))
    np.testing.assert_array_equal(first.weights, [-1.0, 1.0])         # phase 1, one active: ∇G itself
    assert first.extras["paretomtl_phase"] == 1 and b.initialising and b.init_taken == 1
    # phase 2 (ℓ inside the subregion ends phase 1; then ℓ outside again: phase 2 with the constraint):
    # hull of g₁, g₂, g₂ − g₁; the nearest point is on the edge g₁ → g₂ − g₁ at t = 2a/(4a + b),
    # c = (1 − 2t, t) = (b, 2a)/(4a + b), rescaled to Σ|c| = 2: 2 (b, 2a)/(b + 2a) = (0.4, 1.6)
    b.weights_rows(gram, np.array([2.0, 1.0]))
    assert not b.initialising
    second = b.weights_rows(gram, np.array([1.0, 2.0]))
    np.testing.assert_allclose(second.weights, [0.4, 1.6], rtol=TIGHT)
    assert second.extras["paretomtl_phase"] == 2 and second.extras["paretomtl_active"] == 1


def nearest_on_polygon(points: np.ndarray) -> np.ndarray:
    """Barycentric weights (over ``points``) of the point nearest the origin on the convex hull of
    points lying in a plane through the origin: on a vertex or on an edge (every pair tried)."""
    best, best_norm = None, np.inf
    for i, j in itertools.combinations_with_replacement(range(len(points)), 2):
        p, q = points[i], points[j]
        e = q - p
        t = 0.0 if i == j or e @ e == 0 else float(np.clip(-(p @ e) / (e @ e), 0.0, 1.0))
        x = p + t * e
        if x @ x < best_norm:
            best_norm, best = x @ x, np.zeros(len(points))
            best[i] += 1 - t
            best[j] += t
    return best


def official_two_task_weights(jac, losses, pref_index, refs, phase1):
    """The official trainers' K = 2 weights, from the explicit vectors (not the Gram matrix): active
    rows w_j (gx > 0), the min-norm point of the listed vectors, weights assembled per component
    (phase 2: α + Σβ_j w_j, rescaled by K/Σ|·| as the multi-MNIST trainer)."""
    u = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    w = np.delete(u, pref_index, axis=0) - u[pref_index]
    w = w[w @ (losses / np.linalg.norm(losses)) > 0]
    vectors = w @ jac if phase1 else np.vstack([jac, w @ jac])
    sol = nearest_on_polygon(vectors)
    if phase1:
        return np.array([sum(sol[j] * w[j, 0] for j in range(len(w))), sum(sol[j] * w[j, 1] for j in range(len(w)))])
    c = np.array([sol[0] + sum(sol[2 + j] * w[j, 0] for j in range(len(w))),
                  sol[1] + sum(sol[2 + j] * w[j, 1] for j in range(len(w)))])
    return 2 * c / np.abs(c).sum()


@pytest.mark.parametrize("seed", range(6))
def test_two_tasks_equal_the_official_formula(seed):
    rng = np.random.default_rng(seed)
    refs = circle_points(5)
    jac = rng.normal(size=(2, 5))
    gram = jac @ jac.T
    for pref_index in range(5):
        losses = rng.uniform(0.1, 2.0, 2)
        for phase1 in (True, False):
            want = official_two_task_weights(jac, losses, pref_index, refs, phase1)
            if phase1 and not np.any(want):
                continue                   # nothing active: the official phase 1 stops
            b = get_balancer("paretomtl", 2, preferences=refs[pref_index].tolist(), init_steps=1 if phase1 else 0)
            got = b.weights_rows(gram, losses)
            assert got.extras["paretomtl_phase"] == (1 if phase1 else 2)
            # the same nearest point, by the project's closed form on the Gram matrix and by the edge search
            # on the explicit vectors: rounding of a few products (and of 1/‖e‖² on short edges)
            np.testing.assert_allclose(got.weights, want, rtol=1e-9, atol=1e-9)


def test_phase1_with_several_active_constraints_is_their_min_norm_point():
    # u_k at 0°, ℓ at 80°: the constraints of the 22.5°, 45° and 67.5° and 90° references are active
    rng = np.random.default_rng(3)
    jac = rng.normal(size=(2, 4))
    losses = np.array([np.cos(np.radians(80)), np.sin(np.radians(80))])
    b = get_balancer("paretomtl", 2, preferences=[1.0, 0.0])
    out = b.weights_rows(jac @ jac.T, losses)
    assert out.extras["paretomtl_phase"] == 1 and out.extras["paretomtl_active"] == 4
    np.testing.assert_allclose(out.weights, official_two_task_weights(jac, losses, 0, circle_points(5), True),
                               rtol=1e-9, atol=1e-12)


def test_phase1_budget_and_no_return():
    # gradients that do not change and losses that stay outside the subregion: init_steps phase-1 steps,
    # then phase 2 for good
    b = get_balancer("paretomtl", 2, preferences=[1.0, 0.0], references=[[0.0, 1.0]], init_steps=3)
    gram, outside, inside = np.eye(2), np.array([1.0, 2.0]), np.array([2.0, 1.0])
    phases = [int(b.weights_rows(gram, outside).extras["paretomtl_phase"]) for _ in range(5)]
    assert phases == [1, 1, 1, 2, 2] and b.init_taken == 3
    b = get_balancer("paretomtl", 2, preferences=[1.0, 0.0], references=[[0.0, 1.0]], init_steps=10)
    phases = [int(b.weights_rows(gram, x).extras["paretomtl_phase"]) for x in (outside, inside, outside)]
    assert phases == [1, 2, 2]


def test_rows_match_one_row_each_with_state():
    rng = np.random.default_rng(5)
    steps, n = 4, 6
    jac = rng.normal(size=(steps, n, 3, 4))
    grams, losses = np.einsum("snkp,snlp->snkl", jac, jac), rng.uniform(0.1, 2.0, (steps, n, 3))
    hp = dict(preferences=[1.0, 2.0, 0.5], references=6, init_steps=2)
    lock = get_balancer("paretomtl", 3, **hp)
    lock.start_rows([get_balancer("paretomtl", 3, **hp) for _ in range(n)])
    singles = [get_balancer("paretomtl", 3, **hp) for _ in range(n)]
    for s in range(steps):
        rows = lock.weights_rows(grams[s], losses[s])
        for i in range(n):
            np.testing.assert_array_equal(rows.weights[i], singles[i].weights_rows(grams[s, i], losses[s, i]).weights)
    np.testing.assert_array_equal(lock.init_taken, [b.init_taken for b in singles])


def test_rows_sharing_phase_and_active_set_match_one_row_each():
    # rows with one phase and active set take one hull solve without grouping (also once phase 1 is over
    # on every row and the state stays as it is); with a row that differs they are grouped: either way
    # each row's weights, phase and state are those of the row alone
    rng = np.random.default_rng(8)
    hp = dict(preferences=[1.0, 0.0], references=[[0.0, 1.0], [1.0, 1.0]], init_steps=2)
    jac = rng.normal(size=(6, 2, 2, 3))
    outside = np.array([1.0, 2.0])                       # both constraints active: phase 1 while it may
    for n_same in (4, 3):                                # every row the same; one row different
        lock = get_balancer("paretomtl", 2, **hp)
        lock.start_rows([get_balancer("paretomtl", 2, **hp) for _ in range(4)])
        singles = [get_balancer("paretomtl", 2, **hp) for _ in range(4)]
        phases = []
        for s in range(6):
            grams = np.stack([jac[s, 0] @ jac[s, 0].T] * n_same + [jac[s, 1] @ jac[s, 1].T] * (4 - n_same))
            losses = np.stack([outside] * n_same + [outside[::-1]] * (4 - n_same))
            rows = lock.weights_rows(grams, losses)
            phases.append(rows.extras["paretomtl_phase"].tolist())
            for i in range(4):
                one = singles[i].weights_rows(grams[i], losses[i])
                np.testing.assert_array_equal(rows.weights[i], one.weights)
                assert rows.extras["paretomtl_phase"][i] == one.extras["paretomtl_phase"]
        np.testing.assert_array_equal(lock.init_taken, [b.init_taken for b in singles])
        np.testing.assert_array_equal(lock.initialising, [bool(b.initialising) for b in singles])
        assert phases[0][:n_same] == [1] * n_same and phases[-1] == [2] * 4
        assert lock.initialising.shape == (4,) and lock.init_taken.dtype == np.int64


def test_state_dict_round_trip():
    b = get_balancer("paretomtl", 2, preferences=[1.0, 0.0], references=[[0.0, 1.0]])
    b.weights_rows(np.eye(2), np.array([1.0, 2.0]))
    c = get_balancer("paretomtl", 2, preferences=[1.0, 0.0], references=[[0.0, 1.0]])
    c.load_state_dict(b.state_dict())
    assert bool(c.initialising) and int(c.init_taken) == 1


def test_solver_failure_fails_the_step(monkeypatch):
    def no_convergence(gram):
        return np.full(gram.shape[:-1], np.nan), np.zeros(gram.shape[:-2], dtype=bool)

    monkeypatch.setattr(pmtl, "min_norm_weights", no_convergence)
    b = get_balancer("paretomtl", 3, max_norm=None)
    out = b.weights_rows(np.stack([np.eye(3)] * 2), np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]))
    assert out.failed.all() and np.isnan(out.weights).all() and "did not converge" in out.reason_of((0,))
    assert (b.init_taken == 0).all() and b.initialising.all()   # a failed step changes no state
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = get_balancer("paretomtl", 3, max_norm=None)
    with pytest.raises(BalancerError, match="min-norm solver did not converge"):
        b.backward(torch.eye(3, dtype=torch.float64) @ x + 1.0, [x])


@pytest.mark.parametrize("kw", [dict(preferences=[1.0]), dict(preferences=[-1.0, 1.0]), dict(preferences=[0.0, 0.0]),
                                dict(references=1), dict(references=True), dict(references=[[1.0]]),
                                dict(references=[[-1.0, 1.0]]), dict(references=[[0.0, 0.0]]), dict(references="a"),
                                dict(init_steps=-1), dict(init_steps=1.5)])
def test_bad_arguments(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"paretomtl: {name}"):
        get_balancer("paretomtl", 2, **kw)


@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_paretomtl_properties(case):
    # the default reference sets (quarter circle; Das–Dennis lattice) and preference (all ones) are
    # symmetric in the tasks, so relabelling permutes the weights; J → aJ scales every Gram matrix by a²,
    # which changes no min-norm simplex weight and no active set (degree 0 weights, degree 1 direction).
    # K = 2: closed forms (1e-12 up to the few products); K ≥ 3: the exact active-set solver (1e-9: its
    # KKT systems on the K + m dependent vectors are solved by least squares)
    rtol = 1e-11 if case.k == 2 else 1e-9
    stepper = balancer_step("paretomtl")
    assert_valid_step(*stepper(case.jac, case.losses), case)
    assert_permutation_equivariant(stepper, case, rtol=rtol)
    assert_gradient_scaling(stepper, case, degree=1, weight_degree=0, rtol=rtol)


def test_the_official_synthetic_example_ends_in_each_subregion():
    # the official synthetic problem (ℓ₁,₂ = 1 − exp(−‖x ∓ 1/√n‖²), n = 20, concave front; x₀ ~ U(−0.5, 0.5)),
    # 20 phase-1 + 80 steps of plain gradient descent: run k ends on the front (Pareto set: x ∥ 1) inside its
    # subregion, between the bisectors of its reference angle 22.5°·k and its neighbours' (0.5° of slack:
    # the runs approach the boundary from outside)
    n = 20
    s = 1 / np.sqrt(n)

    def losses_and_jacobian(x):
        e1, e2 = np.exp(-((x - s) ** 2).sum()), np.exp(-((x + s) ** 2).sum())
        return np.array([1 - e1, 1 - e2]), np.stack([2 * (x - s) * e1, 2 * (x + s) * e2])

    refs = circle_points(5)
    rng = np.random.default_rng(0)
    for k in range(5):
        b = get_balancer("paretomtl", 2, preferences=refs[k].tolist())
        x = rng.uniform(-0.5, 0.5, n)
        for _ in range(100):
            f, jac = losses_and_jacobian(x)
            x = x - 0.5 * b.weights_rows(jac @ jac.T, f).weights @ jac
        f, _ = losses_and_jacobian(x)
        angle = np.degrees(np.arctan2(f[1], f[0]))
        low, high = max(22.5 * k - 11.25, 0.0), min(22.5 * k + 11.25, 90.0)
        assert low - 0.5 <= angle <= high + 0.5, (k, angle)
        assert np.abs(x - x.mean()).max() < 0.05, (k, x)


def test_one_task_has_one_reference_and_no_constraint():
    """K = 1: the lattice is the single axis (its division count would otherwise grow without end)."""
    from mtl_tune.balancers.paretomtl import lattice_directions, reference_vectors

    np.testing.assert_array_equal(lattice_directions(1, 5), [[1.0]])
    np.testing.assert_array_equal(reference_vectors(1, 5), [[1.0]])
