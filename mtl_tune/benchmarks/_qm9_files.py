"""QM9's files and constants without torch: which files a data root holds, and the benchmark's
target columns, so that a missing or incomplete data root is reported as fast as ``--help``
(docs/performance.md §4.2). Reading the files needs torch: :mod:`._qm9_data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from mtl_tune.benchmarks._paths import DIR, FILE, cannot_read, kind
from mtl_tune.benchmarks.base import DataError

DATA_HINT = ("get QM9 with torch_geometric.datasets.QM9(root) on a machine with internet (it downloads "
             "raw/qm9_v3.pt and writes processed/data_v3.pt) and copy <root>/raw and/or <root>/processed here")
PROCESSED = os.path.join("processed", "data_v3.pt")
RAW_PREPROCESSED = os.path.join("raw", "qm9_v3.pt")
RAW_SDF = tuple(os.path.join("raw", f) for f in ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"))
N_NODE_FEATURES, N_BOND_TYPES, N_TARGETS = 11, 4, 19

#: PyG's target columns, in the benchmark's output order, and their names
TARGETS = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)
TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
#: outputs reported in meV (×1000 from eV)
MEV_OUTPUTS = (2, 3, 5, 6, 7, 8, 9)


def _has_rdkit() -> bool:
    try:
        import rdkit  # noqa: F401
    except ImportError:
        return False
    return True


def _names(paths: Sequence[str]) -> str:
    return ", ".join(str(p) for p in paths)


def _is_file(root: str, name: str) -> bool:
    """Whether ``root/name`` is a file; :class:`DataError` if it cannot be reached (not "missing")."""
    path = os.path.join(root, name)
    try:
        return kind(path) == FILE
    except OSError as e:
        raise DataError(f"qm9: {cannot_read(path, e)}; expected {PROCESSED} or {RAW_PREPROCESSED} under {root}; "
                        f"{DATA_HINT}") from e


def available_source(root: str) -> str:
    """Which QM9 files under ``root`` will be read; :class:`DataError` naming what is missing.

    ``"processed"`` (PyG's ``processed/data_v3.pt``), ``"raw_preprocessed"`` (``raw/qm9_v3.pt``)
    or ``"raw_sdf"`` (``raw/{gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt}``, needs RDKit).
    """
    try:
        is_dir = kind(root) == DIR
        if is_dir:
            os.listdir(root)  # a root that may not be listed: its files would read as missing
    except OSError as e:
        raise DataError(f"qm9: {cannot_read(root, e)}; expected {PROCESSED} or {RAW_PREPROCESSED} under it; "
                        f"{DATA_HINT}") from e
    if not is_dir:
        raise DataError(f"qm9: data root {root} is not a directory; expected {PROCESSED} or {RAW_PREPROCESSED} "
                        f"under it; {DATA_HINT}")
    if _is_file(root, PROCESSED):
        return "processed"
    sdf_found = [f for f in RAW_SDF if _is_file(root, f)]
    if _has_rdkit() and len(sdf_found) == len(RAW_SDF):
        return "raw_sdf"
    if _is_file(root, RAW_PREPROCESSED):
        return "raw_preprocessed"
    if sdf_found and not _has_rdkit():
        raise DataError(f"qm9: found the raw files {_names(sdf_found)} under {root}, but processing them needs "
                        f"RDKit (pip install rdkit), or put PyG's pre-processed {RAW_PREPROCESSED} (or "
                        f"{PROCESSED}) there instead; {DATA_HINT}")
    if sdf_found:
        missing = [f for f in RAW_SDF if f not in sdf_found]
        raise DataError(f"qm9: found {_names(sdf_found)} under {root} but not {_names(missing)}; the raw QM9 "
                        f"needs all of {_names(RAW_SDF)} (or PyG's {RAW_PREPROCESSED} or {PROCESSED}); {DATA_HINT}")
    folders = [name for name in (PROCESSED, RAW_PREPROCESSED, *RAW_SDF) if kind(os.path.join(root, name)) == DIR]
    if folders:  # not "no data": the name is there, as a folder
        raise DataError(f"qm9: {os.path.join(root, folders[0])} is a folder, expected the file; {DATA_HINT}")
    raise DataError(f"qm9: no QM9 data under {root}: expected {PROCESSED} (PyG's processed file), "
                    f"{RAW_PREPROCESSED} (PyG's pre-processed download) or {_names(RAW_SDF)} with RDKit; "
                    f"{DATA_HINT}")
