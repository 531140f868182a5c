"""``python -m mtl_tune.analyze RESULTS... [--out DIR] [--format md|html]``: report on sweeps.

Each RESULTS is a sweep directory (``trials.csv`` + ``sweep.json``, or a Ray Tune
experiment directory without ``trials.csv``, rebuilt from its JSON/CSV files) or a
``trials.csv`` file. Nothing in RESULTS is unpickled unless ``--allow-pickle`` is given,
so a folder from someone else is safe to analyse. The report
(``report.md`` or ``report.html`` plus PNGs) goes to ``--out``. A missing or unreadable
path, or an ``--out`` that is (or lies under) a file, prints one error line and exits with
status 2 (no traceback). A sweep given twice is read once; two folders whose sweeps share a
name are labelled ``"<name> (<folder>)"``; a ``trials.csv`` cut off mid-write or lacking
trials of its folder is rebuilt from the trial folders; each says so in a ``warning:`` line.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtl_tune.analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS", help="sweep directories or trials.csv files")
    p.add_argument("--out", default="results/analysis", help="output directory (default: results/analysis)")
    p.add_argument("--format", choices=("md", "html"), default="md", help="report format (default: md)")
    p.add_argument("--include-incomplete", action="store_true",
                   help="let errored / early-stopped / diverged trials take part in Pareto fronts and hypervolume")
    p.add_argument("--allow-pickle", action="store_true",
                   help="rebuild tables of folders without trials.csv with Ray's ExperimentAnalysis, which "
                        "unpickles Tune's state and so RUNS CODE from the folder: only for sweeps you wrote "
                        "(default: read JSON/CSV files only)")
    p.add_argument("--rank-by", default=None, metavar="METRIC[:min|max]",
                   help="also rank trials of multi-objective sweeps by this scalar (e.g. val/delta_m); by default "
                        "they are summarised by per-method hypervolume and non-dominated counts only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # imported here so that --help answers without loading pandas/matplotlib
    from mtl_tune.analysis.report import write_report
    from mtl_tune.analysis.sweep import SweepNotFoundError, SweepWarning, load_sweep

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SweepWarning)
            df = load_sweep(args.results, allow_pickle=args.allow_pickle)
    except (SweepNotFoundError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _print_warnings(caught)
    if df.empty:
        print(f"error: no trials in {', '.join(args.results)}", file=sys.stderr)
        return 2
    problem = out_dir_problem(Path(args.out))
    if problem:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        path = write_report(df, args.out, args.format, include_incomplete=args.include_incomplete,
                            rank_by=args.rank_by)
    except (KeyError, ValueError) as err:
        print(f"error: cannot analyse {', '.join(args.results)}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # full disk, no permission: the report's folder, not the sweep, is at fault
        print(f"error: cannot write the report to {args.out}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Repeat the loader's warnings as one ``warning:`` line each (a cut table, a sweep given twice)."""
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def out_dir_problem(out: Path) -> str | None:
    """Why the report cannot go to folder ``out`` (it, or a folder above it, is a file), else None;
    checked before anything is computed so the user gets one line instead of a traceback."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():
                return None
            return "exists and is not a folder" if p == out else f"{p} exists and is not a folder"
    return None


if __name__ == "__main__":
    sys.exit(main())
