"""Pieces shared by the kernels of the gradient balancers (cagrad, imtl, pcgrad, gradvac, graddrop).

All of them are :class:`~mtl_tune.balancers.base.GradientBalancer` subclasses, whose ``backward``
checks its inputs before ``combine`` runs: a non-finite loss (``check_losses``) or a Jacobian
whose sum is not finite raises :class:`~mtl_tune.balancers.base.BalancerError`.
:func:`fail_bad_inputs` makes the same rows fail at the same step with the same message; a
non-finite *direction* is caught by the engine itself (``toy.fast``), as on the lockstep path.
"""

from __future__ import annotations

import numpy as np

from toy.kernels._base import Kernel


def fail_bad_inputs(kernel: Kernel, step: int, losses: np.ndarray, jac: np.ndarray) -> None:
    """``GradientBalancer.backward``'s input checks on every row: non-finite losses (B, 2), then a
    non-finite Jacobian sum (B, 2, 2) — each row fails with the balancer's own message.

    The common case costs two reductions: every |J entry| below 1e307 (NaN fails the comparison)
    means no row's sum of 4 entries can overflow, and a finite sum of the losses means none is
    NaN or ±inf; only otherwise are the rows looked at one by one.
    """
    if np.abs(jac).max() < 1e307 and np.isfinite(losses.sum()):
        return
    with np.errstate(all="ignore"):
        bad_loss = ~np.isfinite(losses).all(-1)
        bad_jac = ~np.isfinite(jac.sum((-2, -1))) & ~bad_loss
    name = kernel.name
    if bad_loss.any():
        kernel.fail(bad_loss, step, [f"BalancerError: {name}: non-finite task loss {row.tolist()}" for row in losses])
    if bad_jac.any():
        kernel.fail(bad_jac, step, f"BalancerError: {name}: non-finite per-task gradient")
