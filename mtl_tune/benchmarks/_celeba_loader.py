"""CelebA image datasets (decoded per access, or from a resized uint8 cache) for torch's loaders.

Decoding and the file checks are in :mod:`._celeba_data` (no torch).
"""

from __future__ import annotations

import fcntl
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtl_tune.benchmarks._celeba_data import load_image
from mtl_tune.benchmarks.base import DataError


class CelebaImages(Dataset):
    """(uint8 image (3, s, s), float labels (40,)) decoded from the JPEGs on every access."""

    def __init__(self, img_dir: str, files: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.img_dir, self.files, self.size = img_dir, files, size
        self.labels = torch.from_numpy(labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(load_image(os.path.join(self.img_dir, self.files[i]), self.size)), self.labels[i]


class CachedImages(Dataset):
    """Same items as :class:`CelebaImages`, read from a pre-resized uint8 ``.npy`` memmap."""

    def __init__(self, array_path: str, labels: np.ndarray) -> None:
        self.array_path, self.array = array_path, None
        self.labels = torch.from_numpy(labels.astype(np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.array is None:  # opened lazily so each loader worker maps the file itself
            self.array = np.load(self.array_path, mmap_mode="r")
        return torch.from_numpy(np.array(self.array[i])), self.labels[i]


def cached_split(cache_dir: str, img_dir: str, files: np.ndarray, split: str, size: int,
                 num_workers: int) -> str:
    """Path of ``celeba_<split>_<size>px.npy`` (n, 3, s, s) uint8, built once if missing.

    Decoding the 162k training JPEGs dominates CelebA's epoch time (docs/benchmarks.md#compute-estimates); the
    cache holds exactly the bytes the on-the-fly transform produces. An exclusive file lock
    makes concurrent trials wait for one builder; the file appears atomically (rename).
    """
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"celeba_{split}_{size}px.npy")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            arr = np.load(path, mmap_mode="r")
            if arr.shape != (len(files), 3, size, size) or arr.dtype != np.uint8:
                raise DataError(f"celeba: cache {path} has shape {arr.shape} {arr.dtype}, expected "
                                f"({len(files)}, 3, {size}, {size}) uint8; delete it to rebuild")
            return path
        tmp = path + ".tmp.npy"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
            ds = CelebaImages(img_dir, files, np.zeros((len(files), 40), np.uint8), size)
            start = 0
            for x, _ in DataLoader(ds, batch_size=512, num_workers=num_workers):
                out[start:start + len(x)] = x.numpy()
                start += len(x)
            out.flush()
            del out
            os.replace(tmp, path)
        finally:  # a bad image (DataError naming it) leaves no half-written cache behind
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
