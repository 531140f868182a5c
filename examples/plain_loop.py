"""A balancer in a plain PyTorch training loop.

    python examples/plain_loop.py --method cagrad --steps 200

Everything a balancer needs is in the loop below: build it by name (with its
hyperparameters), add its parameter groups to the optimizer, and replace
``loss.backward()`` by ``balancer.backward(losses, shared, task_params)``. The flags the
loop reads cover every method but ``stgu``, whose grouped optimizer steps are a loop of their
own (``balancer.train_step``): representation-level methods get the encoder output z,
Auto-λ its meta step on a second batch, FAMO the losses after the step, DWA/PIVRG the epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import N_TASKS, TwoTaskNet, make_data  # noqa: E402

from mtl_tune.balancers import EpochInfo, ForwardOutput, get_balancer  # noqa: E402


def train(method: str = "cagrad", steps: int = 200, batch: int = 64, lr: float = 1e-2, seed: int = 0,
          **hparams: object) -> dict[str, list[float]]:
    """Train the example model with ``method``; returns the first and last losses and weights."""
    torch.manual_seed(seed)
    model = TwoTaskNet()
    balancer = get_balancer(method, N_TASKS, **hparams)          # e.g. c=0.4 for cagrad
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *balancer.param_groups()], lr=lr)
    x, y = make_data(batch * 8, seed)
    first = last = weights = None
    shared, task = model.shared_parameters(), model.task_parameters()

    def output(i: int) -> ForwardOutput:                           # the losses (K,) of the batch at i, and z
        return ForwardOutput(*model.losses_and_representation(x[i:i + batch], y[i:i + batch]))

    for step in range(steps):
        i = (step % 8) * batch
        if balancer.needs_meta_batch:                              # Auto-λ: λ's own step on another batch first
            other = ((step + 3) % 8) * batch
            balancer.meta_step(lambda: output(i), lambda: output(other), optimizer, shared, task)
        optimizer.zero_grad(set_to_none=True)
        out = output(i)
        losses = out.losses
        info = balancer.backward(losses, shared, task, representation=out.representation)
        optimizer.step()
        if balancer.needs_post_step_losses:                        # FAMO: losses after the step
            with torch.no_grad():
                balancer.after_optimizer_step(model(x[i:i + batch], y[i:i + batch]))
        if (step + 1) % 8 == 0:                                    # an "epoch": DWA, PIVRG use it
            balancer.on_epoch_end(EpochInfo(epoch=step // 8, train_losses=losses.detach()))
        first = losses.detach().tolist() if first is None else first
        last, weights = losses.detach().tolist(), info.weights.tolist()
    return {"first_losses": first, "last_losses": last, "weights": weights}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--method", default="cagrad")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    result = train(args.method, args.steps)
    print(f"{args.method}: losses {result['first_losses']} -> {result['last_losses']}, weights {result['weights']}")
    return result


if __name__ == "__main__":
    main()
