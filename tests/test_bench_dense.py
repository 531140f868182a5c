"""Tests of the dense benchmarks (nyuv2, cityscapes): model, data checks, augmentation,
losses/metrics (known answers), Δm against published rows, and a tiny end-to-end run."""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from mtl_tune.benchmarks import DataError
from mtl_tune.benchmarks._dense import (
    DenseMetrics, angle_stats, augment, confusion_matrix, depth_error_sums, depth_loss, epoch_order, hflip,
    miou_pixacc, normal_angles, normal_loss, scale_crop, seg_loss, split_indices,
)
from mtl_tune.benchmarks._dense_files import describe_ranges, read_npy_header
from mtl_tune.benchmarks._segnet import SegNetMTAN, build_model, split_parameters
from mtl_tune.metrics import delta_m
from mtl_tune.registry import get_balancer, get_benchmark

NYU_HEADS = [("seg", 13), ("depth", 1), ("normal", 3)]
TINY = (4, 8, 8, 16, 16)


def n_params(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Once scikit-learn's bundled libgomp is loaded (the registry imports every benchmark),
    torch's spinning OpenMP threads and it fight over the 2 cores: tiny convs get ~20× slower.
    One intra-op thread avoids that for these tests; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_release(root, kind: str = "nyuv2", n_train: int = 5, n_val: int = 3, shape=(32, 64), seed: int = 0,
                  label_dtype=np.float64) -> str:
    """Tiny copy of an MTAN release in its on-disk format: {split}/{folder}/{i}.npy, channel-last
    float64 (the release sizes match float64), labels with −1 = ignored, 0 = invalid depth/normal."""
    rng = np.random.default_rng(seed)
    h, w = shape
    n_classes, label_dir = (13, "label") if kind == "nyuv2" else (7, "label_7")
    for split, n in (("train", n_train), ("val", n_val)):
        folders = ["image", label_dir, "depth"] + (["normal"] if kind == "nyuv2" else [])
        for folder in folders:
            os.makedirs(os.path.join(root, split, folder), exist_ok=True)
        for i in range(n):
            np.save(os.path.join(root, split, "image", f"{i}.npy"), rng.random((h, w, 3)))
            label = rng.integers(-1, n_classes, (h, w)).astype(label_dtype)
            np.save(os.path.join(root, split, label_dir, f"{i}.npy"), label)
            depth = rng.uniform(0.5, 8.0, (h, w, 1)) if kind == "nyuv2" else rng.uniform(0.01, 0.49, (h, w, 1))
            depth[: h // 8] = 0.0  # invalid band
            np.save(os.path.join(root, split, "depth", f"{i}.npy"), depth)
            if kind == "nyuv2":
                normal = rng.standard_normal((h, w, 3))
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[:, : w // 8] = 0.0
                np.save(os.path.join(root, split, "normal", f"{i}.npy"), normal)
    return str(root)


@pytest.fixture(scope="module")
def nyu_real(tmp_path_factory) -> str:
    """Real-shaped (288×384) NYUv2 files."""
    return write_release(tmp_path_factory.mktemp("nyu_real"), "nyuv2", 3, 2, (288, 384))


# ---------------------------------------------------------------------------- model
def test_official_parameter_counts_and_splits():
    mtan = build_model("mtan", NYU_HEADS)
    shared, heads = split_parameters(mtan, "famo")
    assert n_params(mtan.parameters()) == 44_229_073
    assert n_params(shared) == 44_117_184
    assert [n_params(h) for h in heads] == [37_773, 36_993, 37_123]
    shared_c, tasks_c = split_parameters(mtan, "cagrad")  # attention masks leave the shared set
    assert n_params(shared_c) == 44_117_184 - 5_506_944 - 3_446_784
    assert n_params(shared_c) + sum(n_params(t) for t in tasks_c) == 44_229_073
    assert n_params(build_model("segnet", NYU_HEADS).parameters()) == 25_055_185
    city = build_model("mtan", [("seg", 7), ("depth", 1)])
    assert n_params(city.parameters()) == 41_206_984
    assert sum(n_params(h) for h in split_parameters(city)[1]) == 74_376


def test_model_outputs_are_log_probs_and_unit_normals():
    model = SegNetMTAN(NYU_HEADS, TINY).eval()
    preds, reps = model(torch.randn(2, 3, 32, 64))
    assert [tuple(p.shape) for p in preds] == [(2, 13, 32, 64), (2, 1, 32, 64), (2, 3, 32, 64)]
    assert len(reps) == 3 and all(tuple(r.shape) == (2, 4, 32, 64) for r in reps)
    torch.testing.assert_close(preds[0].exp().sum(1), torch.ones(2, 32, 64))
    torch.testing.assert_close(preds[2].norm(dim=1), torch.ones(2, 32, 64))
    seg_preds, rep = build_model("segnet", NYU_HEADS, TINY)(torch.randn(2, 3, 32, 64))
    assert isinstance(rep, torch.Tensor) and tuple(rep.shape) == (2, 4, 32, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="filters"):
        SegNetMTAN(NYU_HEADS, (4, 8, 8, 16, 32))


def test_famo_split_gives_exact_zero_gradient_on_other_tasks_attention():
    """In the 'famo' split a task's gradient has exact zeros on the other tasks' masks."""
    model = SegNetMTAN(NYU_HEADS, TINY)
    preds, _ = model(torch.randn(2, 3, 32, 64))
    grads = torch.autograd.grad(preds[1].mean(), list(model.encoder_att[0].parameters()), allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)
    own = torch.autograd.grad(preds[1].mean(), list(model.encoder_att[1].parameters()))
    assert any(bool((g != 0).any()) for g in own)


# ---------------------------------------------------------------------------- losses and metrics
def test_segmentation_metrics_known_answer():
    target = torch.tensor([0, 0, 1, 1, -1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 1])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]  # −1 ignored
    miou, acc = miou_pixacc(conf)
    # IoU₀ = 1/2, IoU₁ = 2/4, IoU₂ = 0/1
    assert miou == pytest.approx((0.5 + 0.5 + 0.0) / 3) and acc == pytest.approx(3 / 5)
    perfect = confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 4)  # class 3 absent
    assert miou_pixacc(perfect) == (1.0, 1.0)


def test_depth_and_normal_metrics_known_answer():
    target = torch.tensor([[[[1.0, 2.0, 0.0]]]])  # B×1×H×W, last pixel invalid
    assert depth_error_sums(target.clone(), target) == (0.0, 0.0, 2)
    a, r, n = depth_error_sums(torch.tensor([[[[2.0, 1.0, 9.0]]]]), target)
    assert (a, r, n) == (2.0, 1.5, 2)
    assert float(depth_loss(torch.tensor([[[[2.0, 1.0, 9.0]]]]), target)) == pytest.approx(1.0)
    n = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    assert normal_angles(n, n) == pytest.approx([0.0, 0.0], abs=1e-3)
    assert normal_angles(-n, n) == pytest.approx([180.0, 180.0])
    ortho = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 3)
    assert normal_angles(ortho, n) == pytest.approx([90.0, 90.0])
    assert float(normal_loss(n, n)) == pytest.approx(0.0) and float(normal_loss(-n, n)) == pytest.approx(2.0)
    assert angle_stats(np.array([5.0, 20.0, 25.0, 40.0])) == pytest.approx([22.5, 22.5, 0.25, 0.5, 0.75])


