"""MultiMNIST benchmark: pair composition vs the official PIL recipe, idx files in torchvision's
layout, DataErrors, the offline sklearn source, metrics, schedule and short runs."""

from __future__ import annotations

import gzip
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_tune.benchmarks import _multi_mnist_data as mm
from mtl_tune.benchmarks.base import DataError
from mtl_tune.benchmarks.multi_mnist import MultiMnist, accuracy_and_nll, normalise, step_decay
from mtl_tune.registry import get_balancer, get_benchmark

CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root, n_train: int = 60, n_test: int = 20, gz: bool = False, seed: int = 0) -> str:
    """MNIST idx files in torchvision's ``<root>/MNIST/raw`` layout (optionally gzipped)."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lab_name = mm.MNIST_FILES[split]
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        payloads = ((img_name, idx_bytes(images, mm.IMAGE_MAGIC)), (lab_name, idx_bytes(labels, mm.LABEL_MAGIC)))
        for name, payload in payloads:
            if gz:
                with gzip.open(os.path.join(raw, name + ".gz"), "wb") as f:
                    f.write(payload)
            else:
                with open(os.path.join(raw, name), "wb") as f:
                    f.write(payload)
    return raw


def official_pair(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Sener & Koltun's recipe verbatim in spirit: paste, max on the overlap, PIL nearest 36 → 28."""
    canvas = np.zeros((36, 36))
    canvas[0:28, 0:28] = left
    canvas[6:34, 6:34] = right
    canvas[6:28, 6:28] = np.maximum(left[6:28, 6:28], right[0:22, 0:22])
    return np.array(Image.fromarray(canvas).resize((28, 28), resample=Image.NEAREST))


# ---------------------------------------------------------------------- composition
def test_compose_matches_official_pil_recipe():
    rng = np.random.default_rng(1)
    left, right = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    ours = mm.compose_pair(left, right)
    for i in range(5):
        np.testing.assert_array_equal(ours[i], official_pair(left[i].astype(float), right[i].astype(float)))


def test_compose_hand_made():
    left = np.zeros((28, 28), np.uint8)
    right = np.zeros((28, 28), np.uint8)
    left[0, 0] = 200  # canvas (0, 0) → output (0, 0)
    left[10, 10] = 50
    right[4, 4] = 70  # canvas (10, 10): overlap → max(50, 70); output index ⌊(i + ½)·36/28⌋ = 10 at i = 8
    right[26, 26] = 100  # canvas (32, 32) → output (25, 25)
    right[27, 27] = 255  # canvas (33, 33) is skipped by the nearest 36 → 28 sampling
    out = mm.compose_pair(left, right)
    assert out[0, 0] == 200 and out[8, 8] == 70 and out[25, 25] == 100 and int(out.sum()) == 370
    assert mm.NEAREST_36_TO_28[[0, 8, 25]].tolist() == [0, 10, 32] and 33 not in mm.NEAREST_36_TO_28


def test_make_pairs_and_labels():
    rng = np.random.default_rng(0)
    pool = mm.DigitPool(rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), np.arange(7) % 10)
    images, labels = mm.make_pairs(pool, 3, np.random.default_rng(5), chunk=4)
    assert images.shape == (21, 28, 28) and labels.shape == (21, 2)
    np.testing.assert_array_equal(labels[:, 0], np.repeat(np.arange(7), 3))
    for i in range(21):
        np.testing.assert_array_equal(images[i], mm.compose_pair(pool.images[labels[i, 0]], pool.images[labels[i, 1]]))


def test_split_pool_is_a_disjoint_cover():
    pool = mm.DigitPool(np.zeros((100, 28, 28), np.uint8), np.arange(100))
    parts = mm.split_pool(pool, (0.6, 0.2, 0.2), np.random.default_rng(0))
    assert [len(p.labels) for p in parts] == [60, 20, 20]
    assert sorted(np.concatenate([p.labels for p in parts]).tolist()) == list(range(100))


