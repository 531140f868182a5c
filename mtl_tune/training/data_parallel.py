"""One trial on several data-parallel workers (``--workers-per-trial N``), without Ray.

Every worker (rank r of N, torch.distributed initialised by the caller: gloo on CPUs,
nccl on GPUs) builds the same run from the same config and seed, so all ranks start from
the same weights and draw the *same* sequence of global batches (``batch_size`` stays the
global batch). Rank r trains on the r-th contiguous 1/N slice of each global batch, with
the model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` and the balancer
averaging losses and per-task Jacobians across ranks (:mod:`mtl_tune.distributed`). With
mean-reduced losses and equal slices, one N-worker step is the step of one worker on the
whole global batch (up to float summation order) — the point of this design: results of a
search with N workers are comparable with N = 1.

* A global batch whose size is not a multiple of N (the last, short batch of an epoch) is
  cut to the largest multiple of N; the at most N − 1 samples cut are skipped this epoch
  (a batch shorter than N is skipped whole). Every rank then runs the same number of steps.
* The reported training losses are the mean over ranks (the global batch's loss), so the
  keys and their meaning match the single-worker case; ``workers`` records N.
* Evaluation runs on rank 0 only (the model is the same on every rank) and its metrics are
  broadcast, so learning-rate schedules on metrics and score-based balancers (PIVRG) step
  identically on every rank; an evaluation failure on rank 0 is raised on every rank.
* Only rank 0's metrics and state are used by the caller (every rank calls ``report``:
  Ray Train's report is a barrier).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mtl_tune.benchmarks.base import ConfigError, DataError
from mtl_tune.training.loop import DivergedError, Reporter, Trainer, is_divergence


def shard_batch(batch: Any, rank: int, world: int) -> Any | None:
    """Rank ``rank``'s contiguous slice of ``batch`` (a tensor, or tuple / list / dict of
    tensors sharing the first dimension), cut to a multiple of ``world`` samples; ``None``
    when the batch has fewer than ``world`` samples."""
    size = _batch_size(batch)
    per_rank = size // world
    if per_rank == 0:
        return None
    return _slice(batch, slice(rank * per_rank, (rank + 1) * per_rank))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    parts = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else None
    sizes = {_batch_size(p) for p in parts or ()}
    if len(sizes) != 1:
        raise ConfigError(f"--workers-per-trial: cannot split a training batch of type {type(batch).__name__} "
                          f"(sizes {sorted(sizes)}) into equal per-worker slices")
    return sizes.pop()


def _slice(batch: Any, part: slice) -> Any:
    if isinstance(batch, Tensor):
        return batch[part]
    if isinstance(batch, dict):
        return {k: _slice(v, part) for k, v in batch.items()}
    return type(batch)(_slice(v, part) for v in batch)


def sharded(train_batches: Callable[[int], Iterable[Any]], rank: int, world: int) -> Callable[[int], Iterator[Any]]:
    """``train_batches`` yielding only this rank's slice of every global batch."""

    def batches(epoch: int) -> Iterator[Any]:
        for batch in train_batches(epoch):
            part = shard_batch(batch, rank, world)
            if part is not None:
                yield part

    return batches


def route_calls_through(module: nn.Module, wrapper: nn.Module) -> None:
    """Make ``module(...)`` go through ``wrapper`` (DDP) whenever gradients are recorded.

    A benchmark's ``forward`` closure calls the model it built; DDP only averages the
    gradients of a backward that follows a call of the DDP wrapper. Under ``no_grad``
    (evaluation, FAMO's post-step losses) the plain module runs: no collective, so rank 0
    can evaluate alone."""
    plain_forward = type(module).forward
    inside = [False]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if inside[0] or not torch.is_grad_enabled():
            return plain_forward(module, *args, **kwargs)
        inside[0] = True
        try:
            return wrapper(*args, **kwargs)
        finally:
            inside[0] = False

    module.forward = forward  # type: ignore[method-assign]


class DataParallelTrainer(Trainer):
    """:class:`Trainer` on rank ``rank`` of ``world`` (torch.distributed is initialised)."""

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
            raise RuntimeError(f"DataParallelTrainer needs torch.distributed initialised with {world} ranks")
        super().__init__(config)
        reason = self.bench.data_parallel
        if reason is not True:
            raise ConfigError(f"--workers-per-trial {world}: benchmark {self.bench.name} cannot be split "
                              f"across workers: {reason}")
        if not type(self.balancer).supports_distributed:
            raise ConfigError(f"--workers-per-trial {world}: method {self.balancer.name} does not support "
                              "data-parallel training (supports_distributed = False)")
        self.rank, self.world = rank, world
        model = self.setup.model
        device_ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids)  # broadcasts rank 0's weights
        route_calls_through(model, self.ddp)
        self.setup.train_batches = sharded(self.setup.train_batches, rank, world)

    def _across_ranks(self, per_rank_sum: Tensor) -> Tensor:
        total = per_rank_sum.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world

    def evaluate(self) -> dict[str, float]:
        payload: list[Any] = [None]
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                out = super().evaluate()
                payload[0] = ("ok", out, self._first_split_values)
            except Exception as err:  # told to every rank before rank 0 raises it
                failure = err
                payload[0] = (_failure_kind(err), f"{type(err).__name__}: {err}", None)
        dist.broadcast_object_list(payload, src=0)
        kind, value, first = payload[0]
        if failure is not None:
            raise failure
        if kind != "ok":  # the other ranks fail in the same class (the trainer classifies it once)
            raise _FAILURE_CLASSES[kind](f"on rank 0: {value}")
        if self.rank != 0:
            self._first_split_values = first
        return dict(value)


_FAILURE_CLASSES: dict[str, type[Exception]] = {"divergence": DivergedError, "data": DataError,
                                                "config": ConfigError, "error": RuntimeError}


def _failure_kind(err: BaseException) -> str:
    if isinstance(err, DataError):
        return "data"
    if isinstance(err, ConfigError):
        return "config"
    return "divergence" if is_divergence(err) else "error"


def train_data_parallel(config: dict[str, Any], rank: int, world: int, report: Reporter,
                        resume_state: dict[str, Any] | None = None) -> DataParallelTrainer:
    """Train one configuration as rank ``rank`` of ``world``; every rank calls ``report``
    once per epoch, with ``workers`` = ``world`` added to the metrics."""
    trainer = DataParallelTrainer(config, rank, world)
    if resume_state is not None:
        trainer.load_state_dict(resume_state)

    def with_workers(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        report({**metrics, "workers": float(world)}, state)

    trainer.run(with_workers)
    return trainer


__all__ = ["DataParallelTrainer", "route_calls_through", "shard_batch", "sharded", "train_data_parallel"]
