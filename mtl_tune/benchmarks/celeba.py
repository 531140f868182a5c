"""``celeba`` — 40 binary face attributes, the FAMO-family protocol (docs/benchmarks.md#celeba).

Data: :mod:`mtl_tune.benchmarks._celeba_data` (torchvision or original layout; 162,770 /
19,867 / 19,962 train/val/test images by ``list_eval_partition.txt``), resized to 64×64,
values in [0, 1], no normalisation or augmentation.

Model (FAMO ``experiments/celeba/models.py``, Liu et al. "FAMO", NeurIPS 2023): a VGG-style
CNN with BN — conv3×3 (no bias) 3→64, 64→128, 128→128, 128→256, 256→256, 256→512, 512→512
with max-pools after the 1st, 3rd and 5th conv, global average pool, two Linear 512→512 (no
bias) + BN1d + ReLU = the 512-d shared representation; 40 heads ``Linear(512, 1)``.

Loss per attribute: binary cross-entropy of σ(z) (the official ``BCELoss`` on sigmoid
outputs); we use the logit form, which is the same function except that ``BCELoss`` clamps
log σ at −100 (only reached for |z| > 100). Heads get their own per-task gradient as the
balancer decides (they are the ``task_parameters``).

Metric (official ``CelebaMetrics``): prediction ŷ = 1[σ(z) > 0.5]; TP, FP, FN summed over
the whole split; P = TP/(TP+FP+1e-8), R = TP/(TP+FN+1e-8), F1 = 2PR/(P+R+1e-8). Δm% uses the
STL test F1 of Cranial-XIX/FAMO issue #2 (= MTLlib ``celeba/delta_m.py``); all higher is
better. The papers select the epoch with the best *mean validation F1* and report its test
F1 — hence :meth:`Celeba.default_objective` is ``val/mean_f1`` (``evaluate`` also returns
``mean_f1``).

Protocol: Adam lr 3e-4, batch 256, 15 epochs, no scheduler (FAMO/FairGrad); ``scheduler=
"cosine"`` gives MTLlib's CosineAnnealingLR(T_max=epochs). The official CelebA trainers leave
the balancer's own parameters out of the optimiser (so UW's log-variances never move, a bug,
docs/methods.md#learnable-balancer-parameters); we train them (paper-faithful) unless
``train_balancer_params=False``.
``cache_dir`` stores the resized images once as ``.npy`` (identical bytes, far faster epochs),
one file per split, image size and data (:func:`._celeba_loader.cache_key`).

Training batches: ``batch_size`` images in a fresh random order each epoch, the last batch
partial, as the official loader (``shuffle=True``, no ``drop_last``) — except that a last batch
of a single image is left out: the shared trunk's BatchNorm1d cannot train on one sample (the
official code would crash there), which happens when 162,770 mod ``batch_size`` = 1, e.g. 139.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mtl_tune.benchmarks import _celeba_data as cd
from mtl_tune.benchmarks.base import Benchmark, DataError, Setting, Setup, data_check_level
from mtl_tune.metrics import MetricSpec

if TYPE_CHECKING:
    import torch

# torch, the model and the loaders are imported where a run needs them: the data check (layout,
# annotation tables, JPEG markers) runs without them, and a bad data root is reported as fast as
# --help (docs/performance.md §4.2)

#: STL test F1 per attribute (FAMO issue #2 / MTLlib ``experiments/celeba/delta_m.py``)
STL_F1 = (
    0.6736886, 0.68121034, 0.81524944, 0.5760289, 0.7205613, 0.8555076, 0.38203922, 0.58225113, 0.787647,
    0.8321292, 0.5029583, 0.68694085, 0.6781237, 0.5240381, 0.5161666, 0.95694304, 0.6968786, 0.67976356,
    0.8808315, 0.8582131, 0.97034, 0.93267566, 0.5057539, 0.40307626, 0.9703734, 0.48644206, 0.60786104,
    0.5261031, 0.56907415, 0.59815097, 0.6858371, 0.924108, 0.5424991, 0.7406311, 0.71019936, 0.87365365,
    0.9305602, 0.33704284, 0.7647628, 0.91907,
)
SPLIT_SIZES = {"train": 162770, "val": 19867, "test": 19962}


class Celeba(Benchmark):
    name = "celeba"
    description = "CelebA, 40 binary attributes, FAMO-family CNN at 64×64, F1 per attribute (test at best mean val F1)"
    tasks = cd.ATTRIBUTES
    metrics = tuple(MetricSpec(f"{a}/f1", a, higher_is_better=True, baseline=b, primary=True)
                    for a, b in zip(cd.ATTRIBUTES, STL_F1))
    defaults = {"epochs": 15, "lr": 3e-4, "batch_size": 256, "eval_batch_size": 256, "num_workers": 2,
                "image_size": 64, "scheduler": None, "train_balancer_params": True, "cache_dir": None}
    settings = {
        "batch_size": Setting("int", low=2, help="BatchNorm1d trains on 2 samples or more"),
        "eval_batch_size": Setting("int", low=1),
        "num_workers": Setting("int", low=0), "image_size": Setting("int", low=8, help="square input size (three 2× poolings)"),
        "scheduler": Setting("str", choices=("none", "cosine"), nullable=True),
        "train_balancer_params": Setting("bool"), "cache_dir": Setting("str", nullable=True),
    }
    data_env = "MTL_TUNE_CELEBA_ROOT"

    def __init__(self, data_root: str | None = None, synthetic: bool = False, *, data_check: str = "headers",
                 **options: Any) -> None:
        super().__init__(data_root=data_root, synthetic=synthetic, **options)
        self.data_check = data_check_level(data_check)
        self.root = self.resolve_root(data_root)  # absolute: Ray trials chdir

    def info(self) -> dict[str, Any]:
        """Which data this benchmark uses (for the trainer to store with the results)."""
        return {"data_source": "synthetic" if self.synthetic else "celeba", "data_root": self.root}

    def _paths(self) -> cd.CelebaPaths:
        if self.root is None:
            raise DataError(f"celeba: no data root; pass --data-root or set ${self.data_env}; {cd.HINT}")
        cd.check_root(self.root)
        return cd.resolve_paths(self.root)

    def check_data(self) -> None:
        """Layout, annotation tables (header, 40 names, ±1 labels, partition codes), every image
        present with JPEG start/end markers, a sample decodable at 178×218 (``data_check="full"``:
        every image decoded). An image that fails to decode in a run raises :class:`DataError`
        naming it."""
        if self.synthetic:
            return
        paths = self._paths()
        index = cd.load_index(paths)
        cd.check_images(paths.img_dir, index.files, level=self.data_check)

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return {}

    def default_objective(self) -> tuple[str, str]:
        return "val/mean_f1", "max"

    def make_optimizer(self, params: Sequence[dict[str, Any]], config: dict[str, Any]) -> torch.optim.Optimizer:
        import torch

        groups = list(params)
        if not config.get("train_balancer_params", True):
            groups = groups[:1]  # official CelebA trainers: Adam(model.parameters()) only
        return torch.optim.Adam(groups, lr=float(config["lr"]))

    def make_scheduler(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        kind = config.get("scheduler")
        if kind in (None, "none"):
            return None
        if kind == "cosine":
            import torch

            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(config["epochs"]))
        raise ValueError(f"celeba: scheduler must be None, 'none' or 'cosine', got {kind!r}")

    # ------------------------------------------------------------------ data
    def _loaders(self, config: dict[str, Any], device: torch.device) -> tuple[Any, dict[str, Any], torch.Generator]:
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        from mtl_tune.benchmarks import _celeba_loader as cl
        from mtl_tune.benchmarks._celeba_model import SyntheticLoader

        bs, ebs, size = int(config["batch_size"]), int(config.get("eval_batch_size", 256)), int(config["image_size"])
        gen = torch.Generator()
        if self.synthetic:
            seed = int(config.get("seed", 0))
            evals = {s: SyntheticLoader(SPLIT_SIZES[s], ebs, size, seed + i) for i, s in enumerate(("val", "test"))}
            return SyntheticLoader(SPLIT_SIZES["train"], bs, size, seed + 7, drop_single=True), evals, gen
        paths = self._paths()
        index = cd.load_index(paths)
        workers = int(config.get("num_workers", 2))
        common = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0}
        sets = {}
        for split in ("train", "val", "test"):
            files, labels = index.split(split)
            if config.get("cache_dir"):
                arr = cl.cached_split(os.path.abspath(config["cache_dir"]), paths.img_dir, files, split, size, workers)
                sets[split] = cl.CachedImages(arr, labels)
            else:
                sets[split] = cl.CelebaImages(paths.img_dir, files, labels, size)
        # a last batch of one image is dropped (the module docstring): the first n − 1 of the same
        # permutation are drawn, so every other batch is what the full sampler gives
        n_train = len(sets["train"])
        draws = n_train - 1 if n_train % bs == 1 else n_train
        train = DataLoader(sets["train"], batch_size=bs, sampler=RandomSampler(sets["train"], num_samples=draws,
                                                                               generator=gen), **common)
        evals = {s: DataLoader(sets[s], batch_size=ebs, shuffle=False, **common) for s in ("val", "test")}
        return train, evals, gen

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        import numpy as np
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual name
        from torch import Tensor

        from mtl_tune.balancers.base import ForwardOutput
        from mtl_tune.benchmarks._celeba_model import CelebaNet, f1_counts, f1_from_counts, to_unit

        config = {**self.defaults, **config}
        model = CelebaNet(self.n_tasks).to(device)
        train_loader, eval_loaders, gen = self._loaders(config, device)
        seed = int(config.get("seed", 0))

        def train_batches(epoch: int):
            gen.manual_seed(seed * 100003 + epoch)  # shuffle independent of the balancer's RNG use
            for x, y in train_loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def forward(batch: tuple[Tensor, Tensor]) -> ForwardOutput:
            x, y = batch
            logits, h = model(to_unit(x))
            losses = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
            return ForwardOutput(losses=losses, representation=h)

        @torch.no_grad()
        def evaluate(split: str) -> dict[str, float]:
            was_training = model.training
            model.eval()
            tp = fp = fn = torch.zeros(self.n_tasks, dtype=torch.float64, device=device)
            for x, y in eval_loaders[split]:
                logits, _ = model(to_unit(x.to(device)))
                c = f1_counts(logits, y.to(device))
                tp, fp, fn = tp + c[0], fp + c[1], fn + c[2]
            model.train(was_training)
            f1 = f1_from_counts(tp, fp, fn).cpu().numpy()
            out = {f"{a}/f1": float(v) for a, v in zip(self.tasks, f1)}
            out["mean_f1"] = float(np.mean(f1))
            return out

        return Setup(model=model, shared_parameters=list(model.trunk.parameters()),
                     task_parameters=[list(h.parameters()) for h in model.heads],
                     train_batches=train_batches, forward=forward, evaluate=evaluate,
                     eval_splits=("val", "test"),
                     extras=self.info())
