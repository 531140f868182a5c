"""Batched NumPy kernels of the balancers for the fast toy engine (see :mod:`toy.kernels._base`).

One module per method, named like the method (``toy/kernels/cagrad.py``), holding one
:class:`~toy.kernels._base.Kernel` subclass whose ``name`` is the registry name. Discovered
here, so adding a kernel needs no other edit; methods without one run on the lockstep path.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from ._base import Kernel, NumpyAdam, clip_rows, combine, gram2

__all__ = ["Kernel", "NumpyAdam", "clip_rows", "combine", "gram2", "kernel_for", "kernels"]


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
    return found


def kernel_for(name: str) -> type[Kernel] | None:
    """The kernel class of method ``name``, or None (the method then runs on the lockstep path)."""
    return kernels().get(name)
