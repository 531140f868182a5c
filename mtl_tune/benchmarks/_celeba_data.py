"""CelebA files: layout resolution, annotation parsing, validation (no torch; pandas is imported by
the parsers: a missing data root is reported as fast as ``--help``). The image datasets and the
resized-image cache are in :mod:`._celeba_loader`.

Layouts accepted under the data root (docs/benchmarks.md#celeba):

* torchvision: ``<root>/celeba/{img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt}``
  (``<root>`` may also be the ``celeba`` folder itself);
* the original Google-Drive release used by FAMO:
  ``<root>/{Img/img_align_celeba/, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt}``.

``list_attr_celeba.txt``: line 1 = number of images, line 2 = the 40 attribute names, then
``<file> ±1 × 40`` per image. ``list_eval_partition.txt``: ``<file> <0|1|2>`` (train/val/test),
same order, every split with images (train: 2 or more); both are read as UTF-8 (the release is
ASCII). Images:
aligned & cropped 178×218 JPEGs. Labels −1/1 map to 0/1 (as FAMO and
torchvision). Transform: PIL bilinear ``resize((s, s))`` (aspect not kept) → uint8 CHW; the
model divides by 255 (= ``ToTensor``); no normalisation, no augmentation.

A path that is there but cannot be read (permissions, a dangling symbolic link) is reported as
``cannot read <path> (<reason>)``, never as missing, unparsable or a bad JPEG.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mtl_tune.benchmarks._paths import DIR, MISSING, cannot_read, kind
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
#: fewest images per split a run can use: BatchNorm1d needs 2 samples to train; one to evaluate
MIN_SPLIT = {"train": 2, "val": 1, "test": 1}
RELEASE_SPLITS = {"train": 162770, "val": 19867, "test": 19962}
IMAGE_SIZE = (178, 218)  # (width, height) of img_align_celeba
#: bytes at the end of a JPEG searched for its end marker (0xFFD9), allowing a little padding
_TAIL = 64
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


def unreadable(path: str, err: OSError) -> DataError:
    return DataError(f"celeba: {cannot_read(path, err)}; {HINT}")


def _kind(path: str) -> str:
    """:func:`._paths.kind`, with a path that cannot be reached as a :class:`DataError`."""
    try:
        return kind(path)
    except OSError as err:
        raise unreadable(path, err) from err


def check_root(root: str) -> None:
    """``root`` is a folder this process can list (else :class:`DataError` saying which and why)."""
    found = _kind(root)
    if found != DIR:
        raise DataError(f"celeba: data root {root} is not a directory; {HINT}")
    try:
        os.listdir(root)
    except OSError as err:
        raise unreadable(root, err) from err


def resolve_paths(root: str) -> CelebaPaths:
    """Find the CelebA files under ``root`` in either accepted layout (else :class:`DataError`)."""
    candidates = [
        CelebaPaths(os.path.join(d, "img_align_celeba"), os.path.join(d, "list_attr_celeba.txt"),
                    os.path.join(d, "list_eval_partition.txt")) for d in (os.path.join(root, "celeba"), root)
    ] + [CelebaPaths(os.path.join(root, "Img", "img_align_celeba"), os.path.join(root, "Anno", "list_attr_celeba.txt"),
                     os.path.join(root, "Eval", "list_eval_partition.txt"))]
    for c in candidates:
        if _kind(c.img_dir) == DIR or _kind(c.attr_file) != MISSING:
            missing = [p for p in (c.img_dir, c.attr_file, c.partition_file) if _kind(p) == MISSING]
            if missing:
                raise DataError(f"celeba: incomplete data set under {root}: missing {missing}; {HINT}")
            return c
    raise DataError(f"celeba: no CelebA data under {root} (looked for {candidates[0].img_dir}, "
                    f"{candidates[0].attr_file}, {candidates[0].partition_file} or the Img/Anno/Eval layout); {HINT}")


def read_text(path: str, expected: str) -> str:
    """The UTF-8 text of an annotation file; :class:`DataError` if it cannot be read, or naming
    the line of the first byte that is not UTF-8 (``expected``: what the file should hold)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise unreadable(path, e) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"celeba: {path} line {line} is not UTF-8 text (byte {data[e.start:e.start + 1]!r}: "
                        f"{e.reason}); expected {expected} (the release is ASCII); {HINT}") from e


ATTR_FORMAT = "a count line, a line with the 40 attribute names, then '<file> ±1 ×40' rows"
PARTITION_FORMAT = "'<file> <0|1|2>' rows"


