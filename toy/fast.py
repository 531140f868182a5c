"""The fast path: many methods, variants and inits in one NumPy lockstep.

Rows = (method variant, init) pairs of every spec handed in. Per step: one evaluation of the
losses and the analytic Jacobian at all rows (:func:`toy.landscape.toy_value_and_jacobian`,
whose cost hardly depends on the number of rows), one call per method variant of its kernel
(:mod:`toy.kernels`) on its block of rows, and one Adam step on all rows (Adam is
element-wise: one Adam on (N, 2) is N independent Adams). Training-loop kernels (STGU) move
their rows themselves. The protocol is the lockstep path's (:mod:`toy.engine`): the same
seeds per init, loss shift, epoch hook and post-step losses, and the kernels are tested to
give the same trajectories as the public balancer API (``tests/test_toy_kernels.py``).

Rows of methods with other iteration counts (FAMO's 50 000) keep stepping until their own
count; a row that fails (solver failures in a row, a non-finite update) is frozen and its
table row says when and why, exactly as on the other paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtl_tune.balancers._rows import gram_rows

from .common import EngineConfig, MethodSpec, RunResult, loss_floor, make_balancer, seed_all, start_point
from .kernels import Kernel, NumpyAdam, clip_rows, combine, kernel_for
from .landscape import gap_scores, toy_value_and_jacobian, toy_values


@dataclass
class _Group:
    """One kernel instance and its contiguous block of rows."""

    kernel: Kernel
    rows: slice
    iters: int
    shift: np.ndarray                 # (B, 2) subtracted from the losses the kernel sees
    results: list[RunResult]
    seconds: float = 0.0


def has_kernel(spec: MethodSpec) -> bool:
    """Whether ``spec`` can run on the fast engine: its method has a kernel that supports these
    hyperparameters (hyperparameters the method itself rejects count as yes: the fast path
    then lists the variant as skipped, with the balancer's error, like the other paths)."""
    cls = kernel_for(spec.name)
    if cls is None:
        return False
    try:
        balancer = make_balancer(spec)
    except Exception:
        return True
    return cls.unsupported(balancer) is None


def _shift(spec: MethodSpec, cfg: EngineConfig) -> np.ndarray:
    return loss_floor(cfg.scale) if cfg.shift and "min_losses" not in spec.hparams else np.zeros(2)


def _build(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig
           ) -> tuple[list[_Group], list[RunResult], list[tuple[float, float]]]:
    """One kernel per (variant, iters); specs whose balancer cannot be built are skipped."""
    keyed: dict[tuple[str, int], list[MethodSpec]] = {}
    for s in specs:  # a kernel runs one variant's rule on its rows (the inits): one kernel per variant
        keyed.setdefault((s.label, s.iters), []).append(s)
    pending: list[tuple[type[Kernel], list, list[RunResult], list[np.ndarray], int]] = []
    skipped: list[RunResult] = []
    for (_, iters), group_specs in keyed.items():
        name = group_specs[0].name
        cls = kernel_for(name)
        if cls is None:
            raise ValueError(f"method {name!r} has no toy kernel; run it on the lockstep path")
        for spec in group_specs:
            if not has_kernel(spec):
                raise ValueError(f"{spec.label}: {cls.unsupported(make_balancer(spec))}; run it on the "
                                 "lockstep or reference path")
        balancers, results, shifts = [], [], []
        for spec in group_specs:
            mine, made = [], []
            try:
                for i in inits:
                    seed_all(cfg.seed + i)  # the lockstep path's seed for this init
                    made.append(make_balancer(spec))
            except Exception as err:  # hyperparameters the method rejects: a table row that says so
                for i in inits:
                    skipped.append(RunResult(spec.label, spec.name, i, "skipped", f"{type(err).__name__}: {err}",
                                             np.array([start_point(cfg, i)]), iters=0, path="fast",
                                             x0=start_point(cfg, i)))
                continue
            for i, bal in zip(inits, made):
                mine.append(RunResult(spec.label, spec.name, i, "ok", iters=spec.iters, path="fast",
                                      x0=start_point(cfg, i)))
                shifts.append(_shift(spec, cfg))
            balancers.extend(made)
            results.extend(mine)
        if balancers:
            pending.append((cls, balancers, results, shifts, iters))
    # plain kernels first (one shared Adam over a prefix of the rows), training-loop kernels after
    pending.sort(key=lambda p: p[0].training_loop)
    groups, starts, offset = [], [], 0
    for cls, balancers, results, shifts, iters in pending:
        rows = slice(offset, offset + len(balancers))
        offset += len(balancers)
        groups.append(_Group(cls(balancers, cfg), rows, iters, np.array(shifts), results))
        starts.extend(r.x0 for r in results)  # type: ignore[misc]
    return groups, skipped, starts


def run_fast(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig) -> list[RunResult]:
    """Run every spec (each must have a kernel) from every init; results as specs × inits.

    Torch runs on one intra-op thread meanwhile (the kernels' few torch calls act on tensors of
    ~10 entries, where a thread pool only costs; changing the thread count per call would
    rebuild the pool, ~1 ms each time)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        return _run_fast(specs, inits, cfg)
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _run_fast(specs: Sequence[MethodSpec], inits: Sequence[int], cfg: EngineConfig) -> list[RunResult]:
    groups, skipped, starts = _build(specs, inits, cfg)
    results = skipped + [r for g in groups for r in g.results]
    if not groups:
        return _ordered(results, specs)
    n = len(starts)
    x = np.array(starts, dtype=np.float64)
    plain = [g for g in groups if not g.kernel.training_loop]
    loops = [g for g in groups if g.kernel.training_loop]
    n_plain = plain[-1].rows.stop if plain else 0
    adam = NumpyAdam(x, cfg.lr)
    grad = np.zeros((n, 2))
    live = np.ones(n, dtype=bool)          # rows still moving (not failed, not past their iters)
    frozen_x = x.copy()
    iters_all = max(g.iters for g in groups)
    traj = np.empty((iters_all + 1, n, 2))
    traj[0] = x
    epoch_sum = np.zeros((n, 2))
    post = [g for g in groups if g.kernel.needs_post_step_losses]
    scale = cfg.scale

    def landscape_of(g: _Group):
        def evaluate(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            vals, jac = toy_value_and_jacobian(points, scale)
            return vals - g.shift, jac
        return evaluate

    def losses_of(g: _Group):
        def evaluate(points: np.ndarray) -> np.ndarray:
            return toy_values(points, scale) - g.shift
        return evaluate

    loop_landscapes = {id(g): (landscape_of(g), losses_of(g)) for g in loops}

    def freeze(rows: np.ndarray) -> None:
        nonlocal any_frozen
        live[rows] = False
        frozen_x[rows] = x[rows]
        any_frozen = True

    def check(g: _Group, t: int, d: np.ndarray | None) -> None:
        k = g.kernel
        if d is not None and not np.isfinite(d).all():
            bad = ~np.isfinite(d).all(-1) & ~k.failed
            k.fail(bad, t, [f"RuntimeError: non-finite update {row.tolist()}" for row in d])
        if k.new_failures:
            k.new_failures = False
            rows = np.flatnonzero(k.failed & live[g.rows]) + g.rows.start
            freeze(rows)

    any_frozen = False
    coef = np.zeros((n_plain, 2))
    # clipping per row where the balancer clips (+inf: off); direct kernels clip their own direction
    max_norm = np.concatenate([np.full(g.kernel.rows, np.inf) if g.kernel.direct else g.kernel.max_norms()
                               for g in plain]) if plain else np.zeros(0)
    clip = bool(np.isfinite(max_norm).any())
    gram_iters = max((g.iters for g in plain if g.kernel.uses_gram), default=0)
    shift_all = np.concatenate([g.shift for g in groups])
    lo, hi = 0, n                          # span of rows whose group is still running
    ends = {g.iters for g in groups}       # the steps after which some group stops
    vals, jac = toy_value_and_jacobian(x, scale)
    svals = vals - shift_all               # what the kernels see (shifted losses), updated in place
    # per plain group, what its call needs, looked up once (~20 groups a worker, 35 000 steps):
    # (group, step_rows, rows, its shifted losses as a view of svals)
    plain_calls = [(g, g.kernel.step_rows, g.rows, svals[g.rows]) for g in plain]
    running_plain = plain_calls
    clock = time.perf_counter
    start, cpu = time.perf_counter(), time.process_time()
    with np.errstate(all="ignore"):  # kernels report non-finite values themselves (check())
        for t in range(iters_all):
            if n_plain:
                # what every plain kernel needs, once for all rows: the input check and the Gram matrices
                inputs_ok = bool(np.isfinite(svals[:n_plain].sum()) and np.abs(jac[:n_plain]).max() < 1e307)
                gram = gram_rows(jac[:n_plain]) if t < gram_iters else None
                direct = []
                for g, step_rows, r, losses_r in running_plain:
                    t0 = clock()
                    c, d = step_rows(t, losses_r, jac[r], None if gram is None else gram[r], inputs_ok)
                    coef[r] = c
                    if d is not None:
                        direct.append((r, d))
                    if g.kernel.new_failures:
                        check(g, t, None)
                    g.seconds += clock() - t0
                # x.grad = Σᵢ cᵢ ∇ℓᵢ for all rows at once (the same products and sum per row as one
                # kernel's), clipped where the balancer clips; Jacobian rules bring their own direction
                grad[:n_plain] = combine(coef[:n_plain], jac[:n_plain])
                if clip:
                    grad[:n_plain] = clip_rows(grad[:n_plain], max_norm)
                for r, d in direct:
                    grad[r] = d
                if not np.isfinite(grad[:n_plain].sum()):  # one reduction; find the rows only when needed
                    for g in plain:
                        if t < g.iters:
                            check(g, t, grad[g.rows])
                if any_frozen:
                    grad[~live] = 0.0
                adam.step(grad[:n_plain], slice(0, n_plain))
            for g in loops:
                if t < g.iters:
                    t0 = time.perf_counter()
                    rows = g.rows

                    def adam_step(gr: np.ndarray, rows: slice = rows) -> None:
                        adam.step(gr, rows)

                    # the engine evaluated every running row at x after the last step (svals, jac)
                    landscape, losses_at = loop_landscapes[id(g)]
                    g.kernel.train_step(t, x[rows], adam_step, landscape, (svals[rows], jac[rows]), losses_at)
                    check(g, t, None)
                    g.seconds += time.perf_counter() - t0
            if any_frozen:
                np.copyto(x, frozen_x, where=~live[:, None])
            traj[t + 1] = x
            epoch_sum += vals
            if hi - lo == n:
                vals, jac = toy_value_and_jacobian(x, scale)
            else:  # only FAMO's longer runs left, say: evaluate their rows only
                vals[lo:hi], jac[lo:hi] = toy_value_and_jacobian(x[lo:hi], scale)
            np.subtract(vals, shift_all, out=svals)
            for g in post:
                if t < g.iters:
                    t0 = time.perf_counter()
                    g.kernel.after_step(svals[g.rows])
                    check(g, t + 1, None)
                    g.seconds += time.perf_counter() - t0
            if (t + 1) % cfg.epoch_steps == 0:
                mean = epoch_sum / cfg.epoch_steps
                epoch_sum[:] = 0.0
                for g in groups:
                    if t < g.iters:
                        m = mean[g.rows]
                        g.kernel.epoch_end((t + 1) // cfg.epoch_steps - 1, m - g.shift, gap_scores(m, scale))
                        check(g, t + 1, None)
            if t + 1 in ends:
                for g in groups:
                    if t + 1 == g.iters and live[g.rows].any():
                        freeze(np.flatnonzero(live[g.rows]) + g.rows.start)
                running = [g for g in groups if t + 1 < g.iters]
                running_plain = [call for call in plain_calls if t + 1 < call[0].iters]
                if running:
                    lo, hi = min(g.rows.start for g in running), max(g.rows.stop for g in running)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    kernel_total = sum(g.seconds for g in groups)
    shared = max(wall - kernel_total, 0.0) / n
    cpu_ratio = cpu / wall if wall > 0 else 1.0
    for g in groups:
        k = g.kernel
        for b, res in enumerate(g.results):
            row = g.rows.start + b
            if k.failed[b]:
                res.status, res.iters = "failed", int(k.fail_step[b])
                res.reason = f"step {res.iters}: {k.fail_reason[b]}"
            res.traj = traj[: res.iters + 1, row].copy()
            res.seconds = g.seconds / k.rows + shared
            res.cpu_seconds = res.seconds * cpu_ratio
            res.warnings = int(k.warning_count[b])
            res.first_warning = k.first_warning[b][:300]
            if k.solver_failures is not None:
                res.solver_failures = int(k.solver_failures[b])
            if np.all(np.isfinite(k.weights[b])):
                res.final_weights = [float(w) for w in k.weights[b]]
    return _ordered(results, specs)


def _ordered(results: list[RunResult], specs: Sequence[MethodSpec]) -> list[RunResult]:
    order = {s.label: k for k, s in enumerate(specs)}
    return sorted(results, key=lambda r: (order[r.label], r.init_index))
