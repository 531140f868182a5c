"""Data-parallel balancing: every rank must combine the *same* per-task information.

Under DistributedDataParallel each rank sees its own shard of the batch. A plain
``loss.backward()`` is fine (DDP averages the gradients), but a balancer computes
state and weights from the losses and per-task gradients it sees; left alone, each rank
would solve its own problem and the ranks' parameters would drift apart.

What the balancers do when a process group is active (see :meth:`Balancer.distribute`):

* the K losses are averaged across ranks before any weight or state is computed from
  them (FAMO's logits, DWA's history, the coefficients of loss-based methods); with equal
  shard sizes and mean-reduced losses that is the loss of the concatenated batch;
* gradient methods average the K×P per-task Jacobian of the shared parameters across
  ranks (one all-reduce of K·P numbers) before the combination, so every rank solves the
  same problem and writes the same shared direction;
* loss-based methods back-propagate ``Σ_i (∂f/∂ℓ_i)(ℓ̄) ℓ_i`` — the objective linearised
  at the averaged losses ℓ̄ — so that DDP's usual gradient average gives exactly the
  gradient of f on the concatenated batch;
* gradients reach ``.grad`` through autograd (never by assignment) so that DDP's
  reducer sees every parameter once per step and averages the heads' gradients.

So: wrap the model in DDP as usual, keep shard sizes equal, and call the balancer as in
single-process training. Methods whose step is a chain of optimizer steps (STGU) are
not covered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: ``"auto"``: use the default process group whenever one is initialised with > 1 rank.
AUTO = "auto"


def active_group(setting: Any) -> Any | None:
    """The process group to average over, or ``None`` for single-process behaviour.

    ``setting`` is ``"auto"`` (the default group when torch.distributed is initialised with
    more than one rank), ``None`` (never), or a process group."""
    if setting is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if setting is AUTO or setting == AUTO:
            return None
        raise RuntimeError("a balancer was given a process group but torch.distributed is not initialised")
    group = dist.group.WORLD if setting == AUTO else setting
    return group if dist.get_world_size(group) > 1 else None


def distributed_run() -> bool:
    """Whether torch.distributed is initialised (then gradients go through autograd for DDP)."""
    return dist.is_available() and dist.is_initialized()


def mean_across_ranks(tensor: Tensor, group: Any) -> Tensor:
    """The element-wise mean of ``tensor`` over the ranks of ``group`` (a new tensor)."""
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out.div_(dist.get_world_size(group))


def add_grad_through_autograd(params: list[Tensor], flat: Tensor) -> None:
    """Add a flat vector into ``params``' ``.grad`` via autograd, so DDP's hooks see it."""
    views, offset = [], 0
    for p in params:
        n = p.numel()
        views.append(flat[offset:offset + n].view_as(p).to(p.dtype))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"direction has {flat.numel()} entries but the shared parameters have {offset}")
    torch.autograd.backward(params, grad_tensors=views)


__all__ = ["AUTO", "active_group", "distributed_run", "add_grad_through_autograd", "mean_across_ranks"]
