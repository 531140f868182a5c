"""Where a search command's wall time goes: the driver's phases and every trial's span, one run.

Runs ``python -m mtl_tune.search ARGS`` in this process with timestamps around the driver's
phases (argument and space checks, ``ray.init``, each method's ``Tuner.fit``, the tables and the
plot), then reads each trial's ``result.json`` for when its trainable started (last report's
``timestamp`` − ``time_total_s``; Ray stamps whole seconds, so ± 1 s), when it ended, and how long
its first epoch took (a fresh actor's first trial pays the imports the next ones reuse).

    python bench/search_timeline.py                            # the README's main command
    python bench/search_timeline.py --method cagrad --num-samples 8

Every argument is the search's; ``--storage-path`` defaults to a fresh temporary folder.
"""

from __future__ import annotations

import _common as c  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads; puts the checkout first)

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

START = time.time()
PHASES: list[tuple[float, str]] = []


def mark(what: str) -> None:
    PHASES.append((time.time() - START, what))


def wrap(module, name: str, label) -> None:
    inner = getattr(module, name)

    def timed(*args, **kwargs):
        mark(f"{label(args)} start")
        try:
            return inner(*args, **kwargs)
        finally:
            mark(f"{label(args)} end")

    setattr(module, name, timed)


def trial_spans(sweep: Path) -> list[tuple[float, float, float, str, str]]:
    """(start, end, first epoch s, experiment, trial folder) per trial, seconds since START."""
    spans = []
    for result in sorted(sweep.glob("*/*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        last = lines[-1]
        spans.append((last["timestamp"] - last["time_total_s"] - START, last["timestamp"] - START,
                      lines[0]["time_this_iter_s"], result.parent.parent.name, result.parent.name))
    return sorted(spans)


def main() -> int:
    args = sys.argv[1:]
    if "--storage-path" not in args:
        args += ["--storage-path", tempfile.mkdtemp(prefix="search_timeline_")]
    if "--name" not in args:
        args += ["--name", "timeline"]
    mark("interpreter up")
    import mtl_tune.search.execution as execution
    from mtl_tune.search import cli, runner

    mark("search modules imported")
    wrap(runner, "prepare", lambda a: "argument and space checks (prepare)")
    wrap(execution, "init_ray", lambda a: "ray.init")
    wrap(execution, "run_method", lambda a: f"method {a[1]}")
    wrap(execution, "finish", lambda a: "trial table")
    wrap(execution, "plot_front", lambda a: "Pareto plot")
    code = cli.main(args)
    mark(f"exit {code}")
    sweep = Path(args[args.index("--storage-path") + 1]).expanduser() / args[args.index("--name") + 1]
    print("\n| s | driver |\n|---|---|")
    for t, what in PHASES:
        print(f"| {t:6.2f} | {what} |")
    print("\n| start s | end s | first epoch s | experiment | trial |\n|---|---|---|---|---|")
    for start, end, first, exp, trial in trial_spans(sweep):
        print(f"| {start:6.1f} | {end:6.1f} | {first:5.2f} | {exp} | {trial} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
