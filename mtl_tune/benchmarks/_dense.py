"""Data, augmentation, losses and metrics of the MTAN dense-prediction benchmarks.

Shared by :mod:`mtl_tune.benchmarks.nyuv2` and :mod:`mtl_tune.benchmarks.cityscapes`
(docs/benchmarks.md#nyuv2, docs/benchmarks.md#cityscapes). The on-disk layout, the pre-flight check
and the checked loading of each sample live in :mod:`mtl_tune.benchmarks._dense_files`;
arrays are cast to float32 here.

Everything random is a pure function of (seed, epoch, sample index) — shuffling and
augmentation — so a run is reproducible and independent of ``num_workers`` (the official
code draws from the global ``random``/``torch`` streams instead; same distributions).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mtl_tune.benchmarks._dense_files import (  # noqa: F401  (re-exported: the file side lives there)
    CHANNELS, DenseFiles, DenseLayout, check_dense_data, npy_source,
)

SCALES: tuple[float, ...] = (1.0, 1.2, 1.5)
#: stream tags so order and augmentation draws never share a random stream
_ORDER, _SPLIT, _AUG = 0x5EED0, 0x5B117, 0xA116


# ---------------------------------------------------------------------------- data sets
def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) partition of range(n); val gets round(n·val_fraction) ids (≥ 1 if > 0).

    Depends only on (n, val_fraction, split_seed) — every trial sees the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and n < 2:
        raise ValueError(f"cannot carve a validation split out of {n} training sample(s)")
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng([_SPLIT, int(split_seed), n]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_order(indices: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a permutation of ``indices`` fixed by (seed, epoch)."""
    rng = np.random.default_rng([_ORDER, int(seed), int(epoch)])
    return [int(i) for i in rng.permutation(np.asarray(indices))]


def to_tensors(raw: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """Channel-last arrays → float32 C×H×W tensors (label stays H×W float until batching)."""
    out = {}
    for key, arr in raw.items():
        arr = np.asarray(arr, dtype=np.float32)
        out[key] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr))
    return out


def scale_crop(sample: Mapping[str, Tensor], sc: float, i: int, j: int,
               inverse_depth: bool = False) -> dict[str, Tensor]:
    """RandomScaleCrop: crop h×w = ⌊H/sc⌋×⌊W/sc⌋ at (i, j), resize back to H×W.

    image/normal bilinear (align_corners=True; normals not re-normalised), label/depth
    nearest. Zooming by sc brings the scene sc× closer, so metric depth becomes d/sc
    (official, NYUv2). For inverse depth (Cityscapes disparity) the physical rule is d·sc;
    the official code divides there too, which ``inverse_depth=False`` reproduces.
    """
    first = next(iter(sample.values()))
    height, width = first.shape[-2:]
    h, w = int(height / sc), int(width / sc)
    out = {}
    for key, x in sample.items():
        x = x[None, ..., i:i + h, j:j + w]
        if key == "label":
            out[key] = F.interpolate(x[None], size=(height, width), mode="nearest")[0, 0]
        elif key == "depth":
            y = F.interpolate(x, size=(height, width), mode="nearest")[0]
            out[key] = y * sc if inverse_depth else y / sc
        else:
            out[key] = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)[0]
    return out


