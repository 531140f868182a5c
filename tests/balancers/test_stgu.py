"""STGU: task grouping by affinity propagation, one optimizer step per group."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtl_tune.balancers.base import BalancerError, ForwardOutput
from mtl_tune.balancers.stgu import (PairGrouping, STGU, affinity_similarity, affinity_update, affinity_update_rows,
                                     group_tasks, linear_quantile, propagate_groups)

from ._helpers import CountingSGD, ScriptedForward
from ._properties import assert_valid_step, property_cases, train_step_weights


def _pair_similarities() -> list[np.ndarray]:
    """2 × 2 similarities where the K = 2 closed form could go wrong: affinities of every sign and
    magnitude (zero diagonals → the guard), and S[0, 1] tied with or one ulp from a diagonal
    entry (the quantile's interpolation rounds there), ±0, subnormals, huge values."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(150):
        a = rng.normal(size=(2, 2)) * 10.0 ** rng.uniform(-300, 300, size=(2, 2))
        a[[0, 1], [0, 1]] = np.abs(np.diag(a)) * (rng.random(2) < 0.8)
        out.append(affinity_similarity(a))
    for d in (1.0, 0.0, 1e-300, 3.0, 1.0 + 2.0 ** -52, 0.7):
        below = np.nextafter(d, -np.inf)
        for s in (d, below, np.nextafter(below, -np.inf), np.nextafter(d, np.inf), -d, -0.0, 5e-324, -1e308):
            for other in (1.0, d, s):
                out.append(np.array([[d, s], [s, other]]))
                out.append(np.array([[other, s], [s, d]]))
    return out


PAIR_QUANTILES = (0.0, 0.1, 0.25, 1 / 3, 0.34, 0.5, 0.6, 2 / 3, 0.9, 1.0)


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


def test_stgu_linear_quantile_is_numpys_bit_for_bit():
    rng = np.random.default_rng(3)
    for n in (1, 2, 4, 5):
        values = np.round(rng.normal(size=(400, n)) * 10.0 ** rng.integers(-3, 4, size=(400, 1)), 2)  # ties
        q = np.concatenate([np.array(PAIR_QUANTILES), rng.random(390)])
        expected = np.array([np.quantile(v, qq) for v, qq in zip(values, q)])
        np.testing.assert_array_equal(linear_quantile(values, q), expected)


def test_stgu_two_task_grouping_is_sklearns_answer():
    """K = 2: the closed form (sklearn's equal-similarities branch) against AffinityPropagation."""
    sims = _pair_similarities()
    seen = set()
    for q in PAIR_QUANTILES:
        batched = PairGrouping(np.full(len(sims), q)).split(np.stack(sims))
        for s, two in zip(sims, batched):
            expected = propagate_groups(s, float(np.quantile(s, q)))
            assert group_tasks(s, q) == expected == ([[0], [1]] if two else [[0, 1]]), (s, q)
            seen.add(len(expected))
    assert seen == {1, 2}  # both outcomes occur, ties included
    with pytest.raises(ValueError), warnings.catch_warnings():  # sklearn's input check decides non-finite S
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's quantile of inf − inf
        group_tasks(np.array([[1.0, np.inf], [np.inf, 1.0]]))


def _reference_update(affinity, group, before, after, decay):
    """The official ``form_task_affinity.update`` as a loop over (s, t): the reference that the
    vectorised :func:`affinity_update_rows` must reproduce bit for bit (NaN before = not measured)."""
    out = np.array(affinity, dtype=np.float64, copy=True)
    valid = np.isfinite(before)
    a = np.full_like(before, np.nan)
    a[valid] = (1.0 - after[valid] / before[valid]) / max(len(group), 1)
    for s in group:
        for t in np.flatnonzero(valid):
            if t == s:
                if a[t] < 0:
                    continue
                value = a[t]
            elif t in set(group) and np.isfinite(a[s]) and a[t] * a[s] < 0:
                value = -max(a[t], a[s])
            else:
                value = a[t]
            out[s, t] = (1.0 - decay) * out[s, t] + decay * value
    return out


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # −inf · 0 (both)
@pytest.mark.parametrize("k", [2, 3, 5])
def test_stgu_batched_affinity_update_is_the_loop_bit_for_bit(k):
    rng = np.random.default_rng(5 + k)
    b = 300
    aff = rng.normal(size=(b, k, k))
    decay = rng.uniform(1e-4, 1.0, size=b)
    members = rng.random((3, b, k)) < 0.5
    members[:, ::7] = True                     # whole-task groups
    members[:, 1::11] = False                  # a row outside the update: left alone
    before = rng.uniform(0.1, 5.0, size=(3, b, k))
    # ratios around 1 on both sides: sign disagreements, a = 0, negative self-affinity updates;
    # an unmeasured target (NaN before), an infinite lookahead (a = −inf), products that underflow
    after = before * rng.choice([0.5, 0.9, 1.0, 1.1, 2.0, 1 + 1e-200], size=(3, b, k))
    before[0, ::13, 0] = np.nan
    after[1, ::17, -1] = np.inf
    before[2, ::19] = after[2, ::19] = 1.0
    after[2, ::19, 0], after[2, ::19, 1] = 1 + 1e-170, 1 - 1e-170
    groups = [[np.flatnonzero(members[n, r]).tolist() for r in range(b)] for n in range(3)]
    one = affinity_update_rows(aff, members[0], before[0], after[0], decay)
    three = affinity_update_rows(aff, members, before, after, decay.reshape(-1, 1, 1))
    for r in range(b):
        expected = aff[r]
        for n in range(3):
            expected = _reference_update(expected, groups[n][r], before[n, r], after[n, r], decay[r])
            if n == 0:
                np.testing.assert_array_equal(one[r], expected)
                if groups[0][r]:
                    np.testing.assert_array_equal(
                        affinity_update(aff[r], groups[0][r], before[0, r], after[0, r], decay[r]), expected)
        np.testing.assert_array_equal(three[r], expected)
    scalar = affinity_update_rows(aff, members, before, after, 0.3)  # one decay for every row
    for r in range(0, b, 10):
        expected = aff[r]
        for n in range(3):
            expected = _reference_update(expected, groups[n][r], before[n, r], after[n, r], 0.3)
        np.testing.assert_array_equal(scalar[r], expected)


def test_stgu_randperm_draws_the_pair_plan_relies_on():
    """The K = 2 rows plan skips ``randperm(1)`` (it takes no number from the generator) and draws
    ``randperm(2)`` into a reused buffer (the same permutation, the same stream)."""
    for seed in range(3):
        plain, buffered = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        out = torch.empty(2, dtype=torch.int64)
        for i in range(300):
            if i % 3 == 0:
                state = plain.get_state()
                assert torch.randperm(1, generator=plain).tolist() == [0]
                assert torch.equal(plain.get_state(), state)
            else:
                torch.randperm(2, generator=buffered, out=out)
                assert torch.randperm(2, generator=plain).tolist() == out.tolist()
        assert torch.equal(plain.get_state(), buffered.get_state())


@pytest.mark.parametrize("hp", [{}, {"group_norm": True}, {"preference_quantile": 0.25, "similarity": "official"}])
def test_stgu_pair_rows_plan_is_each_rows_own_plan(hp):
    """The K = 2 rows plan (a table, one draw per two-group row) gives every row the coefficients
    and the generator state that the row's own one-row plan gives, warm-up and grouping alike."""
    rng = np.random.default_rng(8)
    rows = [STGU(2, prepos=3, seed=s, **hp) for s in range(6)]
    singles = [STGU(2, prepos=3, seed=s, **hp) for s in range(6)]
    many = STGU(2, prepos=3, **hp)
    many.start_rows(rows)
    seen = set()
    for _ in range(40):
        affinities = rng.uniform(-0.2, 1.0, size=(6, 2, 2)) * rng.choice([1.0, 0.0], size=(6, 1, 1), p=[0.9, 0.1])
        many.affinity = affinities.copy()
        got = many.plan_rows(np.zeros(6, dtype=bool), [""] * 6)
        for r, single in enumerate(singles):
            single.affinity = affinities[r].copy()
            expected = single.plan_rows(np.zeros(1, dtype=bool), [""])
            np.testing.assert_array_equal(got[:, r], expected[:, 0])
            assert torch.equal(many.generator[r].get_state(), single.generator.get_state())
            assert many.groups[r] == single.groups
            seen.add(single._last_plan[0])
    assert seen == {1, 2}


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_error_mid_batch_leaves_the_updates_made_before_it(attribution):
    """The EMA steps run at the end of the batch; an error in a forward or a step keeps those
    whose losses were seen before it, as updating at each step did. A non-positive loss raises at
    its update's place: before the next optimizer step (paper), after it (official)."""
    rows = [[2.0, 2.0], [1.0, 3.0], [1.5, 1.5], [1.2, 1.4]]

    def run(fail_at, losses=rows):
        st = STGU(2, affin_decay=0.5, prepos=10, attribution=attribution)
        calls, steps = [], []

        def forward(with_grad):
            calls.append(with_grad)
            if len(calls) == fail_at:
                raise RuntimeError("boom")
            return np.array([losses[len(calls) - 1]])

        with pytest.raises((RuntimeError, BalancerError)) as err:
            st.train_rows(forward, lambda coef: steps.append(coef), None)
        return st, err.value, len(steps)

    r = [np.array(x) for x in rows]
    st = STGU(2, affin_decay=0.5, prepos=10, seed=0)
    first = int(np.argmax(st.plan_rows(np.zeros(1, dtype=bool), [""])[0, 0]))   # the seed's first group
    groups = [[first], [1 - first]]
    if attribution == "paper":   # the lookahead (3rd forward) fails: g0's update over r0 → r1 was made
        st, _, steps = run(3)
        np.testing.assert_array_equal(st.affinity, affinity_update(np.zeros((2, 2)), groups[0], r[0], r[1], 0.5))
        assert steps == 2
    else:                        # no 3rd forward; the 2nd fails: nothing was updated yet
        st, _, steps = run(2)
        np.testing.assert_array_equal(st.affinity, np.zeros((2, 2)))
        assert steps == 1
    assert st.step_count == 0
    # a non-positive first loss: paper checks it at the 2nd forward, before g1's step; official
    # after g1's step (its update credits g1 with ℓ⁽⁰⁾ → ℓ⁽¹⁾)
    st, err, steps = run(0, [[-2.0, 2.0], [1.0, 3.0], [1.5, 1.5]])
    assert isinstance(err, BalancerError) and "positive losses, got [-2.  2.]" in str(err)
    assert steps == (1 if attribution == "paper" else 2)
    np.testing.assert_array_equal(st.affinity, np.zeros((2, 2)))
    if attribution == "paper":   # non-positive before g1's update (over ℓ⁽¹⁾ → ℓ⁽²⁾): after both steps
        bad = [[2.0, 2.0], [-1.0, 3.0], [1.5, 1.5]]
        st, err, steps = run(0, bad)
        assert isinstance(err, BalancerError) and steps == 2
        np.testing.assert_array_equal(st.affinity, affinity_update(np.zeros((2, 2)), groups[0], r[0],
                                                                   np.array(bad[1]), 0.5))


def test_stgu_rows_failing_at_an_update_keep_the_affinity_of_before():
    """Rows: a row with a non-positive loss fails at that update with the one-row balancer's message
    and its affinity keeps the updates before it; the other rows are updated as alone."""
    losses = np.array([[[2.0, 2.0], [1.0, 3.0], [1.5, 1.5]],
                       [[2.0, 2.0], [1.0, -3.0], [1.5, 1.5]],      # fails at the second update (paper)
                       [[-2.0, 2.0], [1.0, 3.0], [1.5, 1.5]]])     # fails at the first
    rows = [STGU(2, affin_decay=0.5, prepos=10, seed=s) for s in range(3)]
    many = STGU(2, affin_decay=0.5, prepos=10)
    many.start_rows(rows)
    calls = []

    def forward(with_grad):
        calls.append(with_grad)
        return losses[:, len(calls) - 1]

    _, weights, failed, reasons = many.train_rows(forward, lambda coef: None)
    assert failed.tolist() == [False, True, True] and reasons[0] == ""
    assert "positive losses, got [ 1. -3.]" in reasons[1] and "positive losses, got [-2.  2.]" in reasons[2]
    np.testing.assert_array_equal(weights, np.ones((3, 2)))
    for r, seed in enumerate(range(3)):
        alone = STGU(2, affin_decay=0.5, prepos=10, seed=seed)
        plan = alone.plan_rows(np.zeros(1, dtype=bool), [""])[:, 0]
        expected = np.zeros((2, 2))
        for n in range({0: 2, 1: 1, 2: 0}[r]):
            expected = affinity_update(expected, np.flatnonzero(plan[n]).tolist(), losses[r, n], losses[r, n + 1], 0.5)
        np.testing.assert_array_equal(many.affinity[r], expected)


def test_stgu_batched_similarity_is_the_per_matrix_one():
    rng = np.random.default_rng(9)
    aff = rng.normal(size=(50, 3, 3))
    aff[::3, 0, 0] = 0.0  # the zero-diagonal guard
    batched = affinity_similarity(aff)
    for a, s in zip(aff, batched):
        np.testing.assert_array_equal(s, affinity_similarity(a))


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_attribution_on_scripted_losses(attribution):
    rows = [[2.0, 2.0], [1.0, 3.0], [1.5, 1.5]]  # before g0, after g0 / before g1, after g1
    script = ScriptedForward(rows)
    st = STGU(2, affin_decay=0.5, prepos=10, attribution=attribution)
    st._plan = lambda: [[0], [1]]
    st.train_step(script, CountingSGD([script.param]), [script.param])
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
    script = ScriptedForward([[1.0, 1.0]])
    opt = CountingSGD([script.param])
    st = STGU(2, prepos=0, attribution=attribution)
    st.next_groups = lambda: [[0, 1]]
    losses, info = st.train_step(script, opt, [script.param])
    assert opt.steps == 2 and info.extras["group_steps"] == 2
    torch.testing.assert_close(info.weights, torch.tensor([2.0, 2.0]))
    single = STGU(2, prepos=0, repeat_single_group=False)
    single.next_groups = lambda: [[0, 1]]
    opt = CountingSGD([script.param])
    single.train_step(script, opt, [script.param])
    assert opt.steps == 1


@pytest.mark.parametrize("prepos", [0, 2])
def test_stgu_warm_up_lasts_prepos_plus_one_batches(prepos):
    """As the official loop (``iter_count <= prepos``, iter_count from 0): prepos + 1 batches with
    every task alone. prepos = 0: the first batch trains each task alone (2 single-task steps,
    weights e_0 and e_1), not one all-task group twice from clustering the all-zero affinity."""
    script = ScriptedForward([[2.0, 2.0], [1.0, 3.0], [1.5, 1.5], [1.2, 1.4]])
    st = STGU(2, affin_decay=0.5, prepos=prepos)
    seen = []
    real = st.next_groups
    st.next_groups = lambda: seen.append((st.batches, real())) or seen[-1][1]
    for _ in range(prepos + 2):
        _, info = st.train_step(script, CountingSGD([script.param]), [script.param])
        if len(seen) <= prepos + 1:   # warm-up batch: each task its own group, one step each
            assert info.extras["n_groups"] == 2 and info.extras["group_steps"] == 2
            torch.testing.assert_close(info.weights, torch.ones(2))
    assert [groups for _, groups in seen[:prepos + 1]] == [[[0], [1]]] * (prepos + 1)
    assert [b for b, _ in seen] == list(range(1, prepos + 3))
    # the first grouping (batch prepos + 2) sees an affinity updated by every warm-up batch
    assert np.any(st.affinity != 0)
    warm = STGU(2, prepos=prepos)
    warm.batches = prepos + 1
    assert warm.next_groups() == [[0], [1]]
    warm.batches = prepos + 2           # all-zero affinity: S = 0 everywhere → one group
    assert warm.next_groups() == [[0, 1]]


def test_stgu_official_similarity_is_the_official_in_place_normalisation():
    """similarity="official" = the official ``X[:, i] /= X[i, i]`` run literally on a torch tensor
    (below-diagonal entries not normalised); the default normalises every entry."""
    rng = np.random.default_rng(5)
    for k in (2, 3, 5):
        a = rng.normal(size=(k, k)) * 0.01
        np.fill_diagonal(a, rng.uniform(0.001, 0.02, size=k))
        x = torch.tensor(a)
        for i in range(k):
            x[:, i] /= x[i, i]
        np.testing.assert_allclose(affinity_similarity(a, official=True), ((x + x.T) / 2).numpy(), rtol=1e-15)
        np.testing.assert_allclose(affinity_similarity(a), (a / np.diag(a) + (a / np.diag(a)).T) / 2, rtol=1e-15)
        assert not np.allclose(affinity_similarity(a, official=True), affinity_similarity(a))
    batch = np.stack([a, a])
    np.testing.assert_array_equal(affinity_similarity(batch, official=np.array([True, False])),
                                  np.stack([affinity_similarity(a, official=True), affinity_similarity(a)]))
    st = STGU(3, prepos=0, similarity="official")
    st.affinity, st.batches = np.array([[1.0, 0.2, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 1.0]]) * 1e-3, 2
    assert st.next_groups() == group_tasks(affinity_similarity(st.affinity, official=True))
    with pytest.raises(ValueError, match="similarity"):
        STGU(2, similarity="paper")


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
    np.testing.assert_array_equal(  # same groups and same shuffled order
        other.plan_rows(np.zeros(1, dtype=bool), [""]), st.plan_rows(np.zeros(1, dtype=bool), [""]))
    with pytest.raises(BalancerError, match="train_step"):
        st.backward(first, list(trunk.parameters()))


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_stgu_properties(case):
    # a training-loop method: one train_step (M grouped SGD steps) instead of a direction. Only the
    # shape and finiteness properties apply: the group order is random (not permutation-equivariant),
    # and the grouping reads loss ratios ℓ(after)/ℓ(before) = (b + aJθ)/b, not homogeneous in J.
    params, weights = train_step_weights("stgu", case, prepos=0)
    assert_valid_step(params, weights, case)


@pytest.mark.parametrize("attribution", ["paper", "official"])
def test_stgu_toy_kernel_reads_the_engines_evaluation_as_its_cache_would(attribution):
    """The toy's kernel (toy/kernels/_rows.py) takes an iteration's first forward from the engine's
    evaluation at x (``at_x``) and the lookahead's losses alone (``losses_at``); without them it keeps
    the lookahead and reuses it. Both ways: the same points, weights and affinities, to the bit, with
    one evaluation with Jacobian per iteration fewer (paper attribution)."""
    from toy.common import EngineConfig, loss_floor
    from toy.kernels import kernel_for
    from toy.kernels._base import NumpyAdam
    from toy.landscape import toy_value_and_jacobian, toy_values

    cfg = EngineConfig()
    calls = {"full": 0, "losses": 0}
    shift = loss_floor(cfg.scale)   # positive losses, as the engine's (relative decreases need them)

    def landscape(points):
        calls["full"] += 1
        losses, jac = toy_value_and_jacobian(points, cfg.scale)
        return losses - shift, jac

    def losses_at(points):
        calls["losses"] += 1
        return toy_values(points, cfg.scale) - shift

    hp = dict(attribution=attribution, prepos=2, affin_decay=0.2, max_norm=0.5)
    engine_fed, cached = (kernel_for("stgu")([STGU(2, seed=s, **hp) for s in range(3)], cfg) for _ in range(2))
    start = np.array([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0]])
    x_fed, x_cached = start.copy(), start.copy()
    adam_fed, adam_cached = NumpyAdam(x_fed, cfg.lr), NumpyAdam(x_cached, cfg.lr)
    for t in range(12):
        losses, jac = toy_value_and_jacobian(x_fed, cfg.scale)   # the engine's evaluation after the last step
        at_x = (losses - shift, jac)
        before = dict(calls)
        engine_fed.train_step(t, x_fed, adam_fed.step, landscape, at_x, losses_at)
        fed_calls = {key: calls[key] - before[key] for key in calls}
        before = dict(calls)
        cached.train_step(t, x_cached, adam_cached.step, landscape)
        cached_calls = {key: calls[key] - before[key] for key in calls}
        np.testing.assert_array_equal(x_fed, x_cached)
        np.testing.assert_array_equal(engine_fed.weights, cached.weights)
        np.testing.assert_array_equal(engine_fed.balancer.affinity, cached.balancer.affinity)
        # two group steps: the second one's forward, and (paper) the lookahead — kept by the cache for the
        # next iteration, whose x it is; official attribution has no lookahead, so its cache never hits
        paper = attribution == "paper"
        assert fed_calls == {"full": 1, "losses": int(paper)}
        assert cached_calls == {"full": 3 if paper and t == 0 else 2, "losses": 0}
    assert not engine_fed.failed.any() and not cached.failed.any()
