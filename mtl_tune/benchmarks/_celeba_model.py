"""CelebA's model and F1 arithmetic (torch): :mod:`.celeba` has the protocol and the sources."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CelebaNet(nn.Module):
    """Shared CNN (5,176,640 parameters) + 40 linear heads (20,520)."""

    def __init__(self, n_tasks: int = 40) -> None:
        super().__init__()
        pool = nn.MaxPool2d(2, stride=2)
        self.trunk = nn.Sequential(
            *_conv(3, 64), pool, *_conv(64, 128), *_conv(128, 128), pool, *_conv(128, 256), *_conv(256, 256), pool,
            *_conv(256, 512), *_conv(512, 512), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList([nn.Linear(512, 1) for _ in range(n_tasks)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, s, s) in [0, 1] → (logits (B, 40), representation (B, 512))."""
        h = self.trunk(x)
        return torch.cat([head(h) for head in self.heads], dim=1), h


def f1_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-attribute (TP, FP, FN) of ŷ = 1[σ(z) > 0.5] against 0/1 ``labels`` (B, K)."""
    pred = torch.sigmoid(logits).gt(0.5).double()
    y = labels.double()
    return (pred * y).sum(0), (pred * (1 - y)).sum(0), ((1 - pred) * y).sum(0)


def f1_from_counts(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """F1 = 2PR/(P + R + 1e-8) with P = TP/(TP+FP+1e-8), R = TP/(TP+FN+1e-8) (official epsilons)."""
    precision = tp / (tp + fp + 1e-8)
    recall = tp / (tp + fn + 1e-8)
    return 2 * precision * recall / (precision + recall + 1e-8)


def to_unit(images_u8: Tensor) -> Tensor:
    """uint8 → float in [0, 1] (``ToTensor``)."""
    return images_u8.float().div_(255.0)


class SyntheticLoader:
    """Random uint8 images/labels of the real shapes, ``n`` samples in batches (throughput only);
    ``drop_single``: leave out a last batch of one sample, as the real training loader does."""

    def __init__(self, n: int, batch_size: int, size: int, seed: int, drop_single: bool = False) -> None:
        self.n, self.batch_size, self.size, self.seed = n, batch_size, size, seed
        self.drop_single = drop_single

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for s in range(0, self.n, self.batch_size):
            b = min(self.batch_size, self.n - s)
            if b == 1 and self.drop_single and s > 0:
                return
            yield (torch.randint(0, 256, (b, 3, self.size, self.size), dtype=torch.uint8, generator=gen),
                   torch.randint(0, 2, (b, 40), generator=gen).float())
