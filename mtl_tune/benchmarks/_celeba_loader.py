"""CelebA image datasets (decoded per access, or from a resized uint8 cache) for torch's loaders.

Decoding and the file checks are in :mod:`._celeba_data` (no torch).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtl_tune.benchmarks._celeba_data import load_image, unreadable
from mtl_tune.benchmarks._paths import os_reason
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


def cache_key(img_dir: str, files: np.ndarray) -> str:
    """Digest of what a cache file is built from: the image folder (its real path) and the name,
    size and modification time of each listed image — metadata only, one ``stat`` per image, so
    another data root, another file list or a replaced image gets a cache of its own."""
    digest = hashlib.sha256(os.path.realpath(img_dir).encode())
    for name in files:
        path = os.path.join(img_dir, str(name))
        try:
            st = os.stat(path)
        except OSError as e:
            raise unreadable(path, e) from e
        digest.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _cache_problem(path: str, shape: tuple[int, ...]) -> str | None:
    """Why the cache file ``path`` cannot be used (damaged, truncated, another shape), else None."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # a truncated file: "mmap length is greater than file size"
        return f"cannot be read ({e})"
    if arr.shape != shape or arr.dtype != np.uint8:
        return f"has shape {arr.shape} {arr.dtype}, expected {shape} uint8"
    return None


def _build(path: str, img_dir: str, files: np.ndarray, size: int, num_workers: int) -> None:
    """Decode and resize every image into ``path``, which appears whole (rename) or not at all."""
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


def cached_split(cache_dir: str, img_dir: str, files: np.ndarray, split: str, size: int,
                 num_workers: int) -> str:
    """Path of ``celeba_<split>_<size>px_<key>.npy`` (n, 3, s, s) uint8, built once if missing.

    Decoding the 162k training JPEGs dominates CelebA's epoch time (docs/benchmarks.md#compute-estimates); the
    cache holds exactly the bytes the on-the-fly transform produces. ``<key>`` is
    :func:`cache_key`: a cache is never reused for other images. A damaged cache file is rebuilt,
    with a warning. An exclusive file lock makes concurrent trials wait for one builder; the file
    appears atomically (rename).
    """
    shape = (len(files), 3, size, size)
    path = os.path.join(cache_dir, f"celeba_{split}_{size}px_{cache_key(img_dir, files)}.npy")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(path):
                problem = _cache_problem(path, shape)
                if problem is None:
                    return path
                warnings.warn(f"celeba: image cache {path} {problem}; rebuilding it", UserWarning, stacklevel=2)
            _build(path, img_dir, files, size, num_workers)
    except OSError as e:  # not the data: the cache folder (permissions, a full disk)
        raise DataError(f"celeba: cannot use the image cache {path} ({os_reason(e)}); fix or delete it, or set "
                        f"cache_dir to a writable folder (or none: decode the JPEGs every epoch)") from e
    return path
