"""QM9 data: optional torch-geometric import, offline dataset, validation, graph completion.

The dataset is ``torch_geometric.datasets.QM9(root)`` (benchmarks.md §5.1) read from the
user's ``root``: ``processed/data_v3.pt`` (PyG's processed file), or ``raw/qm9_v3.pt`` (PyG's
pre-processed download, used when RDKit is absent; processed once into ``processed/``), or —
with RDKit — ``raw/{gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt}``. Nothing is downloaded:
:class:`OfflineQM9` replaces PyG's ``download`` with an error.

Per-molecule features (PyG): ``x`` (N, 11), ``edge_index`` (2, E) bonds in both directions,
``edge_attr`` (E, 4) bond-type one-hot, ``pos`` (N, 3) in Å, ``y`` (1, 19).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from mtl_tune.benchmarks.base import DataError

PYG_HINT = 'QM9 needs torch-geometric: pip install "mtl_tune[qm9]" (or pip install torch-geometric)'
DATA_HINT = ("get QM9 with torch_geometric.datasets.QM9(root) on a machine with internet (it downloads "
             "raw/qm9_v3.pt and writes processed/data_v3.pt) and copy <root>/raw and/or <root>/processed here")
PROCESSED = os.path.join("processed", "data_v3.pt")
RAW_PREPROCESSED = os.path.join("raw", "qm9_v3.pt")
RAW_SDF = tuple(os.path.join("raw", f) for f in ("gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"))
N_NODE_FEATURES, N_BOND_TYPES, N_TARGETS = 11, 4, 19


def require_pyg() -> Any:
    """Import torch_geometric lazily (optional extra) with an actionable error."""
    try:
        import torch_geometric  # noqa: F401
        from torch_geometric import datasets
    except ImportError as e:
        raise ImportError(PYG_HINT) from e
    return datasets


def _has_rdkit() -> bool:
    try:
        import rdkit  # noqa: F401
    except ImportError:
        return False
    return True


def available_source(root: str) -> str:
    """Which QM9 files under ``root`` the PyG class will read; :class:`DataError` if none."""
    if not os.path.isdir(root):
        raise DataError(f"qm9: data root {root} is not a directory; expected {PROCESSED} or {RAW_PREPROCESSED} "
                        f"under it; {DATA_HINT}")
    if os.path.isfile(os.path.join(root, PROCESSED)):
        return "processed"
    if _has_rdkit() and all(os.path.isfile(os.path.join(root, f)) for f in RAW_SDF):
        return "raw_sdf"
    if not _has_rdkit() and os.path.isfile(os.path.join(root, RAW_PREPROCESSED)):
        return "raw_preprocessed"
    wanted = f"{RAW_SDF} (RDKit is installed)" if _has_rdkit() else RAW_PREPROCESSED
    raise DataError(f"qm9: no QM9 data under {root}: expected {PROCESSED} (PyG's processed file) or {wanted}; "
                    f"{DATA_HINT}")


@lru_cache(maxsize=2)
def _offline_class() -> type:
    datasets = require_pyg()

    class OfflineQM9(datasets.QM9):
        """PyG's QM9 that never downloads: PyG calls ``download`` whenever a raw file is
        missing, even when the processed file exists (then there is nothing to do)."""

        def download(self) -> None:
            if not os.path.isfile(os.path.join(self.root, PROCESSED)):
                raise DataError(f"qm9: raw files {self.raw_file_names} missing under {self.raw_dir}; {DATA_HINT}")

    OfflineQM9.__module__, OfflineQM9.__qualname__ = __name__, "OfflineQM9"
    return OfflineQM9


def __getattr__(name: str) -> Any:
    """``OfflineQM9`` resolves lazily (PEP 562), so pickling a dataset for spawned loader
    workers finds the class without importing torch-geometric at module import."""
    if name == "OfflineQM9":
        return _offline_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_qm9(root: str) -> Any:
    """The PyG QM9 dataset of ``root`` (validated by :func:`validate`)."""
    available_source(root)
    try:
        ds = _offline_class()(root)
    except DataError:
        raise
    except Exception as e:  # truncated/corrupt pickles raise many different types
        raise DataError(f"qm9: cannot load QM9 from {root} ({type(e).__name__}: {e}); the file is corrupt or "
                        f"truncated; {DATA_HINT}") from e
    validate(ds, root)
    return ds


def validate(ds: Any, root: str) -> None:
    """Shapes/dtypes of the collated storage and finite targets (fast: no per-graph access)."""
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
        elif d.edge_index.numel() and int(d.edge_index.min()) < 0:
            problems.append("edge_index has negative node indices")
        elif not bool(((d.edge_attr == 0) | (d.edge_attr == 1)).all()):
            problems.append("edge_attr is not a bond-type one-hot")
        if not bool(torch.isfinite(d.y).all()):
            problems.append("y contains NaN/inf")
    if not problems:
        for i in sorted({0, n // 2, n - 1}):  # per-graph bond indices must stay inside the molecule
            g = ds.get(i)
            if g.edge_index.numel() and int(g.edge_index.max()) >= g.num_nodes:
                problems.append(f"molecule {i} has a bond to atom {int(g.edge_index.max())} of {g.num_nodes}")
    if problems:
        raise DataError(f"qm9: malformed QM9 under {root}: {'; '.join(problems)}. Expected PyG's format: x (N, 11) "
                        f"float, edge_index (2, E) long, edge_attr (E, 4) one-hot, pos (N, 3), y (1, 19) per "
                        f"molecule; {DATA_HINT}")


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
