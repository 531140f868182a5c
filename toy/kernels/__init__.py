"""Batched kernels of the balancers for the fast toy engine (see :mod:`toy.kernels._base`).

A method whose balancer has a batch-first rule (``weights_rows``, :mod:`mtl_tune.balancers._rows`)
runs on the generic :class:`~toy.kernels._rows.RowsKernel`, which calls that rule: nothing to add
here. The methods not yet written batch-first still have a module of their own, named like the
method (``toy/kernels/famo.py``), holding a :class:`~toy.kernels._base.Kernel` subclass; a method
with both is an error (the module is a second copy of the math and must go). Methods with
neither run on the lockstep path.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from mtl_tune.registry import available_balancers, balancer_class
from ._base import Kernel, NumpyAdam, clip_rows, combine, gram2
from ._rows import RowsKernel, rule_kind

__all__ = ["Kernel", "NumpyAdam", "RowsKernel", "clip_rows", "combine", "gram2", "kernel_for", "kernels"]


@lru_cache(maxsize=1)
def kernels() -> dict[str, type[Kernel]]:
    """Registry name → kernel class, for every module in this package."""
    found: dict[str, type[Kernel]] = {}
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Kernel) and obj is not Kernel and obj.name:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two toy kernels claim method {obj.name!r}")
                found[obj.name] = obj
    for name in available_balancers():
        kind = rule_kind(balancer_class(name))
        if kind is None:
            continue
        if name in found:
            raise RuntimeError(f"method {name!r} has a batch-first rule and a toy kernel module; delete "
                               f"toy/kernels/{name}.py (the generic kernel runs the rule)")
        found[name] = RowsKernel.for_method(name, kind, balancer_class(name).needs_post_step_losses)
    return found


def kernel_for(name: str) -> type[Kernel] | None:
    """The kernel class of method ``name``, or None (the method then runs on the lockstep path)."""
    return kernels().get(name)
