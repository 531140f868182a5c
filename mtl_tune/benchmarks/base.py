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
* ``settings`` — the schema of every ``--config`` key (type, range, allowed values);
  :meth:`Benchmark.check_config` checks a configuration against it before Ray starts.
"""

from __future__ import annotations

import abc
import inspect
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from mtl_tune.metrics import MetricSpec

if TYPE_CHECKING:  # torch is imported where a run needs it: validating a search (the class's settings,
    # metrics, options and data check) must not pay seconds for it (tests/test_registry_names.py)
    import numpy as np
    import torch
    from torch import Tensor, nn

    from mtl_tune.balancers.base import ForwardOutput


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


def warn_test_only(benchmark: str, why: str) -> None:
    """Warn that a run evaluates only its test split (no validation split: ``why``), where selecting
    on its metrics leaks the test set; the dense benchmarks and MultiMNIST say it alike."""
    warnings.warn(f"{benchmark}: {why}. Any search that selects on 'test/...' metrics LEAKS the test set "
                  "into model selection.", UserWarning, stacklevel=3)


class ConfigError(ValueError):
    """A configuration value the run cannot use (same error on every retry). The message
    names the key, the value and what is allowed."""


KINDS = ("int", "float", "bool", "str", "ints", "mapping")


@dataclass(frozen=True)
class Setting:
    """Schema of one configuration key: its kind, range or allowed values.

    ``kind``: int, float, bool, str (optionally ``choices`` or a regular-expression
    ``pattern``), ints (a non-empty list of ints, each within the range) or mapping.
    ``low``/``high`` bound numbers (``open_low``: strictly above ``low``); ``nullable``
    lets ``none``/``null`` mean "the default behaviour".
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] = ()
    pattern: str | None = None
    nullable: bool = False
    help: str = ""

    def allowed(self) -> str:
        """What the key accepts, in words (for error messages and ``--help`` text)."""
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.pattern:
            text = f"a string matching {self.pattern}"
        elif self.kind in ("int", "float", "ints"):
            noun = {"int": "an integer", "float": "a number", "ints": "a list of integers"}[self.kind]
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
            if self.high is not None:
                bounds.append(f"{'<' if self.open_high else '<='} {self.high:g}")
            text = noun + (" " + " and ".join(bounds) if bounds else "")
        else:
            text = {"bool": "true or false", "mapping": "a mapping {key: value}", "str": "a string"}[self.kind]
        return text + (" or none" if self.nullable and "none" not in self.choices else "")

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is allowed, else why not (see :meth:`allowed`)."""
        if value is None or (self.nullable and isinstance(value, str) and value.lower() in ("none", "null")):
            return None if self.nullable else "a value is required"
        if self.choices:
            return None if value in self.choices else "not allowed"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "not true/false"
        if self.kind == "str":
            if not isinstance(value, str):
                return "not a string"
            return None if self.pattern is None or re.fullmatch(self.pattern, value) else "not allowed"
        if self.kind == "mapping":
            return None if isinstance(value, Mapping) else "not a mapping"
        items = value if self.kind == "ints" else [value]
        if self.kind == "ints" and (not isinstance(value, (list, tuple)) or not value):
            return "not a non-empty list"
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                return "not a number"
            if not math.isfinite(item):
                return "not finite"
            if self.kind in ("int", "ints") and int(item) != item:
                return "not an integer"
            if self.low is not None and (item < self.low or (self.open_low and item == self.low)):
                return "out of range"
            if self.high is not None and (item > self.high or (self.open_high and item == self.high)):
                return "out of range"
        return None


def _positive(kind: str, help: str = "") -> Setting:
    return Setting(kind, low=0, open_low=True, help=help)


#: settings of the generic trainer (mtl_tune.training.loop) that every benchmark accepts
TRAINER_SETTINGS: dict[str, Setting] = {
    "epochs": Setting("int", low=1, help="epochs per trial"),
    "lr": _positive("float", "learning rate"),
    "device": Setting("str", pattern=r"auto|cpu|mps|cuda(:\d+)?", nullable=True, help="torch device"),
    "method_params_lr": Setting("float", low=0, open_low=True, nullable=True,
                                help="learning rate of learnable balancer parameters"),
    "last_n_mean": Setting("int", low=0, help="average the test metrics of the last N epochs"),
    "deterministic": Setting("bool", help="cuDNN deterministic kernels"),
    "benchmark_options": Setting("mapping", help="constructor options of the benchmark"),
    "amp": Setting("str", choices=("none", "bf16"), nullable=True, help="bf16 autocast of the model"),
    "channels_last": Setting("bool", help="NHWC memory format for conv nets"),
}


@dataclass
class Setup:
    """Everything one training run of a benchmark needs (built by :meth:`Benchmark.build`)."""

    model: nn.Module
    shared_parameters: list[Tensor]
    task_parameters: list[list[Tensor]]
    #: ``train_batches(epoch)`` yields the batches of one training epoch. Two epochs' streams may be
    #: read at the same time (the trainer's second stream for ``needs_meta_batch`` methods, Auto-λ,
    #: is another epoch index, opened after the first stream drew its first batch).
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
    #: schema of the benchmark's own --config keys (the trainer's are :data:`TRAINER_SETTINGS`)
    settings: ClassVar[dict[str, Setting]] = {}
    #: environment variable that may hold the data root.
    data_env: ClassVar[str | None] = None
    #: True when results come from random tensors of the real shapes (throughput only).
    synthetic: bool = False
    #: Whether a trial may span several data-parallel workers (``--workers-per-trial``):
    #: the training batches are tensors (or tuples / lists / dicts of tensors) whose first
    #: dimension is the sample, so each worker can take an equal slice of every batch
    #: (:mod:`mtl_tune.training.data_parallel`). A string says why not.
    data_parallel: ClassVar[bool | str] = True
    #: fixed hypervolume reference values per bare metric name, in the metric's own units, for
    #: metrics the generic rules of :func:`mtl_tune.analysis.reference_point` cannot place
    #: (no STL baseline, not a relative drop); e.g. the toy's losses
    reference_points: ClassVar[dict[str, float]] = {}

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

    # ------------------------------------------------------------------ configuration
    @classmethod
    def all_settings(cls) -> dict[str, Setting]:
        return {**TRAINER_SETTINGS, **cls.settings}

    def check_config(self, config: Mapping[str, Any], flag: str = "--config") -> None:
        """Raise :class:`ConfigError` for an unknown key or a value outside its schema.

        Subclasses extend this for checks that relate keys or depend on the data found
        (call ``super().check_config`` first)."""
        schema = self.all_settings()
        for key, value in config.items():
            if key not in schema:
                raise ConfigError(f"{flag} {key}: not a setting of benchmark {self.name}; "
                                  f"valid: {', '.join(sorted(schema))}")
            if schema[key].problem(value) is not None:
                raise ConfigError(f"{flag} {key}={value!r}: {key} must be {schema[key].allowed()}")

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        """Build model, data and loss/eval functions for one run (seeded by the caller)."""

    def make_optimizer(self, params: Sequence[dict[str, Any]], config: dict[str, Any]) -> torch.optim.Optimizer:
        import torch

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

    @classmethod
    def declaration_problems(cls) -> list[str]:
        """What is wrong with the class's declarations (tasks, metrics, reference points), as
        sentences; empty for a sound class. The registry refuses a plug-in benchmark with any
        (a duplicate metric name made a Pareto search optimise one metric twice, a baseline of 0
        divided by zero in every trial, a metric of an unknown task counted as equal to STL)."""
        problems = []
        if not cls.tasks or len(set(cls.tasks)) != len(cls.tasks):
            problems.append(f"tasks must be distinct names, got {cls.tasks!r}")
        names = [getattr(m, "name", None) for m in cls.metrics]
        if not cls.metrics or not all(isinstance(m, MetricSpec) for m in cls.metrics):
            problems.append("metrics must be a non-empty tuple of MetricSpec")
            return problems
        if len(set(names)) != len(names):
            problems.append(f"metric names must be distinct, got {names}")
        for m in cls.metrics:
            if m.task not in cls.tasks and m.task != "all":
                problems.append(f"metric {m.name!r} measures task {m.task!r}, not one of {list(cls.tasks)} or 'all'")
            if m.baseline is not None and not (isinstance(m.baseline, (int, float)) and math.isfinite(m.baseline)
                                               and m.baseline != 0):
                problems.append(f"metric {m.name!r} has baseline {m.baseline!r}: a finite non-zero number or None "
                                "(relative drops divide by it)")
        unmeasured = [t for t in cls.tasks if not any(m.task == t for m in cls.metrics)]
        if unmeasured:
            problems.append(f"task(s) {unmeasured} have no metric (PIVRG's scores and Δm% would count them as STL)")
        if not any(m.primary for m in cls.metrics):
            problems.append("no metric is primary=True (one per task: the objectives of a Pareto search)")
        for key, value in cls.reference_points.items():
            if key not in names:
                problems.append(f"reference_points names {key!r}, which is not one of its metrics {names}")
            elif not (isinstance(value, (int, float)) and math.isfinite(value)):
                problems.append(f"reference_points[{key!r}] must be a finite number, got {value!r}")
        return problems

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

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{constructor argument: value}`` the benchmark imposes on every method whose constructor
        names that argument (e.g. ``min_losses``, a lower bound of each task's loss, for the
        log-loss methods), whatever the method; :func:`mtl_tune.registry.imposed_options` picks
        the ones a method takes. Keyed by argument, not by method name, so that a new method
        (a plug-in included) gets them without editing the benchmark."""
        return {}

    @classmethod
    def known_front(cls, config: Mapping[str, Any] | None = None) -> tuple[tuple[str, ...], np.ndarray] | None:
        """The true Pareto front when the benchmark knows it (an analytic problem such as the toy):
        ``(bare metric names of its columns, points (n, len(names)))``, drawn under the trials in
        front plots; None (the default) when it is unknown, as for every real data set."""
        return None
