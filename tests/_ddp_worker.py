"""Worker of ``test_distributed.py``: a few DDP training steps per method on one rank.

A module of its own (not the test file) so that ``torch.multiprocessing.spawn`` can import
it in the child processes without importing pytest fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mtl_tune.balancers.base import ForwardOutput
from mtl_tune.registry import get_balancer

BATCH, STEPS, N_TASKS = 16, 3, 2


class TwoTaskNet(nn.Module):
    """A shared trunk and two regression heads; forward returns the K losses."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(N_TASKS)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        self.double()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        z = self.trunk(x)
        return torch.stack([((h(z).squeeze(1) - y[:, i]) ** 2).mean() + 0.05 for i, h in enumerate(self.heads)])


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1.0, 4.0], dtype=torch.float64)  # tasks of different scales: no tie
    y = torch.randn(BATCH, N_TASKS, generator=gen, dtype=torch.float64) * scale
    return x, y


def train(method: str, rank: int, world: int, sync: bool = True) -> list[list[Tensor]]:
    """Parameters after each of STEPS steps; rank r trains on shard r of every batch."""
    net = TwoTaskNet()
    model: nn.Module = DistributedDataParallel(net) if world > 1 else net
    balancer = get_balancer(method, N_TASKS)
    if not sync:
        balancer.distribute(None)
    optimizer = torch.optim.SGD([{"params": net.parameters()}, *balancer.param_groups()], lr=0.1)
    shared, heads = list(net.trunk.parameters()), [list(h.parameters()) for h in net.heads]
    out = []
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(STEPS):
        x, y = batch(step)
        balancer.train_step(lambda: ForwardOutput(model(x[shard], y[shard])), optimizer, shared, heads)
        out.append([p.detach().clone() for p in net.parameters()])
    return out


def run(rank: int, world: int, init_file: str, out_dir: str, methods: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {m: train(m, rank, world) for m in methods}
        results["mgda/unsynced"] = train("mgda", rank, world, sync=False)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together (see examples/ddp_train.py)
    finally:
        dist.destroy_process_group()
