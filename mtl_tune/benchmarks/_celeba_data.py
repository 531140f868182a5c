"""CelebA files: layout resolution, annotation parsing, validation, image datasets, cache.

Layouts accepted under the data root (benchmarks.md §4.1):

* torchvision: ``<root>/celeba/{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt}``
  (``<root>`` may also be the ``celeba`` folder itself);
* the original Google-Drive release used by FAMO:
  ``<root>/{Img/img_align_celeba/, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt}``.

``list_attr_celeba.txt``: line 1 = number of images, line 2 = the 40 attribute names, then
``<file> ±1 × 40`` per image. ``list_eval_partition.txt``: ``<file> <0|1|2>`` (train/val/test),
same order. Images: aligned & cropped 178×218 JPEGs. Labels −1/1 map to 0/1 (as FAMO and
torchvision). Transform: PIL bilinear ``resize((s, s))`` (aspect not kept) → uint8 CHW; the
model divides by 255 (= ``ToTensor``); no normalisation, no augmentation.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mtl_tune.benchmarks.base import DataError

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
IMAGE_SIZE = (178, 218)  # (width, height) of img_align_celeba
HINT = ("get CelebA (aligned & cropped images + annotations) from "
        "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive: Img/img_align_celeba.zip, "
        "Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt) and unpack it as <root>/celeba/"
        "{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt} (torchvision layout) or keep the "
        "Img/Anno/Eval folders under <root>")


@dataclass(frozen=True)
class CelebaPaths:
    img_dir: str
    attr_file: str
    partition_file: str


@dataclass
class CelebaIndex:
    """File names, 0/1 labels (n, 40) uint8 and partition codes (n,) of the whole release."""

    files: np.ndarray
    labels: np.ndarray
    partition: np.ndarray

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.partition == SPLIT_CODES[split]
        return self.files[mask], self.labels[mask]


def resolve_paths(root: str) -> CelebaPaths:
    """Find the CelebA files under ``root`` in either accepted layout (else :class:`DataError`)."""
    candidates = [
        CelebaPaths(os.path.join(d, "img_align_celeba"), os.path.join(d, "list_attr_celeba.txt"),
                    os.path.join(d, "list_eval_partition.txt")) for d in (os.path.join(root, "celeba"), root)
    ] + [CelebaPaths(os.path.join(root, "Img", "img_align_celeba"), os.path.join(root, "Anno", "list_attr_celeba.txt"),
                     os.path.join(root, "Eval", "list_eval_partition.txt"))]
    for c in candidates:
        if os.path.isdir(c.img_dir) or os.path.isfile(c.attr_file):
            missing = [p for p in (c.img_dir, c.attr_file, c.partition_file) if not os.path.exists(p)]
            if missing:
                raise DataError(f"celeba: incomplete data set under {root}: missing {missing}; {HINT}")
            return c
    raise DataError(f"celeba: no CelebA data under {root} (looked for {candidates[0].img_dir}, "
                    f"{candidates[0].attr_file}, {candidates[0].partition_file} or the Img/Anno/Eval layout); {HINT}")


def parse_attributes(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(file names (n,), labels (n, 40) uint8 ∈ {0, 1}) from ``list_attr_celeba.txt``."""
    try:
        with open(path) as f:
            count = int(f.readline().strip())
            names = f.readline().split()
        table = pd.read_csv(path, sep=r"\s+", skiprows=2, header=None, dtype=str)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"celeba: cannot parse {path} ({e}); expected a count line, a line with the 40 "
                        f"attribute names, then '<file> ±1 ×40' rows; {HINT}") from e
    if tuple(names) != ATTRIBUTES:
        raise DataError(f"celeba: {path} names {len(names)} attributes {names[:3]}…; expected the 40 CelebA "
                        f"attributes in the official order ({ATTRIBUTES[0]} … {ATTRIBUTES[-1]}); {HINT}")
    if table.shape != (count, 41):
        raise DataError(f"celeba: {path} has a table of shape {table.shape}, expected ({count}, 41) "
                        f"(line 1 announces {count} images; truncated file?); {HINT}")
    values = table.iloc[:, 1:].to_numpy()
    ok = (values == "1") | (values == "-1")
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise DataError(f"celeba: {path} row {r + 3} attribute {ATTRIBUTES[c]} = {values[r, c]!r}; "
                        f"labels must be -1 or 1; {HINT}")
    return table.iloc[:, 0].to_numpy(dtype=str), (values == "1").astype(np.uint8)


def parse_partition(path: str, files: np.ndarray) -> np.ndarray:
    """Partition codes (n,) ∈ {0, 1, 2} from ``list_eval_partition.txt``, rows matching ``files``."""
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"celeba: cannot parse {path} ({e}); expected '<file> <0|1|2>' rows; {HINT}") from e
    if table.shape != (len(files), 2):
        raise DataError(f"celeba: {path} has a table of shape {table.shape}, expected ({len(files)}, 2) "
                        f"to match list_attr_celeba.txt; {HINT}")
    if not np.array_equal(table.iloc[:, 0].to_numpy(dtype=str), files):
        raise DataError(f"celeba: the file names in {path} do not match list_attr_celeba.txt row by row; {HINT}")
    codes = table.iloc[:, 1].to_numpy()
    ok = np.isin(codes, ["0", "1", "2"])
    if not ok.all():
        raise DataError(f"celeba: {path} contains partition code {codes[~ok][0]!r}; expected 0, 1 or 2; {HINT}")
    return codes.astype(np.int64)


def check_images(img_dir: str, files: np.ndarray, n_decode: int = 8, seed: int = 0) -> None:
    """Every listed image exists; a sample (first, last, ``n_decode`` random) decodes at 178×218."""
    present = set(os.listdir(img_dir))
    missing = [f for f in files if f not in present]
    if missing:
        raise DataError(f"celeba: {len(missing)} of {len(files)} images listed in the annotations are missing "
                        f"from {img_dir} (e.g. {missing[:3]}); {HINT}")
    rng = np.random.default_rng(seed)
    picks = {0, len(files) - 1, *rng.integers(0, len(files), size=n_decode).tolist()}
    for i in sorted(picks):
        path = os.path.join(img_dir, files[i])
        try:
            with Image.open(path) as im:
                im.load()
                size = im.size
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"celeba: cannot decode {path} ({e}); truncated or not a JPEG; {HINT}") from e
        if size != IMAGE_SIZE:
            raise DataError(f"celeba: {path} is {size[0]}×{size[1]}, expected the aligned & cropped "
                            f"{IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} images (img_align_celeba); {HINT}")


def load_index(paths: CelebaPaths) -> CelebaIndex:
    files, labels = parse_attributes(paths.attr_file)
    return CelebaIndex(files, labels, parse_partition(paths.partition_file, files))


def load_image(path: str, size: int) -> np.ndarray:
    """RGB → PIL bilinear resize to (size, size) → uint8 (3, size, size) (= torchvision Resize)."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


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

    Decoding the 162k training JPEGs dominates CelebA's epoch time (benchmarks.md §8); the
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
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, size, size))
        ds = CelebaImages(img_dir, files, np.zeros((len(files), 40), np.uint8), size)
        start = 0
        for x, _ in DataLoader(ds, batch_size=512, num_workers=num_workers):
            out[start:start + len(x)] = x.numpy()
            start += len(x)
        out.flush()
        del out
        os.replace(tmp, path)
    return path
