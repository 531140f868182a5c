"""Spread method runs over a small process pool, longest first.

Work unit = one method variant with all its inits in lockstep (the forward pass is shared),
or one init alone when the method is expensive enough that splitting it evens out the
workers (solver-based methods, > 1/(4·workers) of the estimated total) or when it runs on
the reference path anyway (training-loop methods). Costs are
estimated by timing a few steps of each method in the parent; units then go to the pool
longest-first (the LPT rule, makespan ≤ 4/3 of optimal). Results do not depend on the
grouping: every init is seeded on its own (see :func:`toy.engine.run_lockstep`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from toy.engine import EngineConfig, MethodSpec, RunResult, run_method, uses_reference

PROBE_STEPS = 25


@dataclass(frozen=True)
class Unit:
    spec: MethodSpec
    inits: tuple[int, ...]
    cost: float  # estimated seconds


def probe_cost(spec: MethodSpec, inits: Sequence[int], cfg: EngineConfig) -> float:
    """Seconds per init and step, from a few steps of a throw-away run (all inits in lockstep,
    so the shared forward is amortised as in the real run; one init for per-init methods)."""
    probe_inits = [inits[0]] if uses_reference(spec, cfg) else list(inits)
    start = time.perf_counter()
    run_method(replace(spec, iters=PROBE_STEPS), probe_inits, cfg)
    return (time.perf_counter() - start) / (PROBE_STEPS * len(probe_inits))


def plan_units(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig, workers: int,
               costs: dict[str, float]) -> list[Unit]:
    """Units sorted longest first; a method whose share exceeds 1/(4·workers) of the total is split per init
    (so that no single unit dominates the makespan; splitting only costs the shared forward pass)."""
    total = sum(costs[s.label] * s.iters * len(inits) for s in specs)
    units: list[Unit] = []
    for s in specs:
        per_init = costs[s.label] * s.iters
        heavy = per_init * len(inits) > total / (4 * workers)
        if (heavy and workers > 1) or uses_reference(s, cfg):
            units.extend(Unit(s, (i,), per_init) for i in inits)
        else:
            units.append(Unit(s, tuple(inits), per_init * len(inits)))
    return sorted(units, key=lambda u: -u.cost)


def _init_worker() -> None:
    torch.set_num_threads(1)  # tensors here have 2–10 entries: threads only add contention


def _run_unit(args: tuple[Unit, EngineConfig]) -> list[RunResult]:
    unit, cfg = args
    return run_method(unit.spec, unit.inits, cfg)


def run_all(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig, workers: int = 2,
            log: Callable[[str], None] | None = None) -> list[RunResult]:
    """Run every spec from every init; results ordered as ``specs`` × ``inits``."""
    say = log or (lambda _msg: None)
    if not specs:
        return []
    workers = max(1, int(workers))
    if workers > 1:
        run_method(replace(specs[0], iters=2), [3], cfg)  # warm up imports/allocators before timing
        costs = {s.label: probe_cost(s, inits, cfg) for s in specs}
        say("probe, µs per step and init: " + ", ".join(f"{k} {1e6 * v:.0f}" for k, v in costs.items()))
    else:
        costs = {s.label: 1.0 for s in specs}
    units = plan_units(specs, inits, cfg, workers, costs)
    say(f"{len(units)} work units on {workers} process(es); estimated CPU time "
        f"{sum(u.cost for u in units):.0f} s" if workers > 1 else f"{len(units)} work units in-process")
    results: list[RunResult] = []
    if workers == 1 or len(units) == 1:
        for u in units:
            results.extend(_run_unit((u, cfg)))
            say(f"  done {u.spec.label} inits {list(u.inits)}")
    else:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with mp.get_context(method).Pool(min(workers, len(units)), initializer=_init_worker) as pool:
            for done in pool.imap_unordered(_run_unit, [(u, cfg) for u in units], chunksize=1):
                results.extend(done)
                say(f"  done {done[0].label} inits {[r.init_index for r in done]} "
                    f"({sum(r.seconds for r in done):.1f} s)")
    order = {s.label: k for k, s in enumerate(specs)}
    return sorted(results, key=lambda r: (order[r.label], r.init_index))
