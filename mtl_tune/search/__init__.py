"""Search: Ray Tune trials with Optuna choosing balancer hyperparameters.

Command line: ``python -m mtl_tune.search --help`` (or ``mtl-tune search --help``).
Programmatic use (documented with a runnable example in ``docs/api.md``)::

    from mtl_tune.search import SearchOptions, prepare, execute
    plan = prepare(SearchOptions(benchmark="toy", methods=["cagrad"], num_samples=2))
    outcome = execute(plan)          # starts a local Ray cluster unless options.address is set
    outcome.table                    # the tidy trial table, also in outcome.table_path

The public names are exactly those in ``__all__``. :func:`execute` is a function here; the
module that implements it is :mod:`mtl_tune.search.execution` (imported on first call,
because Ray is heavy and validation does not need it); the other names load on first use too,
so ``python -m mtl_tune.search --help`` imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mtl_tune.search.execution import Outcome
    from mtl_tune.search.runner import Plan, SearchError, SearchOptions, prepare

__all__ = ["Outcome", "Plan", "SearchError", "SearchOptions", "execute", "prepare"]


def execute(plan: Plan) -> Outcome:
    """Run a validated plan on Ray Tune; returns the :class:`~mtl_tune.search.execution.Outcome`."""
    from mtl_tune.search.execution import execute as _execute

    return _execute(plan)


def __getattr__(name: str):
    if name in ("Plan", "SearchError", "SearchOptions", "prepare"):
        from mtl_tune.search import runner

        return getattr(runner, name)
    if name == "Outcome":
        from mtl_tune.search.execution import Outcome

        return Outcome
    raise AttributeError(f"module 'mtl_tune.search' has no attribute {name!r}")
