"""QM9's model and metric arithmetic (torch; torch-geometric for the model): :mod:`.qm9` has the
protocol and the sources."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import Tensor, nn

from mtl_tune.benchmarks import _qm9_data as qd
from mtl_tune.benchmarks._qm9_files import MEV_OUTPUTS, TARGETS


class QM9Net(nn.Module):
    """The MPNN of Gilmer et al. as modified by nash-mtl (617,675 parameters at dim 64)."""

    def __init__(self, n_tasks: int = 11, num_features: int = 11, dim: int = 64) -> None:
        super().__init__()
        qd.require_pyg()
        from torch_geometric.nn import NNConv, Set2Set

        self.lin0 = nn.Linear(num_features, dim)
        edge_net = nn.Sequential(nn.Linear(5, 128), nn.ReLU(), nn.Linear(128, dim * dim))
        self.conv = NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=3)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.heads = nn.ModuleList([nn.Linear(dim, 1) for _ in range(n_tasks)])

    def shared_modules(self) -> list[nn.Module]:
        return [self.lin0, self.conv, self.gru, self.set2set, self.lin1]

    def forward(self, g: qd.GraphBatch) -> tuple[Tensor, Tensor]:
        """→ (predictions (B, 11) in standardised units, representation (B, 64))."""
        edge_index, edge_attr = qd.complete_with_distance(g)
        out = F.relu(self.lin0(g.x))
        h = out.unsqueeze(0)
        for _ in range(3):
            m = F.relu(self.conv(out, edge_index, edge_attr))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        feat = F.relu(self.lin1(self.set2set(out, g.batch, dim_size=g.num_graphs)))
        return torch.cat([head(feat) for head in self.heads], dim=1), feat


def target_stats(y_all: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std (1, 11) of the selected targets over all molecules (official)."""
    y = y_all[:, list(TARGETS)]
    return y.mean(dim=0, keepdim=True), y.std(dim=0, keepdim=True)


def mae_original_units(abs_err_std_sum: Tensor, std: Tensor, n: int) -> Tensor:
    """MAE_k = σ_k Σ|ŷ − ỹ|_k / n, then ×1000 for the meV outputs (official ``evaluate``)."""
    mae = abs_err_std_sum.double() * std.reshape(-1).double().to(abs_err_std_sum.device) / n
    scale = torch.ones_like(mae)
    scale[list(MEV_OUTPUTS)] = 1000.0
    return mae * scale


class SyntheticLoader:
    """Random molecular graphs in batches (throughput only)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for s in range(0, self.n, self.batch_size):
            yield qd.synthetic_batch(min(self.batch_size, self.n - s), gen)
