"""Worker of ``test_data_parallel.py``: one rank of a multi-worker trial (gloo, CPU).

A module of its own so that ``torch.multiprocessing.spawn`` can import it in the child
processes without importing pytest fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtl_tune.training.data_parallel import train_data_parallel


def run(rank: int, world: int, init_file: str, out_dir: str, config: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reports: list[dict[str, Any]] = []
        trainer = train_data_parallel(config, rank, world, lambda m, s: reports.append(m))
        params = [p.detach().clone() for p in trainer.setup.model.parameters()]
        torch.save({"reports": reports, "params": params, "state": trainer.state_dict()},
                   Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # leave together (see examples/ddp_train.py)
    finally:
        dist.destroy_process_group()
