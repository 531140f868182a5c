"""Run balancers on the toy problem: the public balancer API, and the fast batched engine.

Protocol (docs/benchmarks.md#toy-protocol): x ∈ R² starts at one of the five
:data:`~mtl_tune.benchmarks.toy.INITS`; Adam (lr 1e-3) on x; the balancer's own learnable
parameters (UW) in a second Adam with their ``param_groups`` lr or ``method_params_lr``
(0.025, the FAMO-family ``--method-params-lr``). The trajectory holds the init and the
point after every step (``iters + 1`` rows).

Three interchangeable paths (tested to agree):

* **fast** (default) — :mod:`toy.fast`: every method with a batched kernel (:mod:`toy.kernels`:
  the balancer's own batch-first rule on all inits of a variant) runs with all its variants and
  inits — and with the other methods of the same worker — in one lockstep; ~5–40 µs per step for
  all rows of a method instead of 50 µs–2 ms per step and init. Each kernel is tested to write
  the same x.grad as the balancer's ``backward`` at every step (``tests/test_toy_kernels.py``).
  Methods without a kernel fall through to the paths below, and the table's ``path`` column says
  which ran.

* **reference** — per init, ``balancer.train_step(forward, optimizer, [x], None)`` with the
  real forward :func:`~mtl_tune.benchmarks.toy.toy_objectives`; ~0.7–2 ms per step.
  Used for methods that override ``train_step`` (training-loop methods such as STGU) and for
  methods with a meta step (Auto-λ: ``meta_step`` before every ``train_step``, as the trainer).
* **lockstep** — all inits of a method advance together: one NumPy evaluation of the
  losses and their analytic Jacobian J (:func:`toy.landscape.toy_value_and_jacobian`) for
  every init, then per init ``balancer.backward(ℓ̂(p), [p])`` on the *linearisation*
  ℓ̂(p) = ℓ(x) + J p at a zero proxy leaf p. ℓ̂ has the exact value and the exact Jacobian
  (∂ℓ̂/∂p = J = ∂ℓ/∂x), so any balancer that only uses loss values and first derivatives
  (every method here) writes exactly the gradient it would write for x; p.grad is copied
  into one (n_inits, 2) Adam (Adam is element-wise, so one Adam on the stacked inits *is*
  n independent Adams). Gradient methods get the stored J from :class:`KnownJacobian`
  instead of an autograd pass. For ``ls`` (constant weights) one balancer call serves all
  inits at once: Σ_n w·ℓ̂_n has per-init gradient w·J_n (``BATCHABLE``).

Toy adaptations (documented in docs/toy.md): methods with a ``min_losses`` argument
(FAMO, SI) get (−21·s, −21) as in FAMO's toy trainer; every other method sees the losses
shifted by that constant (``shift=True``; it changes no gradient, only what loss-value
methods such as DWA/GO4Align/GradNorm/UW see, which need positive losses). Methods that
need a representation see z = x (identity encoder); per-task scores for ``on_epoch_end``
are the gaps to the single-task optima (:func:`toy.landscape.gap_scores`), one "epoch" =
``epoch_steps`` (1000, the Toy benchmark's steps_per_epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_tune.balancers.base import Balancer
from mtl_tune.registry import balancer_class
from .common import (BATCHABLE, TOY_SKIPS, EngineConfig, KnownJacobian, MethodSpec, RunResult,
                        loss_floor, protocol_hparams, start_point)
from .fast import has_kernel, run_fast
from .lockstep import run_lockstep
from .reference import run_reference

__all__ = ["BATCHABLE", "TOY_SKIPS", "EngineConfig", "KnownJacobian", "MethodSpec", "RunResult",
           "has_kernel", "loss_floor", "protocol_hparams", "run_fast", "run_lockstep", "run_method", "run_reference",
           "uses_fast", "uses_reference"]


def is_training_loop(name: str) -> bool:
    """Whether the method needs real forwards at other parameters than the step's: it overrides
    ``train_step`` (several forwards/optimizer steps per batch, STGU) or takes a meta step before each
    step (``needs_meta_batch``, Auto-λ). The lockstep path's linearisation cannot serve either."""
    cls = balancer_class(name)
    return cls.train_step is not Balancer.train_step or cls.needs_meta_batch


def uses_fast(spec: MethodSpec, cfg: EngineConfig) -> bool:
    """``engine="fast"`` and the method has a batched kernel (:mod:`toy.kernels`)."""
    return cfg.engine == "fast" and spec.name not in TOY_SKIPS and has_kernel(spec)


def uses_reference(spec: MethodSpec, cfg: EngineConfig) -> bool:
    """Training-loop methods without a kernel need a real forward per sub-step; ``engine="reference"`` forces it."""
    return cfg.engine == "reference" or (is_training_loop(spec.name) and not uses_fast(spec, cfg))


def run_method(spec: MethodSpec, inits: Sequence[int], cfg: EngineConfig) -> list[RunResult]:
    """Run one method variant from ``inits`` on the path it needs (or list it as skipped)."""
    if spec.name in TOY_SKIPS:
        return [RunResult(spec.label, spec.name, i, "skipped", TOY_SKIPS[spec.name],
                          np.array([start_point(cfg, i)], float), iters=0, path="skipped", x0=start_point(cfg, i))
                for i in inits]
    if cfg.engine == "reference":
        return run_reference(spec, inits, cfg)
    if cfg.engine == "fast" and has_kernel(spec):
        return run_fast([spec], inits, cfg)
    if is_training_loop(spec.name):
        return run_reference(spec, inits, cfg, analytic=True)
    return run_lockstep(spec, inits, cfg)
