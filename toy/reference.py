"""The reference path: per init, ``balancer.train_step`` with the real toy forward.

Every step is exactly what a user's training loop does: ``train_step(forward, optimizer,
[x], None)`` with ``forward`` = :func:`mtl_tune.benchmarks.toy.toy_objectives` (minus the
loss shift, see :mod:`toy.engine`), Adam on x (and on the balancer's parameters), the
post-step loss update for FAMO inside ``train_step``, ``on_epoch_end`` every
``epoch_steps``. Slow (~1–2 ms per step: autograd through 35 tiny operators) but the
ground truth the lockstep path is tested against. Methods that override ``train_step``
(STGU takes several optimizer steps per batch) and methods with a meta step (Auto-λ, whose
``meta_step`` runs before every ``train_step`` as in the trainer, with the same forward as its
second batch: the toy has no data) can only run this way; the lockstep engine runs them here with
the analytic forward :func:`toy.landscape.toy_losses`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mtl_tune.balancers.base import ForwardOutput
from mtl_tune.benchmarks.toy import toy_objectives
from .common import (EngineConfig, MethodSpec, RunResult, epoch_end, extras_info, loss_floor, make_balancer,
                        optimizers, seed_all, start_point, warn_info)
from .landscape import toy_losses


def run_reference(spec: MethodSpec, inits: Sequence[int], cfg: EngineConfig, analytic: bool = False
                  ) -> list[RunResult]:
    """Per init: ``balancer.train_step`` with the real forward (see the module docstring).

    ``analytic=True`` swaps :func:`~mtl_tune.benchmarks.toy.toy_objectives` for
    :func:`toy.landscape.toy_losses` (same values and gradients, ~3× cheaper), the forward
    the lockstep engine gives training-loop methods.
    """
    losses_of = toy_losses if analytic else toy_objectives
    out = []
    for i in inits:
        seed_all(cfg.seed + i)
        res = RunResult(spec.label, spec.name, i, "ok", iters=spec.iters,
                        path="reference-analytic" if analytic else "reference", x0=start_point(cfg, i))
        try:
            balancer = make_balancer(spec)
        except Exception as err:
            res.status, res.reason = "skipped", f"{type(err).__name__}: {err}"
            res.traj = np.array([start_point(cfg, i)])
            out.append(res)
            continue
        shift = torch.from_numpy(loss_floor(cfg.scale) if cfg.shift and "min_losses" not in spec.hparams
                                 else np.zeros(2))
        x = torch.tensor(start_point(cfg, i), dtype=torch.float64, requires_grad=True)
        opts = optimizers(x, [balancer], cfg)
        optimizer: Any = opts[0] if len(opts) == 1 else _Chain(opts)

        def forward() -> ForwardOutput:
            return ForwardOutput(losses_of(x, cfg.scale) - shift,
                                 representation=x if balancer.needs_representation else None)

        traj = np.empty((spec.iters + 1, 2))
        traj[0] = x.detach().numpy()
        epoch_sum = np.zeros(2)
        start, cpu = time.perf_counter(), time.process_time()
        info = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for t in range(spec.iters):
                try:
                    if balancer.needs_meta_batch:  # as the trainer; the toy's second batch is the same objective
                        balancer.meta_step(forward, forward, optimizer, [x], None)
                    losses, info = balancer.train_step(forward, optimizer, [x], None)
                    if not bool(torch.isfinite(x).all()):
                        raise RuntimeError(f"non-finite point {x.tolist()}")
                    traj[t + 1] = x.detach().numpy()
                    epoch_sum += losses.numpy() + shift.numpy()
                    if (t + 1) % cfg.epoch_steps == 0:
                        epoch_end(balancer, (t + 1) // cfg.epoch_steps - 1, epoch_sum / cfg.epoch_steps,
                                  shift.numpy(), cfg.scale)
                        epoch_sum[:] = 0.0
                except Exception as err:  # reported in the table with its step, never hidden
                    res.status, res.reason, res.iters = "failed", f"step {t}: {type(err).__name__}: {err}", t
                    break
        res.seconds, res.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        warn_info(caught, res)
        res.traj = traj[: res.iters + 1].copy()
        extras_info(info, res)
        out.append(res)
    return out


class _Chain:
    """Two optimizers behind one ``zero_grad``/``step`` (x's Adam and the balancer's params)."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts

    # what a meta step reads (the learning rate of the group holding x, its state), read live: the
    # optimizers create their state at their first step
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.opts for g in o.param_groups]

    @property
    def state(self) -> dict[Any, Any]:
        return {p: st for o in self.opts for p, st in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        for o in self.opts:
            o.step()
