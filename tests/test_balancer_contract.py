"""Registry-wide contract of every balancer (parametrised over ``available_balancers()``).

A new method file is picked up automatically; it must pass every test below or be listed,
with the reason, in one of the exception tables right here. Model: a small MLP with a shared
trunk, a shared representation z (read by every head) and K ∈ {2, 3} linear heads; the losses
are MSEs against targets of very different scales (no method sits at a tie). Checked:

* one step writes finite grads on shared and head parameters; ``StepInfo.weights`` is (K,)
  and finite (training-loop methods: one ``train_step`` moves every parameter, finitely);
* the same seed gives bit-identical steps;
* ``state_dict`` → ``torch.save``/``load`` → a fresh instance (another global seed) →
  ``load_state_dict`` continues exactly like the original after a few driven steps (incl.
  ``after_optimizer_step`` via ``train_step`` and ``on_epoch_end`` with losses and scores);
* K = 1 is a finite step or the documented clear error;
* a non-finite loss raises :class:`BalancerError` (the trainer reports it as diverged) or leaves
  NaN/inf visible in the grads / weights — never a silently finite update;
* permuting the tasks permutes the weights and keeps the shared gradient (deterministic methods);
* ``max_norm`` bounds the shared gradient; ``backward`` adds to ``.grad``;
* the flags are truthful (``needs_jacobian``, ``needs_representation``) and docs/methods.md
  has the method in its tables.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mtl_tune.balancers.base import Balancer, BalancerError, EpochInfo, ForwardOutput
from mtl_tune.jacobian import JacobianEngine
from mtl_tune.registry import available_balancers, balancer_class, get_balancer

METHODS = available_balancers()
KS = (2, 3)

# ----------------------------------------------------------------------------- exception tables
#: constructor overrides for the contract model (defaults otherwise), each with its reason.
#: stgu: leave the one-group-per-task warm-up after one batch (prepos + 1 batches), so the driven
#: steps of the state round trip reach the affinity-propagation grouping (default: 101 batches)
HPARAMS: dict[str, dict[str, Any]] = {"stgu": {"prepos": 0}}

#: extra configurations for the state round trip, whose state the default one does not exercise.
STATE_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("nashmtl", {"update_weights_every": 2}),  # the 6th step reuses the saved α (default: α is re-solved)
    ("dwa", {"mode": "iteration", "window": 1}),  # the FIFO loss buffer instead of epoch means
    ("stgu", {"attribution": "official", "prepos": 0}),
    ("stch", {"warmup_epochs": 0}),  # the nadir (set at the first epoch end) instead of the warm-up
    ("sdmgrad", {"inner": "official"}),  # the warm-started inner w (default: the stateless exact solve)
]

#: methods that cannot take a plain ``backward`` and must go through ``train_step``.
TRAIN_STEP_ONLY = {"stgu": "training-loop method: M grouped optimizer steps per batch; backward() raises"}

#: K = 1: (exception type, message pattern) where a single task is rejected on purpose.
#: go4align: num_groups defaults to 2 and must lie in 1..K (MTLlib's M > K crashes inside sklearn)
SINGLE_TASK_ERRORS: dict[str, tuple[type[Exception], str]] = {"go4align": (ValueError, "num_groups")}

#: non-finite losses: methods that raise something other than BalancerError (strict xfail).
#: Empty since the base classes check losses (and per-task gradients) before any solver runs.
NONFINITE_GAPS: dict[str, tuple[type[Exception], str]] = {}

#: methods whose step depends on random draws tied to task indices: permuting the tasks changes
#: which draw each task gets, so weights are not simply permuted.
NOT_PERMUTATION_EQUIVARIANT: dict[str, str] = {
    "rlw": "fresh random weights per step, drawn in task order",
    "pcgrad": "random projection order drawn per task index",
    "gradvac": "random projection order drawn per task index",
    "stgu": "random group order; training-loop method",
}

# ----------------------------------------------------------------------------- the model
D_IN, WIDTH, BATCH = 6, 8, 16
#: target scale per task: losses (and gradients) differ by ~100× across tasks
TARGET_SCALES = (1.0, 10.0, 0.3)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny ops are dominated by thread hand-off on the shared 2-core machine (see
    ``test_bench_dense``); one intra-op thread keeps the whole file fast. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyMTL(nn.Module):
    """Shared trunk → z (B×WIDTH, read by every head) → K scalar heads."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D_IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 1) for _ in range(k))

    def shared(self) -> list[Tensor]:
        return list(self.trunk.parameters())

    def task_params(self) -> list[list[Tensor]]:
        return [list(h.parameters()) for h in self.heads]


def batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen, scale = torch.Generator().manual_seed(seed), torch.tensor(TARGET_SCALES)
    return [(torch.randn(BATCH, D_IN, generator=gen), torch.randn(BATCH, 3, generator=gen) * scale + 0.5)
            for _ in range(n)]


def forward(model: TinyMTL, batch: tuple[Tensor, Tensor], factors: Tensor | None = None) -> ForwardOutput:
    """K MSE losses (strictly positive) and the shared representation; ``factors`` multiplies
    the losses (to inject NaN/inf inside the autograd graph)."""
    x, y = batch
    z = model.trunk(x)
    losses = torch.stack([((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)])
    return ForwardOutput(losses if factors is None else losses * factors, z)


def build(name: str, k: int, seed: int = 0, **overrides: Any) -> tuple[TinyMTL, Balancer]:
    """Model and balancer created under one global seed (``rlw`` with seed=None draws from it)."""
    torch.manual_seed(seed)
    model = TinyMTL(k)
    return model, get_balancer(name, k, **{**HPARAMS.get(name, {}), **overrides})


def uses_train_step(balancer: Balancer) -> bool:
    return type(balancer).train_step is not Balancer.train_step


def make_optimizer(model: TinyMTL, balancer: Balancer) -> torch.optim.Optimizer:
    return torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05, momentum=0.9)


def backward_step(model: TinyMTL, balancer: Balancer, batch, factors: Tensor | None = None):
    out = forward(model, batch, factors)
    return balancer.backward(out.losses, model.shared(), model.task_params(), out.representation)


def train_step(model: TinyMTL, balancer: Balancer, opt: torch.optim.Optimizer, batch):
    return balancer.train_step(lambda: forward(model, batch), opt, model.shared(), model.task_params())


def snapshot(model: TinyMTL, weights: Tensor) -> dict[str, list[Tensor | None]]:
    return {"weights": [weights.detach().clone()],
            "params": [p.detach().clone() for p in model.parameters()],
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]}


def scores_for(epoch: int, k: int) -> Tensor:
    """Made-up per-task performance gaps (percent, positive = worse than STL) that change per epoch."""
    return torch.linspace(-5.0, 12.0, k, dtype=torch.float64) * (epoch + 1)


def drive(model: TinyMTL, balancer: Balancer, opt: torch.optim.Optimizer, data, steps_per_epoch: int = 2,
          first_epoch: int = 0) -> list[dict[str, list[Tensor | None]]]:
    """``train_step`` on each batch (incl. FAMO's post-step update), ``on_epoch_end`` with the
    epoch's mean training losses and scores after every ``steps_per_epoch`` batches; before each
    step, a ``needs_meta_batch`` method's ``meta_step`` with the next batch as the second batch."""
    snaps, seen = [], []
    for i, batch in enumerate(data):
        if balancer.needs_meta_batch:
            other = data[(i + 1) % len(data)]
            balancer.meta_step(lambda: forward(model, batch), lambda: forward(model, other), opt, model.shared(),
                               model.task_params())
        losses, info = train_step(model, balancer, opt, batch)
        seen.append(losses.detach().double())
        snaps.append(snapshot(model, info.weights))
        if (i + 1) % steps_per_epoch == 0:
            epoch = first_epoch + i // steps_per_epoch
            balancer.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.stack(seen).mean(0),
                                            scores=scores_for(epoch, balancer.n_tasks)))
            seen = []
    return snaps


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Recursive exact equality of nested dicts / sequences / tensors / arrays / scalars."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a!r} vs {b!r}"
        assert torch.equal(a.cpu(), b.cpu()), f"{where}: values differ: {a} vs {b}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, np.asarray(b)), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def is_finite(t: Tensor | None) -> bool:
    return t is not None and bool(torch.isfinite(t).all())


