"""Spread method runs over a small process pool with even loads.

Work items: a method variant with a batched kernel (fast path: all its inits are rows of one
kernel), a method variant with all its inits in lockstep, or one init alone when the
method is expensive enough that splitting evens out the workers (lockstep methods over
1/(4·workers) of the estimated total) or runs on the reference path anyway. Costs are
estimated by timing a few steps of each item in the parent; items are then packed into one
bin per worker longest-first (the LPT rule, makespan ≤ 4/3 of optimal) and each worker runs
its bin: all its fast items in **one** :func:`toy.fast.run_fast` (they share the landscape
evaluation and the Adam step), then its other items. Results do not depend on the grouping:
every init is seeded on its own and rows of the fast engine do not interact (tested).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace

import torch

from .engine import EngineConfig, MethodSpec, RunResult, run_fast, run_method, uses_fast, uses_reference
from .report import DEFAULT_TOL, measure_runs

PROBE_STEPS = 25
FAST_PROBE_STEPS = 300


@dataclass(frozen=True)
class Unit:
    spec: MethodSpec
    inits: tuple[int, ...]
    cost: float  # estimated seconds
    fast: bool = False


@dataclass
class Bin:
    """What one worker runs: fast units together, the others one by one."""

    units: list[Unit] = field(default_factory=list)
    cost: float = 0.0


def probe_cost(spec: MethodSpec, inits: Sequence[int], cfg: EngineConfig) -> float:
    """Seconds per init and step of a lockstep/reference method (fast ones: :func:`probe_fast`), from a
    few steps of a throw-away run (all inits in lockstep, so the shared forward is amortised as in
    the real run; one init for per-init methods)."""
    probe_inits = [inits[0]] if uses_reference(spec, cfg) else list(inits)
    start = time.perf_counter()
    run_method(replace(spec, iters=PROBE_STEPS), probe_inits, cfg)
    return (time.perf_counter() - start) / (PROBE_STEPS * len(probe_inits))


def probe_fast(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig) -> dict[str, float]:
    """Seconds per init and step of every fast-path spec, from one short run of all of them together
    (as they will run: the shared landscape and Adam amortised, each kernel timed on its own).

    The probe takes 10× the run's Adam step so that its few hundred steps cover the ground of a few
    thousand: some kernels are slower in the first phase of a run (IMTL's exact path for nearly
    parallel gradients from (0, 0) and (9, 9)), which a probe at the real step size would mistake
    for the method's cost."""
    fast = [replace(s, iters=FAST_PROBE_STEPS) for s in specs if uses_fast(s, cfg)]
    if not fast:
        return {}
    out: dict[str, list[float]] = {}
    for r in run_fast(fast, list(inits), replace(cfg, lr=10 * cfg.lr)):
        out.setdefault(r.label, []).append(r.seconds / FAST_PROBE_STEPS)
    return {label: sum(v) / len(v) for label, v in out.items()}


def plan_units(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig, workers: int,
               costs: dict[str, float]) -> list[Unit]:
    """Units sorted longest first; a lockstep method whose share exceeds 1/(4·workers) of the total is
    split per init (so that no single unit dominates the makespan; splitting only costs the shared
    forward pass). Fast units are never split: their inits are rows of one vectorised kernel."""
    total = sum(costs[s.label] * s.iters * len(inits) for s in specs)
    units: list[Unit] = []
    for s in specs:
        per_init = costs[s.label] * s.iters
        if uses_fast(s, cfg):
            units.append(Unit(s, tuple(inits), per_init * len(inits), fast=True))
            continue
        heavy = per_init * len(inits) > total / (4 * workers)
        if (heavy and workers > 1) or uses_reference(s, cfg):
            units.extend(Unit(s, (i,), per_init) for i in inits)
        else:
            units.append(Unit(s, tuple(inits), per_init * len(inits)))
    return sorted(units, key=lambda u: -u.cost)


def pack(units: Sequence[Unit], workers: int) -> list[Bin]:
    """LPT: each unit (longest first) goes to the bin with the least work so far; empty bins dropped."""
    bins = [Bin() for _ in range(max(1, workers))]
    for u in sorted(units, key=lambda u: -u.cost):
        b = min(bins, key=lambda b: b.cost)
        b.units.append(u)
        b.cost += u.cost
    return [b for b in bins if b.units]


def init_worker() -> None:
    torch.set_num_threads(1)  # tensors here have 2–10 entries: threads only add contention


def worker_pool(processes: int) -> ProcessPoolExecutor:
    """The toy's process pool (the trajectory bins here, the figures in toy.trajectories): an
    executor, so a worker that dies (the OOM killer, a kill) raises BrokenProcessPool instead of a
    multiprocessing Pool's wait for its lost work; forked on Linux, with one torch thread per worker
    (the parent has used torch's OpenMP pool, and a forked child that enters it hangs)."""
    context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(processes, mp_context=context, initializer=init_worker)


def _run_bin(args: tuple[Bin, EngineConfig, float]) -> list[RunResult]:
    b, cfg, tol = args
    fast = [u for u in b.units if u.fast]
    out: list[RunResult] = []
    # fast units of a bin share one lockstep; they all have the same inits (never split)
    if fast:
        out.extend(run_fast([u.spec for u in fast], list(fast[0].inits), cfg))
    for u in b.units:
        if not u.fast:
            out.extend(run_method(u.spec, u.inits, cfg))
    measure_runs(out, cfg.scale, tol)   # what the table needs of the distances, here rather than in the parent
    return out


def run_all(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig, workers: int = 2,
            log: Callable[[str], None] | None = None, tol: float = DEFAULT_TOL) -> list[RunResult]:
    """Run every spec from every init; results ordered as ``specs`` × ``inits``, each measured for the
    table with the "reached the front" distance ``tol``."""
    say = log or (lambda _msg: None)
    if not specs:
        return []
    workers = max(1, int(workers))
    if workers > 1:
        run_method(replace(specs[0], iters=2), [inits[0]], cfg)  # warm up imports/allocators before timing
        costs = probe_fast(specs, inits, cfg)
        costs.update({s.label: probe_cost(s, inits, cfg) for s in specs if s.label not in costs})
        say("probe, µs per step and init: " + ", ".join(f"{k} {1e6 * v:.0f}" for k, v in costs.items()))
    else:
        costs = {s.label: 1.0 for s in specs}
    units = plan_units(specs, inits, cfg, workers, costs)
    bins = pack(units, workers)
    n_fast = sum(u.fast for u in units)
    say(f"{len(units)} work units ({n_fast} on the fast engine) in {len(bins)} process(es)"
        + (f"; estimated CPU time {sum(u.cost for u in units):.0f} s" if workers > 1 else ""))
    results: list[RunResult] = []
    if len(bins) == 1:
        results.extend(_run_bin((bins[0], cfg, tol)))
    else:
        with worker_pool(len(bins)) as pool:
            for job in as_completed([pool.submit(_run_bin, (b, cfg, tol)) for b in bins]):
                done = job.result()
                results.extend(done)
                say(f"  worker done: {len({r.label for r in done})} method variant(s), "
                    f"{sum(r.cpu_seconds for r in done):.1f} s CPU")
    order = {s.label: k for k, s in enumerate(specs)}
    return sorted(results, key=lambda r: (order[r.label], r.init_index))
