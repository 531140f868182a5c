"""The model and evaluation helpers of :mod:`mtl_tune.benchmarks.multi_mnist` (torch), kept apart
from the benchmark's declaration so validating a search does not import torch; see that
module's docstring for the architecture and the official code it follows."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class LeNetTrunk(nn.Module):
    """Shared LeNet trunk: 1×28×28 → 50-d representation."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(320, 50)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))


class DigitHead(nn.Module):
    """Task head: 50 → 50 → 10 logits."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(50, 50)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(50, 10)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(z))))


class MultiLeNet(nn.Module):
    def __init__(self, n_tasks: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.trunk = LeNetTrunk(dropout)
        self.heads = nn.ModuleList([DigitHead(dropout) for _ in range(n_tasks)])

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads], z


def normalise(images_u8: Tensor) -> Tensor:
    """(B, 28, 28) uint8 → (B, 1, 28, 28) float, (x/255 − 0.1307)/0.3081 (official transform)."""
    return ((images_u8.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def accuracy_and_nll(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """Accuracy = mean 1[argmax ŷ = y]; NLL = mean −log softmax(ŷ)_y, both over all samples."""
    acc = (logits.argmax(dim=1) == labels).double().mean().item()
    nll = F.cross_entropy(logits.double(), labels, reduction="mean").item()
    return acc, nll
