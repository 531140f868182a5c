import copy
import inspect
import math

import pytest
import torch

from mtl_tune.training.loop import META_EPOCH_OFFSET, PENALTY, Trainer, decode_hparams, train

TOY = {"benchmark": "toy", "seed": 0, "epochs": 3, "steps_per_epoch": 50, "init": 3}


def run(config, resume=None):
    rows, states = [], []
    # deep copies: a state dict holds live tensors that later epochs update in place
    train(config, lambda m, s: (rows.append(m), states.append(copy.deepcopy(s))), resume)
    return rows, states


def test_reports_flat_metrics_every_epoch():
    rows, states = run({**TOY, "method": "cagrad"})
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    for key in ("val/loss1", "val/loss2", "val/pareto_distance", "train/loss/task1", "weights/task2",
                "epoch_time_s", "solver_failures", "diverged"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in rows), key
    assert states[-1]["epoch"] == 3


def test_loss_decreases_on_the_toy():
    rows, _ = run({**TOY, "method": "ls", "epochs": 4})
    assert rows[-1]["val/loss2"] < rows[0]["val/loss2"]


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run():
    config = {**TOY, "method": "famo"}
    full, _ = run(config)
    first, states = run({**config, "epochs": 3})
    # restart from the state after epoch 1 and finish: identical metrics (CPU determinism)
    rest, _ = run(config, resume=states[0])
    assert [r["epoch"] for r in rest] == [2.0, 3.0]
    for a, b in zip(full[1:], rest):
        assert a["val/loss1"] == b["val/loss1"] and a["val/loss2"] == b["val/loss2"]


def test_autol_resume_keeps_lambda_and_its_adam_state():
    """Auto-λ's weights and their Adam moments live in the balancer's state: a resumed run repeats
    the uninterrupted one, and the weights did move (the meta step ran)."""
    config = {**TOY, "method": "autol", "steps_per_epoch": 20, "hparams": {"meta_lr": 1e-2}}
    full, _ = run(config)
    _, states = run(config)
    rest, _ = run(config, resume=states[0])
    for a, b in zip(full[1:], rest):
        assert a["val/loss1"] == b["val/loss1"] and a["weights/task1"] == b["weights/task1"]
    assert full[-1]["weights/task1"] != pytest.approx(0.1, abs=1e-3)


def test_meta_step_gets_a_second_stream_and_leaves_the_model_buffers_alone(monkeypatch):
    """A ``needs_meta_batch`` balancer gets one batch of the stream of epoch META_EPOCH_OFFSET + e
    before each step (opened after the epoch's own stream), and whatever its forwards do to the
    model's buffers (BatchNorm statistics) is undone; other methods open no second stream."""
    for method, meta in (("autol", True), ("ls", False)):
        trainer = Trainer({**TOY, "method": method, "epochs": 1, "steps_per_epoch": 3})
        model, original = trainer.setup.model, trainer.setup.train_batches
        model.register_buffer("running", torch.zeros(2))
        opened, calls = [], []

        def batches(epoch, original=original, opened=opened):
            opened.append(epoch)
            return original(epoch)

        def meta_step(forward, meta_forward, optimizer, shared, heads, model=model, calls=calls):
            model.running += 1.0
            calls.append(float(meta_forward().losses.detach().sum()))

        trainer.setup.train_batches = batches
        monkeypatch.setattr(trainer.balancer, "meta_step", meta_step)
        trainer.train_epoch()
        assert opened == ([0, META_EPOCH_OFFSET] if meta else [0])
        assert len(calls) == (3 if meta else 0) and torch.equal(model.running, torch.zeros(2))


def test_divergence_reports_finite_penalties_and_stops(monkeypatch):
    from mtl_tune.benchmarks import toy

    original = toy.toy_objectives
    monkeypatch.setattr(toy, "toy_objectives", lambda x, scale=0.1: original(x, scale) * float("nan"))
    rows, states = run({**TOY, "method": "ls"})
    assert len(rows) == 1 and states == [None]
    last = rows[0]
    assert last["diverged"] == 1.0 and "non-finite" in last["error"]
    assert last["val/loss1"] == PENALTY and last["val/pareto_distance"] == PENALTY


def test_balancer_error_is_a_recorded_failure_not_a_crash():
    rows, _ = run({**TOY, "method": "famo", "hparams": {"min_losses": [0.0, 0.0]}})  # toy losses are negative
    assert rows[-1]["diverged"] == 1.0 and "min_losses" in rows[-1]["error"]