def _papers_losses(log_probs, label, depth_pred, depth, normal_pred, normal):
    """The papers' losses verbatim (official code): masked means, NaN when a mask is empty."""
    m = (depth.sum(dim=1, keepdim=True) != 0)
    n = (normal.sum(dim=1, keepdim=True) != 0)
    return (torch.nn.functional.nll_loss(log_probs, label, ignore_index=-1),
            (torch.abs(depth_pred - depth) * m).sum() / m.sum(),
            1 - (normal_pred * normal * n).sum() / n.sum())


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(2, 13, 8, 8, generator=g), 1).requires_grad_()
    label = torch.randint(-1, 13, (2, 8, 8), generator=g)
    depth_pred = torch.rand(2, 1, 8, 8, generator=g).requires_grad_()
    depth = torch.rand(2, 1, 8, 8, generator=g) * (torch.rand(2, 1, 8, 8, generator=g) > 0.3)
    normal_pred = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=g), dim=1).requires_grad_()
    normal = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=g), dim=1)
    normal = normal * (torch.rand(2, 1, 8, 8, generator=g) > 0.3)
    return log_probs, label, depth_pred, depth, normal_pred, normal


def test_losses_are_the_papers_masked_means_bit_for_bit():
    """With valid pixels in the batch, each loss and its gradient are the official formula's, bit for bit."""
    for seed in range(3):
        x = _loss_inputs(seed)
        ours = (seg_loss(x[0], x[1]), depth_loss(x[2], x[3]), normal_loss(x[4], x[5]))
        ref = _papers_losses(*x)
        for a, b, wrt in zip(ours, ref, (x[0], x[2], x[4])):
            assert torch.equal(a, b)
            assert torch.equal(torch.autograd.grad(a, wrt)[0], torch.autograd.grad(b, wrt)[0])


