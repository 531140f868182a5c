"""Wall time of whole search commands, this tree against a checkout of an earlier commit,
paired and interleaved in one run (issue 18 §1: what Ray Tune + Optuna add around each trial).

Each repeat runs every workload once per tree, alternating which tree goes first, each as a
fresh ``python -m mtl_tune.search ...`` process (``PYTHONPATH`` = that tree, a temporary
``--storage-path``), and times the whole command: interpreter start, imports, Ray's start,
the trials, the tables and plots. Workloads:

* ``help``: ``--help``; ``bad-name``: ``--method nope`` (exit 2);
* errors that need the benchmark's class (exit 2): ``bad-objective`` (``--objective nope``),
  ``bad-config`` (``--config nope=1``), ``bad-data`` (MultiMNIST under a missing ``--data-root``),
  ``bad-data-dense`` (NYUv2 under a missing ``--data-root``), ``bad-data-qm9``, ``bad-data-celeba`` (the same
  for QM9, CelebA); their "same results" column
  compares the error message of the two trees;
* ``readme``: the README's main command (no arguments: toy, five methods, what fits on the CPUs);
* ``toy1``: ``--method cagrad --num-samples 4 --max-concurrent 1 --config steps_per_epoch=200`` on
  the toy, one short trial at a time (≈ 1 s of training each: the overhead shows); ``toy8``: the
  same with 8 trials: the difference of the two, ((W − S)₈ − (W − S)₄)/4, is the overhead each
  further trial adds, without the command's fixed start (interpreter, Ray, the driver's imports);
* ``mnist1``: ``--benchmark multi_mnist --method cagrad --num-samples 3 --epochs 2 --max-concurrent 1``.

From the search's ``trials.csv``: N trials, S = Σ ``time_total_s`` (time inside the
trainable). With one trial at a time the **overhead per trial** is (W − S)/N, W the command's
wall time: everything outside the trainable, Ray's start and the interpreter included. For
the README command (two trials at a time) the table gives W, N and S. "Same results": the
rows (method, hyperparameters, objective metrics) of the two trees' tables compared, and each
tree against its own other repeats (a search with two trials at a time is not reproducible
even in one tree: TPE's suggestions depend on which trial finishes first).

Example (the previous commit checked out with ``git worktree add /tmp/base <commit>``)::

    python bench/search_wall.py --base /tmp/base --workloads help,bad-name,toy1,readme --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "bench"))
import _common as c  # noqa: E402

WORKLOADS = {
    "help": ["--help"],
    "bad-name": ["--method", "nope"],
    "bad-objective": ["--objective", "nope"],
    "bad-config": ["--config", "nope=1"],
    "bad-data": ["--benchmark", "multi_mnist", "--data-root", "{storage}/missing"],
    "bad-data-dense": ["--benchmark", "nyuv2", "--data-root", "{storage}/missing"],
    "bad-data-qm9": ["--benchmark", "qm9", "--data-root", "{storage}/missing"],
    "bad-data-celeba": ["--benchmark", "celeba", "--data-root", "{storage}/missing"],
    "readme": [],
    "toy1": ["--method", "cagrad", "--num-samples", "4", "--max-concurrent", "1", "--config", "steps_per_epoch=200"],
    "toy8": ["--method", "cagrad", "--num-samples", "8", "--max-concurrent", "1", "--config", "steps_per_epoch=200"],
    "mnist1": ["--benchmark", "multi_mnist", "--method", "cagrad", "--num-samples", "3", "--epochs", "2",
               "--max-concurrent", "1"],
}
SEARCHES = {"readme", "toy1", "toy8", "mnist1"}


def run_once(tree: Path, workload: str) -> dict:
    """One command in a fresh process; its wall time and, for a search, its trial table."""
    storage = Path(tempfile.mkdtemp(prefix="mtl_bench_wall_"))
    argv = [a.replace("{storage}", str(storage)) for a in WORKLOADS[workload]]
    if workload in SEARCHES:
        argv += ["--storage-path", str(storage), "--name", "run", "--verbose", "0"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mtl_tune.search", *argv], cwd=storage, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    # an error's message, with this run's temporary folder masked, to compare across trees
    out = {"wall": wall, "rc": proc.returncode, "message": proc.stderr.strip().replace(str(storage), "{storage}")}
    if workload in SEARCHES:
        table_path = storage / "run" / "trials.csv"
        if proc.returncode != 0 or not table_path.is_file():
            raise SystemExit(f"{workload} in {tree} failed (rc {proc.returncode}): {proc.stderr[-800:]}")
        table = pd.read_csv(table_path)
        out["table"] = table
        out["n"] = len(table)
        out["s"] = float(table["time_total_s"].sum())
    shutil.rmtree(storage, ignore_errors=True)
    return out


def result_rows(table: pd.DataFrame) -> list[tuple]:
    """(method, hyperparameters, objective metrics) per trial, sorted: what "same results" compares."""
    hp = sorted(col for col in table.columns if col.startswith("hp/"))
    metrics = sorted(col for col in table.columns if col.startswith("val/"))
    rows = []
    for _, row in table.iterrows():
        rows.append((row["method"], *(repr(row[h]) if row[h] == row[h] else "" for h in hp),
                     *(round(float(row[m]), 9) for m in metrics)))
    return sorted(rows, key=repr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a checkout of the earlier commit (git worktree add)")
    p.add_argument("--workloads", default="help,bad-name,toy1,readme")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="also write the Markdown to this file")
    args = p.parse_args(argv)
    trees = {"before": Path(args.base).resolve(), "after": HERE}
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:  # before any work: one usage line and exit 2
        p.error(f"unknown workload(s) {', '.join(unknown)}; valid: {', '.join(WORKLOADS)}")
    load0 = c.load_average()
    runs: dict[tuple[str, str], list[dict]] = {(w, t): [] for w in workloads for t in trees}
    for rep in range(args.repeats):
        for w in workloads:
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for t in order:
                runs[(w, t)].append(run_once(trees[t], w))
                print(f"rep {rep} {w} {t}: {runs[(w, t)][-1]['wall']:.2f} s", file=sys.stderr, flush=True)
    rows = []
    for w in workloads:
        cells = []
        for t in trees:
            r = runs[(w, t)]
            wall = statistics.median(x["wall"] for x in r)
            if w in SEARCHES:
                n, s = r[0]["n"], statistics.median(x["s"] for x in r)
                per = statistics.median((x["wall"] - x["s"]) / x["n"] for x in r)
                cells.append((wall, f"N = {n}, S = {c.fmt(s)} s, (W − S)/N = {c.fmt(per)} s"))
            else:
                cells.append((wall, f"exit {r[0]['rc']}"))
        same = ""
        if w.startswith("bad-"):
            messages = {x["message"] for t in trees for x in runs[(w, t)]}
            same = f"same message: {'yes' if len(messages) == 1 else 'no'}"
        if w in SEARCHES:
            tables = {t: [result_rows(x["table"]) for x in runs[(w, t)]] for t in trees}
            across = all(a == b for a in tables["before"] for b in tables["after"])
            within = {t: all(x == tables[t][0] for x in tables[t]) for t in trees}
            same = (f"before = after: {'yes' if across else 'no'}; repeats equal within before/after: "
                    f"{'yes' if within['before'] else 'no'}/{'yes' if within['after'] else 'no'}")
        walls = ", ".join(c.fmt(x["wall"]) for t in trees for x in runs[(w, t)])
        rows.append([w, " ".join(WORKLOADS[w]) or "(none)", c.fmt(cells[0][0]), c.fmt(cells[1][0]),
                     f"{cells[1][0] / cells[0][0]:.2f}", cells[0][1], cells[1][1], same, walls])
    caption = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; load average (1/5/15 min): {load0} at start, "
               f"{c.load_average()} at end; {os.cpu_count()} CPUs",
               f"command: `python bench/search_wall.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
               f"before: {trees['before']}; after: {trees['after']}; {args.repeats} repeats, interleaved"]
    c.emit("\n".join(f"- {line}" for line in caption) + "\n\n" + c.markdown_table(
        ["workload", "arguments", "W before (s)", "W after (s)", "after ÷ before", "before", "after",
         "same results", "all walls (before…, after…)"], rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