def test_simplex_hparams_become_weights_summing_to_k():
    out = decode_hparams({"task_weights": {"0": 0.5, "1": 0.5, "2": 0.5}, "c": 0.3}, 3)
    assert out["task_weights"] == pytest.approx([1.0, 1.0, 1.0]) and out["c"] == 0.3
    out = decode_hparams({"task_weights": {"0": 0.9, "1": 0.1}}, 2)
    assert sum(out["task_weights"]) == pytest.approx(2.0) and out["task_weights"][1] > out["task_weights"][0]
    with pytest.raises(ValueError, match="2 components"):
        decode_hparams({"task_weights": {"0": 0.5, "1": 0.5}}, 3)


def test_same_seed_same_result():
    a, _ = run({**TOY, "method": "pcgrad"})
    b, _ = run({**TOY, "method": "pcgrad"})
    assert a[-1]["val/loss1"] == b[-1]["val/loss1"]


def test_trainer_uses_benchmark_balancer_options():
    trainer = Trainer({**TOY, "method": "famo"})
    assert trainer.balancer.min_losses.tolist() == pytest.approx([-2.1, -21.0])
    assert trainer.device == torch.device("cpu") or torch.cuda.is_available()


def test_benchmark_options_go_to_every_method_that_names_them():
    """The toy's loss floor reaches each method whose constructor takes ``min_losses`` (no list of
    method names anywhere) and no other; a method's own value wins over the benchmark's."""
    from mtl_tune.registry import available_balancers, balancer_class, get_benchmark, imposed_options

    toy = get_benchmark("toy")
    takers = [m for m in available_balancers()
              if "min_losses" in inspect.signature(balancer_class(m).__init__).parameters]
    assert {"famo", "si", "gls", "dbmtl"} <= set(takers)
    for m in available_balancers():
        got = imposed_options(m, toy, {"scale": 0.1})
        assert list(got) == (["min_losses"] if m in takers else []), m
        assert got.get("min_losses", [-2.1, -21.0]) == pytest.approx([-2.1, -21.0]), m
    assert imposed_options("famo", get_benchmark("multi_mnist"), {}) == {}
    trainer = Trainer({**TOY, "method": "gls", "hparams": {"min_losses": [-3.0, -30.0]}})
    assert trainer.balancer.min_losses.tolist() == [-3.0, -30.0]


def test_test_metrics_are_kept_at_the_best_validation_epoch():
    trainer = Trainer({**TOY, "method": "ls"})
    for epoch, (val, test) in enumerate([(3.0, 10.0), (1.0, 20.0), (2.0, 30.0)]):
        trainer.epoch = epoch
        out = {"val/pareto_distance": val, "test/loss1": test}
        trainer._track_best(out)
    assert out["best/test/loss1"] == 20.0 and out["best/epoch"] == 2.0


def test_bf16_autocast_and_channels_last_run_and_stay_close_to_fp32():
    config = {"benchmark": "multi_mnist", "method": "cagrad", "seed": 0, "epochs": 1,
              "pairs_per_image": 2}
    base, _ = run(config)
    fast, _ = run({**config, "amp": "bf16", "channels_last": True})
    assert fast[-1]["diverged"] == 0.0
    assert abs(fast[-1]["val/mean_acc"] - base[-1]["val/mean_acc"]) < 0.1
    with pytest.raises(ValueError, match="amp must be"):
        Trainer({**config, "amp": "fp16"})


def test_a_toy_trial_with_the_row_by_row_jacobian_equals_the_batched_one(monkeypatch):
    # a tiny Jacobian (the toy's 2 × 2) is computed row by row (cheaper than vmap there): every
    # method's reported metrics must equal, to the last bit, those of the batched pass it replaced
    from mtl_tune import jacobian
    from mtl_tune.registry import available_balancers, balancer_class

    config = {**TOY, "epochs": 2, "steps_per_epoch": 40, "init": 1}
    methods = [m for m in available_balancers() if balancer_class(m).needs_jacobian]
    assert {"mgda", "pcgrad", "cagrad"} <= set(methods)
    for method in methods:
        fast, _ = run({**config, "method": method})
        with monkeypatch.context() as patch:
            patch.setattr(jacobian, "LOOP_MAX_ENTRIES", 0)  # the previous path: always batched
            batched, _ = run({**config, "method": method})
        drop = ("epoch_time_s",)
        assert [{k: v for k, v in r.items() if k not in drop} for r in fast] == \
            [{k: v for k, v in r.items() if k not in drop} for r in batched], method
