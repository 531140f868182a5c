"""Checkpoints that a weights-only ``torch.load`` reads: no pickled code, no allow-list.

Why: ``torch.load(..., weights_only=False)`` unpickles arbitrary objects, so a checkpoint file in a
results directory (copied from a colleague, restored from shared storage) could run code when a
search resumes. torch's default since 2.6 is ``weights_only=True``, which reads tensors and plain
data (dicts, lists, tuples, strings, numbers, None) and refuses everything else — NumPy arrays
included. mtl_tune keeps that default everywhere it loads a checkpoint (:func:`load`).

The states mtl_tune writes hold a few NumPy arrays (warm starts such as Nash-MTL's α, PIVRG's
scores, STGU's affinities, NumPy's global random state). :func:`to_plain` replaces each array or
NumPy scalar by a marked dict holding a tensor with the same values and its dtype, and
:func:`from_plain` turns those back into the very same arrays (dtype, shape and values), so a
balancer or trainer sees exactly what it saved. ``Balancer.state_dict()`` is converted this way
(its extra state), so a user's own ``torch.save`` / ``torch.load`` of it works with torch's default.
"""

from __future__ import annotations

import errno
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

#: the key of a converted NumPy array (a name no user state uses)
NUMPY_KEY = "__mtl_tune_numpy__"


def to_plain(obj: Any) -> Any:
    """``obj`` with every NumPy array and NumPy scalar (in plain dicts, lists and tuples, at any depth)
    replaced by ``{NUMPY_KEY: tensor, "dtype": str, "scalar": bool}``; everything else as it is."""
    return _rebuild(obj, _plain_array)


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain` (data without converted arrays passes unchanged)."""
    return _rebuild(obj, _numpy_array)


_CONTAINER = object()  # a converter's answer for "not mine: look inside"


def _rebuild(obj: Any, convert: Any) -> Any:
    """``obj`` with ``convert`` applied to every node it claims, recursing into plain dicts, lists and
    tuples only (not an OrderedDict such as a module's state_dict: its metadata stays)."""
    out = convert(obj)
    if out is not _CONTAINER:
        return out
    if type(obj) is dict:
        return {k: _rebuild(v, convert) for k, v in obj.items()}
    if type(obj) is list:
        return [_rebuild(v, convert) for v in obj]
    if type(obj) is tuple:
        return tuple(_rebuild(v, convert) for v in obj)
    return obj


def _plain_array(obj: Any) -> Any:
    import torch

    if not isinstance(obj, (np.ndarray, np.generic)):
        return _CONTAINER
    arr = np.asarray(obj)
    if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
        raise TypeError(f"cannot store a NumPy array of dtype {arr.dtype} in a weights-only checkpoint")
    native = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)  # keeps 0-d as 0-d
    return {NUMPY_KEY: torch.from_numpy(native), "dtype": arr.dtype.str, "scalar": isinstance(obj, np.generic)}


def _numpy_array(obj: Any) -> Any:
    if not (type(obj) is dict and NUMPY_KEY in obj):
        return _CONTAINER
    arr = obj[NUMPY_KEY].detach().cpu().numpy().astype(np.dtype(obj["dtype"]), copy=True)
    return arr[()] if obj.get("scalar") else arr


class UnusableCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, the same way at every try: a trial that meets one fails
    once, with the reason, instead of being retried."""


class UnsafeCheckpointError(UnusableCheckpointError):
    """A checkpoint holds objects that a weights-only load refuses."""


class DamagedCheckpointError(UnusableCheckpointError):
    """A checkpoint file that is not a whole torch file: cut short (a kill or a full disk while it
    was written or copied) or modified since."""


class MismatchedCheckpointError(UnusableCheckpointError):
    """A whole, readable checkpoint that does not fit the trial resuming from it (another benchmark,
    method or configuration, or not a trainer state at all)."""


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (torch's run to a paragraph)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else repr(err)


def load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, then :func:`from_plain`.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects other than tensors and plain data —
            written by an mtl_tune before its checkpoints were weights-only (they held NumPy arrays),
            or not by mtl_tune. It is not loaded: unpickling it could run code from the file.
        DamagedCheckpointError: the file is not a whole torch file (torch's reader fails on it).
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds objects a weights-only load refuses ({_first_line(err)}); "
            "it was written by an older mtl_tune (whose checkpoints held NumPy arrays) or by other code, "
            "and is not loaded, since unpickling it could run code from the file: start the run afresh"
        ) from err
    except (RuntimeError, EOFError, ValueError, IndexError, struct.error, OSError) as err:
        # what torch's readers raise on a file cut short or overwritten (zip: RuntimeError, EOFError,
        # ValueError, OSError EINVAL from a seek before the start; the legacy format: also IndexError,
        # struct.error), tried at every cut of a file. Other OS errors (missing file, permissions, I/O)
        # are not the file's content: raised as they are
        if isinstance(err, OSError) and err.errno != errno.EINVAL:
            raise
        raise DamagedCheckpointError(
            f"checkpoint {path} is damaged ({type(err).__name__}: {_first_line(err)}): cut short "
            "by a kill or a full disk while it was written or copied, or modified since; it cannot be "
            "resumed from"
        ) from err
    return from_plain(state)


__all__ = ["NUMPY_KEY", "DamagedCheckpointError", "MismatchedCheckpointError", "UnsafeCheckpointError",
           "UnusableCheckpointError", "from_plain",
           "load", "to_plain"]
