"""Search: Ray Tune trials with Optuna choosing balancer hyperparameters.

Entry point: ``python -m mtl_tune.search --help``. Programmatic use::

    from mtl_tune.search import SearchOptions, prepare, execute
    outcome = execute(prepare(SearchOptions(benchmark="toy", methods=["cagrad"])))
"""

from mtl_tune.search.runner import SearchError, SearchOptions, prepare

__all__ = ["SearchError", "SearchOptions", "execute", "prepare"]


def execute(plan):  # imported lazily: Ray is heavy and not needed for validation
    from mtl_tune.search.execute import execute as _execute

    return _execute(plan)
