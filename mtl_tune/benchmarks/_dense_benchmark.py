"""The pipeline shared by the MTAN-release dense benchmarks (``nyuv2``, ``cityscapes``).

:class:`DenseBenchmark` reads the release's ``.npy`` folders (:mod:`._dense_files`), builds
SegNet / SegNet-MTAN (:mod:`._segnet`), trains with the papers' augmentation and evaluates
with their metric units (:mod:`._dense`); a subclass only declares its layout, tasks, metrics
and defaults.

**Honest tuning (deviation from the papers, on by default).** The release's ``val`` folder is
the test set and the papers select nothing on a validation split. Here ``eval_splits =
("val", "test")``: "val" is a seeded subset (``val_fraction`` 0.1, ``split_seed`` 0 — the same
for every trial) of the *training* folder, excluded from training and not augmented; "test"
is the official ``val`` folder. ``val_fraction = 0`` trains on all 795 images as the papers
do and evaluates only "test", with a warning: tuning on it leaks the test set.
(The counts are NYUv2's; Cityscapes has the same two folders.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mtl_tune.benchmarks._dense_files import FILTERS, IGNORE_LABEL, DenseFiles, DenseLayout, check_dense_data, npy_source
from mtl_tune.benchmarks.base import Benchmark, Setting, Setup, data_check_level, warn_test_only

if TYPE_CHECKING:
    import torch

# The SegNet, the datasets and the losses (torch) are imported where a run needs them: the class's
# settings, metrics, options and data check are what a search validates before it starts, without
# torch (tests/test_registry_names.py).

DENSE_DEFAULTS: dict[str, Any] = {
    "epochs": 200, "lr": 1e-4, "weight_decay": 0.0, "lr_step_size": 100, "lr_gamma": 0.5,
    "model": "mtan",              # "mtan" (SegNet-MTAN) | "segnet" (hard sharing)
    "param_split": "famo",        # "famo": all but pred_* shared | "cagrad": attention masks per task
    "filters": FILTERS,           # SegNet widths; smaller only for tests / quick debugging
    "augmentation": True,
    "depth_aug": "official",      # "official" | "physical" (differs only for inverse depth)
    "val_fraction": 0.1, "split_seed": 0,
    "eval_batch_size": None,      # None = batch_size (the official test loader; batch metrics depend on it)
    "metric_averaging": "batch",  # "batch" (official) | "pixel" (LibMTL / SamsungLabs)
    "num_workers": 0,
    "last_n_mean": 10,
    "seed": 0,
}
DENSE_SETTINGS: dict[str, Setting] = {
    "batch_size": Setting("int", low=1), "eval_batch_size": Setting("int", low=1, nullable=True),
    "weight_decay": Setting("float", low=0), "lr_step_size": Setting("int", low=1),
    "lr_gamma": Setting("float", low=0, high=1, open_low=True),
    "model": Setting("str", choices=("mtan", "segnet")), "param_split": Setting("str", choices=("famo", "cagrad")),
    "filters": Setting("ints", low=1, help="SegNet widths"), "augmentation": Setting("bool"),
    "depth_aug": Setting("str", choices=("official", "physical")),
    "val_fraction": Setting("float", low=0, high=1, open_high=True), "split_seed": Setting("int", low=0),
    "metric_averaging": Setting("str", choices=("batch", "pixel")), "num_workers": Setting("int", low=0),
    "seed": Setting("int", low=0),
}


def synthetic_source(keys: Sequence[str], shape: tuple[int, int], n_classes: int,
                     seed: int) -> Callable[[int], dict[str, np.ndarray]]:
    """Random arrays in the release's format (shapes, dtypes, ranges, ignore labels); sample i
    depends only on (seed, i). For throughput measurements only — nothing is learnable."""
    h, w = shape

    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([0x5A7, int(seed), int(i)])
        out = {"image": rng.random((h, w, 3)), "label": rng.integers(-1, n_classes, (h, w)).astype(np.float64),
               "depth": rng.uniform(0.0, 10.0, (h, w, 1))}
        if "normal" in keys:
            n = rng.standard_normal((h, w, 3))
            out["normal"] = n / np.linalg.norm(n, axis=-1, keepdims=True)
        return {k: out[k] for k in keys}
    return make


def _int_option(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (minimum is not None and value < minimum):
        bound = f" ≥ {minimum}" if minimum is not None else ""
        raise ValueError(f"benchmark option {name} must be an integer{bound}, got {value!r}")
    return int(value)


def _shape_option(value: Any) -> tuple[int, int]:
    """``image_shape``: two positive multiples of 32 (SegNet pools five times)."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 and v % 32 == 0
                       for v in value)):
        raise ValueError(f"benchmark option image_shape must be [H, W], two positive multiples of 32, got {value!r}")
    return int(value[0]), int(value[1])