def test_a_batch_without_valid_pixels_gives_a_zero_loss_not_nan():
    """A random crop can leave a batch without one valid pixel of a task: the papers' masked mean
    is 0/0 there (NaN, reported as divergence); the task contributes 0, with a zero gradient."""
    log_probs, label, depth_pred, depth, normal_pred, normal = _loss_inputs()
    empty = (seg_loss(log_probs, torch.full_like(label, -1)), depth_loss(depth_pred, torch.zeros_like(depth)),
             normal_loss(normal_pred, torch.zeros_like(normal)))
    assert all(bool(torch.isnan(v)) for v in _papers_losses(log_probs, torch.full_like(label, -1), depth_pred,
                                                            torch.zeros_like(depth), normal_pred,
                                                            torch.zeros_like(normal)))
    for loss, wrt in zip(empty, (log_probs, depth_pred, normal_pred)):
        assert float(loss) == 0.0
        grad = torch.autograd.grad(loss, wrt)[0]
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) == 0.0


def test_segmentation_loss_uniform_prediction_is_log_c():
    log_probs = torch.full((1, 5, 2, 2), -math.log(5))
    label = torch.tensor([[[0, 4], [-1, 2]]])
    assert float(seg_loss(log_probs, label)) == pytest.approx(math.log(5))