def parse_attributes(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(file names (n,), labels (n, 40) uint8 ∈ {0, 1}) from ``list_attr_celeba.txt``."""
    import pandas as pd

    text = read_text(path, ATTR_FORMAT)
    try:
        with io.StringIO(text) as f:
            count = int(f.readline().strip())
            names = f.readline().split()
        table = pd.read_csv(io.StringIO(text), sep=r"\s+", skiprows=2, header=None, dtype=str)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"celeba: cannot parse {path} ({e}); expected {ATTR_FORMAT}; {HINT}") from e
    if tuple(names) != ATTRIBUTES:
        raise DataError(f"celeba: {path} line 2: {_names_difference(names)}; expected the 40 CelebA attributes in "
                        f"the official order ({ATTRIBUTES[0]} … {ATTRIBUTES[-1]}); {HINT}")
    if table.shape != (count, 41):
        raise DataError(f"celeba: {path} has a table of shape {table.shape}, expected ({count}, 41) "
                        f"(line 1 announces {count} images; truncated file?); {HINT}")
    values = table.iloc[:, 1:].to_numpy()
    ok = (values == "1") | (values == "-1")
    if not ok.all():
        r, c = np.argwhere(~ok)[0]
        raise DataError(f"celeba: {path} line {r + 3} ({table.iloc[r, 0]}) attribute {ATTRIBUTES[c]} = "
                        f"'{values[r, c]}'; labels must be -1 or 1; {HINT}")
    files = table.iloc[:, 0].to_numpy(dtype=str)
    unique, counts = np.unique(files, return_counts=True)
    if (counts > 1).any():  # one image twice: in two splits it leaks, and the row it replaced is lost
        name = unique[np.argmax(counts > 1)]
        rows = np.flatnonzero(files == name)[:2] + 3
        raise DataError(f"celeba: {path} lists {name} twice (lines {rows[0]} and {rows[1]}; "
                        f"{int((counts > 1).sum())} name(s) repeated); every image must appear once; {HINT}")
    return files, (values == "1").astype(np.uint8)


def parse_partition(path: str, files: np.ndarray) -> np.ndarray:
    """Partition codes (n,) ∈ {0, 1, 2} from ``list_eval_partition.txt``, rows matching ``files``."""
    import pandas as pd

    text = read_text(path, PARTITION_FORMAT)
    try:
        table = pd.read_csv(io.StringIO(text), sep=r"\s+", header=None, dtype=str)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"celeba: cannot parse {path} ({e}); expected {PARTITION_FORMAT}; {HINT}") from e
    if table.shape != (len(files), 2):
        raise DataError(f"celeba: {path} has a table of shape {table.shape}, expected ({len(files)}, 2) "
                        f"to match list_attr_celeba.txt; {HINT}")
    names = table.iloc[:, 0].to_numpy(dtype=str)
    differ = np.flatnonzero(names != files)
    if differ.size:
        r = int(differ[0])
        raise DataError(f"celeba: {path} line {r + 1} names {names[r]}, but line {r + 3} of list_attr_celeba.txt "
                        f"names {files[r]} (the two files must list the same images in the same order; "
                        f"{differ.size} line(s) differ); {HINT}")
    codes = table.iloc[:, 1].to_numpy()
    ok = np.isin(codes, ["0", "1", "2"])
    if not ok.all():
        r = int(np.flatnonzero(~ok)[0])
        raise DataError(f"celeba: {path} line {r + 1} ({names[r]}) has partition code '{codes[r]}'; expected 0 "
                        f"(train), 1 (val) or 2 (test); {HINT}")
    codes = codes.astype(np.int64)
    _check_split_sizes(path, codes)
    return codes


def _check_split_sizes(path: str, codes: np.ndarray) -> None:
    """Every split has images: an empty val split would report F1 = 0 (the search objective), an
    empty train split would fail in the sampler, a train split of one image in BatchNorm."""
    counts = {split: int((codes == code).sum()) for split, code in SPLIT_CODES.items()}
    short = [f"the {s} split (code {SPLIT_CODES[s]}) {n} image(s), it needs at least {MIN_SPLIT[s]}"
             for s, n in counts.items() if n < MIN_SPLIT[s]]
    if short:
        found = ", ".join(f"{n} {s}" for s, n in counts.items())
        release = " / ".join(f"{n:,}" for n in RELEASE_SPLITS.values())
        raise DataError(f"celeba: {path} gives {'; '.join(short)} (rows found: {found}; the release has {release} "
                        f"train / val / test rows); {HINT}")


def _names_difference(names: list[str]) -> str:
    """The first attribute name that differs from the official list, by position."""
    for k, (got, want) in enumerate(zip(names, ATTRIBUTES)):
        if got != want:
            return f"attribute {k + 1} is '{got}', expected '{want}'"
    if len(names) < len(ATTRIBUTES):
        return f"{len(names)} attribute names, the last {len(ATTRIBUTES) - len(names)} missing (from '{ATTRIBUTES[len(names)]}')"
    return f"{len(names)} attribute names, extra '{names[len(ATTRIBUTES)]}' after '{ATTRIBUTES[-1]}'"


def _listing(files: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(str(f) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _open(path: str) -> io.BufferedReader:
    """``path`` opened for reading; :class:`DataError` "cannot read" if it cannot be (which is
    not a decoding problem: PIL's errors on its own ``open`` would read as a bad JPEG)."""
    try:
        return open(path, "rb")
    except OSError as e:
        raise unreadable(path, e) from e


def _readable(path: str) -> str:
    """``path``, after checking that it opens (:func:`_open`); PIL then opens it by name, so that
    its messages name the file."""
    _open(path).close()
    return path


def decode_problem(path: str) -> str | None:
    """Why ``path`` is not an aligned & cropped CelebA JPEG (decodes fully, 178×218), else None;
    :class:`DataError` if it cannot be read."""
    path = _readable(path)
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot decode it ({e}): truncated or not a JPEG"
    if size != IMAGE_SIZE:
        return f"it is {size[0]}×{size[1]}, expected the aligned & cropped {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} (img_align_celeba)"
    return None


def _looks_whole(path: str) -> bool:
    """JPEG start marker at the head and an end marker near the tail (a truncated file has none).

    Only the first and last bytes are read; the end marker may be followed by a little padding.
    :class:`DataError` if it cannot be read.
    """
    with _open(path) as fh:
        try:
            head = fh.read(3)
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - _TAIL))
            tail = fh.read(_TAIL)
        except OSError as e:  # an I/O error: the disk, not the JPEG
            raise unreadable(path, e) from e
    return head == b"\xff\xd8\xff" and b"\xff\xd9" in tail


