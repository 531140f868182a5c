"""``cityscapes`` — Cityscapes, 2 tasks (7-class segmentation, inverse depth), SegNet-MTAN.

Protocol of the FAMO family (Liu et al., NeurIPS'23 FAMO; Navon et al., ICML'22 Nash-MTL;
docs/benchmarks.md#cityscapes): the pre-processed MTAN release at 128×256 (2975 training,
500 "val" images; segmentation from ``label_7``), batch 8, Adam lr 1e-4, StepLR(100, ½), 200
epochs, RandomScaleCrop + flip augmentation, last-10-epoch test mean reported.

The pipeline, the honest validation split (``val_fraction``, default 0.1 of the training
folder; "test" = the official ``val`` folder) and every option are those of
:class:`mtl_tune.benchmarks._dense_benchmark.DenseBenchmark`.

Depth here is **inverse depth** (raw disparity, ≈ 0…0.49, 0 = invalid), so the relative error
is large (STL 27.77). Under a zoom by sc the physical rule is d·sc; the official augmentation
divides by sc as for metric depth. ``depth_aug="official"`` (default) keeps that, since the
published numbers were trained with it; ``depth_aug="physical"`` multiplies instead.

Units as in the official code (mIoU/PixAcc in [0, 1]); STL baselines = official ``BASE``.
"""

from __future__ import annotations

from mtl_tune.benchmarks._dense_files import DenseLayout
from mtl_tune.benchmarks._dense_benchmark import DENSE_DEFAULTS, DENSE_SETTINGS, DenseBenchmark
from mtl_tune.metrics import MetricSpec


class Cityscapes(DenseBenchmark):
    name = "cityscapes"
    description = "Cityscapes (MTAN release, 128×256): 7-class segmentation, inverse depth; SegNet-MTAN"
    tasks = ("seg", "depth")
    data_env = "MTL_TUNE_CITYSCAPES_ROOT"
    inverse_depth = True
    layout = DenseLayout(
        title="Cityscapes", folders={"image": "image", "label": "label_7", "depth": "depth"},
        n_classes=7, image_shape=(128, 256), counts={"train": 2975, "val": 500},
        depth_note="inverse depth (disparity, ≈ 0…0.5)",
        source="the pre-processed Cityscapes release (128×256 .npy, ~651 MB; label_7 is used) linked "
               "from the README of https://github.com/lorenmt/mtan")
    # order and baselines of the official BASE / SIGN (experiments/cityscapes/utils.py)
    metrics = (
        MetricSpec("seg/miou", "seg", True, 0.7401, primary=True),
        MetricSpec("seg/pixacc", "seg", True, 0.9316),
        MetricSpec("depth/abs_err", "depth", False, 0.0125, primary=True),
        MetricSpec("depth/rel_err", "depth", False, 27.77),
    )
    defaults = {**DENSE_DEFAULTS, "batch_size": 8}
    settings = DENSE_SETTINGS


__all__ = ["Cityscapes"]
