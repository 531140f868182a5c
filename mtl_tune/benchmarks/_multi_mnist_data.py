"""Data for the ``multi_mnist`` benchmark: MNIST idx files, sklearn digits, digit pairs.

MultiMNIST (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018; docs/benchmarks.md#multi_mnist): a left digit L is pasted at rows/cols [0:28) and a second
digit R at [6:34) of a 36×36 canvas; where they overlap the pixel is max(L, R); the canvas
is resized to 28×28 with nearest-neighbour sampling (PIL ``NEAREST``: source index
⌊(i + ½)·36/28⌋). Labels are (label(L), label(R)).

Two sources of single digits:

* ``mnist``: the four MNIST idx files in torchvision's layout
  ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` accepted).
* ``sklearn_digits``: scikit-learn's bundled ``load_digits`` (1,797 8×8 images, values
  0…16, no download); each image is scaled to 0…255, bilinearly resized to 20×20 and
  centred in a 28×28 frame with a 4-pixel border — the way MNIST digits sit in their frame.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass

import numpy as np

from mtl_tune.benchmarks._paths import DIR, FILE, cannot_read, kind
from mtl_tune.benchmarks.base import DataError

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_HINT = ("get the four files from http://yann.lecun.com/exdb/mnist/ (or any mirror, e.g. "
              "torchvision.datasets.MNIST(root, download=True) on a machine with internet) and put them, "
              "gzipped or not, in <root>/MNIST/raw/")
CANVAS, SIDE, SHIFT = 36, 28, 6
#: PIL NEAREST sampling positions for a 36 → 28 resize
NEAREST_36_TO_28 = np.floor((np.arange(SIDE) + 0.5) * CANVAS / SIDE).astype(np.int64)


@dataclass
class DigitPool:
    """Single digits: ``images`` (n, 28, 28) uint8 in 0…255 and ``labels`` (n,) int64 in 0…9."""

    images: np.ndarray
    labels: np.ndarray

    def subset(self, idx: np.ndarray) -> DigitPool:
        return DigitPool(self.images[idx], self.labels[idx])


# ---------------------------------------------------------------------- MNIST idx files
def mnist_raw_dir(root: str) -> str:
    return os.path.join(root, "MNIST", "raw")


def _unreadable(path: str, err: OSError) -> DataError:
    # the file is there but this process may not read it: not "missing", not "corrupt"
    return DataError(f"multi_mnist: {cannot_read(path, err)}; expected the MNIST idx files there; {MNIST_HINT}")


def _kind(path: str) -> str:
    try:
        return kind(path)
    except OSError as err:
        raise _unreadable(path, err) from err


def _find(raw_dir: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        path = os.path.join(raw_dir, candidate)
        found = _kind(path)
        if found == FILE:
            return path
        if found == DIR:
            raise DataError(f"multi_mnist: {path} is a folder, expected the idx file; {MNIST_HINT}")
    raise DataError(f"multi_mnist: {os.path.join(raw_dir, name)}[.gz] is missing; expected the MNIST idx "
                    f"files {sorted(n for pair in MNIST_FILES.values() for n in pair)} there; {MNIST_HINT}")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # permissions, an I/O error: the file may well be whole
        raise _unreadable(path, e) from e
    if not path.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # not gzip data (BadGzipFile), or cut short (EOFError)
        raise DataError(f"multi_mnist: cannot decompress {path} ({e}); the file is corrupt or truncated; "
                        f"{MNIST_HINT}") from e


def parse_idx(data: bytes, path: str, magic: int) -> np.ndarray:
    """Parse an idx file: big-endian int32 magic, int32 dims, then uint8 payload.

    Images: magic 2051, dims (n, 28, 28); labels: magic 2049, dims (n,), values 0…9.
    Raises :class:`DataError` on a wrong magic, wrong shape, truncation or bad labels.
    """
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"multi_mnist: {path} is truncated ({len(data)} bytes, header needs {header}); {MNIST_HINT}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        gz = " (it is gzip data: name the file with .gz)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(f"multi_mnist: {path} has idx magic {found}, expected {magic} "
                        f"({'uint8 images n×28×28' if magic == IMAGE_MAGIC else 'uint8 labels'}){gz}; {MNIST_HINT}")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (SIDE, SIDE):
        raise DataError(f"multi_mnist: {path} holds images of shape {dims[1:]}, expected (28, 28); {MNIST_HINT}")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"multi_mnist: {path} has {len(data)} bytes, expected {expected} for dims {dims} "
                        f"(truncated or padded); {MNIST_HINT}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if magic == LABEL_MAGIC and arr.size and int(arr.max()) > 9:
        bad = np.flatnonzero(arr > 9)
        raise DataError(f"multi_mnist: {path} item {int(bad[0])} has label {int(arr[bad[0]])} ({bad.size} label(s) "
                        f"above 9); MNIST labels are 0…9; {MNIST_HINT}")
    return arr


def load_mnist_split(root: str, split: str) -> DigitPool:
    """Read one MNIST split ("train" or "test") from ``<root>/MNIST/raw``; validates everything."""
    raw = mnist_raw_dir(root)
    if _kind(raw) != DIR:
        raise DataError(f"multi_mnist: directory {raw} does not exist; expected the MNIST idx files "
                        f"{sorted(n for pair in MNIST_FILES.values() for n in pair)} there; {MNIST_HINT}")
    try:
        os.listdir(raw)
    except OSError as err:  # a folder that may not be listed: its files would read as missing
        raise _unreadable(raw, err) from err
    img_name, lab_name = MNIST_FILES[split]
    img_path, lab_path = _find(raw, img_name), _find(raw, lab_name)
    images = parse_idx(_read_bytes(img_path), img_path, IMAGE_MAGIC)
    labels = parse_idx(_read_bytes(lab_path), lab_path, LABEL_MAGIC)
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise DataError(f"multi_mnist: {img_path} holds {images.shape[0]} images but {lab_path} holds "
                        f"{labels.shape[0]} labels (must match, > 0); {MNIST_HINT}")
    return DigitPool(images.copy(), labels.astype(np.int64))


# ---------------------------------------------------------------------- sklearn digits
def upscale_digits(images8: np.ndarray) -> np.ndarray:
    """(n, 8, 8) sklearn digits (0…16) → (n, 28, 28) uint8 MNIST-like frames.

    x ↦ 255·x/16, bilinear resize 8 → 20 (half-pixel centres), then zero border of 4.
    """
    import torch  # here, not at the top: the pre-flight check of the MNIST files needs no torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(images8, dtype=np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def load_sklearn_digits() -> DigitPool:
    """The 1,797 bundled scikit-learn digits as 28×28 uint8 frames (no download, deterministic)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return DigitPool(upscale_digits(d.images), np.asarray(d.target, dtype=np.int64))


