"""Toy two-task trajectories: the picture every MTL paper draws, for every registered method.

    python -m toy.trajectories --methods all|ls,mgda,... [--iters N] [--scale S]
        [--set method.param=value ...] [--out DIR] [--search-trials trials.csv]

Every method in :func:`mtl_tune.registry.available_balancers` (so methods added later show
up by themselves) runs from the papers' five inits with the papers' protocol: Adam lr 1e-3
on x, 35 000 iterations (FAMO: 50 000, its paper), scale 0.1 on L₁ (docs/benchmarks.md#toy-protocol).
A method can appear several times with different hyperparameters to see how they move
the end point along the front: ``--methods cagrad,cagrad:c=0.9,fairgrad:alpha=0.5``
(``name:param=value:...``); ``--set cagrad.c=0.2`` changes every variant of a method.
Values are YAML (``--set ls.task_weights=[1,3]``).

Outputs in ``--out`` (default ``toy_outputs/``): ``<method>.png`` (parameter + objective
space), ``gallery.png``, ``table.csv`` / ``table.md`` (per method and init: distance to
the front, iterations to come within ``--tol``, end point, weights, failures),
``trajectories.npz`` and, with ``--search-trials``, ``search_overlay.png``.
See docs/toy.md for what the figures show and docs/perf/toy.md for timings.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mtl_tune.benchmarks.toy import INITS
from mtl_tune.registry import PluginError, available_balancers, balancer_class, check_hparams
from .engine import EngineConfig, MethodSpec, RunResult, protocol_hparams
from .parallel import run_all, worker_pool
from .landscape import loss_grid
from .report import DEFAULT_TOL, SearchTrials, load_search_trials, markdown_table, summarize_all, write_csv, write_npz

DEFAULT_ITERS = 35_000                 # nash-mtl and Aligned-MTL toy trainers
PAPER_ITERS = {"famo": 50_000}         # FAMO's toy trainer


def parse_value(text: str) -> Any:
    """A CLI value as YAML: ``0.5`` → float, ``[1, 3]`` → list, ``none``/``null`` → None."""
    return None if text.strip().lower() == "none" else yaml.safe_load(text)


def _pair(item: str, what: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"{what}: expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), parse_value(value)


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["cagrad.c=0.5", ...]`` → ``{"cagrad": {"c": 0.5}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, value = _pair(item, "--set")
        if "." not in key:
            raise ValueError(f"--set: expected method.param=value, got {item!r}")
        method, param = key.split(".", 1)
        out.setdefault(method, {})[param] = value
    return out


def split_methods(text: str) -> list[str]:
    """Split on commas that are not inside brackets (values may be lists)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def build_specs(methods: str, sets: dict[str, dict[str, Any]] | None = None, iters: int | None = None,
                scale: float = 0.1, exclude: Sequence[str] = ()) -> list[MethodSpec]:
    """Method variants to run (see the module docstring); every name and parameter is checked."""
    sets = sets or {}
    for name in exclude:
        balancer_class(name)  # a typo in --exclude should not silently exclude nothing
    tokens: list[str] = []
    for tok in split_methods(methods):
        tokens.extend(available_balancers() if tok == "all" else [tok])
    specs: list[MethodSpec] = []
    for tok in tokens:
        name, *rest = tok.split(":")
        if name in exclude:
            continue
        balancer_class(name)   # UnknownNameError lists the valid names
        pairs = [_pair(item, f"method {tok!r}") for item in rest]
        variant = dict(pairs)
        if len(variant) != len(pairs):  # cagrad:c=0.1:c=0.2 ran c=0.2 alone
            raise ValueError(f"method {tok!r} gives a parameter twice")
        hparams = {**protocol_hparams(name, scale), **sets.get(name, {}), **variant}
        # names, types and finiteness as get_balancer checks them (zz=1, c=abc, c=nan): an error now,
        # not a skipped row; a value out of a constructor's range stays a table row that says why
        _, hparams = check_hparams(name, 2, hparams)
        label = name if not variant else f"{name}({','.join(f'{k}={v}' for k, v in variant.items())})"
        if any(s.label == label for s in specs):
            continue
        n = iters if iters is not None else PAPER_ITERS.get(name, DEFAULT_ITERS)
        specs.append(MethodSpec(label, name, hparams, int(n)))
    unused = sorted(set(sets) - {s.name for s in specs})
    if unused:
        raise ValueError(f"--set names method(s) {unused} that are not being run")
    if not specs:  # an empty run would still overwrite the --out folder's table with an empty one
        raise ValueError(f"--methods {methods!r}" + (f" minus --exclude {','.join(exclude)}" if exclude else "")
                         + " leaves no method to run")
    return specs


