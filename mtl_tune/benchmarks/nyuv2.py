"""``nyuv2`` — NYUv2, 3 tasks (13-class segmentation, depth, surface normals), SegNet-MTAN.

Protocol of Nash-MTL (Navon et al., ICML'22) and its FAMO-family forks (
docs/benchmarks.md#nyuv2): the pre-processed MTAN release (Liu et al., CVPR'19) at 288×384, 795
training and 654 "val" images; batch 2, Adam lr 1e-4 without weight decay, StepLR(100, ½),
200 epochs, RandomScaleCrop + flip augmentation; papers report the test metrics averaged
over the last 10 epochs (``last_n_mean = 10``; the generic trainer does the averaging).

Metric units follow the official code so Δm matches the published values: mIoU, PixAcc and
the normal-angle fractions in [0, 1] (tables print them ×100), depth errors in metres /
ratio, angles in degrees. STL baselines are the official ``BASE`` (from CAGrad).

The pipeline (and its honest-tuning split: "val" is a seeded subset of the training folder,
"test" the release's ``val`` folder) is :class:`~mtl_tune.benchmarks._dense_benchmark.DenseBenchmark`,
shared with ``cityscapes``; this module declares NYUv2's layout, tasks, metrics and defaults.
"""

from __future__ import annotations

from mtl_tune.benchmarks._dense_benchmark import DENSE_DEFAULTS, DENSE_SETTINGS, DenseBenchmark
from mtl_tune.benchmarks._dense_files import DenseLayout
from mtl_tune.metrics import MetricSpec


class NYUv2(DenseBenchmark):
    name = "nyuv2"
    description = "NYUv2 (MTAN release, 288×384): 13-class segmentation, depth, normals; SegNet-MTAN"
    tasks = ("seg", "depth", "normal")
    data_env = "MTL_TUNE_NYUV2_ROOT"
    layout = DenseLayout(
        title="NYUv2", folders={"image": "image", "label": "label", "depth": "depth", "normal": "normal"},
        n_classes=13, image_shape=(288, 384), counts={"train": 795, "val": 654},
        depth_note="metres",
        source="the pre-processed NYUv2 release (288×384 .npy, ~9 GB) linked from the README of "
               "https://github.com/lorenmt/mtan")
    # order and baselines of the official BASE / SIGN (experiments/nyuv2/utils.py)
    metrics = (
        MetricSpec("seg/miou", "seg", True, 0.3830, primary=True),
        MetricSpec("seg/pixacc", "seg", True, 0.6376),
        MetricSpec("depth/abs_err", "depth", False, 0.6754, primary=True),
        MetricSpec("depth/rel_err", "depth", False, 0.2780),
        MetricSpec("normal/mean", "normal", False, 25.01, primary=True),
        MetricSpec("normal/median", "normal", False, 19.21),
        MetricSpec("normal/within_11_25", "normal", True, 0.3014),
        MetricSpec("normal/within_22_5", "normal", True, 0.5720),
        MetricSpec("normal/within_30", "normal", True, 0.6915),
    )
    defaults = {**DENSE_DEFAULTS, "batch_size": 2}
    settings = DENSE_SETTINGS


__all__ = ["NYUv2"]
