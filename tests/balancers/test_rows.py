"""Batch-first rules (mtl_tune/balancers/_rows.py): a rule on B rows equals B calls on one row.

For every method that declares a rule: random Gram matrices (K = 2, the closed forms and the
toy's case, and K = 3, the general solvers) and losses; the rule applied to all rows at once must
give each row's one-row answer — the same function serves the balancer (one row) and the toy's
generic kernel (many rows), so a rule that mixed rows or broadcast wrongly would fail here.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtl_tune.balancers._rows import RowStep, gram_rows, one_row
from mtl_tune.balancers.base import BalancerError, GradientBalancer, LossBalancer
from mtl_tune.registry import available_balancers, balancer_class, get_balancer


def rule_methods() -> list[str]:
    return sorted(n for n in available_balancers() if balancer_class(n).has_rows_rule())


def inputs(k: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(rows, k, 4)) * rng.uniform(0.1, 3.0, size=(rows, k, 1))
    return gram_rows(jac), rng.uniform(0.5, 3.0, size=(rows, k))


def call(balancer, gram: np.ndarray, losses: np.ndarray) -> RowStep:
    if isinstance(balancer, LossBalancer):
        return balancer.weights_rows(losses)
    return balancer.weights_rows(gram, losses)


def test_the_converted_methods_declare_a_rule():
    assert {"ls", "si", "mgda", "mgdaub", "cagrad", "imtl", "fairgrad", "pivrg", "nashmtl", "dwa",
            "go4align"} <= set(rule_methods())
    assert "consmtl" not in rule_methods()  # its update is more than the inherited FairGrad rule


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", rule_methods())
def test_a_rule_on_many_rows_equals_the_rule_on_each_row(name, k):
    gram, losses = inputs(k, 7, seed=k)
    many = get_balancer(name, n_tasks=k)
    many.start_rows([get_balancer(name, n_tasks=k) for _ in gram])
    out = call(many, gram, losses)
    assert out.weights.shape == (len(gram), k)
    for r in range(len(gram)):
        one = get_balancer(name, n_tasks=k)
        single = call(one, gram[r], losses[r])
        assert single.weights.shape == (k,)
        # the same arithmetic on a row of a batch and on the row alone: equal to rounding
        np.testing.assert_allclose(out.weights[r], single.weights, rtol=1e-9, atol=1e-12, err_msg=f"{name} row {r}")
        for field in ("failed", "solver_failed"):
            a, b = getattr(out, field), getattr(single, field)
            assert (a is None) == (b is None) and (a is None or bool(a[r]) == bool(b)), (name, field, r)


#: stateful loss rules, with settings that make their state move within a few steps
STATEFUL_LOSS_RULES = [("dwa", {"temp": 0.5}), ("dwa", {"mode": "iteration", "window": 2}),
                       ("go4align", {"num_groups": 2, "beta": 0.3}), ("go4align", {"num_groups": 1, "beta": 0.3})]


@pytest.mark.parametrize("name,hparams", STATEFUL_LOSS_RULES, ids=repr)
def test_stateful_loss_rules_on_many_rows_follow_each_row_over_steps_and_epochs(name, hparams):
    """Per-row state (DWA's FIFO and epoch means, GO4Align's log Q) stays with its row: 9 steps with an
    epoch end every 3, all rows at once vs each row's own balancer through the same rules."""
    rng = np.random.default_rng(3)
    k, rows = 3, 4
    losses = rng.uniform(0.5, 3.0, size=(9, rows, k))
    means = rng.uniform(0.5, 3.0, size=(3, rows, k))
    many = get_balancer(name, n_tasks=k, **hparams)
    many.start_rows([get_balancer(name, n_tasks=k, **hparams) for _ in range(rows)])
    ones = [get_balancer(name, n_tasks=k, **hparams) for _ in range(rows)]
    for t in range(9):
        out = many.weights_rows(losses[t])
        for r, one in enumerate(ones):
            np.testing.assert_allclose(out.weights[r], one.weights_rows(losses[t, r]).weights, rtol=1e-12,
                                       err_msg=f"{name} step {t} row {r}")
        if t % 3 == 2:
            many.epoch_rows(means[t // 3], None)
            for r, one in enumerate(ones):
                one.epoch_rows(means[t // 3, r], None)


def test_dwa_epoch_rows_fail_the_rows_with_non_positive_previous_means():
    bal = get_balancer("dwa", n_tasks=2)
    bal.start_rows([get_balancer("dwa", n_tasks=2) for _ in range(3)])
    assert bal.epoch_rows(np.array([[1.0, 2.0], [-1.0, 2.0], [3.0, 0.0]]), None).failed is None  # first epoch
    out = bal.epoch_rows(np.array([[2.0, 2.0], [1.0, 1.0], [1.0, 1.0]]), None)
    assert out.failed.tolist() == [False, True, True]
    assert "[-1.0, 2.0]" in out.reason_of((1,)) and "[3.0, 0.0]" in out.reason_of((2,))
    assert out.weights[1].tolist() == out.weights[2].tolist() == [1.0, 1.0]   # failed rows keep their w
    assert out.weights[0, 0] > 1.0 > out.weights[0, 1]                        # task 0's loss rose (r = 2 vs 1)


def test_a_failed_row_fails_alone_with_its_own_reason():
    bal = get_balancer("si", n_tasks=2, min_losses=[0.0, 0.0])
    out = bal.weights_rows(np.array([[1.0, 2.0], [-1.0, 2.0], [3.0, 4.0]]))
    assert out.failed.tolist() == [False, True, False]
    assert "[-1.0, 2.0]" in out.reason_of((1,))
    with pytest.raises(BalancerError, match="must be > 0"):
        one_row(bal.weights_rows(np.array([-1.0, 2.0])))


def test_pivrg_epoch_rows_keep_each_rows_scores():
    bal = get_balancer("pivrg", n_tasks=2)
    bal.start_rows([get_balancer("pivrg", n_tasks=2) for _ in range(3)])
    out = bal.epoch_rows(np.ones((3, 2)), np.array([[10.0, 0.0], [np.nan, 1.0], [0.0, 5.0]]))
    assert out.failed.tolist() == [False, True, False]
    assert bal.scores[1].tolist() == [0.0, 0.0]          # the failed row keeps its previous scores
    p = bal.task_priorities()
    assert p.shape == (3, 2) and p[0, 0] > p[0, 1] and p[2, 1] > p[2, 0] and p[1, 0] == p[1, 1] == 1.0


def test_gradient_rules_serve_the_balancers_gram_weights():
    import torch

    gram, losses = inputs(2, 1, seed=5)
    for name in rule_methods():
        bal = get_balancer(name, n_tasks=2)
        if not isinstance(bal, GradientBalancer):
            continue
        w = bal.gram_weights(torch.from_numpy(gram[0]), torch.from_numpy(losses[0]))
        np.testing.assert_allclose(w.numpy(), get_balancer(name, n_tasks=2).weights_rows(gram[0], losses[0]).weights,
                                   rtol=1e-12, err_msg=name)
