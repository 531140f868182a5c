"""The lockstep path: every init of a method advances together on a linearised loss.

Per step: one NumPy evaluation of the losses ℓ and their analytic Jacobian J at every init
(:func:`toy.landscape.toy_value_and_jacobian`); per init ``balancer.backward(ℓ̂(p), [p])``
with ℓ̂(p) = ℓ(x) + J p at a zero proxy leaf p — exact value, exact Jacobian, so any
balancer that uses loss values and first derivatives (every method here) writes the
gradient it would write for x; p.grad goes into row n of one Adam over the stacked inits
(Adam is element-wise: one Adam on (n, 2) *is* n independent Adams). Gradient methods get
the stored J from :class:`toy.common.KnownJacobian` instead of an autograd pass; ``ls``
(constant weights) serves all inits with one call (Σ_n w·ℓ̂_n has per-init gradient w·J_n).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mtl_tune.registry import balancer_class
from .common import (BATCHABLE, EngineConfig, KnownJacobian, MethodSpec, RunResult, epoch_end, extras_info,
                        loss_floor, make_balancer, optimizers, seed_all, start_point, warn_info)
from .landscape import gap_scores, toy_value_and_jacobian


class _Job:
    """One balancer instance in the lockstep and the init rows it drives."""

    def __init__(self, spec: MethodSpec, rows: list[int], results: list[RunResult]) -> None:
        self.rows, self.results, self.spec = rows, results, spec
        self.row = rows[0]
        self.engine = KnownJacobian()
        self.balancer = make_balancer(spec, self.engine)
        self.batched = len(rows) > 1
        shape = (len(rows), 2) if self.batched else (2,)
        self.proxy = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        self.rep = self.proxy if self.balancer.needs_representation else None
        self.alive = True
        self.info: Any = None

    def step(self, loss_rows: Sequence[Tensor], jac_rows: Sequence[Tensor], vals: Tensor, jac: Tensor,
             grad: np.ndarray) -> None:
        """One balancer step for this job's rows; writes their gradient rows into ``grad``."""
        p = self.proxy
        p.grad = None
        if self.batched:  # Σ_n ℓ̂_n(p_n): per-row gradients are exact for constant weights (BATCHABLE)
            losses = (vals[self.rows] + (jac[self.rows] @ p.unsqueeze(-1)).squeeze(-1)).sum(0)
        else:
            j = jac_rows[self.row]
            losses = loss_rows[self.row] + j @ p
            self.engine.prime(losses, p, j)
        self.info = self.balancer.backward(losses, [p], None, self.rep)
        if p.grad is None:
            raise RuntimeError("the balancer wrote no gradient for the shared parameter")
        g = p.grad.numpy()
        if not np.isfinite(g).all():
            raise RuntimeError(f"non-finite update {g.tolist()}")
        grad[self.rows] = g

    def fail(self, step: int, err: BaseException, grad: np.ndarray) -> None:
        self.alive = False
        grad[self.rows] = 0.0
        for res in self.results:
            res.status, res.reason, res.iters = "failed", f"step {step}: {type(err).__name__}: {err}", step


class Observer(Protocol):
    """Sees every step of a lockstep run (tests drive a kernel with the same inputs through it)."""

    def step(self, t: int, losses: np.ndarray, jac: np.ndarray, grad: np.ndarray, weights: np.ndarray,
             alive: np.ndarray) -> None:
        """Shifted losses (n, 2), Jacobian (n, 2, 2), the x.grad the balancers wrote (n, 2), their
        weights (n, 2) and which rows are still running, before the optimizer step ``t``."""

    def post(self, t: int, losses: np.ndarray) -> None:
        """Shifted losses after optimizer step ``t`` (what ``after_optimizer_step`` got)."""

    def epoch(self, epoch: int, mean_losses: np.ndarray, scores: np.ndarray) -> None:
        """What ``on_epoch_end`` got: the epoch's mean shifted losses and the gap scores."""