def _counts_option(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"train", "val"}):
        raise ValueError(f"benchmark option expected_counts must be 'release', none or {{train: N, val: M}}, "
                         f"got {value!r}")
    return {k: _int_option(f"expected_counts.{k}", v, minimum=1) for k, v in value.items()}


class DenseBenchmark(Benchmark):
    """Shared pipeline of the MTAN-release dense benchmarks (see the module docstring).

    Benchmark options (constructor keywords; ``--config benchmark_options={...}`` on the CLI):

    * ``data_check``: ``"headers"`` (default) — the pre-flight check reads every file's header
      and the values of ``check_samples`` files per folder; ``"full"`` — every file's values
      (NaN, negative depth, labels outside 0…C−1, …; minutes for NYUv2's 9 GB). Every sample is
      also value-checked when a trial loads it, so a bad file stops the run with its path.
    * ``check_samples``: files per folder whose values the ``"headers"`` check reads (default 4).
    * ``expected_counts``: file counts per split to compare with (default ``"release"``; ``None``:
      no comparison). A different count or ids with gaps (a subset, your own split) is
      reported as a warning, not refused.
    * ``image_shape``: H×W of the files (default the release's; e.g. [256, 512] for the
      larger Cityscapes release).
    * ``ignore_label``: label value of unlabelled pixels (default −1, the releases' value; e.g.
      255 for labels stored as uint8).
    """

    layout: ClassVar[DenseLayout]
    #: the release stores inverse depth (disparity) instead of metric depth
    inverse_depth: ClassVar[bool] = False

    def __init__(self, data_root: str | None = None, synthetic: bool = False, *,
                 image_shape: Sequence[int] | None = None, expected_counts: Any = "release",
                 check_samples: int = 4, data_check: str = "headers", ignore_label: int = IGNORE_LABEL,
                 **options: Any) -> None:
        super().__init__(data_root, synthetic, **options)
        counts = self.layout.counts if expected_counts == "release" else _counts_option(expected_counts)
        shape = _shape_option(image_shape) if image_shape is not None else self.layout.image_shape
        ignore = _int_option("ignore_label", ignore_label)
        if 0 <= ignore < self.layout.n_classes:  # that class would vanish from training and the metrics
            raise ValueError(f"benchmark option ignore_label {ignore} is one of the {self.layout.n_classes} class ids "
                              f"0…{self.layout.n_classes - 1}; give the value of unlabelled pixels (the release's "
                              f"is {IGNORE_LABEL}; 255 for labels stored as uint8)")
        self.data_layout = replace(self.layout, image_shape=shape, counts=counts, ignore_label=ignore)
        self.check_samples = _int_option("check_samples", check_samples, minimum=0)
        self.data_check = data_check_level(data_check)
        self._found: DenseFiles | None = None

    # ------------------------------------------------------------------ data
    @property
    def root(self) -> str | None:
        """``data_root``, else the environment variable :attr:`data_env` (:meth:`resolve_root`)."""
        return self.resolve_root(self.data_root)

    def _scan(self, level: str) -> DenseFiles:
        return check_dense_data(self.data_layout, self.root, self.data_env, self.check_samples, level)

    def check_data(self) -> None:
        """Validate the data folder (no-op for synthetic data); raises :class:`DataError` and
        warns about what differs from the release (a subset runs)."""
        if self.synthetic:
            return
        self._found = self._scan(self.data_check)
        for note in self._found.notes:
            warnings.warn(note, UserWarning, stacklevel=2)

    def _sources(self) -> dict[str, tuple[Any, int]]:
        keys = list(self.layout.folders)
        if self.synthetic:
            counts = self.layout.counts  # the release's sizes, whatever expected_counts says
            if counts is None:
                raise ValueError(f"{self.name}: synthetic mode needs the release's file counts in its layout")
            # fixed data seeds: every trial sees the same random "data set"
            shape, n_classes = self.data_layout.image_shape, self.layout.n_classes
            return {split: (synthetic_source(keys, shape, n_classes, k), counts[split])
                    for k, split in enumerate(("train", "val"))}
        if self._found is None:  # a trial: headers only (the driver's pre-flight did the rest)
            self._found = self._scan("headers")
        root = str(self.root)
        return {split: (npy_source(self.data_layout, root, split, ids), len(ids))
                for split, ids in self._found.ids.items()}

    # ------------------------------------------------------------------ training
    def make_optimizer(self, params, config: dict[str, Any]) -> torch.optim.Optimizer:
        import torch

        """Adam(lr, no weight decay by default); groups with their own ``lr`` keep it."""
        return torch.optim.Adam(params, lr=float(config["lr"]), weight_decay=float(config.get("weight_decay", 0.0)))

    def make_scheduler(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        import torch

        """StepLR(step_size = 100, γ = ½) stepped once per epoch, on every param group."""
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(config["lr_step_size"]),
                                               gamma=float(config["lr_gamma"]))

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        # all losses are ≥ 0 (NLL, L1, 1 − cos), so e.g. FAMO's default ℓ* = 0 is valid
        return {}

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        import torch
        from torch import Tensor
        from torch.utils.data import DataLoader

        from mtl_tune.balancers.base import ForwardOutput
        from mtl_tune.benchmarks._dense import LOSSES, DenseDataset, DenseMetrics, epoch_order, split_indices
        from mtl_tune.benchmarks._segnet import build_model, split_parameters

        cfg = {**self.defaults, **{k: v for k, v in config.items() if v is not None}}
        seed = int(cfg["seed"])
        kinds = list(self.tasks)
        heads = [(k, self.layout.n_classes if k == "seg" else (1 if k == "depth" else 3)) for k in kinds]
        model = build_model(str(cfg["model"]), heads, cfg["filters"]).to(device)
        shared, task_params = split_parameters(model, str(cfg["param_split"]))
        if cfg["depth_aug"] not in ("official", "physical"):
            raise ValueError(f"depth_aug must be 'official' or 'physical', got {cfg['depth_aug']!r}")
        inverse = self.inverse_depth and cfg["depth_aug"] == "physical"

        sources = self._sources()
        (train_src, n_files), (test_src, n_test) = sources["train"], sources["val"]
        val_fraction = float(cfg["val_fraction"])
        train_idx, val_idx = split_indices(n_files, val_fraction, int(cfg["split_seed"]))
        train_set = DenseDataset(train_src, n_files, augmentation=bool(cfg["augmentation"]), seed=seed,
                                 inverse_depth=inverse)
        eval_sets = {"test": (DenseDataset(test_src, n_test), list(range(n_test)))}
        if val_fraction > 0:
            eval_sets = {"val": (DenseDataset(train_src, n_files), [int(i) for i in val_idx]), **eval_sets}
        else:
            warn_test_only(self.name, "val_fraction=0 — training on the whole training folder and evaluating only "
                                      "the official test folder (the papers' protocol)")
        batch_size = int(cfg["batch_size"])
        eval_bs = int(cfg["eval_batch_size"] or batch_size)
        workers = int(cfg["num_workers"])
        pin = device.type == "cuda"

        def loader(dataset: DenseDataset, order: list[int], bs: int) -> DataLoader:
            return DataLoader(dataset, batch_size=bs, sampler=order, num_workers=workers, pin_memory=pin)

        def train_batches(epoch: int) -> DataLoader:
            # a copy per epoch: another epoch's loader (a second stream) must not change this one's draws
            return loader(train_set.for_epoch(epoch), epoch_order(train_idx, seed, epoch), batch_size)

        def predict(batch: dict[str, Tensor]) -> tuple[list[Tensor], Any, Tensor, dict[str, Tensor]]:
            batch = {k: v.to(device, non_blocking=pin) for k, v in batch.items()}
            preds, reps = model(batch["image"])
            losses = torch.stack([LOSSES[k][0](p, batch[LOSSES[k][1]]) for k, p in zip(kinds, preds)])
            return preds, reps, losses, batch

        def forward(batch: dict[str, Tensor]) -> ForwardOutput:
            _, reps, losses, _ = predict(batch)
            return ForwardOutput(losses=losses, representation=reps)

        def evaluate(split: str) -> dict[str, float]:
            if split not in eval_sets:
                raise ValueError(f"{self.name}: unknown split {split!r}; this run evaluates {list(eval_sets)}")
            dataset, order = eval_sets[split]
            metrics = DenseMetrics(kinds, self.layout.n_classes, str(cfg["metric_averaging"]))
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for batch in loader(dataset, order, eval_bs):
                        preds, _, losses, batch = predict(batch)
                        metrics.update(preds, batch, losses)
            finally:
                model.train(was_training)
            return metrics.compute()

        return Setup(model=model, shared_parameters=shared, task_parameters=task_params,
                     train_batches=train_batches, forward=forward, evaluate=evaluate,
                     eval_splits=tuple(eval_sets),
                     extras={"n_train": len(train_idx), "n_val": len(val_idx), "n_test": n_test,
                             "test_leak": val_fraction == 0, "synthetic": self.synthetic,
                             "data_notes": list(self._found.notes) if self._found else []})
