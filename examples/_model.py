"""The small two-task model and synthetic data the examples share.

Task 0 regresses sin(Σx), task 1 regresses 10·cos(x₀) (a 10× larger scale, so the
balancing method matters). Replace these with your model and data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

N_TASKS = 2


class TwoTaskNet(nn.Module):
    """A shared encoder and one linear head per task; ``losses(x, y)`` returns the K losses."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(N_TASKS)])

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The K task losses (mean squared errors), shape (K,)."""
        return self.losses_and_representation(x, y)[0]

    def losses_and_representation(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The K losses and the encoder output z every head reads (representation-level methods
        such as MGDA-UB combine the task gradients with respect to z)."""
        z = self.encoder(x)
        return torch.stack([((head(z).squeeze(1) - y[:, i]) ** 2).mean() for i, head in enumerate(self.heads)]), z

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        return [list(h.parameters()) for h in self.heads]


def make_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` inputs (n, 4) and targets (n, 2)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = torch.stack([torch.sin(x.sum(1)), 10 * torch.cos(x[:, 0])], dim=1)
    return x, y