# ---------------------------------------------------------------------- pairs
def compose_pair(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """MultiMNIST composition of (…, 28, 28) uint8 digits → (…, 28, 28) uint8 images.

    Canvas C (36×36) = max(L placed at [0:28), R placed at [6:34)), then nearest 36 → 28.
    (Both digits are ≥ 0, so "paste, then max on the overlap" equals a max of the two
    zero-padded placements.)
    """
    shape = left.shape[:-2]
    canvas = np.zeros((*shape, CANVAS, CANVAS), dtype=np.uint8)
    canvas[..., :SIDE, :SIDE] = left
    canvas[..., SHIFT:SHIFT + SIDE, SHIFT:SHIFT + SIDE] = np.maximum(
        canvas[..., SHIFT:SHIFT + SIDE, SHIFT:SHIFT + SIDE], right)
    return canvas[..., NEAREST_36_TO_28, :][..., :, NEAREST_36_TO_28]


def make_pairs(pool: DigitPool, pairs_per_image: int, rng: np.random.Generator,
               chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Each pool image is the left digit of ``pairs_per_image`` pairs with uniformly random
    right digits from the same pool (Sener & Koltun: one random partner per image).

    Returns images (n·pairs_per_image, 28, 28) uint8 and labels (n·pairs_per_image, 2) int64.
    """
    n = len(pool.labels)
    left = np.repeat(np.arange(n), pairs_per_image)
    right = rng.integers(0, n, size=left.shape[0])
    out = np.empty((left.shape[0], SIDE, SIDE), dtype=np.uint8)
    for s in range(0, left.shape[0], chunk):  # chunks keep the 36×36 canvas small in memory
        out[s:s + chunk] = compose_pair(pool.images[left[s:s + chunk]], pool.images[right[s:s + chunk]])
    labels = np.stack([pool.labels[left], pool.labels[right]], axis=1)
    return out, labels


def split_bounds(n: int, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """[start, stop) of each part of ``n`` shuffled items with the given fractions (the last takes the
    rest): ``round(fraction · n)`` items each, in order, clipped to ``n``."""
    bounds, start = [], 0
    for frac in fractions[:-1]:
        stop = start + int(round(frac * n))
        bounds.append((min(start, n), min(stop, n)))
        start = stop
    bounds.append((min(start, n), n))
    return bounds


def split_pool(pool: DigitPool, fractions: tuple[float, ...], rng: np.random.Generator) -> list[DigitPool]:
    """Disjoint random parts of ``pool`` with the given fractions (last part takes the rest;
    :func:`split_bounds`)."""
    perm = rng.permutation(len(pool.labels))
    return [pool.subset(np.sort(perm[start:stop])) for start, stop in split_bounds(len(perm), fractions)]


def mnist_count(root: str, split: str) -> int:
    """The number of images the split's idx header announces (16 bytes read; the data check reads
    and validates everything)."""
    path = _find(mnist_raw_dir(root), MNIST_FILES[split][0])
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            head = f.read(8)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"multi_mnist: cannot read {path} ({err}); {MNIST_HINT}") from err
    if len(head) < 8:
        raise DataError(f"multi_mnist: {path} is truncated; {MNIST_HINT}")
    return int.from_bytes(head[4:8], "big")
