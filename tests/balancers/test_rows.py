"""Batch-first rules (mtl_tune/balancers/_rows.py): a rule on B rows equals B calls on one row.

For every method that declares a rule: random Gram matrices (K = 2, the closed forms and the
toy's case, and K = 3, the general solvers) and losses; the rule applied to all rows at once must
give each row's one-row answer — the same function serves the balancer (one row) and the toy's
generic kernel (many rows), so a rule that mixed rows or broadcast wrongly would fail here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_tune.balancers._rows import RowStep, gram_rows, one_row
from mtl_tune.balancers.base import BalancerError, GradientBalancer, LossBalancer
from mtl_tune.registry import available_balancers, balancer_class, get_balancer


def rule_methods() -> list[str]:
    return sorted(n for n in available_balancers() if balancer_class(n).has_rows_rule())


def inputs(k: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    jac = rng.normal(size=(rows, k, 4)) * rng.uniform(0.1, 3.0, size=(rows, k, 1))
    return gram_rows(jac), rng.uniform(0.5, 3.0, size=(rows, k))


def twin_of(balancer):
    """A new balancer of the same method and hyperparameters in ``balancer``'s state (its state_dict)."""
    twin = get_balancer(balancer.name, n_tasks=balancer.n_tasks)
    twin.load_state_dict(balancer.state_dict())
    return twin


def call(balancer, gram: np.ndarray, losses: np.ndarray) -> RowStep:
    if isinstance(balancer, LossBalancer):
        return balancer.weights_rows(losses)
    return balancer.weights_rows(gram, losses)


def test_the_converted_methods_declare_a_rule():
    assert {"ls", "si", "mgda", "mgdaub", "cagrad", "imtl", "fairgrad", "pivrg", "nashmtl"} <= set(rule_methods())
    assert "consmtl" not in rule_methods()  # its update is more than the inherited FairGrad rule


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", rule_methods())
def test_a_rule_on_many_rows_equals_the_rule_on_each_row(name, k):
    gram, losses = inputs(k, 7, seed=k)
    rows = [get_balancer(name, n_tasks=k) for _ in gram]
    # row r is its own balancer's copy: a twin of it in the same state answers for it alone (rlw's rows
    # differ by their generators, seeded from the global RNG)
    twins = [twin_of(b) for b in rows]
    many = get_balancer(name, n_tasks=k)
    many.start_rows(rows)
    out = call(many, gram, losses)
    assert out.weights.shape == (len(gram), k)
    for r in range(len(gram)):
        single = call(twins[r], gram[r], losses[r])
        assert single.weights.shape == (k,)
        # the same arithmetic on a row of a batch and on the row alone: equal to rounding
        np.testing.assert_allclose(out.weights[r], single.weights, rtol=1e-9, atol=1e-12, err_msg=f"{name} row {r}")
        for field in ("failed", "solver_failed"):
            a, b = getattr(out, field), getattr(single, field)
            assert (a is None) == (b is None) and (a is None or bool(a[r]) == bool(b)), (name, field, r)


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
    gram, losses = inputs(2, 1, seed=5)
    for name in rule_methods():
        bal = get_balancer(name, n_tasks=2)
        if not isinstance(bal, GradientBalancer):
            continue
        w = bal.gram_weights(torch.from_numpy(gram[0]), torch.from_numpy(losses[0]))
        np.testing.assert_allclose(w.numpy(), get_balancer(name, n_tasks=2).weights_rows(gram[0], losses[0]).weights,
                                   rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name,hp", [("rlw", {}), ("rlw", {"distribution": "dirichlet", "concentration": 0.4}),
                                     ("pcgrad", {}), ("gradvac", {}), ("gradvac", {"target_update": "official"})])
def test_random_rules_draw_each_rows_own_stream(name, hp, k):
    """Rows of a method with a random stream, seeded apart, step after step: row r draws what its own
    balancer draws alone (same weights, the same generator state and state after), and each row's
    balancer is left where its own run would have left it (the generators are adopted, not copied)."""
    rows = [get_balancer(name, n_tasks=k, seed=seed, **hp) for seed in (3, 11, 12, 40)]
    alone = [get_balancer(name, n_tasks=k, seed=seed, **hp) for seed in (3, 11, 12, 40)]
    many = get_balancer(name, n_tasks=k, seed=99, **hp)
    many.start_rows(rows)
    for step in range(6):
        gram, losses = inputs(k, len(rows), seed=10 * k + step)
        out = call(many, gram, losses)
        for r, one in enumerate(alone):
            np.testing.assert_allclose(out.weights[r], call(one, gram[r], losses[r]).weights, rtol=1e-12, atol=1e-15,
                                       err_msg=f"{name} step {step} row {r}")
    for r, (row, one) in enumerate(zip(rows, alone)):
        assert torch.equal(row.generator.get_state(), one.generator.get_state()), (name, r)
        if name == "gradvac":
            np.testing.assert_allclose(many.targets[r].numpy(), one.targets.numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="one generator per row"):
        call(many, *inputs(k, len(rows) + 1, seed=0))