def file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


def run_trajectories(specs: Sequence[MethodSpec], inits: Sequence[int] = tuple(range(len(INITS))),
                     cfg: EngineConfig | None = None, workers: int = 2, out: Path | None = None,
                     tol: float = DEFAULT_TOL, trials_path: str | Path | None = None, plots: bool = True,
                     log: Callable[[str], None] | None = None) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Run, tabulate and (with ``out``) write every artefact; returns (results, table rows)."""
    cfg = cfg or EngineConfig()
    say = log or (lambda _msg: None)
    trials = load_search_trials(trials_path, cfg.scale) if trials_path else None
    if trials is not None:
        say(f"search trials: {len(trials.points)} points ({trials.dropped} diverged/non-finite left out)")
    start = time.perf_counter()
    results = run_all(specs, inits, cfg, workers, log=say, tol=tol)
    say(f"trajectories: {time.perf_counter() - start:.1f} s wall")
    if out is None:
        return results, summarize_all(results, cfg.scale, tol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        pool, figures = None, len({r.label for r in results})
        if plots and workers > 1 and figures > 1:
            # forked before the writer thread below starts (a fork copies no thread, but it would copy
            # a lock that thread holds)
            pool = stack.enter_context(worker_pool(min(workers, figures)))
            pool.submit(int).result()   # a forking executor starts all its processes at its first job: now
        # the trajectories' file (≈ 1.5 s of zlib for the whole gallery, which releases the GIL) is
        # written by a thread while the table is made and the figures drawn; its errors surface here
        writer = stack.enter_context(ThreadPoolExecutor(1))
        npz = writer.submit(write_npz, out / "trajectories.npz",
                            {f"{file_label(r.label)}__init{r.init_index}": r.traj for r in results})
        rows = summarize_all(results, cfg.scale, tol)
        write_csv(rows, out / "table.csv")
        (out / "table.md").write_text(markdown_table(rows, tol))
        if plots:
            _draw(results, rows, cfg, out, trials, pool, say)
        npz.result()
    return results, rows


def _draw(results: Sequence[RunResult], rows: list[dict[str, Any]], cfg: EngineConfig, out: Path,
          trials: SearchTrials | None, pool: ProcessPoolExecutor | None, say: Callable[[str], None]) -> None:
    """Every method's figure (on ``pool``'s processes when given), the gallery and (with search
    trials) the overlay, into ``out``."""
    from .plots import LIM, plot_gallery, plot_search_overlay, subsample  # matplotlib: only when drawing

    start = time.perf_counter()
    groups: dict[str, list[RunResult]] = {}
    for r in results:  # the figures draw ≤ MAX_POINTS per run: send only those to the workers
        groups.setdefault(r.label, []).append(replace(r, traj=subsample(r.traj)))
    grid = loss_grid(LIM, 250, cfg.scale)
    jobs = [(label, runs, cfg.scale, out / f"{file_label(label)}.png",
             None if trials is None else trials.of(runs[0].name), grid) for label, runs in groups.items()]
    if pool is not None:
        # the gallery (the longest figure, ~6 s) first, on one process, while both draw the rest
        gallery = pool.submit(plot_gallery, groups, cfg.scale, out / "gallery.png")
        for _ in pool.map(_plot_method, jobs):   # (an executor: a worker that dies is an error, not a hang)
            pass
        gallery.result()
    else:
        for job in jobs:
            _plot_method(job)
        plot_gallery(groups, cfg.scale, out / "gallery.png")
    if trials is not None:
        ends = np.array([row[k] for row in rows if row["L1"] != "" for k in ("L1", "L2")]).reshape(-1, 2)
        plot_search_overlay(trials, cfg.scale, out / "search_overlay.png", ends)
    say(f"plots: {time.perf_counter() - start:.1f} s")


def _plot_method(job: tuple) -> Path:
    from .plots import plot_method

    label, runs, scale, path, trials, grid = job
    return plot_method(label, runs, scale, path, trials=trials, grid=grid)


def parser(prog: str = "python -m toy.trajectories") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="'all' or comma list; variants as name:param=value")
    p.add_argument("--exclude", default="", help="comma list of methods to leave out of 'all'")
    p.add_argument("--iters", type=int, default=None,
                   help=f"steps per run (default: the papers', {DEFAULT_ITERS}; FAMO {PAPER_ITERS['famo']})")
    p.add_argument("--scale", type=float, default=0.1, help="L1 = scale·f1 (task imbalance; papers 0.1)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.PARAM=VALUE")
    p.add_argument("--inits", default="0,1,2,3,4", help="indices into the papers' five inits")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method-params-lr", type=float, default=0.025, help="lr of learnable balancer params (UW)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="'reached the front' distance")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--engine", choices=("fast", "lockstep", "reference"), default="fast",
                   help="fast: batched NumPy kernels (toy/kernels, tested against the balancers) where a method "
                        "has one; lockstep: the public balancer API on the exact linearisation; reference: "
                        "train_step with autograd through the real forward")
    p.add_argument("--no-shift", action="store_true",
                   help="give methods without min_losses the raw (negative) losses instead of L - (-21s, -21)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-trials", default=None, help="trials.csv of a toy search to overlay on the front")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="toy_outputs")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m toy.trajectories") -> int:
    """``prog``: the command's name in usage and error lines (``mtl-tune toy`` from the console script)."""
    cli = parser(prog)
    args = cli.parse_args(argv)
    # bad input exits 2 with the usage line, as argparse's own errors do
    if not 0 < args.scale < math.inf:
        cli.error(f"--scale must be a finite number > 0, got {args.scale}")
    if args.seed < 0:
        cli.error(f"--seed must be >= 0, got {args.seed}")
    if args.iters is not None and args.iters < 1:
        cli.error("--iters must be >= 1")
    if args.workers < 1:
        cli.error(f"--workers must be >= 1, got {args.workers}")
    for flag, value in (("--lr", args.lr), ("--method-params-lr", args.method_params_lr), ("--tol", args.tol)):
        if not 0 < value < math.inf:
            cli.error(f"{flag} must be a finite number > 0, got {value}")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        cli.error(f"--out {args.out}: cannot create the folder ({err.strerror or err})")
    try:
        inits = [int(i) for i in args.inits.split(",") if i.strip()]
    except ValueError:
        inits = []
    if not inits or any(not 0 <= i < len(INITS) for i in inits) or len(set(inits)) != len(inits):
        cli.error(f"--inits must be distinct comma-separated indices in [0, {len(INITS) - 1}], got {args.inits!r}")
    if args.search_trials is not None:  # read before any run: a bad file is one line, not a traceback after it
        try:
            load_search_trials(args.search_trials, args.scale)
        except (OSError, ValueError) as err:
            cli.error(f"--search-trials {args.search_trials}: {err}")
    try:
        available_balancers()  # an installed plug-in that does not load: one line, before any work
        specs = build_specs(args.methods, parse_sets(args.sets), args.iters, args.scale,
                            [m.strip() for m in args.exclude.split(",") if m.strip()])
    except (ValueError, KeyError, PluginError) as err:
        cli.error(str(err).strip("'\""))
    cfg = EngineConfig(scale=args.scale, lr=args.lr, method_params_lr=args.method_params_lr,
                       shift=not args.no_shift, seed=args.seed, engine=args.engine)
    _, rows = run_trajectories(specs, inits, cfg, args.workers, Path(args.out), args.tol, args.search_trials,
                               plots=not args.no_plots, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown_table(rows, args.tol))
    print(f"wrote {args.out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
