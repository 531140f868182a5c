"""Checks of the search arguments that need no Ray: numeric ranges, resources, storage, resume.

Every check raises :class:`SearchError` with one line naming the flag, the value and what
is allowed. :func:`check_cluster_resources` is the one check that runs after Ray started
(``--address``: only the cluster knows what it has).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any


class SearchError(ValueError):
    """A user mistake in the search arguments; the message says what is allowed."""


#: Ray's resource granularity (ray._raylet.RESOURCE_UNIT_SCALING = 10000)
RESOURCE_UNIT = 1e-4
#: (flag, field, lowest allowed value, type) for every numeric flag; None = unbounded
SEED_MAX = 2**32 - 1  # NumPy's and Optuna's seed range
NUMERIC_FLAGS: tuple[tuple[str, str, float, float | None], ...] = (
    ("--num-samples", "num_samples", 1, None),
    ("--epochs", "epochs", 1, None),
    ("--grace-period", "grace_period", 1, None),
    ("--gpus-per-trial", "gpus_per_trial", 0, None),
    ("--max-concurrent", "max_concurrent", 1, None),
    ("--num-cpus", "num_cpus", 1, None),
    ("--workers-per-trial", "workers_per_trial", 1, None),
    ("--seed", "seed", 0, SEED_MAX),
    ("--max-failures", "max_failures", 0, None),
    ("--seeds", "seeds", 0, None),
    ("--preferences", "preferences", 0, None),
)


def check_numbers(options: Any) -> None:
    """Every numeric flag within its range (``None`` = the flag's default behaviour)."""
    for flag, name, low, high in NUMERIC_FLAGS:
        value = getattr(options, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            allowed = f"at least {low:g}" + (f" and at most {high}" if high is not None else "")
            raise SearchError(f"{flag} {value if isinstance(value, int) else f'{value:g}'}: must be {allowed}")
    cpus = options.cpus_per_trial
    if not math.isfinite(cpus) or cpus <= 0:
        raise SearchError(f"--cpus-per-trial {cpus:g}: must be a number > 0 (fractions pack trials on a CPU)")
    gpus = options.gpus_per_trial
    for flag, value, zero in (("--cpus-per-trial", cpus, ""), ("--gpus-per-trial", gpus, "0 or ")):
        # Ray counts resources in units of 0.0001 and refuses a smaller non-zero request only
        # when the first trial is scheduled, after the sweep folder was written
        if 0 < value < RESOURCE_UNIT:
            raise SearchError(f"{flag} {value:g}: must be {zero}at least {RESOURCE_UNIT:g} (Ray's smallest "
                              "fraction of a resource)")
    if gpus > 1 and gpus != int(gpus):
        raise SearchError(f"--gpus-per-trial {gpus:g}: above 1 it must be a whole number (Ray packs only "
                          "fractions of a single GPU)")
    if options.scheduler == "asha" and options.epochs is not None and options.grace_period > options.epochs:
        raise SearchError(f"--grace-period {options.grace_period}: must be at most --epochs ({options.epochs})")


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask; what a container grants, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def local_gpus() -> int:
    """GPUs a local Ray cluster would see (CUDA_VISIBLE_DEVICES is honoured by torch too)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_resources(cpus_per_trial: float, gpus_per_trial: float, cpus: float, gpus: float, where: str) -> None:
    """A trial must fit on one node: raise SearchError naming what is available."""
    if cpus_per_trial > cpus:
        raise SearchError(f"--cpus-per-trial {cpus_per_trial:g}: {where} has {cpus:g} CPU(s) per node; "
                          f"ask for at most {cpus:g} (or raise --num-cpus on a local run)")
    if gpus_per_trial > gpus:
        hint = "use --gpus-per-trial 0 to train on CPUs" if gpus == 0 else f"ask for at most {gpus:g}"
        raise SearchError(f"--gpus-per-trial {gpus_per_trial:g}: {where} has {gpus:g} GPU(s) per node; {hint}")


def check_local_resources(options: Any) -> None:
    """Local cluster: its size is known before Ray starts (``--num-cpus`` or this machine);
    one node, so all the workers of a trial must fit on it together."""
    if options.address:
        return
    cpus = options.num_cpus or local_cpus()
    where = "this machine" if not options.num_cpus else f"the local cluster (--num-cpus {options.num_cpus})"
    gpus = local_gpus() if options.gpus_per_trial > 0 else 0
    check_resources(options.cpus_per_trial, options.gpus_per_trial, cpus, gpus, where)
    check_worker_total(options, cpus, gpus, where)


def check_worker_total(options: Any, cpus: float, gpus: float, where: str) -> None:
    """``--workers-per-trial N``: N workers of one trial together within ``cpus`` / ``gpus``."""
    n = int(getattr(options, "workers_per_trial", 1) or 1)
    if n <= 1:
        return
    if n * options.cpus_per_trial > cpus:
        raise SearchError(f"--workers-per-trial {n} × --cpus-per-trial {options.cpus_per_trial:g} = "
                          f"{n * options.cpus_per_trial:g} CPUs, but {where} has {cpus:g}; lower either, or use "
                          "fractional --cpus-per-trial")
    if n * options.gpus_per_trial > gpus:
        raise SearchError(f"--workers-per-trial {n} × --gpus-per-trial {options.gpus_per_trial:g} = "
                          f"{n * options.gpus_per_trial:g} GPUs, but {where} has {gpus:g}")


def check_data_parallel(options: Any, bench: Any, methods: list[str], spaces: dict[str, Any] | None = None) -> None:
    """``--workers-per-trial N > 1``: the benchmark can be split, every method averages across
    ranks, and the global batch divides into N equal per-worker batches."""
    from mtl_tune.registry import balancer_class

    n = int(options.workers_per_trial)
    if n <= 1:
        return
    flag = f"--workers-per-trial {n}"
    if bench.data_parallel is not True:
        raise SearchError(f"{flag}: benchmark {bench.name} cannot be split across workers: {bench.data_parallel}")
    refused = [m for m in methods if not balancer_class(m).supports_distributed]
    if refused:
        raise SearchError(f"{flag}: method(s) {', '.join(refused)} do not support data-parallel training "
                          "(their step is not defined on rank-averaged losses and gradients); run them with "
                          "--workers-per-trial 1")
    gpus = options.gpus_per_trial
    if 0 < gpus < 1:
        raise SearchError(f"{flag} with --gpus-per-trial {gpus:g}: the workers of a trial need a whole GPU each "
                          "(nccl runs one rank per device); use --gpus-per-trial 1 or more, or 0 for CPU workers")
    for method, space in (spaces or {}).items():  # a search-space file may declare the Gram path
        path = next((p for p in space.params if p.name == "gradient_path"), None)
        values = {space.constants().get("gradient_path")} | set((path.choices or ()) if path and path.searchable else ())
        if "gram" in values:
            raise SearchError(f"{flag}: {method}'s search space ({space.source}) allows gradient_path=gram, which is "
                              "not data-parallel correct (the Gram matrix of the rank-mean Jacobian needs the "
                              "Jacobian); use auto or jacobian")
    v2 = os.environ.get("RAY_TRAIN_V2_ENABLED")
    if v2 is not None and v2.lower() not in ("1", "true"):  # Ray reads any other value as "off"
        raise SearchError(f"{flag}: multi-worker trials use Ray Train V2 (a TorchTrainer inside each Tune trial), "
                          f"but RAY_TRAIN_V2_ENABLED={v2} switches it off; unset it or set it to 1")
    batch = options.config.get("batch_size", bench.defaults.get("batch_size"))
    if batch is None or int(batch) % n:
        raise SearchError(f"{flag}: batch_size {batch} (the global batch) is not divisible by {n}; each worker "
                          f"trains on batch_size / {n} samples; pass --config batch_size=<a multiple of {n}>")


def check_cluster_resources(options: Any) -> None:
    """``--address``: ask the running cluster for its largest node (Ray is initialised)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = max((float(r.get("CPU", 0)) for r in nodes), default=0.0)
    gpus = max((float(r.get("GPU", 0)) for r in nodes), default=0.0)
    where = f"the cluster at {options.address} ({len(nodes)} node(s))"
    check_resources(options.cpus_per_trial, options.gpus_per_trial, cpus, gpus, where)
    # the workers of one trial may sit on different nodes: together they need the cluster's total
    check_worker_total(options, sum(float(r.get("CPU", 0)) for r in nodes),
                       sum(float(r.get("GPU", 0)) for r in nodes), where)


#: longest file name (in bytes) of the usual file systems (ext4, xfs, btrfs, APFS, NTFS)
NAME_MAX_BYTES = 255


def check_name(name: str) -> None:
    """``--name`` is one folder below ``--storage-path``: a single path component, never a way out of it."""
    bad = (not name or name in (".", "..") or any(sep in name for sep in ("/", "\\"))
           or any(ord(ch) < 32 for ch in name))
    if bad:
        raise SearchError(f"--name {name!r} must be a single folder name (no '/', '\\', '..' or control "
                          "characters); the sweep is written to --storage-path/--name")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > NAME_MAX_BYTES:  # else an OSError "File name too long" traceback when the folder is made
        raise SearchError(f"--name {name[:40]!r}... is {size} bytes long; a folder name has at most "
                          f"{NAME_MAX_BYTES} bytes")


def check_epochs(options: Any) -> None:
    """``--epochs N`` and ``--config epochs=M`` name the same setting: refuse two different values
    (the trials would train M epochs while the scheduler and the grace-period check use N)."""
    if options.epochs is None or "epochs" not in options.config:
        return
    stored = options.config["epochs"]
    if stored != options.epochs:
        raise SearchError(f"--epochs {options.epochs} and --config epochs={stored} disagree; give the number of "
                          "epochs once (--epochs)")


def check_grace_period(options: Any) -> None:
    """ASHA's grace period within the epochs the trials run, wherever those were given
    (check_numbers covers --epochs; this covers --config epochs=M alone)."""
    epochs = options.config.get("epochs")
    if options.scheduler == "asha" and options.epochs is None and isinstance(epochs, int) \
            and options.grace_period > epochs:
        raise SearchError(f"--grace-period {options.grace_period}: must be at most --config epochs ({epochs})")


def check_preferences(preferences: int, methods: list[str], aware: list[str]) -> None:
    """``--preferences N`` sweeps task weights of preference-aware methods only: without one
    among ``methods`` it would run nothing and write an empty preferences.csv."""
    if preferences and not any(m in aware for m in methods):
        raise SearchError(f"--preferences {preferences}: none of --method {','.join(methods)} is preference-aware "
                          f"(takes task weights or preferences); preference-aware methods: {', '.join(aware)}")


def check_hypervolume_reference(bench: Any, metrics: list[str], preferences: bool) -> None:
    """A Pareto search of several methods (or with ``--seeds``) ranks them by hypervolume, and
    ``--preferences`` compares fronts by it: the benchmark must place a fixed reference point for
    those metrics, or the search failed after every trial had run (a MultiMNIST Pareto search did)."""
    from mtl_tune.analysis import reference_point

    wanted = list(metrics)
    if preferences:
        wanted += [f"val/{m.name}" for m in bench.primary_metrics() if f"val/{m.name}" not in wanted]
    try:
        reference_point(wanted, bench.name, bench.metrics)
    except ValueError as err:
        raise SearchError(f"{err}; the methods are compared by hypervolume, which needs a fixed reference point "
                          "for every objective: choose a scalar --objective, or one benchmark class with "
                          "reference_points for these metrics") from None


#: the driver's lock file inside a sweep folder (mtl_tune.search.lock); alone it is no search
LOCK_FILE = ".driver.lock"


def check_storage(sweep_dir: Path, resume: bool) -> None:
    """The sweep folder can be created (or resumed) without writing anything now."""
    if resume and not sweep_dir.is_dir():
        raise SearchError(f"--resume: {sweep_dir} does not exist; pass the --storage-path and --name of the search "
                          "to resume")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SearchError(f"--storage-path/--name: {sweep_dir} is a file, not a folder")
    if not resume and sweep_dir.exists() and any(p.name != LOCK_FILE for p in sweep_dir.iterdir()):
        raise SearchError(f"{sweep_dir} already holds a search; pass --resume to continue it or choose another --name")
    probe = sweep_dir
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise SearchError(f"--storage-path: {sweep_dir} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SearchError(f"--storage-path: {sweep_dir} is not writable (checked {probe})")
    import tempfile

    try:  # access() says yes to root everywhere, and /proc or sysfs refuse a folder anyway: try one, remove it
        os.rmdir(tempfile.mkdtemp(prefix=".mtl_tune-probe-", dir=probe))
    except OSError as err:
        raise SearchError(f"--storage-path: {sweep_dir} cannot be created: a folder in {probe} could not be made "
                          f"({err.strerror or err})") from None


def sqlite_url(path: Path) -> str:
    """``sqlite:////abs/path`` with the path percent-encoded: SQLAlchemy reads ``?`` as the start of
    the query and ``#`` / ``%`` as URL syntax, so an unencoded ``a?b/optuna.db`` opened ``a``."""
    from urllib.parse import quote

    return f"sqlite:///{quote(str(path))}"


def _check_rdb_url(spec: str) -> str:
    """An RDB URL that SQLAlchemy parses, whose database driver is installed and, for SQLite,
    whose file can be created; a relative SQLite file is pinned to this cwd (sweep.json records it)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = spec.split("://", 1)[0] + "://..."  # never echo a password
    try:
        url = make_url(spec)
        url.get_dialect()  # loads the dialect and its DBAPI module: an unknown scheme fails here, not in Ray
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as err:
        raise SearchError(f"--optuna-storage {shown}: not a usable database URL ({err}); give an RDB URL "
                          "(sqlite:///file.db, postgresql://...) or the path of a journal file") from None
    if url.get_backend_name() != "sqlite":
        return spec
    if not url.database or url.database == ":memory:":
        raise SearchError(f"--optuna-storage {spec}: an in-memory SQLite database is lost with the driver (and "
                          "--resume); name a file, e.g. sqlite:///studies.db")
    path = Path(url.database).expanduser().resolve()
    if path.is_dir():
        raise SearchError(f"--optuna-storage {spec}: {path} is a folder; name a database file")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise SearchError(f"--optuna-storage {spec}: folder {path.parent} does not exist or is not writable")
    return sqlite_url(path) if not url.query else spec


def check_optuna_storage(spec: str) -> str:
    """``--optuna-storage``: an RDB URL is checked (:func:`_check_rdb_url`); anything else is a journal
    file, returned as an absolute path whose folder must exist and be writable."""
    if "://" in spec:
        return _check_rdb_url(spec)
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        raise SearchError(f"--optuna-storage {spec}: is a folder; give an RDB URL (sqlite:///file.db, "
                          "postgresql://...) or the path of a journal file")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise SearchError(f"--optuna-storage {spec}: folder {path.parent} does not exist or is not writable")
    return str(path)


def is_own_storage(url: Any, sweep_name: str | None = None) -> bool:
    """Whether ``url`` is a sweep's default storage, the SQLite file ``<sweep>/optuna.db``
    (sweep.json files before this was recorded as null hold its absolute URL); with
    ``sweep_name`` None any folder name matches."""
    from urllib.parse import unquote

    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        return False
    path = Path(unquote(url[len("sqlite:///"):].split("?", 1)[0]))
    return path.name == "optuna.db" and sweep_name in (None, path.parent.name)


def previous_optuna_storage(sweep_dir: Path) -> str | None:
    """The Optuna storage the search being resumed chose with --optuna-storage, from its
    sweep.json; None for its own ``optuna.db`` (the default, also when absent), which is
    re-derived from where the sweep folder is now, so a moved or copied sweep uses its own."""
    try:
        info = json.loads((sweep_dir / "sweep.json").read_text())
        storage = info["optuna"]["storage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    args = info.get("args") if isinstance(info.get("args"), dict) else {}
    if "optuna_storage" in args and args["optuna_storage"] is None:
        return None  # no --optuna-storage: the default, wherever the folder is now
    if is_own_storage(storage, sweep_dir.name):  # older sweep.json: the default as an absolute URL
        return None
    if isinstance(storage, str) and "***" in storage:
        raise SearchError(f"--resume: this search keeps its Optuna studies in {storage}; pass that URL again with "
                          "--optuna-storage (its password is not stored in sweep.json)")
    return storage if isinstance(storage, str) else None


def previous_studies(sweep_dir: Path) -> dict[str, str]:
    """method → the Optuna study the search being resumed created (its sweep.json). The name holds the
    sweep's name when it was made: a sweep folder copied or renamed since keeps its studies."""
    try:
        studies = json.loads((sweep_dir / "sweep.json").read_text())["optuna"]["studies"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(studies, dict):
        return {}
    return {m: s for m, s in studies.items() if isinstance(m, str) and isinstance(s, str)}


# ---------------------------------------------------------------------------- --resume
#: fields that define a sweep: a resumed search must keep them (else the budget and the
#: comparison change under the user's feet); the others describe where and how it runs
SWEEP_FIELDS = ("benchmark", "methods", "num_samples", "objective", "sampler", "scheduler", "grace_period", "seed",
                "epochs", "synthetic", "search_space", "fixed", "config", "seeds", "preferences",
                "workers_per_trial")  # N workers: the same global batches, but the short last one cut to a multiple of N
#: SearchOptions field → CLI flag, for messages
FLAG_OF = {"methods": "--method", "fixed": "--set", "config": "--config", "wandb_project": "--wandb"}


def _normal(name: str, value: Any) -> Any:
    if name == "sampler":
        return value or "tpe"
    if name == "search_space" and value:  # a relative path, as older sweep.json files hold, from this cwd
        return str(Path(value).expanduser().resolve())
    return json.loads(json.dumps(value, default=str))  # tuples → lists, as stored in sweep.json


def resume_options(given: Any, explicit: set[str], stored_args: dict[str, Any] | None) -> Any:
    """Options of a resumed search: the stored ones, overridden by what was given explicitly.

    An explicitly given sweep-defining option that differs from the stored one is refused,
    listing every difference; run-environment options (resources, address, verbosity) may
    change."""
    if stored_args is None:  # killed before sweep.json was written: nothing ran yet
        return given
    known = {f.name for f in fields(given)}
    moved = _check_stored_space(stored_args.get("search_space"), "search_space" in explicit)
    differing = []
    for name in SWEEP_FIELDS:
        if name == "search_space" and moved:
            continue  # the recorded file is gone: the given one is its new location
        if name in explicit and name in stored_args and _normal(name, getattr(given, name)) != _normal(
                name, stored_args[name]):
            flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
            differing.append(f"{flag} {_normal(name, getattr(given, name))!r} (stored {stored_args[name]!r})")
    if differing:
        raise SearchError("--resume: these arguments differ from the stored search: " + "; ".join(differing) +
                          ". Drop them to reuse the stored ones, or start a new search with another --name")
    if "max_concurrent" in explicit and _normal("max_concurrent", given.max_concurrent) != _normal(
            "max_concurrent", stored_args.get("max_concurrent")):  # it would be ignored, silently
        raise SearchError(f"--resume: --max-concurrent {given.max_concurrent} differs from the stored search's "
                          f"({stored_args.get('max_concurrent') or 'the default: what the cluster fits'}); Tune "
                          "restores the concurrency limit with each method's searcher, so it cannot change on "
                          "--resume. Drop --max-concurrent")
    merged = {name: (getattr(given, name) if name in explicit or name not in stored_args else stored_args[name])
              for name in known}
    # the Optuna storage comes from sweep.json's "optuna" entry (previous_optuna_storage), which
    # refuses a password-masked URL instead of connecting with it
    merged.update(storage_path=given.storage_path, name=given.name, resume=True,
                  optuna_storage=getattr(given, "optuna_storage", None))
    return type(given)(**merged)


def _check_stored_space(stored: Any, given: bool) -> bool:
    """True when sweep.json names a --search-space file that no longer exists; without a new
    --search-space that is an error naming where the path came from."""
    if not stored or Path(stored).expanduser().is_file():
        return False
    if not given:
        raise SearchError(f"--resume: the search-space file {stored} recorded in sweep.json (the first run's "
                          "--search-space) does not exist from here; put it back, or pass --search-space with its "
                          "new location")
    return True


def stored_arguments(sweep_dir: Path) -> dict[str, Any] | None:
    """The ``args`` of ``sweep.json`` in ``sweep_dir`` (None when absent, which a search killed before
    its first method leaves). Absent beside experiments that ran (sweep.json is written before the
    first method starts): deleted since, so the sweep's methods, budget and objective are unknown — a
    SearchError, rather than resuming with whatever arguments were given (the defaults, if none)."""
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        ran = sorted(d.name for d in sweep_dir.iterdir() if (d / "tuner.pkl").is_file()) if sweep_dir.is_dir() else []
        if ran:
            raise SearchError(f"--resume: {path} is missing, but the sweep holds experiments that ran ({', '.join(ran)}); "
                              "it records the search's arguments (methods, budget, objective, ...): put it back")
        return None
    try:
        return dict(json.loads(path.read_text())["args"])
    except (ValueError, KeyError, TypeError) as err:
        raise SearchError(f"--resume: {path} is unreadable ({err}); it records the search's arguments") from None

#: the constructor arguments that make a method preference-aware (``--preferences`` sweeps them)
PREFERENCE_ARGS = ("task_weights", "preferences")


def preference_arg(method: str) -> str | None:
    """The method's preference argument (``task_weights`` / ``preferences``), or None."""
    import inspect

    from mtl_tune.registry import balancer_class

    params = inspect.signature(balancer_class(method).__init__).parameters
    return next((a for a in PREFERENCE_ARGS if a in params), None)
