"""``qm9`` — 11 molecular-property regressions, the Nash-MTL protocol (docs/benchmarks.md#qm9).

Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (nash-mtl
``experiments/quantum_chemistry``), followed by FAMO, FairGrad, MTLlib. Needs the optional
torch-geometric (``pip install "mtl_tune[qm9]"``); it is imported only when QM9 is used.

Data: PyG's QM9 from the user's root, never downloaded (:mod:`._qm9_data`). Targets, in
output order, PyG columns [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11] = μ, α, ε_HOMO, ε_LUMO, ⟨R²⟩,
ZPVE, U₀ᵃᵗᵒᵐ, Uᵃᵗᵒᵐ, Hᵃᵗᵒᵐ, Gᵃᵗᵒᵐ, c_v. Standardisation (``--scale-y True``):
ỹ = (y − μ)/σ with μ, σ (unbiased) over **all** molecules — the official code takes them from
``train_dataset.data``, which is the storage of the whole data set (docs/benchmarks.md#qm9).
Split (official): after the model is built, ``torch.randperm`` on the global RNG (so the
trial ``seed`` decides it); test = first 10,000, val = next 10,000, train = the rest
(110,831). ``split_seed=<int>`` draws the permutation from its own generator instead (same
split for every trial; a deviation, off by default).

Graphs are completed on the device per batch — the official per-molecule ``Complete()`` +
``Distance(norm=False)`` transforms computed in one vectorised step
(:func:`._qm9_data.complete_with_distance`; same edges, order and features).

Model (official ``Net``, dim 64): lin0 11→64 + ReLU; 3 rounds of shared-weight
NNConv(64, 64, edge net 5→128→64·64, aggr mean) + ReLU and GRU(64, 64); Set2Set(64, 3);
lin1 128→64 + ReLU = the shared representation; 11 heads Linear(64, 1). Loss: per-target
MSE on standardised targets. Adam lr 1e-3 (balancer group 0.025), 300 epochs, batch 120,
ReduceLROnPlateau(min, factor 0.7, patience ``lr_patience``=5, min_lr 1e-5) stepped on the
validation Δm (scales every param group, as official).

Metric: MAE per target in original units, Σ|ŷσ − ỹσ|/#molecules over the whole split, ×1000
(eV → meV) for ε_HOMO, ε_LUMO, ZPVE, U₀, U, H, G. Δm% against the Nash-MTL STL MAEs. The papers
report the test metrics at the epoch of lowest validation Δm (``default_objective``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from mtl_tune.benchmarks import _qm9_files as qf
from mtl_tune.benchmarks._qm9_files import MEV_OUTPUTS, TARGETS, TASKS  # noqa: F401 - the benchmark's constants
from mtl_tune.benchmarks.base import Benchmark, DataError, Setting, Setup, data_check_level
from mtl_tune.metrics import MetricSpec, delta_m

if TYPE_CHECKING:
    import torch

# torch, torch-geometric, the model and the dataset are imported where a run needs them: a missing
# or incomplete data root is reported without them, as fast as --help (docs/performance.md §4.2)
#: STL MAE (nash-mtl / FAMO / MTLlib ``BASE``), energies in meV
STL_MAE = (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244, 63.852, 66.223, 0.07212)
SPLIT_SIZES = {"train": 110831, "val": 10000, "test": 10000}


@lru_cache(maxsize=1)
def _dataset(root: str, source: str | None = None) -> Any:
    from mtl_tune.benchmarks import _qm9_data as qd

    return qd.load_qm9(root, source)


class QM9Benchmark(Benchmark):
    data_parallel = "its training batches are molecular graphs, which are not split into equal per-worker shards"
    name = "qm9"
    description = ("QM9, 11 molecular properties, Nash-MTL MPNN (NNConv+GRU+Set2Set), MAE per target "
                   "(needs torch-geometric)")
    tasks = TASKS
    metrics = tuple(MetricSpec(f"{t}/mae", t, higher_is_better=False, baseline=b, primary=True)
                    for t, b in zip(TASKS, STL_MAE))
    defaults = {"epochs": 300, "lr": 1e-3, "batch_size": 120, "eval_batch_size": None, "lr_patience": 5,
                "lr_factor": 0.7, "min_lr": 1e-5, "n_test": 10000, "n_val": 10000, "split_seed": None,
                "num_workers": 0, "dim": 64}
    settings = {
        "batch_size": Setting("int", low=1), "eval_batch_size": Setting("int", low=1, nullable=True),
        "lr_patience": Setting("int", low=0), "lr_factor": Setting("float", low=0, high=1, open_low=True, open_high=True),
        "min_lr": Setting("float", low=0), "n_test": Setting("int", low=1), "n_val": Setting("int", low=1),
        "split_seed": Setting("int", low=0, nullable=True), "num_workers": Setting("int", low=0),
        "dim": Setting("int", low=1, help="hidden width of the MPNN"),
    }
    data_env = "MTL_TUNE_QM9_ROOT"

    def __init__(self, data_root: str | None = None, synthetic: bool = False, *, data_check: str = "headers",
                 **options: Any) -> None:
        super().__init__(data_root=data_root, synthetic=synthetic, **options)
        self.data_check = data_check_level(data_check)
        self.root = self.resolve_root(data_root)  # absolute: Ray trials chdir
        self._held_out: tuple[int, int] | None = None  # (n_test, n_val) of the checked config

    def info(self) -> dict[str, Any]:
        """Which data this benchmark uses (for the trainer to store with the results)."""
        return {"data_source": "synthetic" if self.synthetic else "qm9", "data_root": self.root}

    def _root(self) -> str:
        if self.root is None:
            raise DataError(f"qm9: no data root; pass --data-root or set ${self.data_env} to the folder holding "
                            f"{qf.PROCESSED} or {qf.RAW_PREPROCESSED}; {qf.DATA_HINT}")
        return self.root

    def check_config(self, config: Mapping[str, Any], flag: str = "--config") -> None:
        """The schema, and remember ``n_test``/``n_val``: :meth:`check_data`, which runs after it in
        the search's pre-flight, knows the data set's size and checks that they leave a training set."""
        super().check_config(config, flag)
        merged = {**self.defaults, **{k: v for k, v in config.items() if v is not None}}
        self._held_out = (int(merged["n_test"]), int(merged["n_val"]))

    def check_data(self) -> None:
        """torch-geometric importable; processed/raw files present (raw files are processed once,
        outside the data root); storage shapes, dtypes, finite values, bonds inside their molecule,
        no constant target; after :meth:`check_config`, room for its ``n_test`` + ``n_val`` and a
        training set. Always the whole storage (``data_check`` makes no difference: it is loaded anyway)."""
        if not self.synthetic:  # synthetic: no data to check (building still needs torch-geometric)
            root = self._root()
            source = qf.available_source(root)  # which files: without torch
            from mtl_tune.benchmarks import _qm9_data as qd

            qd.require_pyg()
            ds = _dataset(root, source)
            if self._held_out is not None:
                self._check_split_sizes(len(ds), *self._held_out)

    def _check_split_sizes(self, n: int, n_test: int, n_val: int) -> None:
        """A training set is left after the test and validation molecules (else :class:`DataError`)."""
        if n_test + n_val >= n:
            raise DataError(f"qm9: {n} molecules under {self.root} cannot hold n_test={n_test} + n_val={n_val} "
                            f"plus a training set; expected more than {n_test + n_val} molecules (the full QM9 has "
                            f"{sum(SPLIT_SIZES.values())}), or set n_test and n_val (--config) so that their sum "
                            f"is below {n}")

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return {}

    def default_objective(self) -> tuple[str, str]:
        return "val/delta_m", "min"

    def make_scheduler(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        import torch

        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(config.get("lr_factor", 0.7)),
            patience=int(config.get("lr_patience", 5)), min_lr=float(config.get("min_lr", 1e-5)))

    def scheduler_step(self, scheduler: Any, epoch_metrics: dict[str, float]) -> None:
        """ReduceLROnPlateau on the validation Δm (computed here if the trainer did not)."""
        if "val/delta_m" in epoch_metrics:
            value = float(epoch_metrics["val/delta_m"])
        else:
            missing = [f"val/{m.name}" for m in self.metrics if f"val/{m.name}" not in epoch_metrics]
            if missing:
                raise KeyError(f"qm9: scheduler_step needs 'val/delta_m' or the validation MAEs; missing {missing}")
            value = delta_m({m.name: epoch_metrics[f"val/{m.name}"] for m in self.metrics}, self.metrics)
        scheduler.step(value)

    # ------------------------------------------------------------------ build
    def _loaders(self, config: dict[str, Any], seed: int
                 ) -> tuple[Any, dict[str, Any], torch.Generator, torch.Tensor, torch.Tensor]:
        import torch

        from mtl_tune.benchmarks._qm9_model import SyntheticLoader, target_stats

        bs = int(config["batch_size"])
        ebs = int(config.get("eval_batch_size") or bs)
        gen = torch.Generator()
        if self.synthetic:
            evals = {s: SyntheticLoader(SPLIT_SIZES[s], ebs, seed + i) for i, s in enumerate(("val", "test"))}
            return (SyntheticLoader(SPLIT_SIZES["train"], bs, seed + 7), evals, gen,
                    torch.zeros(1, len(TASKS)), torch.ones(1, len(TASKS)))
        from torch_geometric.loader import DataLoader

        ds = _dataset(self._root())
        n_test, n_val = int(config.get("n_test", 10000)), int(config.get("n_val", 10000))
        self._check_split_sizes(len(ds), n_test, n_val)
        split_seed = config.get("split_seed")
        # official: dataset.shuffle() right after the model is built, on the global RNG
        perm = (torch.randperm(len(ds)) if split_seed is None
                else torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(split_seed))))
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        mean, std = target_stats(ds._data.y)
        kw = {"num_workers": int(config.get("num_workers", 0)), "exclude_keys": ["name", "smiles", "idx", "z"]}
        train = DataLoader(ds[parts["train"]], batch_size=bs, shuffle=True, generator=gen, **kw)
        evals = {s: DataLoader(ds[parts[s]], batch_size=ebs, shuffle=False, **kw) for s in ("val", "test")}
        return train, evals, gen, mean, std

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual name
        from torch import Tensor

        from mtl_tune.balancers.base import ForwardOutput
        from mtl_tune.benchmarks import _qm9_data as qd
        from mtl_tune.benchmarks._qm9_model import QM9Net, mae_original_units

        config = {**self.defaults, **config}
        seed = int(config.get("seed", 0))
        model = QM9Net(self.n_tasks, dim=int(config.get("dim", 64))).to(device)
        train_loader, eval_loaders, gen, mean, std = self._loaders(config, seed)
        mean, std = mean.to(device), std.to(device)
        targets = torch.tensor(TARGETS, device=device)

        def prepare(b: Any) -> tuple[qd.GraphBatch, Tensor]:
            g = (b if isinstance(b, qd.GraphBatch) else qd.from_pyg(b)).to(device)
            return g, (g.y.index_select(1, targets) - mean) / std

        def train_batches(epoch: int):
            gen.manual_seed(seed * 100003 + epoch)  # shuffle independent of the balancer's RNG use
            return iter(train_loader)

        def forward(batch: Any) -> ForwardOutput:
            g, y = prepare(batch)
            pred, feat = model(g)
            return ForwardOutput(losses=F.mse_loss(pred, y, reduction="none").mean(0), representation=feat)

        @torch.no_grad()
        def evaluate(split: str) -> dict[str, float]:
            was_training = model.training
            model.eval()
            abs_sum = torch.zeros(self.n_tasks, dtype=torch.float64, device=device)
            n = 0
            for b in eval_loaders[split]:
                g, y = prepare(b)
                pred, _ = model(g)
                abs_sum += (pred - y).abs().double().sum(0)
                n += g.num_graphs
            model.train(was_training)
            mae = mae_original_units(abs_sum, std, n).cpu().tolist()
            out = {f"{t}/mae": float(v) for t, v in zip(self.tasks, mae)}
            out["avg_mae"] = float(sum(mae) / len(mae))  # mixed units; the official "avg_loss" (logging only)
            return out

        shared = [p for mod in model.shared_modules() for p in mod.parameters()]
        return Setup(model=model, shared_parameters=shared, task_parameters=[list(h.parameters()) for h in model.heads],
                     train_batches=train_batches, forward=forward, evaluate=evaluate, eval_splits=("val", "test"),
                     extras=self.info())