def _image_error(path: str, problem: str) -> DataError:
    return DataError(f"celeba: image {path}: {problem}; {HINT}")


def check_images(img_dir: str, files: np.ndarray, level: str = "headers", n_decode: int = 8, seed: int = 0,
                 workers: int = 8) -> None:
    """Every listed image exists; ``"headers"``: each one has the JPEG start/end markers (a
    screen that reads ~70 bytes per file; a file failing it is decoded to confirm) and a sample
    (first, last, ``n_decode`` random) decodes at 178×218; ``"full"``: every image decodes."""
    try:
        present = set(os.listdir(img_dir))
    except OSError as e:
        raise unreadable(img_dir, e) from e
    missing = [str(f) for f in files if f not in present]
    if missing:
        raise DataError(f"celeba: {len(missing)} of {len(files)} images listed in the annotations are missing "
                        f"from {img_dir}: {_listing(missing)}; {HINT}")
    paths = [os.path.join(img_dir, str(f)) for f in files]
    if level == "full":
        decode = paths
    else:
        rng = np.random.default_rng(seed)
        picks = {0, len(files) - 1, *rng.integers(0, len(files), size=n_decode).tolist()}
        decode = [paths[i] for i in sorted(picks)]
        decode += [p for p in paths if not _looks_whole(p)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(decode)))) as pool:  # PIL decodes without the GIL
        for path, problem in zip(decode, pool.map(decode_problem, decode)):
            if problem:
                raise _image_error(path, problem)


def load_index(paths: CelebaPaths) -> CelebaIndex:
    files, labels = parse_attributes(paths.attr_file)
    return CelebaIndex(files, labels, parse_partition(paths.partition_file, files))


def load_image(path: str, size: int) -> np.ndarray:
    """RGB → PIL bilinear resize to (size, size) → uint8 (3, size, size) (= torchvision Resize).

    A file that does not decode, or is not 178×218, raises :class:`DataError` naming it (met at run
    time when the pre-flight check did not decode it), or "cannot read" naming it."""
    path = _readable(path)
    try:
        with Image.open(path) as im:
            if im.size != IMAGE_SIZE:  # another crop would be resized silently: the pre-flight samples only some
                raise _image_error(path, f"it is {im.size[0]}×{im.size[1]}, expected the aligned & cropped "
                                         f"{IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} (img_align_celeba)")
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _image_error(path, f"cannot decode it ({e}): truncated or not a JPEG") from e
