"""How many trials a search runs at once by default: what fits on the cluster's nodes.

The limit matters beyond throughput. Each method's Optuna searcher sits behind Tune's
``ConcurrencyLimiter``, and Tune lets a searcher keep as many trials pending as that limit: a
limit above what can actually run makes Optuna suggest trials that only wait, each chosen
without the results of those before it (TPE then samples nearly blind). So the default is
counted from the resources Ray reports for the cluster it is connected to — the local one or
``--address`` — node by node, since a single-process trial's CPUs and GPUs are on one node:

    Σ_nodes min(⌊CPU / cpus⌋, ⌊GPU / gpus⌋ (gpus > 0), ⌊memory / TRIAL_PROCESS_MEMORY⌋)

A trial with N workers (``--workers-per-trial``) spreads them over nodes (their own placement
group), so it counts worker slots the same way and divides by N. ``--max-concurrent`` overrides
all of it, e.g. for an autoscaling cluster whose nodes do not exist yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: resident memory a trial process holds at least (Python, torch, Ray and the trainable's imports:
#: ≈ 0.5 GiB idle, a toy trial peaks at ≈ 0.8 GiB). Never more trial processes on a node than its
#: Ray ``memory`` resource holds at this size: a fractional ``--cpus-per-trial 0.01`` would
#: otherwise start a hundred torch processes per CPU and exhaust the machine's memory
TRIAL_PROCESS_MEMORY = float(2**30)


def _whole(available: float, per_trial: float) -> float:
    """Whole trials of ``per_trial`` in ``available`` (∞ when a trial needs none); the tolerance
    keeps 1 ÷ (1/3) at 3."""
    if per_trial <= 0:
        return math.inf
    return math.floor(available / per_trial + 1e-9)


def trials_that_fit(nodes: Iterable[Mapping[str, float]], cpus: float, gpus: float, workers: int = 1,
                    process_memory: float = TRIAL_PROCESS_MEMORY) -> int:
    """Trials (at least 1) that run at once on ``nodes`` (each node's Ray resources: ``CPU``, ``GPU``,
    ``memory`` in bytes), each trial being ``workers`` processes of ``cpus`` CPUs and ``gpus`` GPUs."""
    slots = 0.0
    for node in nodes:
        slots += min(_whole(float(node.get("CPU", 0.0)), cpus), _whole(float(node.get("GPU", 0.0)), gpus),
                     _whole(float(node.get("memory", math.inf)), process_memory))
    if math.isinf(slots):  # a trial that needs nothing countable: Tune's own limits decide
        return 1
    return max(1, int(slots) // max(1, workers))


_NOTED: set[tuple[int, int]] = set()


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every live node of the Ray cluster this process is connected to."""
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def fitting_trials(options: Any) -> int:
    """The default number of trials at once for these options, on the connected cluster; says so
    when memory, not CPUs or GPUs, is what limits it."""
    nodes = cluster_nodes()
    workers = max(1, options.workers_per_trial)
    limit = trials_that_fit(nodes, options.cpus_per_trial, options.gpus_per_trial, workers)
    by_devices = trials_that_fit(nodes, options.cpus_per_trial, options.gpus_per_trial, workers, process_memory=0.0)
    if limit < by_devices and (limit, by_devices) not in _NOTED:
        _NOTED.add((limit, by_devices))  # once per search, not once per method
        print(f"note: {limit} trials at once, not the {by_devices} that --cpus-per-trial {options.cpus_per_trial:g} "
              f"would pack: Ray's memory resource holds {limit} trial processes of "
              f"{TRIAL_PROCESS_MEMORY / 2**30:g} GiB; --max-concurrent sets the number")
    return limit
