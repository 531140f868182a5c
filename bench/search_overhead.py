"""Ray Tune + Optuna overhead per trial, as a share of trial time.

Two measurements of the same trial configuration (benchmark, method, epochs, seed):

1. **Trainer alone** — ``mtl_tune.training.loop.Trainer(config).run(report)`` without Ray,
   with a reporter that drops the metrics, each of ``--repeats`` runs in a fresh process
   (cold data caches and the registry's first scan, as in a trial's worker; torch threads =
   ``--cpus-per-trial``, as the trainable sets them).
2. **A tiny search** through the programmatic API (``SearchOptions`` → ``prepare`` →
   ``execute``): ``--num-samples`` trials, at most ``--max-concurrent`` at a time. Ray's
   start (``init_ray``) is timed on its own; the search wall time covers Tune's loop,
   Optuna's ask/tell, trial actors, per-epoch checkpoints and the results table/plot.

From Tune's per-trial ``time_total_s`` (time inside the trainable) S, the search wall time W,
the concurrency c and the trainer-alone time A per trial (N trials):

* in-trial overhead per trial = S/N − A (``tune.report``, the per-epoch ``torch.save``
  checkpoint, worker-side set-up);
* outside-trial overhead per trial = (c·W − S)/N (scheduling, actor start-up, searcher,
  experiment state, the results table);
* overhead share = 1 − N·A / (c·W): the fraction of the occupied trial slots not spent training.

With c > 1 on a machine with c cores, trials also slow each other down (shared memory
bandwidth, the driver's own CPU use): ``--max-concurrent 1`` (default) isolates the overhead.

Example::

    python bench/search_overhead.py --benchmark multi_mnist --method cagrad --num-samples 4 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402


def alone_child(config: dict) -> dict[str, float]:
    """In a fresh process, as a trial starts: the registry's first scan (it imports every
    balancer and benchmark module), then build + train. Returns seconds."""
    from mtl_tune.registry import balancer_classes, benchmark_classes
    from mtl_tune.training.loop import Trainer

    torch.set_num_threads(max(1, int(float(config.get("cpus_per_trial", 1)))))  # what train_trial does
    start = time.perf_counter()
    balancer_classes(), benchmark_classes()
    scanned = time.perf_counter()
    Trainer(dict(config)).run(lambda metrics, state: None)
    return {"registry_s": scanned - start, "total_s": time.perf_counter() - start}


def time_trainer(config: dict, repeats: int) -> list[dict[str, float]]:
    """``repeats`` plain trainer runs of ``config``, each in a fresh process (cold caches, as
    a Ray trial's worker; interpreter start-up and ``import torch`` are not timed)."""
    out = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--alone-child", json.dumps(config)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"trainer-alone run failed: {proc.stderr.strip()[-500:]}")
        out.append(json.loads(lines[-1]))
    return out


def overhead_rows(n: int, conc: int, wall: float, trial_s: list[float], alone: float, init_s: float,
                  registry_s: float = float("nan")) -> list[list[str]]:
    """The table: quantity, seconds, share of the trainer-alone time per trial."""
    total = sum(trial_s)
    inside = total / n - alone
    outside = (conc * wall - total) / n
    share = 1.0 - n * alone / (conc * wall) if wall > 0 else float("nan")

    def row(name: str, seconds: float, per_trial: bool = False, note: str = "") -> list[str]:
        rel = f"{100 * seconds / alone:.0f} %" if per_trial and alone > 0 else ""
        return [name, c.fmt(seconds), rel, note]

    return [
        row("Ray start (init_ray), once", init_s, note="not in the search wall time"),
        row(f"search wall time W ({n} trials, concurrency {conc})", wall),
        row("Σ trial time_total_s S", total),
        row("trial time_total_s, median", statistics.median(trial_s), True),
        row("trainer alone per trial A (no Ray, fresh process)", alone, True, "median of the repeats"),
        row("… of which the registry's first scan (imports)", registry_s, True, "also inside every trial"),
        row("in-trial overhead per trial, S/N − A", inside, True, "report + checkpoint + trial set-up"),
        row("outside-trial overhead per trial, (c·W − S)/N", outside, True, "scheduling, actors, Optuna, tables"),
        ["**overhead share of occupied trial time, 1 − N·A/(c·W)**", f"**{100 * share:.1f} %**", "", ""],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="multi_mnist")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--method", default="cagrad", help="a method with searchable hyperparameters (else 1 trial)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPU count (default: all cores)")
    p.add_argument("--config", action="append", metavar="K=V", help="trainer setting passed to every trial")
    p.add_argument("--repeats", type=int, default=2, help="trainer-alone runs (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="where the search writes (default: a temporary folder, removed after)")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--alone-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.alone_child:
        print(json.dumps(alone_child(json.loads(args.alone_child))))
        return 0

    from mtl_tune.search import SearchOptions, execute, prepare
    from mtl_tune.search.execution import init_ray
    from mtl_tune.search.runner import trial_constants

    load0 = c.load_average()
    storage = args.storage or tempfile.mkdtemp(prefix="mtl_bench_overhead_")
    options = SearchOptions(benchmark=args.benchmark, methods=[args.method], num_samples=args.num_samples,
                            epochs=args.epochs, max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                            gpus_per_trial=args.gpus_per_trial, num_cpus=args.num_cpus, synthetic=args.synthetic,
                            seed=args.seed, storage_path=storage, name="overhead", verbose=0,
                            config=c.parse_kv(args.config))
    plan = prepare(options)
    torch.set_num_threads(max(1, int(args.cpus_per_trial)))  # as the trials (and for the caption)
    config = trial_constants(plan, args.method)
    alone_runs = time_trainer(config, args.repeats)
    alone = statistics.median(r["total_s"] for r in alone_runs)
    registry_s = statistics.median(r["registry_s"] for r in alone_runs)

    import ray

    start = time.perf_counter()
    init_ray(plan)
    init_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        outcome = execute(plan)
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    table = outcome.table
    table = table[table["phase"] == "search"] if "phase" in table else table
    trial_s = [float(v) for v in table["time_total_s"] if v == v]
    statuses = ", ".join(f"{k}: {v}" for k, v in table["status"].value_counts().items())
    if not args.storage:
        shutil.rmtree(storage, ignore_errors=True)
    n = len(trial_s)
    if n == 0:
        raise SystemExit(f"no trial reported time_total_s (statuses: {statuses})")
    conc = min(args.max_concurrent, n)
    extra = (f"search: {args.benchmark}{' (synthetic)' if args.synthetic else ''}, method {args.method}, "
             f"{n} trials × {args.epochs} epochs ({statuses}), max {args.max_concurrent} concurrent, "
             f"{args.cpus_per_trial} CPU / {args.gpus_per_trial} GPU per trial")
    caption = c.context_lines(c.resolve_device("auto" if args.gpus_per_trial else "cpu"), load0, extra)
    rows = overhead_rows(n, conc, wall, trial_s, alone, init_s, registry_s)
    c.emit("\n".join(f"- {line}" for line in caption) + "\n\n" +
           c.markdown_table(["quantity", "seconds", "÷ trainer alone", "notes"], rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
