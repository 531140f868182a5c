"""QM9 data: optional torch-geometric import, offline dataset, validation, graph completion.

The dataset is ``torch_geometric.datasets.QM9(root)`` (docs/benchmarks.md#qm9) read from the
user's ``root``: ``processed/data_v3.pt`` (PyG's processed file), or ``raw/qm9_v3.pt`` (PyG's
pre-processed download), or — with RDKit — ``raw/{gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt}``.
Nothing is downloaded: :class:`OfflineQM9` replaces PyG's ``download`` with an error. Raw
files are processed once, by PyG, in a temporary folder; only a successful result is copied
into ``root/processed/`` (PyG's own files ``data_v3.pt``, ``pre_transform.pt``,
``pre_filter.pt``) — a failed processing leaves the data root as it was. With the processed
file present nothing is written at all, so a read-only data root works.

Per-molecule features (PyG): ``x`` (N, 11), ``edge_index`` (2, E) bonds in both directions,
``edge_attr`` (E, 4) bond-type one-hot, ``pos`` (N, 3) in Å, ``y`` (1, 19).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from mtl_tune.benchmarks import _qm9_files as qf
from mtl_tune.benchmarks._paths import cannot_read
from mtl_tune.benchmarks._qm9_files import (DATA_HINT, N_BOND_TYPES, N_NODE_FEATURES, N_TARGETS, PROCESSED,
                                            RAW_PREPROCESSED, RAW_SDF, TARGETS, TASKS, available_source)
from mtl_tune.benchmarks.base import ConfigError, DataError

PYG_HINT = 'QM9 needs torch-geometric: pip install "mtl_tune[qm9]" (or pip install torch-geometric)'


class MissingExtraError(ConfigError, ImportError):
    """An optional dependency is not installed: a configuration error for the search's pre-flight
    (one line, exit 2) and still an ImportError for code that catches that."""


def require_pyg() -> Any:
    """Import torch_geometric lazily (optional extra) with an actionable error."""
    try:
        import torch_geometric  # noqa: F401
        from torch_geometric import datasets
    except ImportError as e:
        raise MissingExtraError(PYG_HINT) from e
    return datasets


@lru_cache(maxsize=2)
def _offline_class() -> type:
    datasets = require_pyg()

    class OfflineQM9(datasets.QM9):
        """PyG's QM9 that never downloads and reads the raw files that are there.

        PyG calls ``download`` whenever a raw file is missing, even when the processed file
        exists (then there is nothing to do). PyG picks its raw files by whether RDKit is
        importable; ``source="raw_preprocessed"`` reads ``raw/qm9_v3.pt`` either way.
        """

        def __init__(self, root: str, source: str = "processed", **kwargs: Any) -> None:
            self.source = source
            super().__init__(root, **kwargs)

        @property
        def has_download(self) -> bool:
            # PyG's _download makes raw/ before it looks for anything to fetch, even when the processed
            # file is there: that fails on a read-only data root and leaves an empty raw/ elsewhere
            if os.path.isfile(os.path.join(self.root, PROCESSED)):
                return False
            return not all(os.path.isfile(p) for p in self.raw_paths)

        @property
        def raw_file_names(self) -> list[str]:
            if getattr(self, "source", "") == "raw_preprocessed":
                return [os.path.basename(RAW_PREPROCESSED)]
            return super().raw_file_names

        def download(self) -> None:
            if not os.path.isfile(os.path.join(self.root, PROCESSED)):
                raise DataError(f"qm9: raw files {self.raw_file_names} missing under {self.raw_dir}; {DATA_HINT}")

        def process(self) -> None:
            if self.source != "raw_preprocessed" or not qf._has_rdkit():
                return super().process()  # PyG's own processing (without RDKit: from qm9_v3.pt)
            from torch_geometric.data import Data
            from torch_geometric.io import fs
            # PyG's RDKit-less branch, for a machine with RDKit but only qm9_v3.pt
            self.save([Data(**d) for d in fs.torch_load(self.raw_paths[0])], self.processed_paths[0])

    OfflineQM9.__module__, OfflineQM9.__qualname__ = __name__, "OfflineQM9"
    return OfflineQM9


def __getattr__(name: str) -> Any:
    """``OfflineQM9`` resolves lazily (PEP 562), so pickling a dataset for spawned loader
    workers finds the class without importing torch-geometric at module import."""
    if name == "OfflineQM9":
        return _offline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _publish(src_dir: str, dst_dir: str) -> None:
    """Move PyG's processed files into ``dst_dir``, each appearing whole (copy + rename);
    ``data_v3.pt`` last, as its presence means "processed". On failure nothing is left."""
    created = not os.path.isdir(dst_dir)
    os.makedirs(dst_dir, exist_ok=True)
    names = sorted(os.listdir(src_dir), key=lambda n: n == os.path.basename(PROCESSED))
    done: list[str] = []
    try:
        for name in names:
            partial = os.path.join(dst_dir, f".{name}.partial-{os.getpid()}")
            try:
                shutil.copyfile(os.path.join(src_dir, name), partial)
                os.replace(partial, os.path.join(dst_dir, name))
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
            done.append(name)
    except BaseException:
        for name in done:
            os.remove(os.path.join(dst_dir, name))
        if created and not os.listdir(dst_dir):
            os.rmdir(dst_dir)
        raise


def _process_outside(root: str, source: str) -> Any:
    """Run PyG's processing in a temporary folder (its ``raw`` links to ``root/raw``) and
    publish the result into ``root/processed`` only when it succeeded: a failed processing
    (a truncated ``qm9_v3.pt``, say) leaves nothing in the user's data root."""
    raw_file = RAW_PREPROCESSED if source == "raw_preprocessed" else RAW_SDF[0]
    with tempfile.TemporaryDirectory(prefix="mtl_tune_qm9_") as tmp:
        os.symlink(os.path.join(root, "raw"), os.path.join(tmp, "raw"))
        try:
            ds = _offline_class()(tmp, source=source)
        except DataError:
            raise
        except Exception as e:  # truncated/corrupt pickles raise many different types
            raise DataError(f"qm9: cannot process {os.path.join(root, raw_file)} ({type(e).__name__}: {e}); the "
                            f"file is corrupt or truncated (nothing was written under {root}); {DATA_HINT}") from e
        try:
            _publish(os.path.join(tmp, "processed"), os.path.join(root, "processed"))
        except OSError as e:  # e.g. a read-only data root: use the in-memory result
            warnings.warn(f"qm9: could not store the processed QM9 in {os.path.join(root, 'processed')} ({e}); "
                          "it will be processed again by every run", UserWarning, stacklevel=3)
            return ds
    return _offline_class()(root, source=source)


