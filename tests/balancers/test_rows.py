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
from mtl_tune.balancers.base import Balancer, BalancerError, GradientBalancer, LossBalancer
from mtl_tune.registry import available_balancers, balancer_class, get_balancer


def rule_methods() -> list[str]:
    return sorted(n for n in available_balancers() if balancer_class(n).has_rows_rule())


def weight_rule_methods() -> list[str]:
    """Methods whose rule gives weights (``weights_rows``), not a direction (``direction_rows``)."""
    return [n for n in rule_methods() if not balancer_class(n).has_jacobian_rule()
            and balancer_class(n).train_step is Balancer.train_step]  # not a training-loop rule (stgu)


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
    toy_methods = {"amtl", "amtlub", "cagrad", "dwa", "fairgrad", "famo", "go4align", "graddrop", "gradnorm", "gradvac",
                   "imtl", "ls", "mgda", "mgdaub", "nashmtl", "pcgrad", "pivrg", "rlw", "si", "stgu", "uw",
                   "upgrad", "dualproj", "config", "krum", "trimmedmean"}
    assert toy_methods <= set(rule_methods())  # every method the toy runs (all but consmtl) is a rule
    assert "consmtl" not in rule_methods()  # its update is more than the inherited FairGrad rule


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", weight_rule_methods())
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
        assert (out.param_grads is None) == (single.param_grads is None), name
        if out.param_grads is not None:
            np.testing.assert_allclose(out.param_grads[r], single.param_grads, rtol=1e-9, atol=1e-12,
                                       err_msg=f"{name} row {r}")


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
    gram, losses = inputs(2, 1, seed=5)
    for name in weight_rule_methods():
        bal = get_balancer(name, n_tasks=2)
        if not isinstance(bal, GradientBalancer):
            continue
        w = bal.gram_weights(torch.from_numpy(gram[0]), torch.from_numpy(losses[0]))
        np.testing.assert_allclose(w.numpy(), get_balancer(name, n_tasks=2).weights_rows(gram[0], losses[0]).weights,
                                   rtol=1e-12, err_msg=name)


def test_famo_post_step_rows_equal_each_rows_own_update():
    """FAMO's logits: one private Adam over the (B, K) logits is B independent Adams (element-wise);
    float32 state, so equal to float32 resolution (torch may vectorise a (B, K) tensor differently)."""
    rng = np.random.default_rng(3)
    before, after = rng.uniform(1.0, 3.0, size=(4, 5, 2)), rng.uniform(0.5, 3.0, size=(4, 5, 2))
    rows = [get_balancer("famo", n_tasks=2, w_lr=0.1) for _ in range(5)]
    many = get_balancer("famo", n_tasks=2, w_lr=0.1)
    many.start_rows(rows)
    for b, a in zip(before, after):
        w = many.weights_rows(b).weights
        many.after_rows(a)
        for r, one in enumerate(rows):
            np.testing.assert_allclose(w[r], one.weights_rows(b[r]).weights, rtol=1e-6)
            one.after_rows(a[r])
    np.testing.assert_allclose(many.logits.numpy(), np.stack([one.logits.numpy() for one in rows]), rtol=1e-6, atol=1e-7)
    assert np.abs(many.logits.numpy()).max() > 0.05  # the logits moved: the comparison is not of zeros


