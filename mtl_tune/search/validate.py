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


def check_name(name: str) -> None:
    """``--name`` is one folder below ``--storage-path``: a single path component, never a way out of it."""
    bad = (not name or name in (".", "..") or any(sep in name for sep in ("/", "\\"))
           or any(ord(ch) < 32 for ch in name))
    if bad:
        raise SearchError(f"--name {name!r} must be a single folder name (no '/', '\\', '..' or control "
                          "characters); the sweep is written to --storage-path/--name")


def check_storage(sweep_dir: Path, resume: bool) -> None:
    """The sweep folder can be created (or resumed) without writing anything now."""
    if resume and not sweep_dir.is_dir():
        raise SearchError(f"--resume: {sweep_dir} does not exist; pass the --storage-path and --name of the search "
                          "to resume")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SearchError(f"--storage-path/--name: {sweep_dir} is a file, not a folder")
    if not resume and sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise SearchError(f"{sweep_dir} already holds a search; pass --resume to continue it or choose another --name")
    probe = sweep_dir
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise SearchError(f"--storage-path: {sweep_dir} cannot be created: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SearchError(f"--storage-path: {sweep_dir} is not writable (checked {probe})")


def check_optuna_storage(spec: str) -> str:
    """``--optuna-storage``: an RDB URL is kept as given; anything else is a journal file,
    returned as an absolute path whose folder must exist and be writable."""
    if "://" in spec:
        if spec.startswith("sqlite:///") and not spec.startswith("sqlite:////"):
            relative = Path(spec[len("sqlite:///"):]).expanduser().resolve()
            return f"sqlite:///{relative}"  # recorded in sweep.json: pin a relative file to this cwd
        return spec
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        raise SearchError(f"--optuna-storage {spec}: is a folder; give an RDB URL (sqlite:///file.db, "
                          "postgresql://...) or the path of a journal file")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise SearchError(f"--optuna-storage {spec}: folder {path.parent} does not exist or is not writable")
    return str(path)


def previous_optuna_storage(sweep_dir: Path) -> str | None:
    """The Optuna storage recorded in the sweep.json of the search being resumed (None when absent)."""
    try:
        storage = json.loads((sweep_dir / "sweep.json").read_text())["optuna"]["storage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(storage, str) and "***" in storage:
        raise SearchError(f"--resume: this search keeps its Optuna studies in {storage}; pass that URL again with "
                          "--optuna-storage (its password is not stored in sweep.json)")
    return storage if isinstance(storage, str) else None


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
    return json.loads(json.dumps(value, default=str))  # tuples → lists, as stored in sweep.json


def resume_options(given: Any, explicit: set[str], stored_args: dict[str, Any] | None) -> Any:
    """Options of a resumed search: the stored ones, overridden by what was given explicitly.

    An explicitly given sweep-defining option that differs from the stored one is refused,
    listing every difference; run-environment options (resources, address, verbosity) may
    change."""
    if stored_args is None:  # killed before sweep.json was written: nothing ran yet
        return given
    known = {f.name for f in fields(given)}
    differing = []
    for name in SWEEP_FIELDS:
        if name in explicit and name in stored_args and _normal(name, getattr(given, name)) != _normal(
                name, stored_args[name]):
            flag = FLAG_OF.get(name, "--" + name.replace("_", "-"))
            differing.append(f"{flag} {_normal(name, getattr(given, name))!r} (stored {stored_args[name]!r})")
    if differing:
        raise SearchError("--resume: these arguments differ from the stored search: " + "; ".join(differing) +
                          ". Drop them to reuse the stored ones, or start a new search with another --name")
    merged = {name: (getattr(given, name) if name in explicit or name not in stored_args else stored_args[name])
              for name in known}
    # the Optuna storage comes from sweep.json's "optuna" entry (previous_optuna_storage), which
    # refuses a password-masked URL instead of connecting with it
    merged.update(storage_path=given.storage_path, name=given.name, resume=True,
                  optuna_storage=getattr(given, "optuna_storage", None))
    return type(given)(**merged)


def stored_arguments(sweep_dir: Path) -> dict[str, Any] | None:
    """The ``args`` of ``sweep.json`` in ``sweep_dir`` (None when absent)."""
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["args"])
    except (ValueError, KeyError, TypeError) as err:
        raise SearchError(f"--resume: {path} is unreadable ({err}); it records the search's arguments") from None
