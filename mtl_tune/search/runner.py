"""Run a search: one Ray Tune experiment (with its own Optuna study) per method.

Each method gets the same trial budget on the same benchmark and seeds, in its own
folder ``<storage>/<name>/<method>/``; the tidy table, ``sweep.json`` and the Pareto plot
are written to ``<storage>/<name>/``. Validation happens in :func:`prepare` before Ray
starts, so user mistakes cost no compute.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl_tune.registry import available_balancers, available_benchmarks, benchmark_class, check_names, imposed_options
from mtl_tune.spaces import SearchSpace, load_space
from mtl_tune.search.validate import (
    SearchError, check_data_parallel, check_epochs, check_grace_period, check_hypervolume_reference,
    check_local_resources, check_name, check_numbers, check_optuna_storage, check_preferences, check_storage,
    previous_optuna_storage, previous_studies,
)

if TYPE_CHECKING:  # the benchmarks import torch: loaded by prepare(), not by `--help` or a name check
    from mtl_tune.benchmarks.base import Benchmark

__all__ = ["Plan", "SearchError", "SearchOptions", "prepare", "sweep_dir_of"]


@dataclass
class SearchOptions:
    benchmark: str = "toy"
    methods: list[str] = field(default_factory=lambda: ["ls", "mgda", "pcgrad", "cagrad", "famo"])
    num_samples: int = 4
    objective: str = "pareto"
    sampler: str | None = None
    scheduler: str = "fifo"
    grace_period: int = 1
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    max_concurrent: int | None = None
    storage_path: str = "results"
    name: str | None = None
    seed: int = 0
    epochs: int | None = None
    data_root: str | None = None
    synthetic: bool = False
    address: str | None = None
    num_cpus: int | None = None
    resume: bool = False
    search_space: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    verbose: int = 1
    seeds: int = 0
    preferences: int = 0
    wandb_project: str | None = None
    optuna_storage: str | None = None


@dataclass
class Plan:
    """A validated search: what runs, where, with which objective."""

    options: SearchOptions
    bench: Benchmark
    spaces: dict[str, SearchSpace]
    metrics: list[str]
    modes: list[str]
    sweep_dir: Path
    name: str
    #: method → Optuna study of a resumed search (from its sweep.json; the sweep may have been renamed since)
    studies: dict[str, str] = field(default_factory=dict)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def optuna_storage(self) -> str:
        """Where the Optuna studies live: ``--optuna-storage`` (an RDB URL or a journal file)
        or, by default, the SQLite file ``optuna.db`` in the sweep folder."""
        from mtl_tune.search.searcher import default_storage_url

        return self.options.optuna_storage or default_storage_url(self.sweep_dir)

    def study_name(self, method: str) -> str:
        """One Optuna study per method, named ``<sweep>/<method>`` inside the storage (a resumed search:
        the name it was created with)."""
        return self.studies.get(method, f"{self.name}/{method}")


def _objective(bench: Benchmark, objective: str) -> tuple[list[str], list[str]]:
    specs = {m.name: m for m in bench.metrics}
    if objective == "pareto":
        primary = bench.primary_metrics()
        if len(primary) < 2:
            raise SearchError(f"benchmark {bench.name} has fewer than two primary metrics; use a scalar --objective")
        return [f"val/{m.name}" for m in primary], [m.mode for m in primary]
    if objective in ("default", "", None):
        key, mode = bench.default_objective()
        name = key[4:] if isinstance(key, str) and key.startswith("val/") else None
        expected = "min" if name == "delta_m" and bench.has_baselines() else \
            specs[name].mode if name in specs else None
        if expected is None or mode != expected:  # a plug-in's: every trial would fail on Tune's metric check
            raise SearchError(f"benchmark {bench.name}: its default_objective() gives {(key, mode)!r}, which is not "
                              "'val/<one of its metrics>' with that metric's direction (min/max); fix the class, or "
                              f"pass --objective with one of: {', '.join(specs)}")
        return [key], [mode]
    name = objective.split("/", 1)[1] if "/" in objective and objective.split("/", 1)[0] in ("val", "test") else objective
    split = objective.split("/", 1)[0] if name != objective else "val"
    if split == "test":
        raise SearchError("tuning on test metrics leaks the test set; use a val/ metric as --objective")
    valid = (["pareto"] if len(bench.primary_metrics()) >= 2 else []) + ["default"] + \
        (["delta_m"] if bench.has_baselines() else []) + list(specs)
    if name == "delta_m":
        if not bench.has_baselines():
            raise SearchError(f"benchmark {bench.name} has no single-task baselines, so no delta_m; "
                              f"valid objectives: {', '.join(v for v in valid if v != 'delta_m')}")
        return ["val/delta_m"], ["min"]
    if name not in specs:
        raise SearchError(f"unknown objective {objective!r} for benchmark {bench.name}; valid: {', '.join(valid)}")
    return [f"val/{name}"], [specs[name].mode]


def sweep_dir_of(options: SearchOptions) -> Path | None:
    """``<storage>/<name>`` (None while no --name is given: a fresh name is made later)."""
    if not options.name:
        return None
    check_name(options.name)
    return Path(options.storage_path).expanduser().resolve() / options.name


def make_benchmark(options: SearchOptions) -> Benchmark:
    """The benchmark with the constructor options the trials will use (``benchmark_options``),
    so the pre-flight data check sees exactly what the trials read."""
    from mtl_tune.benchmarks.base import TRAINER_SETTINGS, ConfigError, DataError

    cls = benchmark_class(options.benchmark)
    extra = options.config.get("benchmark_options") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"--config benchmark_options={extra!r}: benchmark_options must be "
                          f"{TRAINER_SETTINGS['benchmark_options'].allowed()}, e.g. benchmark_options={{data_check: full}}")
    try:  # unknown options are refused by Benchmark.__init__
        return cls(data_root=options.data_root, synthetic=options.synthetic, **extra)
    except DataError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--config benchmark_options={extra!r}: {err}") from None


def prepare(options: SearchOptions) -> Plan:
    """Validate everything that can be checked without Ray; raise SearchError, SpaceError,
    ConfigError or DataError (one line naming the flag or file, the value and what is allowed)."""
    check_numbers(options)
    if options.scheduler not in ("fifo", "asha", "hyperband"):
        raise SearchError(f"--scheduler must be fifo, asha or hyperband, got {options.scheduler!r}")
    if options.resume and not options.name:
        raise SearchError("--resume needs the --name (and --storage-path) of the search to continue")
    if options.name is not None:  # "" (an unset shell variable) would quietly mean a new timestamped name
        check_name(options.name)
    if options.objective == "":
        raise SearchError("--objective is empty; give pareto, default or a metric name (see --help)")
    methods = available_balancers() if options.methods == ["all"] else list(dict.fromkeys(options.methods))
    if not methods:
        raise SearchError("--method needs at least one method name")
    check_names("method", methods)  # from the modules' source: fails before torch loads
    check_names("benchmark", [options.benchmark])
    if options.search_space and len(methods) != 1:
        raise SearchError("--search-space replaces one method's space; use it with a single --method")
    if options.fixed and len(methods) != 1:
        raise SearchError("--set fixes hyperparameters of one method; use it with a single --method")
    if options.search_space:  # sweep.json records it: absolute, so --resume from another cwd finds the same file
        options.search_space = str(Path(options.search_space).expanduser().resolve())
    bench = make_benchmark(options)
    bench.check_config(options.config)
    check_epochs(options)
    check_grace_period(options)
    metrics, modes = _objective(bench, options.objective)
    val_fraction = options.config.get("val_fraction", bench.defaults.get("val_fraction"))
    if val_fraction is not None and float(val_fraction) == 0 and any(m.startswith("val/") for m in metrics):
        raise SearchError(f"--config val_fraction=0 leaves {bench.name} without a validation split, so the "
                          f"search objective {metrics} is never reported (and tuning on test/ metrics leaks the "
                          "test set); keep val_fraction > 0 for a search, or train one configuration with "
                          "val_fraction=0 for the papers' protocol")
    if options.scheduler != "fifo" and len(metrics) > 1:
        raise SearchError("early-stopping schedulers need a scalar objective; with --objective pareto use "
                          "--scheduler fifo (Tune has no multi-objective scheduler)")
    if options.preferences and len(bench.primary_metrics()) < 2:
        raise SearchError(f"--preferences needs a benchmark with at least two tasks; {bench.name} has one primary metric")
    if options.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SearchError('--wandb needs the wandb package: pip install "mtl_tune[wandb]"') from None
    if options.workers_per_trial <= 1:  # several workers: check_data_parallel's reasons come first (below)
        check_local_resources(options)
    name = options.name or f"{bench.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_name(name)
    sweep_dir = Path(options.storage_path).expanduser().resolve() / name
    from mtl_tune.search.lock import check_unlocked

    check_unlocked(sweep_dir)  # a driver still running this sweep: refused before any other message
    check_storage(sweep_dir, options.resume)
    if options.optuna_storage:
        options.optuna_storage = check_optuna_storage(options.optuna_storage)
    elif options.resume:  # the restored searchers keep writing where the first run chose
        options.optuna_storage = previous_optuna_storage(sweep_dir)
    # up to here nothing imported torch (the benchmark's class declares its settings, metrics and data
    # check without it): argument and data errors answer in well under a second. The search spaces are
    # checked by building each method, which loads torch.
    bench.check_data()
    spaces = {}
    for m in methods:
        space = load_space(m, bench.name, options.search_space)
        spaces[m] = space.with_fixed(options.fixed) if options.fixed else space
        spaces[m].check_for(bench.n_tasks, bench.name, imposed_options(m, bench, options.config))
    check_data_parallel(options, bench, methods, spaces)
    if options.preferences:
        from mtl_tune.search.validate import preference_arg

        check_preferences(options.preferences, methods, [m for m in available_balancers() if preference_arg(m)])
    if (len(metrics) > 1 and (len(methods) > 1 or options.seeds)) or options.preferences:
        check_hypervolume_reference(bench, metrics if len(metrics) > 1 else [], bool(options.preferences))
    if options.workers_per_trial > 1:
        check_local_resources(options)
    # the full scan, once, in the driver, after the argument checks: a plug-in that does not load
    # is an error here (the trials look up only their own method and benchmark, balancer_class)
    available_balancers(), available_benchmarks()
    if options.address:
        check_address(options.address)
    return Plan(options=options, bench=bench, spaces=spaces, metrics=metrics, modes=modes,
                sweep_dir=sweep_dir, name=name, studies=previous_studies(sweep_dir) if options.resume else {})


def check_address(address: str) -> None:
    """Fail fast when ``--address`` names no reachable Ray head (``ray.init`` would retry for minutes)."""
    if address.startswith("ray://"):
        return  # Ray Client: connection errors surface quickly on their own
    target = address
    if address == "auto":
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        target = os.environ.get("RAY_ADDRESS") or (current.read_text().strip() if current.is_file() else "")
        if not target or target == "auto":
            raise SearchError("--address auto: no running Ray cluster found on this machine; start one with "
                              "`ray start --head` or pass host:port of the head node")
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5) as conn:
            speaks_grpc = _speaks_http2(conn)
    except (OSError, ValueError) as err:
        raise SearchError(f"--address {address}: could not connect to a Ray cluster at {target} ({err}); start one "
                          "with `ray start --head` or pass host:port of a running head node") from None
    if not speaks_grpc:  # ray.init would retry against it for minutes
        raise SearchError(f"--address {address}: {target} accepts connections but is not a Ray head node (no gRPC "
                          "answer); pass host:port of the head's GCS (`ray start --head` prints it, default port 6379)")


#: HTTP/2's client preface and an empty SETTINGS frame: what a gRPC client sends first
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _speaks_http2(conn: socket.socket) -> bool:
    """Whether the server answers HTTP/2's preface with a SETTINGS frame, as Ray's GCS (a gRPC
    server) does; another service (an HTTP/1 server, a database) answers otherwise or not at all.
    With TLS (RAY_USE_TLS) the plain preface cannot be answered: not probed."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    try:
        conn.sendall(_H2_PREFACE)
        head = conn.recv(9)
    except OSError:
        return False
    return len(head) >= 4 and head[3] == 0x04


