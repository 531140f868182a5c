"""Batched kernels of the balancers for the fast toy engine (see :mod:`toy.kernels._base`).

Every method whose balancer has a batch-first rule (:mod:`mtl_tune.balancers._rows`) runs on the
generic :class:`~toy.kernels._rows.RowsKernel`, which calls that rule — the balancer's own math —
on all rows of a variant: adding a method to the toy needs nothing here. There are no per-method
kernels: a second copy of a method's math would have to be kept in step with the balancer by
hand. Methods without a rule (a plug-in that only implements ``backward``; ``consmtl``) run on
the lockstep path, and the table's ``path`` column says so.
"""

from __future__ import annotations

from functools import lru_cache

from mtl_tune.registry import available_balancers, balancer_class
from ._base import Kernel, NumpyAdam, clip_rows, combine
from ._rows import RowsKernel, rule_kind

__all__ = ["Kernel", "NumpyAdam", "RowsKernel", "clip_rows", "combine", "kernel_for", "kernels"]


@lru_cache(maxsize=1)
def kernels() -> dict[str, type[Kernel]]:
    """Registry name → kernel class, for every registered method with a batch-first rule."""
    found: dict[str, type[Kernel]] = {}
    for name in available_balancers():
        kind = rule_kind(balancer_class(name))
        if kind is not None:
            found[name] = RowsKernel.for_method(name, kind, balancer_class(name).needs_post_step_losses)
    return found


def kernel_for(name: str) -> type[Kernel] | None:
    """The kernel class of method ``name``, or None (the method then runs on the lockstep path)."""
    return kernels().get(name)
