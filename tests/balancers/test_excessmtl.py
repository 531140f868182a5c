"""ExcessMTL: AdaGrad-style excess-risk estimates e_i = Σ_p g_ip²/√(S_ip + 1e-7) and multiplicative
weights w ← K·w·exp(η e/e⁽¹⁾)/Σ(…) (He et al., ICML'24).

Parity with TorchJD 0.18's ``ExcessMTLWeighting`` (adapted from the official code) on identical
Jacobians. Its conventions differ from the official code's, which the balancer follows: (1) it starts
from w = 1/K (sum 1) instead of 1 (sum K); (2) on the first call it already updates the weights with
the raw e⁽¹⁾ (softmax(log(1/K) + η e⁽¹⁾)), where the official code only records the baseline; (3) it
divides by e⁽¹⁾ + 1e-7 instead of e⁽¹⁾. So log w_torchjd − log w_ours − η e⁽¹⁾ must be the same for
every task (the normalisations), up to the relative 1e-7/e⁽¹⁾ of (3) in each later ratio.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_tune.balancers.base import BalancerError
from mtl_tune.registry import get_balancer

from ._helpers import linear_problem, saved_and_loaded
from ._properties import (assert_gradient_scaling, assert_permutation_equivariant, assert_valid_step, balancer_step,
                          property_cases)


def step(balancer, rows):
    x, losses = linear_problem(rows)
    info = balancer.backward(losses, [x])
    return x.grad.clone(), info.weights.clone()


def official_sequence(jacs, eta):
    """The official update written out task by task (module docstring of excessmtl.py)."""
    k, p = len(jacs[0]), len(jacs[0][0])
    s = [[0.0] * p for _ in range(k)]
    w, base, out = [1.0] * k, None, []
    for g in jacs:
        e = []
        for i in range(k):
            for c in range(p):
                s[i][c] += g[i][c] ** 2
            e.append(sum(g[i][c] ** 2 / math.sqrt(s[i][c] + 1e-7) for c in range(p)))
        if base is None:
            base = e
        else:
            w = [w[i] * math.exp(eta * e[i] / base[i]) for i in range(k)]
            w = [k * v / sum(w) for v in w]
        out.append(list(w))
    return out


def test_excessmtl_replays_the_official_update():
    rng = np.random.default_rng(0)
    jacs = [rng.normal(size=(3, 4)).tolist() for _ in range(6)]
    bal = get_balancer("excessmtl", 3, robust_step_size=0.5)
    for g, w_ref in zip(jacs, official_sequence(jacs, 0.5)):
        d, w = step(bal, g)
        # the same float64 formulas (log-domain softmax vs exp-and-normalise): ~1e-15 relative
        assert w.tolist() == pytest.approx(w_ref, rel=1e-12)
        np.testing.assert_allclose(d.numpy(), np.array(w_ref) @ np.array(g), rtol=1e-12, atol=1e-14)


def test_excessmtl_first_step_keeps_unit_weights():
    d, w = step(get_balancer("excessmtl", 2, robust_step_size=5.0), [[1.0, 0.0], [0.0, 2.0]])
    assert w.tolist() == [1.0, 1.0] and d.tolist() == [1.0, 2.0]


def test_equal_excess_risk_ratios_keep_equal_weights():
    # g₂ is g₁ with its coordinates swapped, every step scaled by its own c: S₂ is S₁ swapped, so
    # e₂ = e₁ exactly (the same two terms, added in the other order) and every ratio is equal
    bal = get_balancer("excessmtl", 2, robust_step_size=1.0)
    for c in (1.0, 0.5, 2.0, 0.1, 3.0):
        _, w = step(bal, [[c * 0.3, c * 1.7], [c * 1.7, c * 0.3]])
        assert w.tolist() == [1.0, 1.0]


def test_excessmtl_moves_weight_to_the_task_whose_excess_risk_stays():
    # task 0's gradient keeps its size (excess risk not shrinking), task 1's decays: task 0 gains weight
    bal = get_balancer("excessmtl", 2, robust_step_size=0.5)
    for t in range(10):
        _, w = step(bal, [[1.0, 0.5], [0.8 ** t, 0.4 * 0.8 ** t]])
    assert w[0] > 1.2 > 0.8 > w[1] and float(w.sum()) == pytest.approx(2.0, rel=1e-14)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_excessmtl_matches_torchjd_up_to_its_conventions(k):
    torchjd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(30 + k)
    eta = 0.3
    ref = torchjd.ExcessMTLWeighting(robust_step_size=eta)
    bal = get_balancer("excessmtl", k, robust_step_size=eta)
    base = None
    for t in range(8):
        jac = 3.0 * torch.randn(k, 6, generator=gen, dtype=torch.float64) * (0.9 ** t)
        want = ref(jac)
        _, w = bal.combine(jac, torch.ones(k, dtype=torch.float64))
        if base is None:
            base = torch.from_numpy(bal.baseline)
        gap = torch.log(want) - torch.log(w) - eta * base
        # (3) changes each ratio by a relative 1e-7/e⁽¹⁾ (e⁽¹⁾ ~ 5 here): ≲ η·t·r·2e-8 ≤ 1e-7 in the logs
        assert float(gap.max() - gap.min()) < 1e-7, (t, gap)


def test_excessmtl_state_round_trip_and_lockstep_rows():
    rng = np.random.default_rng(3)
    seq = [rng.normal(size=(3, 4)) for _ in range(5)]
    a = get_balancer("excessmtl", 3, robust_step_size=0.4)
    step(a, seq[0].tolist())
    step(a, seq[1].tolist())
    b = get_balancer("excessmtl", 3, robust_step_size=0.4)
    b.load_state_dict(saved_and_loaded(a.state_dict()))
    for rows in seq[2:]:
        (da, wa), (db, wb) = step(a, rows.tolist()), step(b, rows.tolist())
        assert torch.equal(da, db) and torch.equal(wa, wb)
    singles = [get_balancer("excessmtl", 3, robust_step_size=0.4) for _ in range(2)]
    lock = get_balancer("excessmtl", 3, robust_step_size=0.4)
    lock.start_rows(singles)
    for rows in seq:
        jac = torch.from_numpy(np.stack([rows, rows[::-1] * 1.5]))
        out = lock.direction_rows(jac, torch.ones(2, 3, dtype=torch.float64))
        for r, bal in enumerate(singles):
            d, w = bal.combine(jac[r], torch.ones(3, dtype=torch.float64))
            torch.testing.assert_close(out.direction[r], d, rtol=1e-14, atol=1e-15)
            torch.testing.assert_close(out.weights[r], w, rtol=1e-14, atol=1e-15)


def test_zero_gradient_at_the_first_step_is_an_error_and_a_size_change_too():
    bal = get_balancer("excessmtl", 2)
    step(bal, [[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(BalancerError, match="task 1"):
        step(bal, [[1.0, 0.0], [0.0, 1.0]])
    bal = get_balancer("excessmtl", 2)
    step(bal, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(BalancerError, match="shape"):
        step(bal, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def test_excessmtl_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="excessmtl"):
        get_balancer("excessmtl", 2, robust_step_size=0.0)


# ---------------------------------------------------------------------------- properties (_properties.py)
@pytest.mark.parametrize("case", property_cases(), ids=repr)
def test_excessmtl_properties(case):
    # one step of a fresh balancer records the baseline and keeps w = 1: d = Σ g_i exactly (sums of K
    # terms), linear in J (degree 1, weights 0)
    st = balancer_step("excessmtl")
    assert_valid_step(*st(case.jac, case.losses), case)
    assert_permutation_equivariant(st, case, rtol=1e-12)
    assert_gradient_scaling(st, case, degree=1, weight_degree=0, rtol=1e-12)


def test_excessmtl_host_path_is_torchs_bit_for_bit():
    """P ≤ 2 on a float64 CPU Jacobian forms S and e in NumPy; torch's path (any other Jacobian: here
    one that requires grad) gives the same bits, step after step, zero-baseline rows included."""
    rng = np.random.default_rng(5)
    for p in (1, 2):
        host_run, torch_run = (get_balancer("excessmtl", 2, robust_step_size=0.3) for _ in range(2))
        host_run.start_rows([get_balancer("excessmtl", 2) for _ in range(4)])
        torch_run.start_rows([get_balancer("excessmtl", 2) for _ in range(4)])
        for t in range(6):
            jac = rng.normal(size=(4, 2, p)) * 10.0 ** rng.uniform(-5, 5, size=(4, 2, 1))
            if t == 0:
                jac[3, 1] = 0.0          # row 3: task 1's baseline is 0, the row fails from step 2 on
            jac_t = torch.from_numpy(jac)
            losses = torch.ones(4, 2, dtype=torch.float64)
            a = host_run.direction_rows(jac_t, losses)
            b = torch_run.direction_rows(jac_t.clone().requires_grad_(True), losses)
            assert torch.equal(a.direction, b.direction.detach()) and torch.equal(a.weights, b.weights)
            assert torch.equal(host_run.sq_sum, torch_run.sq_sum.detach())
            assert np.array_equal(host_run.baseline, torch_run.baseline)
            assert (a.failed is None) == (t == 0) and (t == 0 or a.failed.tolist() == [False] * 3 + [True])