def trial_constants(plan: Plan, method: str) -> dict[str, Any]:
    o = plan.options
    const: dict[str, Any] = {"benchmark": plan.bench.name, "method": method, "seed": o.seed,
                             "synthetic": o.synthetic, "cpus_per_trial": o.cpus_per_trial}
    if o.workers_per_trial > 1:  # a Ray Train run per trial (search/data_parallel.py); N = 1 adds nothing
        const.update(workers_per_trial=o.workers_per_trial, gpus_per_trial=o.gpus_per_trial)
    if o.epochs is not None:
        const["epochs"] = o.epochs
    if o.data_root or plan.bench.data_env:
        # resolved once, here on the driver (flag, else the benchmark's variable), as an absolute
        # path: trials run in their own cwd, on nodes whose environment may differ ("" = none)
        const["data_root"] = type(plan.bench).resolve_root(o.data_root) or ""
    const.update(o.config)
    return const


def sweep_info(plan: Plan) -> dict[str, Any]:
    from mtl_tune.search.searcher import public_storage_url

    args = asdict(plan.options)
    if args.get("optuna_storage"):
        args["optuna_storage"] = public_storage_url(args["optuna_storage"])
    return {
        "name": plan.name, "benchmark": plan.bench.name, "methods": list(plan.spaces),
        "objective": {"metrics": plan.metrics, "modes": plan.modes},
        "metric_specs": [asdict(m) for m in plan.bench.metrics], "tasks": list(plan.bench.tasks),
        "synthetic": plan.options.synthetic,
        "optuna": {"storage": public_storage_url(plan.optuna_storage), "studies": {m: plan.study_name(m) for m in plan.spaces}},
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "args": args,
    }