# ----------------------------------------------------------------------------- tests
def test_registry_finds_methods_and_exception_tables_name_real_methods():
    """The tables above must not go stale when a method is renamed or removed."""
    assert len(METHODS) >= 20
    for table in (HPARAMS, TRAIN_STEP_ONLY, SINGLE_TASK_ERRORS, NONFINITE_GAPS, NOT_PERMUTATION_EQUIVARIANT,
                  dict(STATE_VARIANTS)):
        assert set(table) <= set(METHODS), set(table) - set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_docs_methods_page_has_a_row_per_table(name):
    """docs/methods.md: needs, search space and decisions tables each have a row for the method."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert page.count(f"\n| `{name}` |") >= 3, f"add {name} to the tables of docs/methods.md"


@pytest.mark.parametrize("name", METHODS)
def test_training_loop_methods_are_documented(name):
    _, balancer = build(name, 2)
    assert uses_train_step(balancer) == (name in TRAIN_STEP_ONLY)
    if name in TRAIN_STEP_ONLY:  # a plain backward must say to use train_step, not misbehave
        model = TinyMTL(2)
        with pytest.raises(BalancerError, match="train_step"):
            backward_step(model, balancer, batches(1)[0])


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", METHODS)
def test_one_step_writes_finite_grads_and_weights(name, k):
    model, balancer = build(name, k)
    batch = batches(1)[0]
    if uses_train_step(balancer):
        before = [p.detach().clone() for p in model.parameters()]
        losses, info = train_step(model, balancer, make_optimizer(model, balancer), batch)
        assert losses.shape == (k,) and is_finite(losses)
        for p, old in zip(model.parameters(), before):  # every head took at least one group step
            assert is_finite(p) and not torch.equal(p.detach(), old)
    else:
        info = backward_step(model, balancer, batch)
        shared = model.shared()
        assert all(is_finite(p.grad) for p in shared), "non-finite or missing shared grad"
        assert any(bool(p.grad.abs().sum() > 0) for p in shared), "the shared gradient is exactly zero"
        for t, head in enumerate(model.task_params()):
            assert all(is_finite(p.grad) for p in head), f"head {t}: non-finite or missing grad"
        for p in balancer.parameters():  # learnable balancer parameters (UW) get a gradient too
            assert is_finite(p.grad)
    assert isinstance(info.weights, Tensor) and info.weights.shape == (k,) and is_finite(info.weights)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", METHODS)
def test_same_seed_is_bit_reproducible(name, k):
    runs = []
    for _ in range(2):
        model, balancer = build(name, k, seed=7)
        runs.append(drive(model, balancer, make_optimizer(model, balancer), batches(4, seed=1)))
    assert_identical(runs[0], runs[1], "steps")


def _state_cases():
    cases = [pytest.param(name, k, {}, id=f"{name}-{k}") for name in METHODS for k in KS]
    return cases + [pytest.param(name, 3, hp, id=f"{name}-3-" + "-".join(f"{a}={b}" for a, b in hp.items()))
                    for name, hp in STATE_VARIANTS]


@pytest.mark.parametrize(("name", "k", "hparams"), _state_cases())
def test_state_dict_round_trip_continues_identically(name, k, hparams):
    data = batches(6, seed=2)
    model, balancer = build(name, k, seed=3, **hparams)
    opt = make_optimizer(model, balancer)
    drive(model, balancer, opt, data[:5])  # two epochs (two on_epoch_end calls) + one step into the third

    buffer = io.BytesIO()  # the checkpoint goes through torch.save as in mtl_tune.search.trainable, and
    # back through torch.load with its safe default (weights_only=True: mtl_tune.checkpoint)
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model_b = copy.deepcopy(model)
    _, fresh = build(name, k, seed=12345, **hparams)  # another global seed: nothing may come from construction
    fresh.load_state_dict(state)
    opt_b = make_optimizer(model_b, fresh)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))  # else both share momentum buffers

    original = drive(model, balancer, opt, data[5:], first_epoch=2)
    resumed = drive(model_b, fresh, opt_b, data[5:], first_epoch=2)
    assert_identical(original, resumed, "next step")
    assert_identical(balancer.state_dict(), fresh.state_dict(), "state after the step")


@pytest.mark.parametrize(("name", "k", "hparams"), _state_cases())
def test_a_state_loaded_in_process_shares_nothing_with_its_source(name, k, hparams):
    """``fresh.load_state_dict(balancer.state_dict())`` without a file in between (a snapshot, a copy
    for evaluation) must leave two independent balancers, as ``nn.Module.load_state_dict`` does for
    parameters and buffers: stepping the copy may not change the source's state (private Adam
    moments, tracked gradients, warm starts are copied, not shared)."""
    data = batches(6, seed=2)
    model, balancer = build(name, k, seed=3, **hparams)
    opt = make_optimizer(model, balancer)
    drive(model, balancer, opt, data[:5])
    kept = copy.deepcopy(balancer.state_dict())
    model_b = copy.deepcopy(model)
    _, fresh = build(name, k, seed=12345, **hparams)
    fresh.load_state_dict(balancer.state_dict())
    opt_b = make_optimizer(model_b, fresh)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    drive(model_b, fresh, opt_b, data[5:], first_epoch=2)
    assert_identical(kept, balancer.state_dict(), "the source's state after its copy stepped")


@pytest.mark.parametrize("name", METHODS)
def test_single_task_is_a_finite_step_or_a_clear_error(name):
    if name in SINGLE_TASK_ERRORS:
        error, pattern = SINGLE_TASK_ERRORS[name]
        with pytest.raises(error, match=pattern) as info:
            model, balancer = build(name, 1)
            backward_step(model, balancer, batches(1)[0])
        assert name in str(info.value)
        return
    model, balancer = build(name, 1)
    if uses_train_step(balancer):
        losses, step = train_step(model, balancer, make_optimizer(model, balancer), batches(1)[0])
        assert all(is_finite(p) for p in model.parameters())
    else:
        step = backward_step(model, balancer, batches(1)[0])
        assert all(is_finite(p.grad) for p in model.parameters())
    assert step.weights.shape == (1,) and is_finite(step.weights)


def _nonfinite_params():
    out = []
    for name in METHODS:
        for bad in ("nan", "inf"):
            marks = []
            if name in NONFINITE_GAPS:
                error, reason = NONFINITE_GAPS[name]
                marks = [pytest.mark.xfail(raises=error, strict=True, reason=f"known gap: {reason}")]
            out.append(pytest.param(name, bad, marks=marks, id=f"{name}-{bad}"))
    return out


@pytest.mark.parametrize(("name", "bad"), _nonfinite_params())
def test_non_finite_loss_is_an_error_or_visible(name, bad):
    """Never a silently finite update: raise BalancerError naming the method, or leave NaN/inf in
    the shared grads (parameters for training-loop methods) or in the weights."""
    k = 3
    model, balancer = build(name, k)
    factors = torch.ones(k)
    factors[1] = float(bad)
    batch = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # solver-failure warnings are expected here
        try:
            if uses_train_step(balancer):
                opt = make_optimizer(model, balancer)
                _, info = balancer.train_step(lambda: forward(model, batch, factors), opt, model.shared(),
                                              model.task_params())
                values = [p.detach() for p in model.shared()]
            else:
                info = backward_step(model, balancer, batch, factors)
                values = [p.grad for p in model.shared() if p.grad is not None]
        except BalancerError as err:
            assert name in str(err)
            return
    assert not getattr(balancer, "checks_finite_losses", True), f"{name}: a {bad} loss did not raise BalancerError"
    visible = not all(is_finite(v) for v in values) or not is_finite(info.weights)
    assert visible, f"{name}: a {bad} loss produced a finite update and finite weights {info.weights.tolist()}"


@pytest.mark.parametrize("name", [m for m in METHODS if m not in NONFINITE_GAPS and m not in TRAIN_STEP_ONLY])
def test_a_refused_non_finite_loss_leaves_the_state_as_it_was(name):
    """A step that raises on a NaN loss changes nothing: a loop that catches the error and goes on
    (a skipped batch, as torch.amp's GradScaler skips one) continues as if the batch never came —
    e.g. FAMO's logits, DWA's loss window, a warm start must not take the NaN for good. Not for
    training-loop methods (STGU): a batch is several optimizer steps, and a NaN met in a later group's
    forward comes after earlier groups moved the model, which no balancer can undo; they raise."""
    k = 3
    model, balancer = build(name, k, **({"mode": "iteration", "window": 1} if name == "dwa" else {}))
    opt = make_optimizer(model, balancer)
    data = batches(3, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        drive(model, balancer, opt, data[:2])
        before = copy.deepcopy(balancer.state_dict())
        factors = torch.ones(k)
        factors[1] = float("nan")
        try:
            if uses_train_step(balancer):
                balancer.train_step(lambda: forward(model, data[2], factors), opt, model.shared(), model.task_params())
            else:
                backward_step(model, balancer, data[2], factors)
        except BalancerError:
            assert_identical(before, balancer.state_dict(), "the state after a refused step")
            return
    assert not getattr(balancer, "checks_finite_losses", True), f"{name}: a NaN loss did not raise BalancerError"


@pytest.mark.parametrize("name", [m for m in METHODS if m not in NOT_PERMUTATION_EQUIVARIANT])
def test_permuting_tasks_permutes_weights(name):
    """Relabelling the tasks is not information: weights follow the permutation and the shared
    gradient stays the same (up to solver round-off)."""
    k, perm = 3, [2, 0, 1]
    batch = batches(1, seed=4)[0]
    model, balancer = build(name, k, seed=5)
    info = backward_step(model, balancer, batch)
    model_p, balancer_p = build(name, k, seed=5)
    out = forward(model_p, batch)
    heads = model_p.task_params()
    info_p = balancer_p.backward(out.losses[perm], model_p.shared(), [heads[i] for i in perm], out.representation)
    torch.testing.assert_close(info_p.weights.double(), info.weights.double()[perm], rtol=1e-4, atol=1e-7)
    for p, q in zip(model.parameters(), model_p.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", METHODS)
def test_max_norm_bounds_the_shared_gradient(name):
    max_norm = 0.05  # far below every method's unclipped norm on this problem
    model, balancer = build(name, 3, max_norm=max_norm)
    if uses_train_step(balancer):  # the grads left after the last group step were clipped too
        train_step(model, balancer, make_optimizer(model, balancer), batches(1)[0])
    else:
        backward_step(model, balancer, batches(1)[0])
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.shared() if p.grad is not None))
    assert 0 < float(norm) <= max_norm * (1 + 1e-5)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in TRAIN_STEP_ONLY])
def test_a_shared_parameter_listed_twice_is_clipped_once(name):
    """Tied weights gathered from two modules list one tensor twice: the clipped gradient is the one
    of the list without the repeat (it used to count twice in the norm and be scaled twice)."""
    grads = []
    for twice in (False, True):
        model, balancer = build(name, 3, seed=2, max_norm=0.05)
        out = forward(model, batches(1)[0])
        shared = model.shared()
        balancer.backward(out.losses, shared + shared[:1] if twice else shared, model.task_params(), out.representation)
        grads.append([p.grad.clone() for p in model.shared()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in TRAIN_STEP_ONLY])
def test_losses_without_a_graph_or_not_a_tensor_are_a_clear_error(name):
    """Losses computed under no_grad (or detached), or a list of K losses: a BalancerError that says
    so — not torch's "does not require grad" from deep inside, nor (UW, IMTL-L) a step that trained
    only the balancer's own parameters and left the model's ``.grad`` empty."""
    model, balancer = build(name, 3)
    batch = batches(1)[0]
    with torch.no_grad():
        out = forward(model, batch)
    with pytest.raises(BalancerError, match=f"{name}: the losses are not attached to an autograd graph"):
        balancer.backward(out.losses, model.shared(), model.task_params(), out.representation)
    out = forward(model, batch)
    with pytest.raises(BalancerError, match=f"{name}: the losses are not attached"):
        balancer.backward(out.losses.detach(), model.shared(), model.task_params(), out.representation)
    with pytest.raises(BalancerError, match=rf"{name}: losses must be one tensor of shape \(3,\)"):
        balancer.backward(list(out.losses), model.shared(), model.task_params(), out.representation)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", [m for m in METHODS if m not in TRAIN_STEP_ONLY])
def test_no_parameter_that_requires_grad_is_a_clear_error(name):
    """shared_params empty (or only frozen / integer tensors): a ValueError that says so, from every
    method — loss methods too, where torch's "`inputs` argument to `backward()` cannot be empty"
    named no argument."""
    model, balancer = build(name, 3)
    out = forward(model, batches(1)[0])
    frozen = [p.detach() for p in model.shared()]
    for shared, heads in (([], []), (frozen, []), ([torch.zeros(3, dtype=torch.long)], None)):
        # representation-level methods and GradNorm say it as a BalancerError; ConsMTL first wants its heads
        with pytest.raises((ValueError, BalancerError),
                           match=rf"{name}: (no shared (or task )?parameter requires grad|task_params must be)|"
                                 "jacobian: no shared parameter requires grad"):
            balancer.backward(out.losses, shared, heads, out.representation)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in TRAIN_STEP_ONLY])
def test_backward_adds_to_existing_grads(name):
    """``backward`` accumulates like ``Tensor.backward`` (so extra regularisers compose)."""
    batch = batches(1)[0]
    model, balancer = build(name, 3, seed=9, max_norm=None)  # clipping acts on the sum: off here
    backward_step(model, balancer, batch)
    model_b, balancer_b = build(name, 3, seed=9, max_norm=None)
    for i, p in enumerate(model_b.parameters()):
        p.grad = torch.full_like(p, 0.25 * (i + 1))
    backward_step(model_b, balancer_b, batch)
    for i, (p, q) in enumerate(zip(model.parameters(), model_b.parameters())):
        torch.testing.assert_close(q.grad, p.grad + 0.25 * (i + 1), rtol=1e-6, atol=1e-6)


class SpyEngine(JacobianEngine):
    """Records which parameter lists the Jacobian is requested for."""

    def __init__(self) -> None:
        super().__init__("auto")
        self.requests: list[list[int]] = []

    def jacobian(self, losses: Tensor, params, retain_graph: bool = False, **kw) -> Tensor:
        self.requests.append([id(p) for p in params])
        return super().jacobian(losses, params, retain_graph=retain_graph, **kw)

    def gram(self, losses: Tensor, params, retain_graph: bool = True) -> Tensor:
        # the Gram path differentiates every task w.r.t. every shared parameter as well
        self.requests.append([id(p) for p in params])
        return super().gram(losses, params, retain_graph=retain_graph)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in TRAIN_STEP_ONLY])
def test_flags_are_truthful(name):
    """``needs_jacobian`` ⇔ the full shared-parameter Jacobian (K backward passes) is computed;
    ``needs_representation`` ⇒ a missing representation is a clear BalancerError."""
    engine = SpyEngine()
    model, balancer = build(name, 3, jacobian_engine=engine)
    backward_step(model, balancer, batches(1)[0])
    shared_ids = [id(p) for p in model.shared()]
    assert balancer_class(name).needs_jacobian == (shared_ids in engine.requests), engine.requests
    if balancer_class(name).needs_representation:
        model, balancer = build(name, 3)
        out = forward(model, batches(1)[0])
        with pytest.raises(BalancerError, match="representation"):
            balancer.backward(out.losses, model.shared(), model.task_params(), None)
