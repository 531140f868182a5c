"""The generic trainer: one (benchmark, method, hyperparameters, seed) run, epoch by epoch.

It knows nothing about Ray: it calls ``report(metrics, state)`` once per epoch with a flat
dict of floats and the full training state (model, optimizer, scheduler, balancer, RNGs),
and accepts a state to resume from. :mod:`mtl_tune.search.trainable` adapts it to Ray
Tune (``tune.report`` + checkpoints); tests pass a list-appending reporter.

Reported keys (stable, flat): ``epoch``, ``epochs``, ``train/loss/<task>``,
``weights/<task>`` (mean balancer weight over the epoch), ``<split>/<metric>`` for each
evaluation split, ``<split>/delta_m`` when the benchmark has single-task baselines,
``test_last<N>/…`` (running mean of the last N test evaluations, papers' protocol),
``epoch_time_s``, ``solver_failures``, ``diverged`` (0/1), ``synthetic`` (0/1),
``resumed_from_epoch`` (0, or the checkpoint epoch a restarted trial continued from),
``best/test/…`` and ``best/epoch`` (test metrics at the best-validation epoch).

Failures are classified once (docs/reliability.md):

1. Divergence — a non-finite or overflowing loss, balancer output, parameter, optimizer
   state or objective metric (including overflow ``RuntimeError``/``OverflowError``) — ends
   the run with ``diverged = 1``, ``error`` text, and every metric replaced by a finite
   penalty in its worse direction, so a searcher learns "bad here" instead of receiving NaN
   (a NaN left in Optuna becomes a zombie RUNNING trial;
   docs/references.md#a-non-finite-objective-leaves-a-running-optuna-trial).
2. Bad data or configuration met at run time (:class:`DataError`, :class:`ConfigError`:
   the same error would recur on a retry) is raised to the caller;
   :func:`failure_metrics` gives the one final result the search reports for it.
3. Anything else propagates (the search's retry policy decides).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from mtl_tune.checkpoint import MismatchedCheckpointError, from_plain, to_plain
from mtl_tune.balancers.base import BalancerError, EpochInfo, ForwardOutput
from mtl_tune.benchmarks.base import ConfigError
from mtl_tune.metrics import delta_m, task_scores
from mtl_tune.registry import benchmark_class, get_balancer, get_benchmark, imposed_options
from mtl_tune.spaces import decode_hparams

Reporter = Callable[[dict[str, Any], dict[str, Any] | None], None]

#: finite stand-in for a diverged metric: worse than any real value in its direction.
PENALTY = 1.0e6
#: steps between the trainer's divergence checks inside an epoch (each is one host sync)
CHECK_EVERY = 50
#: the second stream of training batches (``needs_meta_batch``, Auto-λ) of epoch e is the
#: benchmark's ``train_batches(META_EPOCH_OFFSET + e)``: the same training set in another order,
#: fixed by the trial seed and the epoch like the first (so resumed runs repeat it)
META_EPOCH_OFFSET = 1 << 20


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, update or metric."""


#: phrases of numeric-overflow errors raised by torch / NumPy / Python inside a run
_OVERFLOW = ("overflow", "non-finite", "math range error")


def is_divergence(err: BaseException) -> bool:
    """Failure class 1: the run's numbers blew up (not the data, not the machine)."""
    if isinstance(err, (DivergedError, BalancerError, OverflowError, FloatingPointError)):
        return True
    return isinstance(err, RuntimeError) and any(p in str(err).lower() for p in _OVERFLOW)


