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
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtl_tune.balancers.base import ForwardOutput
from mtl_tune.metrics import MetricSpec


#: values of the ``data_check`` benchmark option: how much of the data the pre-flight check reads
#: ("headers": every file's header / size plus the values of a few files; "full": every value)
DATA_CHECKS = ("headers", "full")
_WORKER_PREFIX = "Caught DataError in DataLoader worker"


class DataError(ValueError):
    """A missing, partial or malformed data set. The message names the path and layout.

    Raised in a ``DataLoader`` worker, torch re-raises it in the main process as
    ``DataError("Caught DataError in DataLoader worker process k.\nOriginal Traceback …")``;
    the constructor keeps only the original message, so the first line still names the file.
    """

    def __init__(self, message: str = "", *args: Any) -> None:
        super().__init__(_original_message(message), *args)


def _original_message(message: Any) -> Any:
    """The message a worker raised, out of torch's worker re-raise text (else unchanged)."""
    if not (isinstance(message, str) and message.startswith(_WORKER_PREFIX)):
        return message
    marker = f"{DataError.__module__}.DataError: "
    at = message.rfind(marker)
    return message[at + len(marker):].strip() if at >= 0 else message


def data_check_level(value: Any) -> str:
    """Validate the ``data_check`` benchmark option (see :data:`DATA_CHECKS`)."""
    if value not in DATA_CHECKS:
        raise ValueError(f"benchmark option data_check must be one of {', '.join(DATA_CHECKS)}, got {value!r}")
    return str(value)


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
        if options:  # a misspelt option must not be ignored silently
            valid = ", ".join(self.option_names()) or "none"
            raise ValueError(f"unknown benchmark option(s) {', '.join(sorted(options))} for {self.name}; "
                             f"valid: {valid}")
        self.data_root = data_root
        self.synthetic = synthetic

    @classmethod
    def option_names(cls) -> list[str]:
        """The benchmark options (constructor keywords besides data_root and synthetic)."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is Benchmark:
                continue
            for p in inspect.signature(init).parameters.values():
                if (p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                        and p.name not in ("self", "data_root", "synthetic") and p.name not in names):
                    names.append(p.name)
        return sorted(names)

    @classmethod
    def resolve_root(cls, data_root: str | None) -> str | None:
        """The absolute data root: ``data_root``, else the variable :attr:`data_env` of the
        environment of *this* process, else None.

        The search calls this once on the driver and passes the result in every trial's
        config (``""`` when there is none), so trials on other nodes never read their own
        environment: ``""`` means "resolved: no data root" and skips the variable.
        """
        if data_root is None and cls.data_env:
            data_root = os.environ.get(cls.data_env) or None
        return os.path.abspath(os.path.expanduser(data_root)) if data_root else None

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

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """``{method: constructor arguments}`` a benchmark imposes (e.g. FAMO's min_losses)."""
        return {}
