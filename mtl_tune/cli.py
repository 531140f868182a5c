"""``mtl-tune``: one console command for the search, the analysis and the toy trajectories.

``mtl-tune search ARGS`` is ``python -m mtl_tune.search ARGS``, ``mtl-tune analyze ARGS``
is ``python -m mtl_tune.analyze ARGS`` and ``mtl-tune toy ARGS`` is
``python -m toy.trajectories ARGS`` (in a checkout; an installed package carries the
same code as ``mtl_tune._toy``). ``mtl-tune --version`` prints the package version.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence

import mtl_tune

COMMANDS = {
    "search": "tune balancer hyperparameters with Ray Tune + Optuna (python -m mtl_tune.search)",
    "analyze": "report on finished sweeps (python -m mtl_tune.analyze)",
    "toy": "optimisation trajectories of every method on the toy problem (python -m toy.trajectories)",
}

USAGE = "usage: mtl-tune [--version] {search,analyze,toy} [ARGS...]\n\ncommands:\n" + "".join(
    f"  {name:<8} {text}\n" for name, text in COMMANDS.items()) + "\n`mtl-tune COMMAND --help` lists a command's options.\n"


def _search_main() -> Callable[[list[str]], int]:
    # before torch / scikit-learn load (as python -m mtl_tune.search does)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mtl_tune.search.cli import main

    return main


def _analyze_main() -> Callable[[list[str]], int]:
    from mtl_tune.analyze import main

    return main


def _toy_main() -> Callable[[list[str]], int]:
    try:  # an installed package
        from mtl_tune._toy.trajectories import main
    except ImportError:  # a checkout: the repository's toy/ folder
        from toy.trajectories import main
    # usage and error lines name the command the user typed (python -m toy.trajectories exists only
    # in a checkout)
    return functools.partial(main, prog="mtl-tune toy")


ENTRY_POINTS = {"search": _search_main, "analyze": _analyze_main, "toy": _toy_main}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"mtl-tune {mtl_tune.__version__}")
        return 0
    if args[0] not in ENTRY_POINTS:
        print(f"{USAGE}\nerror: unknown command {args[0]!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(ENTRY_POINTS[args[0]]()(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