def test_split_bounds_clip_to_the_items():
    split_bounds = mm.split_bounds
    assert split_bounds(100, (0.6, 0.2, 0.2)) == [(0, 60), (60, 80), (80, 100)]
    assert split_bounds(12, (0.01, 0.99)) == [(0, 0), (0, 12)]
    assert split_bounds(3, (0.9, 0.9, 0.1)) == [(0, 3), (3, 3), (3, 3)]


@pytest.mark.parametrize("gz", [False, True])
def test_fractions_that_leave_no_training_image_are_refused_before_training(tmp_path, gz):
    """val_fraction=0.99 of 12 MNIST images (or of the 1,797 digits with a large test_fraction): the
    trials failed after Ray started ("the training split yielded no batch"), each retried."""
    from mtl_tune.benchmarks.base import ConfigError

    write_mnist(tmp_path, 12, 6, gz=gz)
    mnist = MultiMnist(data_root=str(tmp_path))
    mnist.check_config({"val_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"val_fraction=0.99, .* split into train/val/test = 0/12/6"):
        mnist.check_config({"val_fraction": 0.99})
    digits = MultiMnist(source="sklearn_digits")
    with pytest.raises(ConfigError, match=r"1797 images of the sklearn_digits source split into train/val/test = 0/"):
        digits.check_config({"val_fraction": 0.9999, "test_fraction": 0.9999})
    with pytest.raises(ConfigError, match="leave no training image"):
        digits.build({"val_fraction": 0.9999, "test_fraction": 0.9999}, torch.device("cpu"))


def test_sklearn_digits_upscaling():
    eight = np.zeros((1, 8, 8))
    eight[0, 2:6, 2:6] = 16
    out = mm.upscale_digits(eight)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert out[0, :4].sum() == 0 and out[0, -4:].sum() == 0 and out[0, :, :4].sum() == 0  # MNIST-like border
    assert out.max() == 255 and out[0, 14, 14] == 255
    pool = mm.load_sklearn_digits()
    assert pool.images.shape == (1797, 28, 28) and set(pool.labels.tolist()) == set(range(10))


# ---------------------------------------------------------------------- idx files
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_files_read_back(tmp_path, gz):
    write_mnist(tmp_path, gz=gz, seed=3)
    pool = mm.load_mnist_split(str(tmp_path), "test")
    rng = np.random.default_rng(3)
    rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60)  # the training split drawn first
    np.testing.assert_array_equal(pool.images, rng.integers(0, 256, (20, 28, 28)).astype(np.uint8))
    np.testing.assert_array_equal(pool.labels, rng.integers(0, 10, 20))
    MultiMnist(data_root=str(tmp_path)).check_data()


def _break(raw: str, case: str) -> str:
    img = os.path.join(raw, "train-images-idx3-ubyte")
    lab = os.path.join(raw, "train-labels-idx1-ubyte")
    if case == "missing_file":
        os.remove(lab)
        return "train-labels-idx1-ubyte"
    if case == "truncated":
        data = open(img, "rb").read()
        open(img, "wb").write(data[:-100])
        return "truncated"
    if case == "truncated_gz":
        data = gzip.compress(open(img, "rb").read())
        os.remove(img)
        open(img + ".gz", "wb").write(data[: len(data) // 2])
        return "corrupt or truncated"
    if case == "wrong_magic":
        open(img, "wb").write(idx_bytes(np.zeros((60, 28, 28)), 2049 + 7))
        return "magic"
    if case == "wrong_shape":
        open(img, "wb").write(idx_bytes(np.zeros((60, 27, 28)), mm.IMAGE_MAGIC))
        return r"\(28, 28\)"
    if case == "label_out_of_range":
        labels = np.full(60, 3)
        labels[[17, 40]] = [12, 10]
        open(lab, "wb").write(idx_bytes(labels, mm.LABEL_MAGIC))
        return r"train-labels-idx1-ubyte item 17 has label 12 \(2 label\(s\) above 9\); MNIST labels are 0…9"
    if case == "count_mismatch":
        open(lab, "wb").write(idx_bytes(np.zeros(59), mm.LABEL_MAGIC))
        return "must match"
    if case == "broken_link":  # was: "... is missing"
        os.remove(img)
        os.symlink("/mnt/unmounted/mnist", img)
        return (r"multi_mnist: cannot read \S+/train-images-idx3-ubyte "
                r"\(a broken symbolic link to /mnt/unmounted/mnist\)")
    if case == "link_loop":  # was: "... is missing"
        os.remove(lab)
        os.symlink(lab, lab)
        return r"multi_mnist: cannot read \S+/train-labels-idx1-ubyte \(Too many levels of symbolic links\)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_file", "truncated", "truncated_gz", "wrong_magic", "wrong_shape",
                                  "label_out_of_range", "count_mismatch", "broken_link", "link_loop"])
def test_data_errors(tmp_path, case):
    raw = write_mnist(tmp_path)
    match = _break(raw, case)
    with pytest.raises(DataError, match=match) as err:
        MultiMnist(data_root=str(tmp_path)).check_data()
    assert raw in str(err.value)


def test_missing_dir_and_source_selection(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_TUNE_MNIST_ROOT", raising=False)
    with pytest.raises(DataError, match="MNIST/raw"):
        MultiMnist(data_root=str(tmp_path / "nope")).check_data()
    assert MultiMnist().info() == {"data_source": "sklearn_digits", "data_root": None}
    assert MultiMnist(data_root=str(tmp_path), source="sklearn_digits").info()["data_source"] == "sklearn_digits"
    with pytest.raises(DataError, match="needs a data root"):
        MultiMnist(source="mnist")
    monkeypatch.setenv("MTL_TUNE_MNIST_ROOT", str(tmp_path))
    assert MultiMnist().info() == {"data_source": "mnist", "data_root": str(tmp_path)}
    assert "sklearn_digits" in MultiMnist.description and "mnist" in MultiMnist.description


def test_an_empty_data_root_is_an_error_and_no_root_the_offline_source(tmp_path, monkeypatch, capsys):
    """``--data-root ""`` (an unset shell variable) was read as "no root": a silent switch to the
    sklearn digits. Giving no --data-root keeps the documented offline source."""
    from mtl_tune.search.cli import main

    class Started(Exception):
        pass

    def execute(plan):
        raise Started(plan)

    monkeypatch.setattr("mtl_tune.search.execute", execute)
    monkeypatch.setenv("MTL_TUNE_MNIST_ROOT", str(tmp_path / "nope"))  # an explicit "" does not read it
    base = ["--benchmark", "multi_mnist", "--method", "ls", "--storage-path", str(tmp_path / "out"), "--name", "x"]
    assert main(base + ["--data-root", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: multi_mnist: the data root given is empty (''; an unset shell variable?)")
    assert "\n" not in err
    with pytest.raises(DataError, match="data root given is empty"):
        MultiMnist(data_root="").check_data()
    MultiMnist(data_root="", source="sklearn_digits").check_data()  # the source named: no guess made
    monkeypatch.delenv("MTL_TUNE_MNIST_ROOT")
    with pytest.raises(Started) as started:
        main(base)
    assert started.value.args[0].bench.info() == {"data_source": "sklearn_digits", "data_root": None}
    # a trial's config holds data_root="" when the driver resolved none: it builds the offline source
    assert MultiMnist(data_root="").info() == {"data_source": "sklearn_digits", "data_root": None}


# ---------------------------------------------------------------------- metrics and schedule
def test_accuracy_and_nll_known_answers():
    labels = torch.tensor([0, 3, 9, 3])
    perfect = torch.nn.functional.one_hot(labels, 10).float() * 50
    assert accuracy_and_nll(perfect, labels)[0] == 1.0 and accuracy_and_nll(perfect, labels)[1] < 1e-12
    acc, nll = accuracy_and_nll(torch.zeros(4, 10), labels)  # uniform: NLL = log 10, argmax = class 0
    assert acc == 0.25 and nll == pytest.approx(math.log(10))


def test_normalise_uses_mnist_statistics():
    x = normalise(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    torch.testing.assert_close(x, torch.tensor([[[[-0.1307 / 0.3081, (1 - 0.1307) / 0.3081]]]]))


def test_lr_schedule_matches_official_epochs():
    assert [step_decay(e, 0.85, 10) for e in (0, 8, 9, 18, 19)] == [1, 1, 0.85, 0.85, 0.85 ** 2]
    bench = MultiMnist()
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = bench.make_scheduler(opt, bench.defaults)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[8] == pytest.approx(1e-3) and lrs[9] == pytest.approx(0.85e-3)
    assert lrs[19] == pytest.approx(0.85 ** 2 * 1e-3)


def test_metadata():
    bench = MultiMnist()
    assert not bench.has_baselines() and bench.default_objective() == ("val/mean_acc", "max")
    assert [m.name for m in bench.primary_metrics()] == ["left/acc", "right/acc"]


# ---------------------------------------------------------------------- end to end
def _run(bench, config, steps: int | None = None, device: str = "cpu") -> dict:
    setup = bench.build(config, torch.device(device))
    balancer = get_balancer("ls", bench.n_tasks)
    optimizer = bench.make_optimizer([{"params": list(setup.model.parameters())}], config)
    setup.model.train()
    for i, batch in enumerate(setup.train_batches(0)):
        if steps is not None and i >= steps:
            break
        losses, _ = balancer.train_step(lambda: setup.forward(batch), optimizer, setup.shared_parameters,
                                        setup.task_parameters)
        assert losses.shape == (2,) and bool(torch.isfinite(losses).all())
    setup.model.eval()
    return {"setup": setup, **{s: setup.evaluate(s) for s in setup.eval_splits}}


@pytest.mark.parametrize("device", DEVICES)
def test_mnist_source_end_to_end(tmp_path, device):
    write_mnist(tmp_path, gz=True)
    bench = get_benchmark("multi_mnist", data_root=str(tmp_path))
    bench.check_data()
    out = _run(bench, {**bench.defaults, "seed": 0, "batch_size": 16}, device=device)
    assert out["setup"].extras["data_source"] == "mnist"
    assert (out["setup"].extras["n_train"], out["setup"].extras["n_val"], out["setup"].extras["n_test"]) == (50, 10, 20)
    assert set(out["val"]) == {"left/acc", "right/acc", "left/loss", "right/loss", "mean_acc"}
    assert out["setup"].eval_splits[0] == "val"


def test_sklearn_source_is_deterministic():
    bench = get_benchmark("multi_mnist")
    bench.check_data()
    out = _run(bench, {**bench.defaults, "seed": 0}, steps=2)
    extras = out["setup"].extras
    assert extras["data_source"] == "sklearn_digits"
    assert (extras["n_train"], extras["n_val"], extras["n_test"]) == (11980, 2400, 3590)  # 10 pairs per image
    from mtl_tune.benchmarks.multi_mnist import _build_arrays
    cached = _build_arrays("sklearn_digits", None, 0, 1 / 6, 0.2, 10)
    fresh = _build_arrays.__wrapped__("sklearn_digits", None, 0, 1 / 6, 0.2, 10)
    assert all(np.array_equal(cached[s][0], fresh[s][0]) and np.array_equal(cached[s][1], fresh[s][1]) for s in fresh)


@pytest.mark.slow
def test_sklearn_source_learns_in_one_epoch():
    bench = MultiMnist()
    out = _run(bench, {**bench.defaults, "seed": 0})  # one full epoch: ≈ 1 s on an idle 2-core CPU
    assert out["val"]["mean_acc"] > 0.3  # chance is 0.1


def test_synthetic_has_real_shapes():
    bench = MultiMnist(synthetic=True)
    bench.check_data()
    assert bench.info()["data_source"] == "synthetic"
    out = _run(bench, {**bench.defaults, "seed": 0}, steps=1)
    assert out["setup"].extras["n_train"] == 11980 and 0 <= out["test"]["left/acc"] <= 1


@pytest.mark.parametrize("source", ["mnist", "sklearn_digits", "synthetic"])
def test_val_fraction_zero_evaluates_the_test_split_and_says_so(tmp_path, source):
    """val_fraction = 0 (the papers' protocol: no validation split) leaves the val split empty: the run
    evaluates the test split only, warns that selecting on it leaks, and a whole training run ends
    (it crashed at the first evaluation, concatenating no batches)."""
    from mtl_tune.training.loop import Trainer

    if source == "mnist":
        write_mnist(tmp_path)
    kwargs = {"data_root": str(tmp_path)} if source == "mnist" else {"synthetic": source == "synthetic"}
    config = {"benchmark": "multi_mnist", "method": "ls", "epochs": 1, "seed": 0, "val_fraction": 0,
              "pairs_per_image": 1, "batch_size": 256, **kwargs}
    with pytest.warns(UserWarning, match="validation split is empty"):
        trainer = Trainer(config)
    setup = trainer.setup
    assert setup.eval_splits == ("test",) and setup.extras["test_leak"] and setup.extras["n_val"] == 0
    with pytest.raises(ValueError, match=r"split 'val' is not evaluated.*\['test'\]"):
        setup.evaluate("val")
    reports = []
    trainer.run(lambda metrics, state: reports.append(metrics))
    assert reports and "test/mean_acc" in reports[-1] and not any(k.startswith("val/") for k in reports[-1])
    default = Trainer({**config, "val_fraction": 1 / 6})
    assert default.setup.eval_splits == ("val", "test") and not default.setup.extras["test_leak"]


def test_swapped_release_files_are_refused_and_other_counts_said(tmp_path, monkeypatch):
    """train-* and t10k-* swapped trained on the test set, silently; NYUv2 and CelebA already say when
    the counts are not the release's."""
    from mtl_tune.benchmarks import multi_mnist

    write_mnist(tmp_path, 12, 6)
    with pytest.warns(UserWarning, match=r"holds 12 training and 6 test images; the release has 60000 and 10000"):
        MultiMnist(data_root=str(tmp_path)).check_data()
    monkeypatch.setattr(multi_mnist, "MNIST_TRAIN", 12)
    monkeypatch.setattr(multi_mnist, "MNIST_TEST", 6)
    MultiMnist(data_root=str(tmp_path)).check_data()  # the release's counts: no warning
    write_mnist(tmp_path, 6, 12)
    with pytest.raises(DataError, match=r"the train-\* files hold 6 images and the t10k-\* files 12: swapped\?"):
        MultiMnist(data_root=str(tmp_path)).check_data()


def test_a_folder_or_gzip_data_under_the_plain_name_is_named(tmp_path):
    raw = write_mnist(tmp_path, 12, 6)
    label = os.path.join(raw, mm.MNIST_FILES["test"][1])
    os.remove(label)
    os.mkdir(label)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is a folder, expected the idx file"):
        mm.load_mnist_split(str(tmp_path), "test")
    os.rmdir(label)
    write_mnist(tmp_path, 12, 6, gz=True)
    images = os.path.join(raw, mm.MNIST_FILES["train"][0])
    os.replace(images + ".gz", images)
    with pytest.raises(DataError, match=r"idx magic \d+, expected 2051 .* \(it is gzip data: name the file with .gz\)"):
        mm.load_mnist_split(str(tmp_path), "train")
