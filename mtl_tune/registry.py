"""One registry for method and benchmark names.

Adding a method is one file in ``mtl_tune/balancers/`` (a :class:`Balancer` subclass with
a ``name``) plus one ``search_spaces/<name>.yaml``; adding a benchmark is one file in
``mtl_tune/benchmarks/``. The registry imports those packages' public modules once and
maps names to classes; modules whose name starts with ``_`` and ``base`` are skipped.
Unknown names raise :class:`UnknownNameError`, whose message lists the valid names.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache
from typing import Any


class UnknownNameError(KeyError):
    """An unknown method or benchmark name; ``str()`` lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def _scan(package: str, base_name: str) -> dict[str, type]:
    pkg = importlib.import_module(package)
    base = getattr(importlib.import_module(f"{package}.base"), base_name)
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, base) and obj.__module__ == module.__name__ and getattr(obj, "name", ""):
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two classes register the name {obj.name!r}: "
                                       f"{found[obj.name].__module__} and {obj.__module__}")
                found[obj.name] = obj
    return dict(sorted(found.items()))


@cache
def balancer_classes() -> dict[str, type]:
    return _scan("mtl_tune.balancers", "Balancer")


@cache
def benchmark_classes() -> dict[str, type]:
    return _scan("mtl_tune.benchmarks", "Benchmark")


def available_balancers() -> list[str]:
    return list(balancer_classes())


def available_benchmarks() -> list[str]:
    return list(benchmark_classes())


def balancer_class(name: str) -> type:
    classes = balancer_classes()
    if name not in classes:
        raise UnknownNameError("method", name, list(classes))
    return classes[name]


def benchmark_class(name: str) -> type:
    classes = benchmark_classes()
    if name not in classes:
        raise UnknownNameError("benchmark", name, list(classes))
    return classes[name]


def get_balancer(name: str, n_tasks: int, **hparams: Any):
    """Instantiate the balancer ``name`` for ``n_tasks`` tasks with its hyperparameters."""
    return balancer_class(name)(n_tasks, **hparams)


def get_benchmark(name: str, **options: Any):
    return benchmark_class(name)(**options)