def nonfinite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Name of the first parameter or optimizer-state tensor holding NaN/inf, else None
    (one host sync when everything is finite)."""
    named = [(f"parameter {n}", p) for n, p in model.named_parameters()]
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    named.append((f"optimizer state {key} (group {group_index}, parameter {param_index})", value))
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all().to("cpu", non_blocking=True) for _, t in named])
    if bool(flags.all()):
        return None
    return next(name for (name, _), ok in zip(named, flags.tolist()) if not ok)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def metric_directions(bench, splits: tuple[str, ...], last_n: int) -> dict[str, str]:
    """Every reported metric key with its mode ("min"/"max")."""
    keys: dict[str, str] = {}
    prefixes = list(splits) + ([f"test_last{last_n}"] if last_n and "test" in splits else [])
    for prefix in prefixes:
        for spec in bench.metrics:
            keys[f"{prefix}/{spec.name}"] = spec.mode
        if bench.has_baselines():
            keys[f"{prefix}/delta_m"] = "min"
    key, mode = bench.default_objective()  # may be a derived metric such as val/mean_f1
    keys.setdefault(key, mode)
    if "test" in splits:
        keys.update({f"best/{k}": m for k, m in list(keys.items()) if k.startswith("test/")})
    return keys


def failure_metrics(config: dict[str, Any], err: BaseException, epoch: int = 0) -> dict[str, Any]:
    """The single final result of a run that failed on bad data or configuration (class 2):
    ``failed = 1``, the error text and finite penalties for every objective a search may
    use (a search must still receive its metrics; the searcher tells it FAIL)."""
    cls = benchmark_class(config["benchmark"])
    # metric metadata lives on the class; __init__ (which may itself have failed) is not needed
    bench = object.__new__(cls)
    directions = metric_directions(bench, ("val", "test"), 0)
    epochs = config.get("epochs", cls.defaults.get("epochs", 1))
    return penalised({"epoch": float(epoch), "epochs": float(epochs), "failed": 1.0, "diverged": 0.0,
                      "error": f"{type(err).__name__}: {err}"}, directions)


def penalised(metrics: dict[str, Any], directions: dict[str, str]) -> dict[str, Any]:
    out = dict(metrics)
    for key, mode in directions.items():
        value = out.get(key)
        if value is None or not math.isfinite(float(value)):
            out[key] = PENALTY if mode == "min" else -PENALTY
    return out


class Trainer:
    """Builds a run from a trial config and trains it; see the module docstring."""

    def __init__(self, config: dict[str, Any]) -> None:
        bench = get_benchmark(config["benchmark"], data_root=config.get("data_root"),
                              synthetic=bool(config.get("synthetic", False)),
                              **dict(config.get("benchmark_options") or {}))
        self.bench = bench
        self.config = {**bench.defaults, **{k: v for k, v in config.items() if v is not None}}
        cfg = self.config
        self.device = resolve_device(cfg.get("device"))
        seed_everything(int(cfg.get("seed", 0)))
        # the official trainers' setting (slower convolutions on GPU); set both ways, as a reused
        # Tune actor runs several trials in one process
        torch.backends.cudnn.deterministic = bool(cfg.get("deterministic"))
        torch.backends.cudnn.benchmark = False
        self.setup = bench.build(cfg, self.device)
        amp = cfg.get("amp")
        if amp not in (None, False, "none", "bf16"):
            raise ConfigError(f"amp must be 'bf16' or none, got {amp!r}")
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        if cfg.get("channels_last"):  # conv nets: NHWC kernels are faster on tensor cores
            self.setup.model.to(memory_format=torch.channels_last)
        self.hparams = decode_hparams(cfg.get("hparams"), bench.n_tasks)
        extra = imposed_options(cfg["method"], bench, cfg)
        try:
            self.balancer = get_balancer(cfg["method"], bench.n_tasks, **{**extra, **self.hparams})
        except (TypeError, ValueError) as err:  # the constructor rejects a hyperparameter: same on every retry
            raise ConfigError(f"{cfg['method']} with {self.hparams}: {err}") from err
        self.balancer.to(self.device)
        groups: list[dict[str, Any]] = [{"params": list(self.setup.model.parameters())}]
        groups.extend(self._balancer_groups(config))
        self.optimizer = bench.make_optimizer(groups, cfg)
        self.scheduler = bench.make_scheduler(self.optimizer, cfg)
        self.epoch = 0
        self.epochs = int(cfg["epochs"])
        self.last_n = int(cfg.get("last_n_mean", 0) or 0)
        self.test_history: deque[dict[str, float]] = deque(maxlen=max(self.last_n, 1))
        self.directions = metric_directions(bench, self.setup.eval_splits, self.last_n)
        self.best_value: float | None = None
        self.best_metrics: dict[str, float] = {}

    def _balancer_groups(self, user_config: dict[str, Any]) -> list[dict[str, Any]]:
        """Param groups for learnable balancer parameters (UW's log-variances).

        A group that brings its own learning rate (UW's searchable ``lr``) keeps it unless the
        trial config sets ``method_params_lr``; a group without one gets ``method_params_lr``
        or the official trainers' 0.025.
        """
        lr = user_config.get("method_params_lr")
        groups = [dict(g) for g in self.balancer.param_groups()]
        for g in groups:
            if lr is not None or "lr" not in g:
                g["lr"] = float(lr if lr is not None else 0.025)
        return groups

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.setup.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "test_history": list(self.test_history),
            "best": {"value": self.best_value, "metrics": dict(self.best_metrics)},
            "rng": {"python": random.getstate(), "numpy": to_plain(np.random.get_state()), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; :class:`~mtl_tune.checkpoint.MismatchedCheckpointError`
        when it does not fit this trial (the same at every retry: the trial fails once, with why)."""
        try:
            epoch = int(state["epoch"])
            if not 0 <= epoch <= self.epochs:
                raise ValueError(f"it is at epoch {epoch}, outside this run's 0…{self.epochs}")
            self._load_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            lines = str(err).strip().splitlines()
            why = f"it has no {err.args[0]!r}" if isinstance(err, KeyError) and err.args else \
                f"{type(err).__name__}: {lines[0] if lines else err!r}"
            raise MismatchedCheckpointError(
                "the checkpoint does not fit this trial (written by another benchmark, method or configuration, "
                f"or not a trainer state): {why}") from err

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.setup.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.balancer.load_state_dict(state["balancer"])
        self.test_history = deque(state["test_history"], maxlen=max(self.last_n, 1))
        self.best_value, self.best_metrics = state["best"]["value"], dict(state["best"]["metrics"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(from_plain(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ training
    def _forward(self, batch: Any) -> ForwardOutput:
        """The benchmark's forward, under bf16 autocast when ``amp="bf16"``.

        Only the model runs in bf16: the losses are cast to float32 before any balancer sees
        them, and the per-task gradients / solvers stay in float32/float64. fp16 is not
        offered: its loss scaling would rescale every task's gradient, which changes the
        answer of scale-dependent balancers (FairGrad, PIVRG, CAGrad's trust region)."""
        if self.amp_dtype is None:
            return self.setup.forward(batch)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
            out = self.setup.forward(batch)
        return ForwardOutput(out.losses.float(), out.representation)

    def train_epoch(self) -> dict[str, float]:
        setup, bench = self.setup, self.bench
        k = bench.n_tasks
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        weight_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        steps = 0
        setup.model.train()
        meta = self._meta_batches() if self.balancer.needs_meta_batch else None
        for batch in setup.train_batches(self.epoch):
            if meta is not None:
                self._meta_step(batch, next(meta))
            losses, info = self.balancer.train_step(lambda b=batch: self._forward(b), self.optimizer,
                                                    setup.shared_parameters, setup.task_parameters)
            loss_sum += losses.detach().to(loss_sum.dtype)
            weight_sum += info.weights.detach().to(device=self.device, dtype=weight_sum.dtype)
            steps += 1
            # one host sync every CHECK_EVERY steps: stop a diverged run early, not at epoch end
            if steps % CHECK_EVERY == 0 and not bool(torch.isfinite(self._across_ranks(loss_sum)).all()):
                raise DivergedError(f"non-finite training loss within the first {steps} steps of epoch {self.epoch + 1}")
        if steps == 0:
            raise ValueError(f"{bench.name}: the training split yielded no batch")
        # one host sync per epoch, not per step
        mean_losses = (self._across_ranks(loss_sum) / steps).cpu()
        if not bool(torch.isfinite(mean_losses).all()):
            raise DivergedError(f"non-finite training loss {mean_losses.tolist()}")
        # a huge gradient can leave the loss finite but the parameters or Adam's moments inf
        broken = nonfinite_state(setup.model, self.optimizer)
        if broken:
            raise DivergedError(f"non-finite {broken} after epoch {self.epoch + 1}")
        metrics = {f"train/loss/{t}": float(v) for t, v in zip(bench.tasks, mean_losses)}
        metrics.update({f"weights/{t}": float(v) for t, v in zip(bench.tasks, (weight_sum / steps).cpu())})
        self._train_losses = mean_losses
        return metrics

    def _meta_batches(self) -> Iterator[Any]:
        """The epoch's second stream of training batches, for a balancer with ``needs_meta_batch``.

        A generator: the benchmark's ``train_batches`` for it is only called at the first ``next``,
        after the epoch's own stream drew its first batch (benchmarks that reseed one shared
        shuffling generator per call have drawn that stream's order by then). Restarts if it runs
        out before the epoch does."""
        while True:
            empty = True
            for batch in self.setup.train_batches(META_EPOCH_OFFSET + self.epoch):
                empty = False
                yield batch
            if empty:
                raise ValueError(f"{self.bench.name}: the second training stream yielded no batch")

    def _meta_step(self, batch: Any, meta_batch: Any) -> None:
        """The balancer's :meth:`~mtl_tune.balancers.base.Balancer.meta_step` before the step on
        ``batch``. Its extra forwards run in training mode, like the step's; the model's buffers
        (BatchNorm's running statistics) are put back afterwards, so that only the training step's
        own forward moves them, as for every other method."""
        model = self.setup.model
        buffers = list(model.buffers())
        kept = [b.detach().clone() for b in buffers]
        self.balancer.meta_step(lambda: self._forward(batch), lambda: self._forward(meta_batch), self.optimizer,
                                self.setup.shared_parameters, self.setup.task_parameters)
        with torch.no_grad():
            for b, old in zip(buffers, kept):
                b.copy_(old)

    def _across_ranks(self, per_rank_sum: torch.Tensor) -> torch.Tensor:
        """The mean over data-parallel ranks (one process: the tensor itself); see
        :mod:`mtl_tune.training.data_parallel`."""
        return per_rank_sum

    def evaluate(self) -> dict[str, float]:
        bench = self.bench
        self.setup.model.eval()
        out: dict[str, float] = {}
        first_values: dict[str, float] | None = None
        with torch.no_grad():
            for split in self.setup.eval_splits:
                values = {k: float(v) for k, v in self.setup.evaluate(split).items()}
                first_values = values if first_values is None else first_values
                out.update({f"{split}/{k}": v for k, v in values.items()})
                if bench.has_baselines():
                    out[f"{split}/delta_m"] = delta_m(values, bench.metrics)
                if split == "test" and self.last_n:
                    self.test_history.append(values)
                    mean = {k: float(np.mean([h[k] for h in self.test_history])) for k in values}
                    out.update({f"test_last{self.last_n}/{k}": v for k, v in mean.items()})
                    if bench.has_baselines():
                        out[f"test_last{self.last_n}/delta_m"] = delta_m(mean, bench.metrics)
        for key in self.directions:
            if key in out and not math.isfinite(out[key]):
                raise DivergedError(f"non-finite metric {key} = {out[key]}")
        self._first_split_values = first_values or {}
        self._track_best(out)
        return out

    def _track_best(self, out: dict[str, float]) -> None:
        """Test metrics at the best-validation epoch (CelebA / QM9 papers' reported number):
        ``best/test/<metric>`` and ``best/epoch``, by the benchmark's default objective."""
        key, mode = self.bench.default_objective()
        if key not in out or not any(k.startswith("test/") for k in out):
            return
        value = out[key]
        if self.best_value is None or (value < self.best_value if mode == "min" else value > self.best_value):
            self.best_value = value
            self.best_metrics = {f"best/{k}": v for k, v in out.items() if k.startswith("test/")}
            self.best_metrics["best/epoch"] = float(self.epoch + 1)
        out.update(self.best_metrics)

    def run(self, report: Reporter) -> None:
        """Train the remaining epochs, reporting after each; divergence ends the run cleanly."""
        # resumed_from_epoch: the epoch this process started at (> 0 after a restart from a checkpoint)
        base = {"epochs": float(self.epochs), "synthetic": float(self.bench.synthetic),
                "resumed_from_epoch": float(self.epoch)}
        if "data_source" in self.setup.extras:  # e.g. multi_mnist: real MNIST files or sklearn digits
            base["data_source"] = str(self.setup.extras["data_source"])
        while self.epoch < self.epochs:
            start = time.perf_counter()
            try:
                metrics = self.train_epoch()
                metrics.update(self.evaluate())
                self.bench.scheduler_step(self.scheduler, metrics)
                scores = None
                if self.bench.has_baselines() and self._first_split_values:
                    scores = torch.tensor(task_scores(self._first_split_values, self.bench.metrics, self.bench.tasks))
                # inside the try: epoch-level methods (DWA) may reject the epoch's losses
                self.balancer.on_epoch_end(EpochInfo(epoch=self.epoch, train_losses=self._train_losses, scores=scores))
            except (RuntimeError, OverflowError, FloatingPointError) as err:
                if not is_divergence(err):
                    raise
                failed = penalised({**base, "epoch": float(self.epoch + 1), "diverged": 1.0,
                                    "solver_failures": float(self._solver_failures()), "error": f"{type(err).__name__}: {err}"},
                                   self.directions)
                report(failed, None)
                return
            self.epoch += 1
            metrics.update(base)
            metrics.update({"epoch": float(self.epoch), "epoch_time_s": time.perf_counter() - start, "diverged": 0.0,
                            "solver_failures": float(self._solver_failures())})
            report(metrics, self.state_dict())

    def _solver_failures(self) -> int:
        return int(self.balancer.failures.total)


def train(config: dict[str, Any], report: Reporter, resume_state: dict[str, Any] | None = None) -> Trainer:
    """Train one configuration; ``resume_state`` (a ``Trainer.state_dict()``) continues a run."""
    trainer = Trainer(config)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
    trainer.run(report)
    return trainer
