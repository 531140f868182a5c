"""Files of the MTAN dense-prediction releases: layout, pre-flight check, checked sample loading.

The pre-processed MTAN releases (Liu et al., CVPR'19; lorenmt/mtan) store one ``.npy`` per
sample and array, channel-last: ``root/{train,val}/<folder>/{i}.npy``. Sample keys:
``image`` (H×W×3, RGB in [0, 1]), ``label`` (H×W class ids, −1 = ignored), ``depth``
(H×W×1, ≥ 0, 0 = invalid) and ``normal`` (H×W×3, components in [−1, 1], all-zero = invalid).
Dtypes are undocumented (the NYUv2 size, ~9 GB, fits float64 throughout): any float dtype is
accepted (labels: any numeric dtype holding integral ids).

What is checked, and when:

* pre-flight (:func:`check_dense_data`, before any trial): file names ``<id>.npy`` with ids
  written as plain non-negative integers (``0.npy``, ``17.npy``; ``00.npy`` would be a second
  file for id 0); every file's ``.npy`` header (shape, dtype, and a size that holds the
  announced array — a truncated file fails here); the same sample ids in every folder of a
  split; the values of a few files per folder, or of every file with ``level="full"``. Fewer
  files than the release, or ids with gaps (a subset or a user's own split) are *reported*,
  not refused: the result's ``notes`` say what was found against the release.
* run time (:func:`npy_source`): every sample is value-checked as it is loaded (NaN/inf,
  negative depth, labels outside 0…C−1 other than the ignore label, a file without one
  valid pixel, …), so a bad file the pre-flight did not read stops the run with a
  :class:`DataError` naming it — never a NaN loss (which would look like divergence) or an
  ``IndexError`` in the loss. (A *batch* without a valid pixel of a task — possible after a
  random crop — gets a 0 loss for it: :mod:`._dense`.)

A path that exists but cannot be read (permissions, a dangling symbolic link, a link loop) is
reported as ``cannot read <path> (<reason>)``, not as missing or malformed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mtl_tune.benchmarks._paths import DIR, MISSING, cannot_read, kind
from mtl_tune.benchmarks.base import DataError

#: channels of each sample key as stored on disk (None = 2-D array)
CHANNELS: dict[str, int | None] = {"image": 3, "label": None, "depth": 1, "normal": 3}
#: the releases' value for unlabelled pixels in the label files
IGNORE_LABEL = -1
SPLITS = ("train", "val")
#: SegNet's widths (the papers'): the benchmarks' default ``filters`` and :mod:`._segnet`'s; here, in
#: the dense benchmarks' torch-free module, so the declaration of their defaults needs no torch
FILTERS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: tolerance on value-range checks (float32 round-off in the release)
_TOL = 1e-3
#: a file stem that is a sample id: a non-negative integer as ``str(int)`` writes it (no sign, no
#: leading zero), so that no two files name the same id
_ID = re.compile(r"0|[1-9][0-9]*")
#: allowed value range per key where a range is the whole rule (finite bounds: inf fails too)
_RANGES = {"image": (-_TOL, 1 + _TOL), "depth": (0.0, float(np.finfo(np.float64).max)),
           "normal": (-1 - _TOL, 1 + _TOL)}


@dataclass(frozen=True)
class DenseLayout:
    """On-disk layout of one MTAN-release data set (see the module docstring)."""

    title: str                          # "NYUv2"
    folders: Mapping[str, str]          # sample key → folder name ("label" → "label_7")
    n_classes: int
    image_shape: tuple[int, int]        # (H, W)
    counts: Mapping[str, int] | None    # files per split folder in the release; None = any
    depth_note: str                     # what the depth values are
    source: str                         # where to get the data
    ignore_label: int = IGNORE_LABEL    # label value of unlabelled pixels

    def shape(self, key: str) -> tuple[int, ...]:
        h, w = self.image_shape
        return (h, w) if CHANNELS[key] is None else (h, w, int(CHANNELS[key]))

    def spec(self, key: str) -> str:
        """What one file of ``key`` must hold."""
        h, w = self.image_shape
        return {"image": f"{h}×{w}×3 float, RGB in [0, 1]",
                "label": f"{h}×{w} float or int, class ids 0…{self.n_classes - 1}, {self.ignore_label} = ignored",
                "depth": f"{h}×{w}×1 float ≥ 0, {self.depth_note}, 0 = invalid",
                "normal": f"{h}×{w}×3 float in [−1, 1], all-zero = invalid"}[key]

    def describe(self) -> str:
        files = "; ".join(f"{folder}/{{i}}.npy ({self.spec(key)})" for key, folder in self.folders.items())
        counts = f" (the release: {self.counts['train']} train, {self.counts['val']} val files)" if self.counts else ""
        return f"train/ and val/ each holding {files}, the same ids i in every folder{counts}"


@dataclass
class DenseFiles:
    """What the pre-flight check found: sample ids per split, and notes against the release."""

    ids: dict[str, list[int]]
    notes: list[str] = field(default_factory=list)


def _fail(layout: DenseLayout, path: str, problem: str, env: str | None) -> DataError:
    where = "pass its folder as data_root (--data-root)" + (f" or set {env}" if env else "")
    return DataError(f"{layout.title} data at {path}: {problem}. Expected: {layout.describe()}. "
                     f"Get it from {layout.source}; {where}. Nothing is downloaded automatically.")


def _bad_file(layout: DenseLayout, path: str, key: str, problem: str) -> DataError:
    return DataError(f"{layout.title} file {path}: {problem}; expected {layout.spec(key)}")


def _unreadable(layout: DenseLayout, path: str, err: OSError) -> DataError:
    # not "missing" or "malformed": the file is there, the process may not read it
    return DataError(f"{layout.title} data: {cannot_read(path, err)}. Expected: {layout.describe()}")


# ---------------------------------------------------------------------------- ids
def describe_ranges(values: Sequence[int], limit: int = 5) -> str:
    """Sorted ids as ranges: ``"17, 20…25, 31"`` (at most ``limit`` ranges, then a count)."""
    arr = sorted(set(int(v) for v in values))
    runs: list[tuple[int, int]] = []
    for v in arr:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    text = ", ".join(str(a) if a == b else f"{a}…{b}" for a, b in runs[:limit])
    return text + (f" and {len(runs) - limit} more range(s)" if len(runs) > limit else "")


def _readable_dir(layout: DenseLayout, path: str, missing: str, env: str | None) -> list[str]:
    """The entries of folder ``path``; :class:`DataError` when it is missing (``missing`` says
    so), not a folder, or cannot be read."""
    try:
        found = kind(path)
        if found == MISSING:
            raise _fail(layout, path, missing, env)
        if found != DIR:
            raise _fail(layout, path, "not a folder", env)
        return os.listdir(path)
    except OSError as err:
        raise _unreadable(layout, path, err) from err


def _list_ids(layout: DenseLayout, folder: str, env: str | None) -> list[int]:
    """Sorted sample ids of the ``<id>.npy`` files of ``folder``."""
    names = sorted(n for n in _readable_dir(layout, folder, "folder missing", env) if n.endswith(".npy"))
    bad = [n for n in names if not _ID.fullmatch(n[:-4])]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise _fail(layout, os.path.join(folder, bad[0]),
                    f"file name(s) {', '.join(bad[:3])}{more} are not <integer id>.npy (ids are non-negative "
                    "integers without leading zeros or a sign: 0.npy, 1.npy, …, 17.npy)", env)
    if not names:
        raise _fail(layout, folder, "no .npy files", env)
    return sorted(int(n[:-4]) for n in names)


def _same_ids(layout: DenseLayout, split_dir: str, ref_name: str, ref: list[int], name: str, ids: list[int],
              env: str | None) -> None:
    """All folders of a split hold the same ids; else name a missing file."""
    if ids == ref:
        return
    only_ref, only_here = sorted(set(ref) - set(ids)), sorted(set(ids) - set(ref))
    if only_ref:
        i = only_ref[0]
        problem = (f"{name}/{i}.npy is missing but {ref_name}/{i}.npy exists "
                   f"({len(only_ref)} such id(s): {describe_ranges(only_ref)})")
    else:
        i = only_here[0]
        problem = (f"{name}/{i}.npy has no {ref_name}/{i}.npy "
                   f"({len(only_here)} such id(s): {describe_ranges(only_here)})")
    raise _fail(layout, split_dir, problem, env)


# ---------------------------------------------------------------------------- headers and values
def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an ``.npy`` header; ``ValueError`` if not an ``.npy``, pickled or
    truncated; ``OSError`` if the file cannot be opened or read."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        if dtype.hasobject:
            raise ValueError("an object (pickled) array")
        need = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.fstat(fh.fileno()).st_size
    if size < need:
        raise ValueError(f"truncated: {size} bytes, its header announces {shape} {dtype} = {need} bytes")
    if size > need:  # numpy reads the first part and ignores the rest: another array under a stale header
        raise ValueError(f"{size} bytes, but its header announces {shape} {dtype} = {need} bytes (data after the "
                         "array: written over with another array?)")
    return tuple(int(s) for s in shape), dtype


def _header_problem(layout: DenseLayout, key: str, path: str) -> str | None:
    """What is wrong with the header of ``path``, else None; ``OSError`` if it cannot be read."""
    try:
        shape, dtype = read_npy_header(path)
    except (ValueError, EOFError) as err:
        return f"unreadable .npy ({err})"
    kinds = "fiu" if key == "label" else "f"
    if shape != layout.shape(key) or dtype.kind not in kinds:
        hint = ("; for data at another resolution pass benchmark_options={image_shape: [H, W]}"
                if key == "image" and len(shape) == 3 and shape[2] == 3 else "")
        return (f"shape {shape} dtype {dtype}, expected shape {layout.shape(key)} and a "
                f"{'numeric' if key == 'label' else 'float'} dtype{hint}")
    return None


def _at(mask: np.ndarray) -> str:
    """Position of the first True of ``mask`` as ``pixel (row, col)`` (channel dropped)."""
    where = tuple(int(v) for v in np.argwhere(mask)[0])
    return f"pixel ({where[0]}, {where[1]})" if len(where) >= 2 else f"index {where}"


def _num(x: float) -> str:
    return f"{float(x):.6g}"


def value_problem(key: str, arr: np.ndarray, n_classes: int, ignore_label: int = IGNORE_LABEL) -> str | None:
    """Text naming the first value of ``arr`` outside the documented range of ``key``, else None."""
    if key in _RANGES and arr.size:  # fast path (run time, every sample): NaN propagates to min/max
        low, high = _RANGES[key]
        if low <= float(arr.min()) and float(arr.max()) <= high:
            return None
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr[~finite].flat[0]
        return f"{'NaN' if np.isnan(bad) else _num(bad)} at {_at(~finite)}"
    if key == "image":
        bad = (arr < -_TOL) | (arr > 1 + _TOL)
        if bad.any():
            return (f"value {_num(arr[bad].flat[0])} at {_at(bad)} (values span [{_num(arr.min())}, "
                    f"{_num(arr.max())}]; 0…255 images must be divided by 255)")
    elif key == "label":
        frac = arr != np.round(arr)
        if frac.any():
            return f"non-integer class id {_num(arr[frac].flat[0])} at {_at(frac)}"
        bad = ((arr < 0) | (arr >= n_classes)) & (arr != ignore_label)
        if bad.any():
            values = ", ".join(str(int(v)) for v in np.unique(arr[bad])[:5])
            return (f"class id(s) {values} at {int(bad.sum())} pixel(s), first at {_at(bad)}, outside "
                    f"0…{n_classes - 1} and not the ignore label {ignore_label} (if such a value marks "
                    "unlabelled pixels in your data, pass benchmark_options={ignore_label: <value>})")
    elif key == "depth":
        bad = arr < 0
        if bad.any():
            return f"negative depth {_num(arr[bad].flat[0])} at {_at(bad)} ({int(bad.sum())} pixel(s))"
    elif key == "normal":
        bad = np.abs(arr) > 1 + _TOL
        if bad.any():
            return f"normal component {_num(arr[bad].flat[0])} at {_at(bad)}, outside [−1, 1]"
    return None


def empty_problem(key: str, arr: np.ndarray, ignore_label: int = IGNORE_LABEL) -> str | None:
    """Text when ``arr`` (values already checked) has no valid pixel for its task, else None.

    Valid pixels follow the losses' masks (:func:`._dense.valid_mask`, ``ignore_index``): depth
    ≠ 0, Σ_c normal_c ≠ 0, label ≠ the ignore label. A sample without one adds nothing to its
    task and, alone in a batch, would leave the papers' masked mean undefined; the releases have
    none, so such a file is a damaged one (zeros written for a failed conversion, say).
    """
    if key == "depth" and not arr.any():
        return "no valid pixel: every depth value is 0 (= invalid)"
    if key == "normal" and not (np.asarray(arr, dtype=np.float32).sum(axis=-1) != 0).any():
        return "no valid pixel: every normal is invalid (its components sum to 0, e.g. all-zero)"
    if key == "label" and bool((arr == ignore_label).all()):
        return f"no labelled pixel: every class id is the ignore label {ignore_label}"
    return None


def load_checked(layout: DenseLayout, key: str, path: str) -> np.ndarray:
    """Load one file and check its shape and values; :class:`DataError` naming the file if bad."""
    try:
        fh = open(path, "rb")
    except OSError as err:  # permissions, a dangling link: the file is not malformed
        raise _unreadable(layout, path, err) from err
    with fh:
        try:
            arr = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # truncated, not an .npy, a pickled array
            raise _bad_file(layout, path, key, f"unreadable .npy ({err})") from err
    if arr.shape != layout.shape(key):
        raise _bad_file(layout, path, key, f"shape {arr.shape}, expected {layout.shape(key)}")
    problem = (value_problem(key, arr, layout.n_classes, layout.ignore_label)
               or empty_problem(key, arr, layout.ignore_label))
    if problem:
        raise _bad_file(layout, path, key, problem)
    return arr


def npy_source(layout: DenseLayout, root: str, split: str,
               ids: Sequence[int]) -> Callable[[int], dict[str, np.ndarray]]:
    """Loader of the ``k``-th sample (file id ``ids[k]``) of ``root/split`` as checked raw arrays.

    Labels come back with the ignore label mapped to −1 (what the losses and metrics skip).
    """
    ids = [int(i) for i in ids]

    def load(k: int) -> dict[str, np.ndarray]:
        out = {key: load_checked(layout, key, os.path.join(root, split, name, f"{ids[k]}.npy"))
               for key, name in layout.folders.items()}
        if "label" in out and layout.ignore_label != IGNORE_LABEL:
            label = out["label"].astype(np.float32)
            label[label == layout.ignore_label] = IGNORE_LABEL
            out["label"] = label
        return out
    return load


# ---------------------------------------------------------------------------- pre-flight check
def _sample_ids(ids: list[int], samples: int) -> list[int]:
    if samples <= 0 or not ids:
        return []
    return [ids[k] for k in sorted({int(round(x)) for x in np.linspace(0, len(ids) - 1, min(samples, len(ids)))})]


def _check_split(layout: DenseLayout, root: str, split: str, env: str | None, samples: int,
                 full: bool) -> list[int]:
    split_dir = os.path.join(root, split)
    _readable_dir(layout, split_dir, "folder missing", env)  # blame an unreadable split, not its folders
    ref_name, ref = "", []
    for n, (key, name) in enumerate(layout.folders.items()):
        ids = _list_ids(layout, os.path.join(split_dir, name), env)
        if n == 0:
            ref_name, ref = name, ids
        _same_ids(layout, split_dir, ref_name, ref, name, ids, env)
    for key, name in layout.folders.items():  # headers of every file: cheap, catches truncation
        for i in ref:
            path = os.path.join(split_dir, name, f"{i}.npy")
            try:
                problem = _header_problem(layout, key, path)
            except OSError as err:
                raise _unreadable(layout, path, err) from err
            if problem:
                raise _fail(layout, path, problem, env)
    for key, name in layout.folders.items():
        for i in (ref if full else _sample_ids(ref, samples)):
            load_checked(layout, key, os.path.join(split_dir, name, f"{i}.npy"))
    return ref


def release_note(layout: DenseLayout, split_dir: str, ids: list[int], expected: int) -> str | None:
    """What a split's ids are against the release's 0…expected−1 (None when they match)."""
    if ids == list(range(expected)):
        return None
    missing = sorted(set(range(expected)) - set(ids))
    extra = sorted(set(ids) - set(range(expected)))
    parts = [f"{layout.title} at {split_dir}: {len(ids)} samples, the release has {expected} (ids 0…{expected - 1})"]
    if missing:
        parts.append(f"missing id(s) {describe_ranges(missing)}")
    if extra:
        parts.append(f"id(s) not in the release {describe_ranges(extra)}")
    return "; ".join(parts) + (f". Running on the {len(ids)} found (a subset or your own split: results are "
                               "not comparable with the papers' numbers)")


def check_dense_data(layout: DenseLayout, root: str | None, env: str | None, samples: int = 4,
                     level: str = "headers") -> DenseFiles:
    """Validate a data folder; raise :class:`DataError` naming the path and expected layout.

    Reads every file's header; the values of ``samples`` files per folder (``level="headers"``)
    or of every file (``level="full"``). Returns the ids per split and notes on what differs
    from the release (counts, id gaps) — a subset is reported there, not refused.
    """
    if root is None:
        raise _fail(layout, "<unset>", "no data folder given", env)
    _readable_dir(layout, root, "folder does not exist", env)
    found = DenseFiles({split: _check_split(layout, root, split, env, samples, level == "full") for split in SPLITS})
    if layout.counts is not None:
        for split, ids in found.ids.items():
            note = release_note(layout, os.path.join(root, split), ids, int(layout.counts[split]))
            if note:
                found.notes.append(note)
    return found
