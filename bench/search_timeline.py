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

import _common as c  # (sets OMP_WAIT_POLICY before torch loads; puts the checkout first)

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


def given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def main() -> int:
    args = sys.argv[1:]
    if not given(args, "--storage-path"):
        args += ["--storage-path", tempfile.mkdtemp(prefix="search_timeline_")]
    mark("interpreter up")
    import mtl_tune.search.execution as execution
    from mtl_tune.search import cli, runner

    mark("search modules imported")
    plans = []
    prepare = runner.prepare
    runner.prepare = lambda options: plans.append(prepare(options)) or plans[-1]  # the sweep folder it chose
    wrap(runner, "prepare", lambda a: "argument and space checks (prepare)")
    wrap(execution, "init_ray", lambda a: "ray.init")
    wrap(execution, "run_method", lambda a: f"method {a[1]}")
    wrap(execution, "finish", lambda a: "trial table")
    wrap(execution, "plot_front", lambda a: "Pareto plot")
    code = cli.main(args)
    mark(f"exit {code}")
    print("\n" + c.markdown_table(["s", "driver"], [(f"{t:6.2f}", what) for t, what in PHASES]))
    spans = trial_spans(plans[0].sweep_dir) if plans else []
    if not spans:
        print("no trial reported a result (see the search's own output above)", file=sys.stderr)
        return code or 1
    print("\n" + c.markdown_table(["start s", "end s", "first epoch s", "experiment", "trial"],
                                  [(f"{s:6.1f}", f"{e:6.1f}", f"{f:5.2f}", exp, trial)
                                   for s, e, f, exp, trial in spans]))
    return code


if __name__ == "__main__":
    sys.exit(main())