def hflip(sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mirror along the width; the normal's x component changes sign."""
    out = {key: torch.flip(x, dims=[-1]) for key, x in sample.items()}
    if "normal" in out:
        out["normal"][0] = -out["normal"][0]
    return out


def augment(sample: Mapping[str, Tensor], rng: np.random.Generator, scales: Sequence[float] = SCALES,
            inverse_depth: bool = False) -> dict[str, Tensor]:
    """The papers' train augmentation: RandomScaleCrop (sc uniform over ``scales``, top-left
    uniform over valid positions) then a horizontal flip with probability ½."""
    height, width = next(iter(sample.values())).shape[-2:]
    sc = float(scales[int(rng.integers(len(scales)))])
    i = int(rng.integers(0, height - int(height / sc) + 1))
    j = int(rng.integers(0, width - int(width / sc) + 1))
    out = scale_crop(sample, sc, i, j, inverse_depth)
    return hflip(out) if rng.random() < 0.5 else out


class DenseDataset(Dataset):
    """Samples of one split folder as dicts of tensors, indexed by file id.

    ``epoch`` must be set before each epoch's loader is created: augmentation draws come from
    (seed, epoch, file id) only. :meth:`for_epoch` gives a copy with its own epoch, so that two
    loaders of different epochs (Auto-λ's second training stream) can be read at the same time.
    """

    def __init__(self, source: Callable[[int], dict[str, np.ndarray]], size: int, augmentation: bool = False,
                 seed: int = 0, inverse_depth: bool = False) -> None:
        self.source, self.size, self.augmentation = source, size, augmentation
        self.seed, self.epoch, self.inverse_depth = seed, 0, inverse_depth

    def __len__(self) -> int:
        return self.size

    def for_epoch(self, epoch: int) -> DenseDataset:
        """A shallow copy (same source and files) whose augmentation draws are those of ``epoch``."""
        twin = copy.copy(self)
        twin.epoch = epoch
        return twin

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = to_tensors(self.source(int(index)))
        if self.augmentation:
            rng = np.random.default_rng([_AUG, int(self.seed), int(self.epoch), int(index)])
            sample = augment(sample, rng, SCALES, self.inverse_depth)
        sample["label"] = sample["label"].long()
        return sample


# ---------------------------------------------------------------------------- losses
def valid_mask(target: Tensor) -> Tensor:
    """Pixels with Σ_c target_c ≠ 0 (official rule for depth and normals), shape B×1×H×W."""
    return (target.sum(dim=1, keepdim=True) != 0)


# A batch without any valid pixel of a task (every sample file has some — the data check refuses
# one without — but a random crop can cut them all away) leaves the papers' masked mean 0/0 = NaN,
# which the trainer would report as divergence. Such a batch contributes 0 to that task, with a 0
# gradient; for every other batch each loss below is the papers' value bit for bit (a count ≥ 1
# is unchanged by clamp(min=1), torch.where passes the selected value and its gradient as is).
def seg_loss(log_probs: Tensor, label: Tensor) -> Tensor:
    """Mean NLL over labelled pixels: −(1/|V|) Σ_{p∈V} log p̂_p[y_p], V = {y ≠ −1}; 0 if V = ∅."""
    loss = F.nll_loss(log_probs, label, ignore_index=-1)  # NaN if V = ∅; its gradient is 0 then
    return torch.where((label != -1).any(), loss, torch.zeros_like(loss))


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Masked L1: Σ_p m_p |d̂_p − d_p| / Σ_p m_p over the batch (m = valid depth); 0 if Σ m = 0."""
    m = valid_mask(target)
    return (torch.abs(pred - target) * m).sum() / m.sum().clamp(min=1)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """1 − mean cosine over valid pixels: 1 − Σ_p m_p (n̂_p·n_p) / Σ_p m_p (n̂ is unit); 0 if Σ m = 0."""
    m = valid_mask(target)
    count = m.sum()
    loss = 1 - (pred * target * m).sum() / count.clamp(min=1)
    return torch.where(count > 0, loss, torch.zeros_like(loss))


LOSSES = {"seg": (seg_loss, "label"), "depth": (depth_loss, "depth"), "normal": (normal_loss, "normal")}


# ---------------------------------------------------------------------------- metrics
AVERAGING = ("batch", "pixel")
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
METRIC_NAMES = {"seg": ("seg/miou", "seg/pixacc"), "depth": ("depth/abs_err", "depth/rel_err"),
                "normal": ("normal/mean", "normal/median", "normal/within_11_25", "normal/within_22_5",
                           "normal/within_30")}


def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """C×C pixel counts M[y, ŷ] (row = true class, column = prediction) over 0 ≤ y < C."""
    keep = (target >= 0) & (target < n_classes)
    idx = target[keep].long() * n_classes + pred[keep].long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def miou_pixacc(conf: Tensor) -> tuple[float, float]:
    """PixAcc = tr M / Σ M; IoU_c = M_cc / (Σ_j M_cj + Σ_i M_ic − M_cc); mIoU = mean_c IoU_c.

    Classes absent from both prediction and ground truth (0/0) are left out of the mean;
    the official code would return NaN then, which never happens on the full official test
    folders (every class occurs) but can on a small validation split.
    """
    m = conf.double()
    tp = torch.diag(m)
    denom = m.sum(0) + m.sum(1) - tp
    iou = tp[denom > 0] / denom[denom > 0]
    miou = float(iou.mean()) if iou.numel() else math.nan
    return miou, float(tp.sum() / m.sum()) if m.sum() > 0 else math.nan


def depth_error_sums(pred: Tensor, target: Tensor) -> tuple[float, float, int]:
    """(Σ |d̂ − d|, Σ |d̂ − d| / d, #valid) over valid pixels (d ≠ 0)."""
    m = valid_mask(target)
    p, t = pred[m], target[m]
    err = torch.abs(p - t)
    return float(err.sum()), float((err / t).sum()), int(m.sum())


def normal_angles(pred: Tensor, target: Tensor) -> np.ndarray:
    """Angles in degrees, acos(clamp(n̂·n, −1, 1)), at valid pixels (Σ_c n_c ≠ 0)."""
    m = valid_mask(target)[:, 0]
    cos = torch.clamp((pred * target).sum(dim=1)[m], -1, 1)
    return np.degrees(torch.acos(cos).cpu().numpy())


def angle_stats(angles: np.ndarray) -> list[float]:
    """[mean, median, fraction < 11.25°, < 22.5°, < 30°] (fractions in [0, 1], not %)."""
    return [float(np.mean(angles)), float(np.median(angles))] + [float(np.mean(angles < t)) for t in ANGLE_THRESHOLDS]


class DenseMetrics:
    """Accumulates the metrics of one split batch by batch; :meth:`compute` returns them.

    mIoU / PixAcc always come from one confusion matrix over the whole split. Depth and
    normal metrics follow ``averaging``:

    * ``"batch"`` (official Nash-MTL / FAMO code, the default): each metric is computed on
      every batch's valid pixels, then averaged over batches with equal weight (the median
      angle is the mean of per-batch medians). Batches without any valid pixel are skipped
      (the official code would produce NaN).
    * ``"pixel"`` (LibMTL / SamsungLabs): over all valid pixels of the split (global mean and
      median; keeps every angle of the split in host memory, ≈ 4 bytes per pixel).

    Losses (``<task>/loss``) are the batch means averaged over batches, as logged officially.
    """

    def __init__(self, kinds: Sequence[str], n_classes: int, averaging: str = "batch") -> None:
        if averaging not in AVERAGING:
            raise ValueError(f"metric_averaging must be one of {AVERAGING}, got {averaging!r}")
        self.kinds, self.n_classes, self.averaging = list(kinds), n_classes, averaging
        self.conf: Tensor | None = None
        self.loss_sum = np.zeros(len(self.kinds))
        self.batches = 0
        self.depth_batches: list[tuple[float, float]] = []
        self.depth_sums = [0.0, 0.0, 0]
        self.normal_batches: list[list[float]] = []
        self.angles: list[np.ndarray] = []

    def update(self, preds: Sequence[Tensor], batch: Mapping[str, Tensor], losses: Tensor) -> None:
        self.loss_sum += losses.detach().double().cpu().numpy()
        self.batches += 1
        for kind, pred in zip(self.kinds, preds):
            if kind == "seg":
                conf = confusion_matrix(pred.argmax(1), batch["label"], self.n_classes)
                self.conf = conf if self.conf is None else self.conf + conf
            elif kind == "depth":
                a, r, n = depth_error_sums(pred, batch["depth"])
                if n and self.averaging == "batch":
                    self.depth_batches.append((a / n, r / n))
                self.depth_sums = [self.depth_sums[0] + a, self.depth_sums[1] + r, self.depth_sums[2] + n]
            elif kind == "normal":
                ang = normal_angles(pred, batch["normal"])
                if self.averaging == "pixel":
                    self.angles.append(ang.astype(np.float32))
                elif ang.size:
                    self.normal_batches.append(angle_stats(ang))

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, kind in enumerate(self.kinds):
            out[f"{kind}/loss"] = float(self.loss_sum[t] / max(self.batches, 1))
            if kind == "seg":
                values = miou_pixacc(self.conf) if self.conf is not None else (math.nan, math.nan)
            elif kind == "depth":
                if self.averaging == "batch":
                    values = np.mean(self.depth_batches, axis=0) if self.depth_batches else [math.nan] * 2
                else:
                    n = self.depth_sums[2]
                    values = [self.depth_sums[0] / n, self.depth_sums[1] / n] if n else [math.nan] * 2
            else:
                if self.averaging == "batch":
                    values = np.mean(self.normal_batches, axis=0) if self.normal_batches else [math.nan] * 5
                else:
                    ang = np.concatenate(self.angles) if self.angles else np.zeros(0)
                    values = angle_stats(ang) if ang.size else [math.nan] * 5
            out.update({name: float(v) for name, v in zip(METRIC_NAMES[kind], values)})
        return out