def run_lockstep(spec: MethodSpec, inits: Sequence[int], cfg: EngineConfig,
                 observer: Observer | None = None) -> list[RunResult]:
    """Run ``spec`` from every init in ``inits`` in lockstep (see the module docstring).

    Global RNGs are seeded with ``seed + init index`` before each init's balancer is built
    (as on the reference path), so a balancer that draws its own seed gets the same one on
    both paths and in any grouping of inits into processes. ``observer`` (tests) is shown
    every step's inputs and outputs.
    """
    if balancer_class(spec.name).needs_meta_batch:
        raise ValueError(f"{spec.name}: a meta step evaluates the losses at other parameters, which the "
                         "linearisation cannot give; run it on the reference path (toy.engine.run_method does)")
    n = len(inits)
    results = [RunResult(spec.label, spec.name, i, "ok", iters=spec.iters, path="lockstep", x0=start_point(cfg, i))
               for i in inits]
    shift = loss_floor(cfg.scale) if cfg.shift and "min_losses" not in spec.hparams else np.zeros(2)
    try:
        if spec.name in BATCHABLE and balancer_class(spec.name)(2, **spec.hparams).max_norm is None:
            seed_all(cfg.seed + inits[0])
            jobs = [_Job(spec, list(range(n)), results)]
            for r in results:
                r.path = "lockstep-batched"
        else:
            jobs = []
            for k in range(n):
                seed_all(cfg.seed + inits[k])  # same seed as the reference path for this init
                jobs.append(_Job(spec, [k], [results[k]]))
    except Exception as err:  # the method cannot even be built with these hyperparameters
        for r in results:
            r.status, r.reason = "skipped", f"{type(err).__name__}: {err}"
            r.traj = np.array([start_point(cfg, r.init_index)])
        return results
    x = torch.tensor([start_point(cfg, i) for i in inits], dtype=torch.float64, requires_grad=True)
    xn = x.detach().numpy()                    # shares memory with x: Adam's updates show here
    grad = np.zeros((n, 2))
    x.grad = torch.from_numpy(grad)           # shares memory: jobs write rows, Adam reads them
    opts = optimizers(x, [j.balancer for j in jobs], cfg)
    bal_params = [p for j in jobs for p in j.balancer.parameters()]
    post = [j for j in jobs if j.balancer.needs_post_step_losses]
    traj = np.empty((spec.iters + 1, n, 2))
    traj[0] = xn
    epoch_sum = np.zeros((n, 2))
    vals_np, jac_np = toy_value_and_jacobian(xn, cfg.scale)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for t in range(spec.iters):
            # balancers see the shifted losses; one subtraction and one unbind serve every job
            vals, jac = torch.from_numpy(vals_np - shift), torch.from_numpy(jac_np)
            loss_rows, jac_rows = vals.unbind(0), jac.unbind(0)
            for p in bal_params:
                p.grad = None
            for job in jobs:
                if job.alive:
                    try:
                        job.step(loss_rows, jac_rows, vals, jac, grad)
                    except Exception as err:  # reported per init in the table, never hidden
                        job.fail(t, err, grad)
            if observer is not None:
                alive = np.array([job.alive for job in jobs for _ in job.rows])
                weights = np.full((n, 2), np.nan)
                for job in jobs:
                    if job.alive and job.info is not None:
                        weights[job.rows] = job.info.weights.detach().double().cpu().numpy()
                observer.step(t, vals.numpy().copy(), jac_np.copy(), grad.copy(), weights, alive)
            if not any(j.alive for j in jobs):
                break
            for opt in opts:
                opt.step()
            traj[t + 1] = xn
            epoch_sum += vals_np
            vals_np, jac_np = toy_value_and_jacobian(xn, cfg.scale)
            if observer is not None and post:
                observer.post(t, vals_np - shift)
            for job in post:
                if job.alive:
                    try:
                        new = torch.from_numpy(vals_np[job.row] - shift)
                        job.balancer.after_optimizer_step(new)
                    except Exception as err:
                        job.fail(t + 1, err, grad)
            if (t + 1) % cfg.epoch_steps == 0:
                mean = epoch_sum / cfg.epoch_steps
                epoch_sum[:] = 0.0
                if observer is not None:
                    observer.epoch((t + 1) // cfg.epoch_steps - 1, mean - shift, gap_scores(mean, cfg.scale))
                for job in jobs:
                    if job.alive:
                        try:
                            epoch_end(job.balancer, (t + 1) // cfg.epoch_steps - 1, mean[job.rows].mean(0),
                                      shift, cfg.scale)
                        except Exception as err:
                            job.fail(t + 1, err, grad)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    for k, res in enumerate(results):
        steps = res.iters if res.status == "failed" else spec.iters
        res.traj = traj[: steps + 1, k].copy()
        res.seconds, res.cpu_seconds = seconds / n, cpu / n
        warn_info(caught, res)
    for job in jobs:
        for res in job.results:
            extras_info(job.info, res)
    return results
