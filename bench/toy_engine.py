"""Toy trajectories: the fast batched kernels vs the public balancer API, per method, side by side.

For every method (or ``--methods``): CPU µs per step and init of

* **fast** — the method's kernel in :func:`toy.fast.run_fast` on its own (all ``--inits`` as rows,
  the landscape and Adam included), and
* **api** — the lockstep path :func:`toy.engine.run_lockstep` (the balancer's ``backward`` per
  init on the exact linearisation; the fastest way through the public API),

measured in one process, alternating fast/api per method over ``--repeats`` rounds (a drift in
machine load hits both alike), with the speed-up api/fast. With ``--full`` it then times the
whole ``python -m toy.trajectories`` job (every method × the five inits at the papers'
iteration counts, ``--workers`` processes, no plots) — the number the toy issue's target is
about — and prints its wall and CPU time.

    python bench/toy_engine.py                      # all methods, 2 000 steps each way
    python bench/toy_engine.py --methods ls,cagrad --steps 500 --full
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from toy.common import TOY_SKIPS  # noqa: E402
from toy.engine import EngineConfig, is_training_loop, run_fast, run_lockstep, run_reference, uses_fast  # noqa: E402
from toy.trajectories import build_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_us_per_step(fn, steps: int, rows: int) -> float:
    start = time.process_time()
    fn()
    return 1e6 * (time.process_time() - start) / (steps * rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="all")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--inits", default="0,1,2,3,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--full", action="store_true", help="also time the whole toy.trajectories job (papers' protocol)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load = c.load_average()
    inits = [int(i) for i in args.inits.split(",")]
    cfg = EngineConfig()
    specs = [replace(s, iters=args.steps) for s in build_specs(args.methods) if s.name not in TOY_SKIPS]
    rows = []
    for s in specs[:1]:  # warm-up: first calls import and allocate (not part of any method's cost)
        if is_training_loop(s.name):  # (a meta or training-loop method has no lockstep path)
            run_reference(replace(s, iters=20), inits, cfg, analytic=True)
        else:
            run_lockstep(replace(s, iters=20), inits, cfg)
        if uses_fast(s, cfg):
            run_fast([replace(s, iters=20)], inits, cfg)
    for s in specs:
        fast_t: list[float] = []
        api_t: list[float] = []
        for _ in range(args.repeats):
            if uses_fast(s, cfg):
                fast_t.append(cpu_us_per_step(lambda: run_fast([s], inits, cfg), s.iters, len(inits)))
            if is_training_loop(s.name):
                api_t.append(cpu_us_per_step(lambda: run_reference(s, inits, cfg, analytic=True), s.iters,
                                             len(inits)))
            else:
                api_t.append(cpu_us_per_step(lambda: run_lockstep(s, inits, cfg), s.iters, len(inits)))
        f = statistics.median(fast_t) if fast_t else None
        a = statistics.median(api_t)
        rows.append([s.label, c.fmt(f, 1) if f else "no kernel", c.fmt(a, 1), c.fmt(a / f, 1) if f else ""])
    lines = [c.markdown_table(["method", "fast µs/step/init", "api µs/step/init", "speed-up"], rows)]
    lines += c.context_lines(torch.device("cpu"), load, extra=f"{args.steps} steps, inits {inits}, "
                             f"median of {args.repeats}; CPU time", show_threads=False)
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "toy.trajectories", "--methods", args.methods, "--no-plots",
                   "--workers", str(args.workers), "--out", tmp]
            start = time.perf_counter()
            before = os.times()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - start
            after = os.times()
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
            traj_line = [ln for ln in proc.stderr.splitlines() if ln.startswith("trajectories:")]
            lines.append(f"\nfull job `python {' '.join(cmd[1:])}`: "
                         f"{wall:.1f} s wall (process start, probes, runs, table), {cpu:.1f} s CPU; "
                         f"{traj_line[0] if traj_line else ''}")
    c.emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
