"""Aggregate throughput (trial-epochs per hour) for n trials sharing one device.

For each n in ``--trials`` (default 1, 2, 4, 8), n worker processes each build one trainer
(``mtl_tune.training.loop.Trainer``: the benchmark, method and settings a search trial
would run) and report READY; when all n are ready the parent releases them together (a
barrier on their stdin) and times until the last one finishes ``--epochs`` epochs
(training + evaluation, as a trial's epoch; no Ray checkpointing). Throughput =
n · epochs / wall time · 3600. Process start-up and model building are outside the window,
so the table shows what sharing the device costs, not interpreter start-up.

Each worker gets ``--threads-per-trial`` torch threads (default: cores // n, at least 1 —
Ray sets ``OMP_NUM_THREADS`` to a trial's CPU count the same way). On a GPU all workers share
the device, as Ray's fractional ``--gpus-per-trial 1/n`` would place them (Ray only counts;
it isolates nothing, docs/references.md#fractional-gpus-only-count). ``--max-steps`` caps training
batches per epoch (for
benchmarks with long epochs, e.g. NYUv2 on a GPU).

Examples::

    python bench/packing.py                                   # multi_mnist (sklearn digits), CPU
    python bench/packing.py --benchmark nyuv2 --synthetic --device cuda --method ls --max-steps 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """Build one trainer, signal READY, wait for GO on stdin, train, print a JSON line."""
    from mtl_tune.training.loop import Trainer

    torch.set_num_threads(args.threads_per_trial)
    config = {"benchmark": args.benchmark, "method": args.method, "epochs": args.epochs, "seed": args.seed,
              "synthetic": args.synthetic, "device": args.device, **c.parse_kv(args.config)}
    trainer = Trainer(config)
    if args.max_steps:
        full = trainer.setup.train_batches
        trainer.setup.train_batches = lambda epoch: itertools.islice(full(epoch), args.max_steps)
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    trainer.run(lambda metrics, state: None)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    print(json.dumps({"train_s": time.perf_counter() - start, "epochs": trainer.epoch}), flush=True)


def run_group(n: int, argv: list[str], threads: int, timeout: float) -> tuple[float, list[dict], str]:
    """Start n workers, release them together; returns (wall seconds, worker results, error)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--threads-per-trial", str(threads)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    # a hung worker must not hang the benchmark: kill our own workers (by handle) at the deadline
    watchdog = threading.Timer(timeout, lambda: [proc.kill() for proc in procs if proc.poll() is None])
    watchdog.start()
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "READY":
                proc.wait()
                tail = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
                raise RuntimeError(f"worker did not start: {line.strip() or (tail[-1][:300] if tail else '')}")
        start = time.perf_counter()
        for proc in procs:
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for proc in procs:  # the window ends at the last result line, not at interpreter exit
            line = proc.stdout.readline()
            if not line.startswith("{"):
                proc.wait(timeout=timeout)
                raise RuntimeError((proc.stderr.read().strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300])
            results.append(json.loads(line))
        wall = time.perf_counter() - start
        for proc in procs:
            proc.communicate(timeout=timeout)
        return wall, results, ""
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
        return float("nan"), [], f"{type(err).__name__}: {err}"
    finally:
        watchdog.cancel()
        for proc in procs:  # only our own children, by handle
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="multi_mnist")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--method", default="ls")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="training batches per epoch (default: all)")
    p.add_argument("--config", action="append", metavar="K=V", help="trainer setting for every worker")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trials", default="1,2,4,8", help="comma-separated numbers of concurrent trials")
    p.add_argument("--threads-per-trial", type=int, default=None, help="default: cores // n, at least 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per group")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    c.method_names(args.method)  # an unknown name fails here, listing the valid ones
    load0 = c.load_average()
    cores = os.cpu_count() or 1
    base = [a for a in argv if a != "--worker"]
    rows, single = [], None
    for n in [int(x) for x in args.trials.split(",") if x.strip()]:
        threads = args.threads_per_trial or max(1, cores // n)
        wall, results, error = run_group(n, base, threads, args.timeout)
        if error:
            rows.append([str(n), str(threads), "—", "—", "—", "—", f"FAILED: {error}"])
            continue
        epochs = sum(int(r["epochs"]) for r in results)
        rate = epochs / wall * 3600.0
        if n == 1:
            single = rate
        per_trial = sorted(float(r["train_s"]) / max(1, int(r["epochs"])) for r in results)
        speedup = c.fmt(rate / single) if single else "—"
        rows.append([str(n), str(threads), c.fmt(wall, 1), c.fmt(per_trial[len(per_trial) // 2], 2),
                     f"{rate:.0f}", speedup, ""])
    where = c.resolve_device(args.device)
    extra = (f"trials: {args.benchmark}{' (synthetic)' if args.synthetic else ''}, method {args.method}, "
             f"{args.epochs} epochs each{f', ≤ {args.max_steps} steps/epoch' if args.max_steps else ''}; "
             f"{cores} cores; workers started together after building (start-up not timed)")
    caption = c.context_lines(where, load0, extra, show_threads=False)  # per trial: in the table
    header = ["concurrent trials n", "threads per trial", "wall s", "s per epoch per trial (median)",
              "trial-epochs / hour", "× n = 1", "notes"]
    c.emit("\n".join(f"- {line}" for line in caption) + "\n\n" + c.markdown_table(header, rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
