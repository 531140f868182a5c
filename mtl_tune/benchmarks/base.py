"""The benchmark interface: tasks, model, data, losses, metrics and training defaults.

A benchmark is one file in this package with a :class:`Benchmark` subclass; the
registry finds it by its ``name``. The generic trainer (:mod:`mtl_tune.training.loop`)
drives every benchmark through the same small surface:

* ``check_data()`` — validate the on-disk data *before* any trial starts; raise
  :class:`DataError` naming the path, the expected layout and where to get the data.
* ``build(seed, device)`` → :class:`Setup` — model, the shared / per-task parameter split,
  the training batches of an epoch, the forward pass that returns K losses (and the head
  representations), and the evaluation of a split.
* ``make_optimizer`` / ``make_scheduler`` / ``scheduler_step`` — the papers' training
  protocol (overridable through the trial config).
* ``metrics`` — every reported metric with its direction, STL baseline and task.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtl_tune.balancers.base import ForwardOutput
from mtl_tune.metrics import MetricSpec


class DataError(ValueError):
    """A missing, partial or malformed data set. The message names the path and layout."""


@dataclass
class Setup:
    """Everything one training run of a benchmark needs (built by :meth:`Benchmark.build`)."""

    model: nn.Module
    shared_parameters: list[Tensor]
    task_parameters: list[list[Tensor]]
    #: ``train_batches(epoch)`` yields the batches of one training epoch.
    train_batches: Callable[[int], Iterable[Any]]
    #: ``forward(batch)`` returns the K task losses (and head inputs) for a batch.
    forward: Callable[[Any], ForwardOutput]
    #: ``evaluate(split)`` returns ``{metric name: value}`` for ``split`` (e.g. "val", "test").
    evaluate: Callable[[str], dict[str, float]]
    #: splits evaluated each epoch; the first one is what searches tune on.
    eval_splits: tuple[str, ...] = ("val",)
    extras: dict[str, Any] = field(default_factory=dict)


class Benchmark(abc.ABC):
    """Base class of every benchmark (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()
    #: training defaults (the papers' protocol); a trial config may override any key.
    defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "lr": 1e-3, "batch_size": 32}
    #: environment variable that may hold the data root.
    data_env: ClassVar[str | None] = None
    #: True when results come from random tensors of the real shapes (throughput only).
    synthetic: bool = False

    def __init__(self, data_root: str | None = None, synthetic: bool = False, **options: Any) -> None:
        self.data_root = data_root
        self.synthetic = synthetic
        self.options = options

    # ------------------------------------------------------------------ data
    def check_data(self) -> None:
        """Raise :class:`DataError` if the data set is missing or malformed. Default: no data."""

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        """Build model, data and loss/eval functions for one run (seeded by the caller)."""

    def make_optimizer(self, params: Sequence[dict[str, Any]], config: dict[str, Any]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=float(config["lr"]))

    def make_scheduler(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        return None

    def scheduler_step(self, scheduler: Any, epoch_metrics: dict[str, float]) -> None:
        if scheduler is not None:
            scheduler.step()

    # ------------------------------------------------------------------ metadata
    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def primary_metrics(self) -> list[MetricSpec]:
        return [m for m in self.metrics if m.primary]

    def has_baselines(self) -> bool:
        return bool(self.metrics) and all(m.baseline is not None for m in self.metrics)

    def default_objective(self) -> tuple[str, str]:
        """(metric key, mode) a single-objective search optimises by default."""
        if self.has_baselines():
            return "val/delta_m", "min"
        first = self.primary_metrics()[0]
        return f"val/{first.name}", first.mode

    def seed_changes_results(self, config: dict[str, Any]) -> bool:
        """Whether the trial seed changes anything with these settings (model init, data order);
        a benchmark without randomness returns False, so seed re-runs are reported as repeats."""
        return True

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """``{method: constructor arguments}`` a benchmark imposes (e.g. FAMO's min_losses)."""
        return {}
