"""A balancer in a Lightning ``LightningModule`` with manual optimisation.

    python examples/lightning_module.py --method nashmtl --steps 100

A balancer writes the gradients itself (per-task gradients, solvers), so the module
turns automatic optimisation off and does the step in ``training_step``: zero the
gradients, compute the K losses, ``balancer.backward``, ``optimizer.step()``.

The balancer is a submodule (it is an ``nn.Module``): Lightning moves it to the device
and its state (FAMO's logits, Nash-MTL's warm start, ...) is part of every checkpoint.
Use 32-bit or ``"bf16-mixed"`` precision: a balancer does not go through
``manual_backward``, so fp16 loss scaling would not be applied (and would change the
answer of scale-dependent methods anyway). With several processes the balancer averages
losses and per-task gradients across ranks itself (``mtl_tune.distributed``); that is
tested with plain DDP (``examples/ddp_train.py``), not with Lightning's DDP strategy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import N_TASKS, TwoTaskNet, make_data  # noqa: E402

from mtl_tune.balancers import EpochInfo, get_balancer  # noqa: E402


class BalancedModule(L.LightningModule):
    """Two-task regression trained with the balancer ``method`` (hyperparameters in ``hparams``)."""

    def __init__(self, method: str = "cagrad", lr: float = 1e-2, **hparams: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = TwoTaskNet()
        self.balancer = get_balancer(method, N_TASKS, **hparams)
        self.first_losses: list[float] | None = None
        self.last_losses: list[float] | None = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # the model's parameters plus the balancer's own groups (UW's log-variances; empty for most)
        return torch.optim.Adam([{"params": self.net.parameters()}, *self.balancer.param_groups()],
                                lr=self.hparams.lr)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        losses = self.net(x, y)
        info = self.balancer.backward(losses, self.net.shared_parameters(), self.net.task_parameters())
        optimizer.step()
        if self.balancer.needs_post_step_losses:  # FAMO
            with torch.no_grad():
                self.balancer.after_optimizer_step(self.net(x, y))
        self.log_dict({f"weight/{i}": w for i, w in enumerate(info.weights.float())}, on_step=True)
        self.first_losses = self.first_losses or losses.detach().tolist()
        self.last_losses = losses.detach().tolist()
        self._epoch_losses = losses.detach()

    def on_train_epoch_end(self) -> None:
        self.balancer.on_epoch_end(EpochInfo(epoch=self.current_epoch, train_losses=self._epoch_losses))


def train(method: str = "cagrad", steps: int = 100, checkpoint: str | None = None, **hparams: Any) -> BalancedModule:
    """Fit for ``steps`` steps on CPU; save a checkpoint to ``checkpoint`` if given."""
    L.seed_everything(0, verbose=False)
    x, y = make_data(512)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    module = BalancedModule(method, **hparams)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    if checkpoint:
        trainer.save_checkpoint(checkpoint)
    return module


def main(argv: list[str] | None = None) -> BalancedModule:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--method", default="cagrad")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    module = train(args.method, args.steps)
    print(f"{args.method}: losses {module.first_losses} -> {module.last_losses}")
    return module


if __name__ == "__main__":
    main()
