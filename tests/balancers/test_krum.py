"""Krum / Multi-Krum: selection by scores from the Gramian. References: the paper's definition
evaluated directly on the gradient vectors (a loop, below) and TorchJD 0.18.0's Krum (test-only).
The selection is discrete; coefficients are exactly 1/|S|, so the checks are exact or at the
rounding of a matrix product (d = c J)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers.krum import krum_rows
from mtl_tune.registry import get_balancer

from ._helpers import random_jacobian
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)

ONES = lambda k: torch.ones(k, dtype=torch.float64)  # noqa: E731


def paper_krum(jac: torch.Tensor, f: int, m: int = 1, squared: bool = True) -> list[int]:
    """Indices of the m lowest scores s(i) = Σ_{j ∈ N(i)} ‖gᵢ − gⱼ‖² (N(i): the K − f − 2 nearest other
    gradients), from the vectors themselves."""
    k = jac.shape[0]
    scores = []
    for i in range(k):
        dists = sorted(float((jac[i] - jac[j]).norm()) for j in range(k) if j != i)
        scores.append(sum((x * x if squared else x) for x in dists[:k - f - 2]))
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


def test_known_answer_on_a_line():
    # points 0, 1, 3, 4.5, 100 on a line, f = 1 (2 neighbours each): squared scores 10, 5, 6.25, 14.5, …
    jac = torch.tensor([[0.0], [1.0], [3.0], [4.5], [100.0]], dtype=torch.float64) * torch.tensor([[1.0, -2.0]])
    d, w = get_balancer("krum", 5, n_byzantine=1).combine(jac, ONES(5))
    assert torch.equal(w, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(d, jac[1])
    _, w2 = get_balancer("krum", 5, n_byzantine=1, n_selected=2).combine(jac, ONES(5))
    assert torch.equal(w2, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_squared_and_plain_distance_scores_can_select_differently():
    # neighbour distances (1, 3) vs (2, 2.1): sums 4 < 4.1, squares 10 > 8.41
    pts = torch.tensor([0.0, 1.0, -3.0, 20.0, 22.0, 17.9, -50.0], dtype=torch.float64)[:, None]
    k, f = 7, 3                                             # 2 neighbours each
    assert paper_krum(pts, f) != paper_krum(pts, f, squared=False)
    for squared, score in ((True, "squared"), (False, "distance")):
        _, w = get_balancer("krum", k, n_byzantine=f, score=score).combine(pts, ONES(k))
        assert torch.nonzero(w).flatten().tolist() == paper_krum(pts, f, squared=squared)


def test_ties_select_all_tied_gradients():
    # K = 2 (f = 0): no neighbour to count, both scores 0: the mean
    jac = random_jacobian(2, 4, 0)
    d, w = get_balancer("krum", 2).combine(jac, ONES(2))
    assert torch.equal(w, torch.full((2,), 0.5, dtype=torch.float64))
    # K = 3 (f = 0): one neighbour each; the closest pair are each other's nearest: their mean
    jac = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    _, w = get_balancer("krum", 3).combine(jac, ONES(3))
    assert torch.equal(w, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    # identical gradients: all tied, the mean (= each of them)
    _, w = get_balancer("krum", 4, n_byzantine=1).combine(jac[1:2].repeat(4, 1), ONES(4))
    assert torch.equal(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_hyperparameters_are_validated_against_k():
    with pytest.raises(ValueError, match="n_byzantine = 1 needs at least n_byzantine \\+ 3 = 4 tasks"):
        get_balancer("krum", 3, n_byzantine=1)
    with pytest.raises(ValueError, match="needs at least"):
        get_balancer("krum", 2, n_byzantine=1)
    with pytest.raises(ValueError, match="n_selected = 4 exceeds"):
        get_balancer("krum", 3, n_selected=4)
    with pytest.raises(ValueError, match="integer"):
        get_balancer("krum", 5, n_byzantine=-1)
    with pytest.raises(ValueError, match="score"):
        get_balancer("krum", 5, score="cosine")
    get_balancer("krum", 1)          # K = 1: the one gradient (no neighbour, f = 0)


def test_batch_rows_match_single_rows():
    grams = np.stack([(j @ j.T) for j in (random_jacobian(6, 3, s).numpy() for s in range(5))])
    batch = krum_rows(grams, 2, 2)
    for r in range(5):
        assert np.array_equal(batch[r], krum_rows(grams[r], 2, 2))


@pytest.mark.parametrize("case", property_cases(ks=(3, 4, 5)), ids=repr)
def test_krum_properties(case):
    # selection by distances: scale-free and symmetric; d is one gradient or a mean of a few
    step = balancer_step("krum")
    assert_valid_step(*step(case.jac, case.losses), case)
    assert_permutation_equivariant(step, case, rtol=1e-14)
    assert_gradient_scaling(step, case, degree=1, weight_degree=0, rtol=1e-14)


@pytest.mark.parametrize("k,f,m,seed", [(k, f, m, s) for k in (4, 6, 9) for f in sorted({0, 1, k - 4})
                                        if f <= k - 4 for m in (1, 2) for s in range(4)])
def test_matches_the_paper_and_torchjd(k, f, m, seed):
    """score="squared" = the paper's definition evaluated on the vectors; score="distance" = TorchJD's
    Krum exactly (with ≥ 2 neighbours per score, K − f − 2 ≥ 2, random inputs have no ties)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(k, 5, 31 * k + 7 * f + seed)
    d, w = get_balancer("krum", k, n_byzantine=f, n_selected=m).combine(jac, ONES(k))
    assert torch.nonzero(w).flatten().tolist() == paper_krum(jac, f, m)
    d_t, _ = get_balancer("krum", k, n_byzantine=f, n_selected=m, score="distance").combine(jac, ONES(k))
    ref = aggregation.Krum(n_byzantine=f, n_selected=m)(jac)
    assert torch.allclose(d_t, ref, rtol=1e-14, atol=1e-15)


def test_torchjd_breaks_the_k3_tie_by_position():
    """The documented difference: with one neighbour per score the closest pair ties; TorchJD follows
    one of the pair, we follow its mean (permutation-equivariant)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    for seed in range(5):
        jac = random_jacobian(3, 4, seed)
        d, w = get_balancer("krum", 3, score="distance").combine(jac, ONES(3))
        pair = torch.nonzero(w).flatten().tolist()
        assert len(pair) == 2
        ref = aggregation.Krum(n_byzantine=0)(jac)
        assert any(torch.equal(ref, jac[i]) for i in pair)
        assert torch.allclose(d, jac[pair].mean(0), rtol=1e-15, atol=0)


def test_identical_gradients_match_torchjd():
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = random_jacobian(1, 4, 2).repeat(5, 1)
    d, _ = get_balancer("krum", 5, n_byzantine=1, score="distance").combine(jac, ONES(5))
    assert torch.allclose(d, aggregation.Krum(n_byzantine=1)(jac), rtol=1e-15, atol=0)
