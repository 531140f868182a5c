"""Benchmarks: tasks, model, data, losses and metrics behind one interface.

``get_benchmark(name, **options)`` builds one by name; ``available_benchmarks()`` lists them.
"""

from mtl_tune.benchmarks.base import Benchmark, DataError, Setup
from mtl_tune.registry import available_benchmarks, benchmark_class, get_benchmark

__all__ = ["Benchmark", "DataError", "Setup", "available_benchmarks", "benchmark_class", "get_benchmark"]