def test_graddrop_jacobian_rule_on_rows_draws_each_rows_own_stream():
    """A ``direction_rows`` rule: row r of the batch uses row r's generator exactly as that row's own
    balancer would (the toy compares each init with its own balancer run)."""
    import torch

    jac = torch.from_numpy(np.random.default_rng(4).normal(size=(3, 2, 6)))
    seeds = [1, 2, 3]
    many = get_balancer("graddrop", n_tasks=2, leak=0.2)
    many.start_rows([get_balancer("graddrop", n_tasks=2, leak=0.2, seed=s) for s in seeds])
    for _ in range(3):
        out = many.direction_rows(jac, torch.ones(3, 2))
        assert out.direction.shape == (3, 6) and out.weights.shape == (3, 2)
    singles = [get_balancer("graddrop", n_tasks=2, leak=0.2, seed=s) for s in seeds]
    for _ in range(3):
        ones = [b.direction_rows(jac[r], torch.ones(2)) for r, b in enumerate(singles)]
    for r, one in enumerate(ones):  # the third draw of each stream
        torch.testing.assert_close(out.direction[r], one.direction, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(out.weights[r], one.weights, rtol=1e-12, atol=1e-15)


def test_stgu_groups_each_row_by_its_own_affinity():
    """The K = 2 closed-form grouping on many rows gives each row sklearn's answer for its own
    affinity (a quantile taken from one row for all would not)."""
    from mtl_tune.balancers.stgu import affinity_similarity, group_tasks

    rng = np.random.default_rng(6)
    affinities = rng.uniform(-0.2, 1.0, size=(12, 2, 2))
    rows = [get_balancer("stgu", n_tasks=2, prepos=0, seed=s) for s in range(12)]
    many = get_balancer("stgu", n_tasks=2, prepos=0)
    many.start_rows(rows)
    many.affinity, many.batches = affinities.copy(), 5
    got = many._groups_rows(np.zeros(12, dtype=bool), [""] * 12)
    expected = [group_tasks(affinity_similarity(a), 0.5) for a in affinities]
    assert got == expected and len({len(g) for g in expected}) == 2  # both outcomes occur


def test_uw_rows_use_each_rows_log_variances_and_the_objective_has_the_rules_gradients():
    """UW's rule gives ∂L/∂ℓ and, as param_grads, ∂L/∂s from each row's own s (start_rows stacks
    them); the one-row objective (the rule's linearisation) gives autograd exactly those, and they
    are the gradients of L = Σ ½(e^{−s}ℓ + s) itself."""
    import torch

    rng = np.random.default_rng(4)
    losses = rng.uniform(0.5, 3.0, size=(4, 3))
    rows = [get_balancer("uw", n_tasks=3) for _ in losses]
    for one in rows:
        with torch.no_grad():
            one.log_vars.copy_(torch.from_numpy(rng.normal(size=3)))
    many = get_balancer("uw", n_tasks=3)
    many.start_rows(rows)
    assert many.log_vars.shape == (4, 3) and isinstance(many.log_vars, torch.nn.Parameter)
    out = many.weights_rows(losses)
    for r, one in enumerate(rows):
        single = one.weights_rows(losses[r])
        np.testing.assert_array_equal(out.weights[r], single.weights)
        np.testing.assert_array_equal(out.param_grads[r], single.param_grads)
        ell = torch.from_numpy(losses[r]).requires_grad_(True)
        total, w = one.objective(ell)
        total.backward()
        np.testing.assert_array_equal(ell.grad.numpy(), single.weights)
        np.testing.assert_array_equal(one.log_vars.grad.numpy(), single.param_grads.astype(np.float32))
        s = one.log_vars.detach().double().requires_grad_(True)
        ell = torch.from_numpy(losses[r]).requires_grad_(True)
        (0.5 * (torch.exp(-s) * ell + s)).sum().backward()
        np.testing.assert_allclose(ell.grad.numpy(), single.weights, rtol=1e-15)
        np.testing.assert_allclose(s.grad.numpy(), single.param_grads, rtol=1e-14, atol=1e-16)


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


RANDOM_RULES = [("rlw", {}), ("rlw", {"distribution": "dirichlet", "concentration": 0.4}), ("pcgrad", {}),
                ("gradvac", {}), ("graddrop", {"leak": 0.2})]


def random_step(balancer, jac: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """One step of a random rule: its weights (its direction for GradDrop's Jacobian rule)."""
    if balancer.name == "graddrop":
        return balancer.direction_rows(torch.from_numpy(jac), torch.from_numpy(losses)).direction.numpy()
    return call(balancer, gram_rows(jac), losses).weights


@pytest.mark.parametrize("name,hp", RANDOM_RULES, ids=repr)
def test_lockstep_rows_drawn_ahead_look_as_if_they_were_not(name, hp):
    """Lockstep rows draw a block of steps ahead (mtl_tune/balancers/_random_rows.py); mid-block, a row
    balancer's generator reads where its own run's would be, a checkpoint of it resumes the same draws, and
    a state loaded into it is what its next lockstep draws continue from."""
    k, seeds = 3, (3, 11, 12, 40)
    rows = [get_balancer(name, n_tasks=k, seed=s, **hp) for s in seeds]
    alone = [get_balancer(name, n_tasks=k, seed=s, **hp) for s in seeds]
    initial = rows[2].state_dict()
    many = get_balancer(name, n_tasks=k, seed=99, **hp)
    many.start_rows(rows)
    rng = np.random.default_rng(8)

    def step_all(extra=()):
        jac, losses = rng.normal(size=(len(rows), k, 5)), rng.uniform(0.5, 3.0, size=(len(rows), k))
        out = random_step(many, jac, losses)
        for r, one in enumerate(alone):
            np.testing.assert_array_equal(out[r], random_step(one, jac[r], losses[r]), err_msg=f"{name} row {r}")
        for r, other in extra:
            np.testing.assert_array_equal(out[r], random_step(other, jac[r], losses[r]), err_msg=f"{name} row {r}")

    for _ in range(3):
        step_all()
    for row, one in zip(rows, alone):        # mid-block: each generator where its own run left it
        assert torch.equal(row.generator.get_state(), one.generator.get_state())
    resumed = get_balancer(name, n_tasks=k, seed=0, **hp)
    resumed.load_state_dict(rows[1].state_dict())
    if name == "gradvac":                    # (lockstep keeps the rows' targets in the rule's balancer)
        resumed.targets = many.targets[1].clone()
    rows[2].load_state_dict(initial)         # row 2 starts over: its next lockstep draws are its first again
    alone[2] = get_balancer(name, n_tasks=k, seed=0, **hp)
    alone[2].load_state_dict(initial)
    if name == "gradvac":
        alone[2].targets = many.targets[2].clone()
    for _ in range(4):
        step_all([(1, resumed)])
    assert many.row_draws.steps > 4 or name == "rlw" and hp      # (the draws were ahead: blocks of steps)


@pytest.mark.parametrize("name,hp", RANDOM_RULES, ids=repr)
def test_lockstep_rows_pickle_mid_block(name, hp):
    """A row balancer pickled mid-block (torch.save of a module, a copy) is settled first: the copy holds no
    block and draws on as the row's own run; the rule's balancer pickles too (no lambdas)."""
    import pickle

    k, seeds = 2, (1, 2, 3)
    rows = [get_balancer(name, n_tasks=k, seed=s, **hp) for s in seeds]
    alone = [get_balancer(name, n_tasks=k, seed=s, **hp) for s in seeds]
    many = get_balancer(name, n_tasks=k, seed=99, **hp)
    many.start_rows(rows)
    rng = np.random.default_rng(2)
    jac, losses = rng.normal(size=(len(rows), k, 3)), rng.uniform(0.5, 3.0, size=(len(rows), k))
    random_step(many, jac, losses)
    for r, one in enumerate(alone):
        random_step(one, jac[r], losses[r])
    pickle.loads(pickle.dumps(many))
    copy = pickle.loads(pickle.dumps(rows[1]))
    if name == "gradvac":
        copy.targets = alone[1].targets.clone()
    np.testing.assert_array_equal(random_step(copy, jac[1], losses[1]), random_step(alone[1], jac[1], losses[1]))