def _unreadable(path: str, err: OSError, root: str) -> DataError:
    return DataError(f"qm9: {cannot_read(path, err)}; expected a readable {PROCESSED} under {root}; {DATA_HINT}")


def _check_readable(path: str, root: str) -> None:
    """``path`` can be opened and read: a permission problem is not a corrupt file."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as e:
        raise _unreadable(path, e, root) from e


def load_qm9(root: str, source: str | None = None) -> Any:
    """The PyG QM9 dataset of ``root`` (validated by :func:`validate`); ``source``: what
    :func:`available_source` already said about ``root``, if the caller asked."""
    source = available_source(root) if source is None else source
    if source != "processed":
        ds = _process_outside(root, source)
    else:
        path = os.path.join(root, PROCESSED)
        _check_readable(path, root)
        try:
            ds = _offline_class()(root)
        except DataError:
            raise
        except (PermissionError, FileNotFoundError, IsADirectoryError) as e:  # e.g. PyG's pre_transform.pt
            raise _unreadable(e.filename if isinstance(e.filename, str) else path, e, root) from e
        except Exception as e:  # truncated/corrupt pickles raise many different types (OSError too)
            raise DataError(f"qm9: cannot load {path} ({type(e).__name__}: {e}); the file is corrupt or truncated: "
                            f"copy it again, or delete it to re-process it from {RAW_PREPROCESSED}; {DATA_HINT}") from e
    validate(ds, root)
    return ds


def _molecule(ds: Any, i: int) -> str:
    names = getattr(ds._data, "name", None)
    name = names[i] if isinstance(names, (list, tuple)) and i < len(names) else None
    return f"molecule {i}" + (f" ({name})" if name else "")


def validate(ds: Any, root: str) -> None:
    """Shapes/dtypes of the collated storage, finite values, every bond inside its molecule
    (vectorised over the storage: no per-graph access), no target constant over the molecules."""
    d, n = ds._data, len(ds)
    problems = []
    expect = {"x": (2, N_NODE_FEATURES, torch.float32), "edge_attr": (2, N_BOND_TYPES, torch.float32),
              "pos": (2, 3, torch.float32), "y": (2, N_TARGETS, torch.float32), "edge_index": (2, None, torch.int64)}
    for key, (ndim, cols, dtype) in expect.items():
        t = getattr(d, key, None)
        if t is None:
            problems.append(f"missing field {key!r}")
        elif t.dim() != ndim or (cols is not None and t.shape[1] != cols) or t.dtype != dtype:
            problems.append(f"{key} is {tuple(t.shape)} {t.dtype}, expected (*, {cols or 'E'}) {dtype}")
    if not problems:
        if d.y.shape[0] != n:
            problems.append(f"y has {d.y.shape[0]} rows for {n} molecules (expected one (1, 19) row each)")
        if d.edge_index.shape[0] != 2:
            problems.append(f"edge_index has shape {tuple(d.edge_index.shape)}, expected (2, E)")
        elif not bool(((d.edge_attr == 0) | (d.edge_attr == 1)).all()) or \
                (d.edge_attr.shape[0] and not bool((d.edge_attr.sum(dim=1) == 1).all())):
            # 0/1 entries alone let [1, 1, 1, 1] or all zeros through: exactly one bond type per bond
            problems.append("edge_attr is not a bond-type one-hot (0/1 with exactly one 1 per bond)")
        atoms = ds.slices["x"][1:] - ds.slices["x"][:-1] if "x" in ds.slices else None
        if atoms is not None and bool((atoms == 0).any()):
            problems.append(f"{_molecule(ds, int(torch.nonzero(atoms == 0)[0]))} has no atom")
    if not problems:
        for key in ("y", "x", "pos"):
            bad = ~torch.isfinite(getattr(d, key))
            if bool(bad.any()):
                row, col = (int(v) for v in bad.nonzero()[0])
                mol = row if key == "y" else int(torch.searchsorted(ds.slices[key], row, right=True)) - 1
                problems.append(f"{key} of {_molecule(ds, mol)} holds {float(getattr(d, key)[row, col])} "
                                f"(column {col})")
        problems.extend(_bond_problems(ds))
    if problems:
        raise DataError(f"qm9: malformed QM9 under {root}: {'; '.join(problems)}. Expected PyG's format: x (N, 11) "
                        f"float, edge_index (2, E) long, edge_attr (E, 4) one-hot, pos (N, 3), y (1, 19) per "
                        f"molecule; {DATA_HINT}")
    constant = _constant_targets(ds)  # after the checks above: on finite targets of the right shape
    if constant:
        raise DataError(f"qm9: QM9 under {root}: {'; '.join(constant)}. Expected targets that vary over the "
                        f"molecules (each is standardised by its standard deviation over all of them); {DATA_HINT}")


def _constant_targets(ds: Any) -> list[str]:
    """Targets of the benchmark with one value for every molecule: their standard deviation is 0,
    and the standardisation (y − μ)/σ divides by it (every loss would be NaN)."""
    y = ds._data.y[:, list(TARGETS)]
    if y.shape[0] == 0:  # no molecules: the split sizes say so (QM9Benchmark._check_split_sizes)
        return []
    same = (y == y[:1]).all(dim=0) | ~(y.std(dim=0) > 0)  # std is NaN for a single molecule
    return [f"target {TASKS[k]} (PyG column {TARGETS[k]}) has the same value {float(y[0, k]):g} for all {len(y)} "
            "molecules: its standard deviation is 0, so it cannot be standardised"
            for k in torch.nonzero(same).flatten().tolist()]


def _bond_problems(ds: Any) -> list[str]:
    """Bonds pointing outside their molecule (the storage keeps per-molecule atom indices)."""
    d, slices = ds._data, ds.slices
    atoms = slices["x"][1:] - slices["x"][:-1]
    per_mol = slices["edge_index"][1:] - slices["edge_index"][:-1]
    owner = torch.repeat_interleave(torch.arange(atoms.numel()), per_mol)
    if d.edge_index.numel() == 0:
        return []
    bad = (d.edge_index < 0) | (d.edge_index >= atoms[owner].unsqueeze(0))
    if not bool(bad.any()):
        return []
    e = int(bad.any(dim=0).nonzero()[0])
    mol = int(owner[e])
    return [f"{_molecule(ds, mol)} has a bond {int(d.edge_index[0, e])}–{int(d.edge_index[1, e])} to an atom "
            f"outside its {int(atoms[mol])} atoms"]


# ---------------------------------------------------------------------- batches
@dataclass
class GraphBatch:
    """The fields of a collated PyG batch the model uses (also built directly for synthetic data)."""

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    pos: Tensor
    batch: Tensor
    ptr: Tensor
    y: Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.ptr.numel() - 1)

    def to(self, device: torch.device) -> GraphBatch:
        return GraphBatch(*(getattr(self, f).to(device, non_blocking=True) for f in
                            ("x", "edge_index", "edge_attr", "pos", "batch", "ptr", "y")))


def from_pyg(b: Any) -> GraphBatch:
    return GraphBatch(b.x, b.edge_index, b.edge_attr, b.pos, b.batch, b.ptr, b.y)


def complete_with_distance(g: GraphBatch) -> tuple[Tensor, Tensor]:
    """Fully connect every graph of the batch (no self loops) and append distances.

    The official per-molecule ``Complete()`` + ``Distance(norm=False)`` transforms
    (nash-mtl ``experiments/quantum_chemistry/utils.py``) done once per batch on the device:
    for each molecule with n atoms, the n(n−1) ordered pairs (i, j), i ≠ j, in row-major
    order; edge features = bond one-hot of (i, j) (zeros if unbonded) ‖ ‖pos_j − pos_i‖₂.
    Returns ``edge_index`` (2, Σ n(n−1)) and ``edge_attr`` (Σ n(n−1), 5).
    """
    counts = g.ptr[1:] - g.ptr[:-1]
    n2 = counts * counts
    pair_start = torch.cumsum(n2, 0) - n2
    graph = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), n2)
    local = torch.arange(int(n2.sum()), device=counts.device) - pair_start[graph]
    n_of = counts[graph]
    row = g.ptr[graph] + torch.div(local, n_of, rounding_mode="floor")
    col = g.ptr[graph] + local % n_of
    bonds = g.edge_attr.new_zeros(row.numel(), g.edge_attr.shape[1])
    if g.edge_index.numel():
        r, c = g.edge_index
        gb = g.batch[r]
        bonds[pair_start[gb] + (r - g.ptr[gb]) * counts[gb] + (c - g.ptr[gb])] = g.edge_attr
    keep = row != col
    row, col, bonds = row[keep], col[keep], bonds[keep]
    dist = torch.norm(g.pos[col] - g.pos[row], p=2, dim=-1).unsqueeze(1)
    return torch.stack([row, col]), torch.cat([bonds, dist.to(bonds.dtype)], dim=1)


def synthetic_batch(n_graphs: int, gen: torch.Generator) -> GraphBatch:
    """Random molecules of QM9's shapes (≈ 18 ± 3 atoms, chain bonds) — throughput only."""
    counts = torch.clamp(torch.round(18 + 3 * torch.randn(n_graphs, generator=gen)), 3, 29).long()
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    n = int(ptr[-1])
    batch = torch.repeat_interleave(torch.arange(n_graphs), counts)
    types = torch.randint(0, 5, (n,), generator=gen)
    x = torch.cat([torch.nn.functional.one_hot(types, 5).float(),
                   torch.rand(n, 6, generator=gen)], dim=1)
    src = torch.arange(n)
    chain = src[(src + 1) < ptr[batch + 1]]  # atom i bonded to i+1 inside its molecule
    edge_index = torch.cat([torch.stack([chain, chain + 1]), torch.stack([chain + 1, chain])], dim=1)
    bond = torch.randint(0, N_BOND_TYPES, (chain.numel(),), generator=gen).repeat(2)
    edge_attr = torch.nn.functional.one_hot(bond, N_BOND_TYPES).float()
    return GraphBatch(x, edge_index, edge_attr, 1.5 * torch.randn(n, 3, generator=gen), batch, ptr,
                      torch.randn(n_graphs, N_TARGETS, generator=gen))
