"""A balancer under DistributedDataParallel (CPU processes on the gloo backend).

    python examples/ddp_train.py --method mgda --world-size 2 --steps 50

Wrap the model in DDP as usual, give every rank an equal share of each batch, and call
the balancer exactly as in one process. With a process group initialised, the balancer
averages the K losses and (gradient methods) the K per-task gradients across ranks
before combining them, so every rank applies the same update: the result equals
training on the concatenated batch (see ``mtl_tune.distributed``). On GPUs use the
``nccl`` backend and one device per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import N_TASKS, TwoTaskNet, make_data  # noqa: E402

from mtl_tune.balancers import get_balancer  # noqa: E402


def worker(rank: int, world: int, method: str, steps: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                                  # the same initial weights on every rank
        net = TwoTaskNet()
        model = DistributedDataParallel(net)
        balancer = get_balancer(method, N_TASKS)              # averages across ranks by itself
        optimizer = torch.optim.Adam([{"params": net.parameters()}, *balancer.param_groups()], lr=1e-2)
        x, y = make_data(64 * 8)
        per_rank = 64 // world
        for step in range(steps):
            start = (step % 8) * 64 + rank * per_rank        # this rank's shard of the global batch
            xb, yb = x[start:start + per_rank], y[start:start + per_rank]
            optimizer.zero_grad(set_to_none=True)
            losses = model(xb, yb)
            info = balancer.backward(losses, net.shared_parameters(), net.task_parameters())
            optimizer.step()
            if balancer.needs_post_step_losses:
                with torch.no_grad():
                    balancer.after_optimizer_step(model(xb, yb))
        # every rank must hold the same parameters: compare them across ranks
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            result = {"method": method, "ranks_identical": same, "last_losses": losses.detach().tolist(),
                      "weights": info.weights.tolist()}
            Path(out_dir, "result.json").write_text(json.dumps(result))
        # leave together: a rank tearing gloo down while the other still works in it can abort it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train(method: str = "mgda", world_size: int = 2, steps: int = 50) -> dict:
    """Run ``world_size`` processes; returns rank 0's summary (``ranks_identical`` must be True)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world_size, method, steps, out_dir), nprocs=world_size, join=True)
        return json.loads(Path(out_dir, "result.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--method", default="mgda")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = train(args.method, args.world_size, args.steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