def test_batch_versus_pixel_averaging():
    """Official batch averaging weights batches equally; pixel averaging weights pixels."""
    def run(averaging):
        acc = DenseMetrics(["depth"], 1, averaging)
        t1, p1 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[2.0, 5.0]]]])      # 1 valid px, error 1
        t2, p2 = torch.full((1, 1, 1, 3), 1.0), torch.full((1, 1, 1, 3), 4.0)       # 3 valid px, error 3
        acc.update([p1], {"depth": t1}, torch.tensor([1.0]))
        acc.update([p2], {"depth": t2}, torch.tensor([3.0]))
        return acc.compute()
    assert run("batch")["depth/abs_err"] == pytest.approx(2.0)
    assert run("pixel")["depth/abs_err"] == pytest.approx((1 + 9) / 4)
    assert run("batch")["depth/loss"] == pytest.approx(2.0)
    normals = DenseMetrics(["normal"], 1, "batch")
    n = torch.tensor([[1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 1)
    normals.update([n], {"normal": n}, torch.tensor([0.0]))            # angle 0
    normals.update([-n], {"normal": n}, torch.tensor([2.0]))           # angle 180
    out = normals.compute()
    assert out["normal/mean"] == pytest.approx(90.0) and out["normal/within_30"] == pytest.approx(0.5)


@pytest.mark.parametrize("bench, row, expected", [
    # published LS and FAMO rows (docs/benchmarks.md#published-results), tables in %; the official
    # units are fractions
    ("nyuv2", [39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08], 5.59),
    ("nyuv2", [38.88, 64.90, 0.5474, 0.2194, 25.06, 19.57, 29.21, 56.61, 68.98], -4.10),
    ("cityscapes", [75.18, 93.49, 0.0155, 46.77], 22.60),
    ("cityscapes", [74.54, 93.29, 0.0145, 32.59], 8.13),
])
def test_delta_m_reproduces_published_rows(bench, row, expected):
    specs = get_benchmark(bench).metrics
    percent = {"seg/miou", "seg/pixacc", "normal/within_11_25", "normal/within_22_5", "normal/within_30"}
    values = {s.name: v / 100 if s.name in percent else v for s, v in zip(specs, row)}
    # the tables print rounded per-metric values (e.g. 0.0155), so agreement is ±0.1
    # (docs/benchmarks.md#published-results)
    assert delta_m(values, specs) == pytest.approx(expected, abs=0.1)


# ---------------------------------------------------------------------------- augmentation and splits
def _sample(h=4, w=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(3, h, w, generator=g), "label": torch.arange(h * w, dtype=torch.float32).view(h, w),
            "depth": torch.rand(1, h, w, generator=g) + 1, "normal": torch.rand(3, h, w, generator=g)}


def test_scale_crop_known_answer():
    s = _sample()
    same = scale_crop(s, 1.0, 0, 0)
    for key in s:
        torch.testing.assert_close(same[key], s[key])
    zoom = scale_crop(s, 2.0, 1, 2)  # 2×2 crop at (1, 2), nearest-upsampled ×2
    crop = s["label"][1:3, 2:4]
    torch.testing.assert_close(zoom["label"], crop.repeat_interleave(2, 0).repeat_interleave(2, 1))
    up = s["depth"][0, 1:3, 2:4].repeat_interleave(2, 0).repeat_interleave(2, 1)
    torch.testing.assert_close(zoom["depth"][0], up / 2)  # metric depth: d / sc
    inv = scale_crop(s, 2.0, 1, 2, inverse_depth=True)  # disparity grows when the scene comes closer
    torch.testing.assert_close(inv["depth"], zoom["depth"] * 4)
    torch.testing.assert_close(zoom["image"][:, 0, 0], s["image"][:, 1, 2])  # align_corners keeps corners


def test_hflip_negates_normal_x_and_is_an_involution():
    s = _sample()
    f = hflip(s)
    torch.testing.assert_close(f["normal"][0], -torch.flip(s["normal"][0], dims=[-1]))
    torch.testing.assert_close(f["normal"][1:], torch.flip(s["normal"][1:], dims=[-1]))
    for key, x in hflip(f).items():
        torch.testing.assert_close(x, s[key])


def test_augment_is_a_function_of_the_rng_and_keeps_labels_integral():
    s = _sample(32, 64)
    a = augment(s, np.random.default_rng(3))
    b = augment(s, np.random.default_rng(3))
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert set(a["label"].unique().tolist()) <= set(s["label"].unique().tolist())


def test_split_indices_and_epoch_order():
    train, val = split_indices(795, 0.1, 0)
    assert len(val) == 80 and len(train) == 715
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(795))
    assert np.array_equal(split_indices(795, 0.1, 0)[1], val)
    assert not np.array_equal(split_indices(795, 0.1, 1)[1], val)
    assert len(split_indices(795, 0.0, 0)[1]) == 0
    order = epoch_order(train, seed=0, epoch=3)
    assert sorted(order) == sorted(train.tolist()) and order == epoch_order(train, 0, 3)
    assert order != epoch_order(train, 0, 4)


# ---------------------------------------------------------------------------- data checks
def test_check_data_accepts_real_format(nyu_real, monkeypatch):
    get_benchmark("nyuv2", data_root=nyu_real, expected_counts=None).check_data()
    monkeypatch.setenv("MTL_TUNE_NYUV2_ROOT", nyu_real)  # env var when data_root is None
    get_benchmark("nyuv2", expected_counts=None).check_data()


def test_check_data_int_labels_and_cityscapes(tmp_path):
    root = write_release(tmp_path / "c", "cityscapes", 2, 2, (128, 256), label_dtype=np.int64)
    get_benchmark("cityscapes", data_root=root, expected_counts=None).check_data()
    os.rename(os.path.join(root, "val", "label_7"), os.path.join(root, "val", "label"))
    with pytest.raises(DataError, match="label_7"):
        get_benchmark("cityscapes", data_root=root, expected_counts=None).check_data()


def test_check_data_missing_root(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="(?s)does not exist.*lorenmt/mtan"):
        get_benchmark("nyuv2", data_root=str(tmp_path / "nope")).check_data()
    monkeypatch.delenv("MTL_TUNE_NYUV2_ROOT", raising=False)
    with pytest.raises(DataError, match="MTL_TUNE_NYUV2_ROOT"):
        get_benchmark("nyuv2").check_data()


def test_subset_of_the_release_runs_with_a_warning(nyu_real):
    """Fewer files than the release: a warning saying what was found, not a refusal."""
    bench = get_benchmark("nyuv2", data_root=nyu_real)
    with pytest.warns(UserWarning, match=r"train: 3 samples, the release has 795 \(ids 0…794\); missing id\(s\) "
                                         r"3…794\. Running on the 3 found"):
        bench.check_data()


def test_own_split_with_id_gaps_runs_and_names_the_missing_ids(tmp_path):
    root = write_release(tmp_path / "g", "cityscapes", 6, 2)
    for folder in ("image", "label_7", "depth"):  # the user's own split: ids 1 and 4 moved away
        for i in (1, 4):
            os.remove(os.path.join(root, "train", folder, f"{i}.npy"))
    bench = get_benchmark("cityscapes", data_root=root, image_shape=(32, 64), expected_counts={"train": 6, "val": 2})
    with pytest.warns(UserWarning, match=r"train: 4 samples, the release has 6 \(ids 0…5\); missing id\(s\) 1, 4\."):
        bench.check_data()
    setup = bench.build({**bench.defaults, "filters": TINY, "batch_size": 4, "val_fraction": 0,
                         "augmentation": False}, torch.device("cpu"))
    files = {np.load(os.path.join(root, "train", "image", f"{i}.npy")).astype(np.float32).tobytes(): i
             for i in (0, 2, 3, 5)}
    seen = {files[x.permute(1, 2, 0).numpy().tobytes()] for batch in setup.train_batches(0) for x in batch["image"]}
    assert seen == {0, 2, 3, 5} and setup.extras["n_train"] == 4
    assert "missing id(s) 1, 4" in setup.extras["data_notes"][0]


def test_a_file_missing_from_one_folder_is_named(tmp_path):
    root = write_release(tmp_path / "m", "nyuv2", 4, 2)
    os.remove(os.path.join(root, "train", "normal", "2.npy"))
    with pytest.raises(DataError, match=r"normal/2\.npy is missing but image/2\.npy exists \(1 such id\(s\): 2\)"):
        get_benchmark("nyuv2", data_root=root, image_shape=(32, 64), expected_counts=None).check_data()


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def _set(path, value):
    arr = np.load(path)
    arr.flat[7] = value
    np.save(path, arr)


def _append(path, data: bytes):
    with open(path, "ab") as fh:
        fh.write(data)


def _link(path, target):
    """Replace the file or folder ``path`` by a symbolic link to ``target``."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
    os.symlink(target, path)


@pytest.mark.parametrize("damage, path, message", [
    (lambda r: os.rename(os.path.join(r, "val", "depth"), os.path.join(r, "val", "dep")), "val/depth",
     "folder missing"),
    (lambda r: _truncate(os.path.join(r, "train", "image", "2.npy")), "train/image/2.npy",
     r"truncated: \d+ bytes, its header announces \(32, 64, 3\) float64 = 49280 bytes"),
    # a larger array written under the old header: numpy reads the first part and ignores the rest
    (lambda r: _append(os.path.join(r, "train", "image", "2.npy"), b"\0" * 4096), "train/image/2.npy",
     r"53376 bytes, but its header announces \(32, 64, 3\) float64 = 49280 bytes \(data after the array"),
    (lambda r: np.save(os.path.join(r, "val", "depth", "0.npy"), np.ones((32, 64))), "val/depth/0.npy",
     r"shape \(32, 64\) dtype float64, expected shape \(32, 64, 1\)"),
    (lambda r: np.save(os.path.join(r, "train", "image", "1.npy"), np.ones((32, 64, 3), np.int64)),
     "train/image/1.npy", "float dtype"),
    (lambda r: np.save(os.path.join(r, "train", "image", "3.npy"), np.ones((64, 128, 3))), "train/image/3.npy",
     r"benchmark_options=\{image_shape: \[H, W\]\}"),
    (lambda r: np.save(os.path.join(r, "train", "depth", "x.npy"), np.ones((32, 64, 1))), "train/depth",
     r"file name\(s\) x\.npy are not <integer id>\.npy"),
    (lambda r: _set(os.path.join(r, "train", "label", "4.npy"), 13.0), "train/label/4.npy",
     r"class id\(s\) 13 at 1 pixel\(s\), first at pixel \(0, 7\), outside 0…12 and not the ignore label -1"),
    (lambda r: _set(os.path.join(r, "val", "image", "2.npy"), 255.0), "val/image/2.npy",
     r"value 255 at pixel \(0, 2\).*expected 32×64×3 float, RGB in \[0, 1\]"),
    (lambda r: _set(os.path.join(r, "train", "depth", "0.npy"), np.nan), "train/depth/0.npy",
     r"NaN at pixel \(0, 7\); expected 32×64×1 float ≥ 0"),
    # a second file for id 0 (was: IndexError); a zero-padded name (was: "unreadable" for 0.npy)
    (lambda r: np.save(os.path.join(r, "train", "image", "00.npy"), np.full((32, 64, 3), 0.5)), "train/image/00.npy",
     r"file name\(s\) 00\.npy are not <integer id>\.npy \(ids are non-negative integers without leading zeros"),
    (lambda r: os.rename(os.path.join(r, "val", "depth", "0.npy"), os.path.join(r, "val", "depth", "000.npy")),
     "val/depth/000.npy", r"file name\(s\) 000\.npy are not <integer id>\.npy"),
    # no valid pixel in a file (was: passed, then NaN losses in training)
    (lambda r: np.save(os.path.join(r, "train", "depth", "0.npy"), np.zeros((32, 64, 1))), "train/depth/0.npy",
     r"no valid pixel: every depth value is 0 \(= invalid\); expected 32×64×1 float"),
    (lambda r: np.save(os.path.join(r, "val", "normal", "0.npy"), np.zeros((32, 64, 3))), "val/normal/0.npy",
     r"no valid pixel: every normal is invalid"),
    (lambda r: np.save(os.path.join(r, "train", "label", "4.npy"), np.full((32, 64), -1.0)), "train/label/4.npy",
     r"no labelled pixel: every class id is the ignore label -1"),
    # there but not readable (was: "folder missing", "unreadable .npy")
    (lambda r: _link(os.path.join(r, "val", "normal"), "/nonexistent/normal"), "val/normal",
     r"NYUv2 data: cannot read \S+/val/normal \(a broken symbolic link to /nonexistent/normal\)"),
    (lambda r: _link(os.path.join(r, "train", "label", "2.npy"), "/nonexistent/2.npy"), "train/label/2.npy",
     r"cannot read \S+/train/label/2\.npy \(a broken symbolic link to /nonexistent/2\.npy\)"),
    (lambda r: _link(os.path.join(r, "train", "depth", "1.npy"), os.path.join(r, "train", "depth", "1.npy")),
     "train/depth/1.npy", r"cannot read \S+/train/depth/1\.npy \(Too many levels of symbolic links\)"),
])
def test_check_data_rejects_damaged_files(tmp_path, damage, path, message):
    root = write_release(tmp_path / "d", "nyuv2", 5, 3)
    get_benchmark("nyuv2", data_root=root, image_shape=(32, 64), expected_counts=None).check_data()
    damage(root)
    with pytest.raises(DataError) as err:
        get_benchmark("nyuv2", data_root=root, image_shape=(32, 64), expected_counts=None).check_data()
    text = str(err.value)
    assert os.path.join(root, path) in text and "\n" not in text
    assert re.search(message, text), text


#: (folder, value written at one pixel, message) — bad values the pre-flight check does not
#: sample by default; a run must stop with the file named, never train on them or diverge.
BAD_VALUES = [
    ("depth", np.nan, r"NaN at pixel \(\d+, \d+\)"),
    ("depth", -0.5, r"negative depth -0\.5 at pixel"),
    ("label", 255.0, r"class id\(s\) 255 at 1 pixel\(s\).*ignore_label"),
    ("normal", np.inf, r"inf at pixel"),
]


@pytest.mark.parametrize("folder, value, message", BAD_VALUES)
def test_bad_file_not_sampled_by_the_precheck_stops_the_run_with_its_name(tmp_path, folder, value, message):
    root = write_release(tmp_path / "b", "nyuv2", 6, 2)
    path = os.path.join(root, "train", folder, "3.npy")
    _set(path, value)
    opts = {"data_root": root, "image_shape": (32, 64), "expected_counts": None, "check_samples": 1}
    get_benchmark("nyuv2", **opts).check_data()  # samples file 0 only: passes
    with pytest.raises(DataError, match=message) as err:  # the full scan reads it
        get_benchmark("nyuv2", **opts, data_check="full").check_data()
    assert path in str(err.value)
    bench = get_benchmark("nyuv2", **opts)
    setup = bench.build({**bench.defaults, "filters": TINY, "batch_size": 2, "val_fraction": 0.2},
                        torch.device("cpu"))
    with pytest.raises(DataError, match=message) as err:
        for _ in range(2):
            _run(bench, setup, steps=10)
    assert str(err.value).startswith(f"NYUv2 file {path}: ")


#: (folder, file content, message) — files without a valid pixel for their task
EMPTY_FILES = [
    ("depth", np.zeros((32, 64, 1)), r"no valid pixel: every depth value is 0"),
    ("normal", np.zeros((32, 64, 3)), r"no valid pixel: every normal is invalid"),
    ("label", np.full((32, 64), -1.0), r"no labelled pixel: every class id is the ignore label -1"),
]


@pytest.mark.parametrize("folder, content, message", EMPTY_FILES)
def test_a_file_without_valid_pixels_is_named_never_a_divergence(tmp_path, folder, content, message):
    """The full check names it; a run whose pre-flight did not read it stops with its name when
    it is loaded (was: NaN losses, the trial marked diverged)."""
    from mtl_tune.training.loop import Trainer

    root = write_release(tmp_path / "e", "nyuv2", 6, 2)
    path = os.path.join(root, "train", folder, "3.npy")
    np.save(path, content)
    options = {"image_shape": [32, 64], "expected_counts": None, "check_samples": 1}
    get_benchmark("nyuv2", data_root=root, **options).check_data()  # samples file 0 only: passes
    with pytest.raises(DataError, match=message) as err:
        get_benchmark("nyuv2", data_root=root, **options, data_check="full").check_data()
    assert str(err.value).startswith(f"NYUv2 file {path}: ")
    trainer = Trainer({"benchmark": "nyuv2", "method": "ls", "data_root": root, "device": "cpu", "epochs": 1,
                       "benchmark_options": options, "filters": TINY, "batch_size": 1, "val_fraction": 0.2,
                       "augmentation": False})
    reports = []
    with pytest.raises(DataError, match=f"NYUv2 file {path}: {message}"):
        trainer.run(lambda metrics, state: reports.append(metrics))
    assert reports == []


def test_trainer_raises_the_data_error_never_a_divergence(tmp_path):
    """Through the generic trainer (what a trial runs): the DataError propagates, no report
    with diverged = 1 is made."""
    from mtl_tune.training.loop import Trainer

    root = write_release(tmp_path / "t", "nyuv2", 6, 2)
    path = os.path.join(root, "train", "depth", "4.npy")
    _set(path, np.nan)
    trainer = Trainer({"benchmark": "nyuv2", "method": "ls", "data_root": root, "device": "cpu", "epochs": 1,
                       "benchmark_options": {"image_shape": [32, 64], "expected_counts": None, "check_samples": 1},
                       "filters": TINY, "batch_size": 2, "val_fraction": 0.2})
    reports = []
    with pytest.raises(DataError, match=f"NYUv2 file {path}: NaN at pixel"):
        trainer.run(lambda metrics, state: reports.append(metrics))
    assert reports == []


def test_bad_file_in_a_loader_worker_keeps_the_message(tmp_path):
    root = write_release(tmp_path / "w", "cityscapes", 4, 2)
    path = os.path.join(root, "val", "depth", "1.npy")
    _set(path, -1.0)
    bench = get_benchmark("cityscapes", data_root=root, image_shape=(32, 64), expected_counts=None, check_samples=0)
    setup = bench.build({**bench.defaults, "filters": TINY, "num_workers": 1}, torch.device("cpu"))
    with pytest.raises(DataError) as err:
        setup.evaluate("test")
    assert str(err.value).startswith(f"Cityscapes file {path}: negative depth -1 at pixel (0, 7)")


def test_ignore_label_option_maps_other_ignore_values(tmp_path):
    root = write_release(tmp_path / "u", "cityscapes", 3, 2, label_dtype=np.uint8)  # −1 wraps to 255
    label = np.load(os.path.join(root, "train", "label_7", "0.npy"))
    assert label.dtype == np.uint8 and 255 in label
    opts = {"data_root": root, "image_shape": (32, 64), "expected_counts": None}
    with pytest.raises(DataError, match="class id.s. 255"):
        get_benchmark("cityscapes", **opts, data_check="full").check_data()
    bench = get_benchmark("cityscapes", **opts, ignore_label=255, data_check="full")
    bench.check_data()
    setup = bench.build({**bench.defaults, "filters": TINY, "batch_size": 3, "val_fraction": 0,
                         "augmentation": False}, torch.device("cpu"))
    labels = torch.cat([b["label"].flatten() for b in setup.train_batches(0)])
    assert int((labels == -1).sum()) == sum(int((np.load(os.path.join(root, "train", "label_7", f"{i}.npy")) == 255)
                                                .sum()) for i in range(3))
    assert int(labels.max()) < 7


@pytest.mark.parametrize("options, message", [
    ({"data_check": "fast"}, "data_check must be one of headers, full, got 'fast'"),
    ({"image_shape": [30, 64]}, "image_shape must be"),
    ({"check_samples": -1}, "check_samples must be an integer ≥ 0"),
    ({"expected_counts": {"train": 5}}, "expected_counts must be"),
    ({"ignore_label": "x"}, "ignore_label must be an integer"),
    # a class id as the ignore value: class 5 vanished from training and the metrics, silently
    ({"ignore_label": 5}, r"ignore_label 5 is one of the 13 class ids 0…12"),
])
def test_bad_benchmark_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_benchmark("nyuv2", **options)


def test_describe_ranges_and_header_reader(tmp_path):
    assert describe_ranges([17]) == "17"
    assert describe_ranges([1, 2, 3, 7, 9, 10]) == "1…3, 7, 9…10"
    assert describe_ranges(list(range(0, 20, 2)), limit=2) == "0, 2 and 8 more range(s)"
    path = str(tmp_path / "a.npy")
    np.save(path, np.zeros((4, 5, 1), np.float32))
    assert read_npy_header(path) == ((4, 5, 1), np.dtype(np.float32))
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        read_npy_header(path)


def test_cli_data_errors_exit_2_with_one_line(tmp_path, capsys):
    """benchmark_options reach the pre-flight check: the full scan names the bad file."""
    from mtl_tune.search.cli import main

    root = write_release(tmp_path / "cli", "nyuv2", 4, 2)
    _set(os.path.join(root, "val", "label", "1.npy"), 255.0)  # not sampled? 2 files: sampled
    _set(os.path.join(root, "train", "depth", "2.npy"), -3.0)  # 4 files, 1 sample: id 0 only
    base = ["--benchmark", "nyuv2", "--method", "ls", "--data-root", root, "--storage-path", str(tmp_path / "out"),
            "--name", "x"]
    opts = "benchmark_options={image_shape: [32, 64], expected_counts: null, check_samples: 1, data_check: full}"
    assert main(base + ["--config", opts]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and os.path.join(root, "train", "depth", "2.npy") in err and "negative depth -3" in err
    assert main(base + ["--config", "benchmark_options={data_check: fast}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --config benchmark_options={'data_check': 'fast'}: benchmark option data_check must be "
                   "one of headers, full, got 'fast'")
    assert main(base + ["--config", "benchmark_options=[1]"]) == 2
    assert "must be a mapping" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- end to end
def _run(bench, setup, method="ls", steps=2):
    balancer = get_balancer(method, bench.n_tasks)
    optimizer = bench.make_optimizer([{"params": list(setup.model.parameters())}], {**bench.defaults})
    before = [p.detach().clone() for p in setup.shared_parameters[:3]]
    setup.model.train()
    for k, batch in enumerate(setup.train_batches(0)):
        losses, _ = balancer.train_step(lambda b=batch: setup.forward(b), optimizer, setup.shared_parameters,
                                        setup.task_parameters)
        assert losses.shape == (bench.n_tasks,) and bool(torch.isfinite(losses).all())
        if k + 1 == steps:
            break
    assert any(not torch.equal(a, p) for a, p in zip(before, setup.shared_parameters[:3]))
    setup.model.eval()
    return {split: setup.evaluate(split) for split in setup.eval_splits}


def test_nyuv2_end_to_end_tiny(tmp_path):
    root = write_release(tmp_path / "n", "nyuv2", 10, 3)
    bench = get_benchmark("nyuv2", data_root=root, image_shape=(32, 64), expected_counts=None)
    bench.check_data()
    setup = bench.build({**bench.defaults, "filters": TINY, "val_fraction": 0.2}, torch.device("cpu"))
    assert setup.eval_splits == ("val", "test") and setup.extras["n_train"] == 8 and setup.extras["n_val"] == 2
    assert isinstance(setup.forward(next(iter(setup.train_batches(0)))).representation, list)
    results = _run(bench, setup)
    for split in ("val", "test"):
        assert {s.name for s in bench.metrics} <= set(results[split])
        assert all(math.isfinite(v) for v in results[split].values())
        assert math.isfinite(delta_m(results[split], bench.metrics))


def test_cityscapes_segnet_gradient_method_cagrad_split(tmp_path):
    root = write_release(tmp_path / "c", "cityscapes", 6, 2)
    bench = get_benchmark("cityscapes", data_root=root, image_shape=(32, 64), expected_counts=None)
    setup = bench.build({**bench.defaults, "filters": TINY, "batch_size": 4, "param_split": "cagrad",
                         "metric_averaging": "pixel"}, torch.device("cpu"))
    results = _run(bench, setup, method="mgda", steps=1)
    assert set(results) == {"val", "test"} and all(math.isfinite(v) for v in results["test"].values())


def test_val_fraction_zero_warns_and_evaluates_test_only(tmp_path):
    root = write_release(tmp_path / "z", "cityscapes", 4, 2)
    bench = get_benchmark("cityscapes", data_root=root, image_shape=(32, 64), expected_counts=None)
    with pytest.warns(UserWarning, match="LEAKS"):
        setup = bench.build({**bench.defaults, "filters": TINY, "val_fraction": 0}, torch.device("cpu"))
    assert setup.eval_splits == ("test",) and setup.extras["test_leak"] and setup.extras["n_train"] == 4
    with pytest.raises(ValueError, match="unknown split"):
        setup.evaluate("val")


def test_synthetic_needs_no_data_and_reports_all_metrics():
    bench = get_benchmark("nyuv2", synthetic=True, image_shape=(32, 64))
    bench.check_data()  # no-op
    setup = bench.build({**bench.defaults, "filters": TINY, "val_fraction": 0.01}, torch.device("cpu"))
    assert setup.extras["n_train"] + setup.extras["n_val"] == 795 and setup.extras["n_test"] == 654
    out = setup.evaluate("val")
    assert {s.name for s in bench.metrics} <= set(out) and all(math.isfinite(v) for v in out.values())


def test_training_batches_are_reproducible_and_exclude_val(tmp_path):
    root = write_release(tmp_path / "r", "cityscapes", 10, 2)
    bench = get_benchmark("cityscapes", data_root=root, image_shape=(32, 64), expected_counts=None)
    cfg = {**bench.defaults, "filters": TINY, "batch_size": 3}
    a = [b["image"] for b in bench.build(cfg, torch.device("cpu")).train_batches(5)]
    b = [b["image"] for b in bench.build(cfg, torch.device("cpu")).train_batches(5)]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))  # 9 train images, batches of 3
    plain = bench.build({**cfg, "augmentation": False}, torch.device("cpu"))
    files = [np.load(os.path.join(root, "train", "image", f"{i}.npy")) for i in range(10)]
    seen = {a.astype(np.float32).tobytes(): i for i, a in enumerate(files)}
    train_ids = {seen[x.permute(1, 2, 0).numpy().tobytes()] for batch in plain.train_batches(0) for x in batch["image"]}
    _, val_ids = split_indices(10, 0.1, 0)
    assert train_ids == set(range(10)) - set(val_ids.tolist())
