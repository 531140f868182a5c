"""CelebA benchmark: tiny fixtures in the real layouts, F1 known answers, DataErrors, a short run."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_tune.benchmarks import _celeba_data as cd
from mtl_tune.benchmarks.base import ConfigError, DataError
from mtl_tune.benchmarks import _celeba_loader as cl
from mtl_tune.benchmarks._celeba_model import CelebaNet, f1_counts, f1_from_counts
from mtl_tune.benchmarks.celeba import STL_F1, Celeba
from mtl_tune.metrics import delta_m
from mtl_tune.registry import get_balancer, get_benchmark

CPU = torch.device("cpu")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARTITION = [0] * 8 + [1] * 5 + [2] * 5  # 8 train, 5 val, 5 test


def write_celeba(root, layout: str = "torchvision", n: int = len(PARTITION), seed: int = 0) -> cd.CelebaPaths:
    """CelebA files exactly as released: 178×218 JPEGs, ±1 attribute table, partition list."""
    if layout == "torchvision":
        base = os.path.join(root, "celeba")
        paths = cd.CelebaPaths(os.path.join(base, "img_align_celeba"), os.path.join(base, "list_attr_celeba.txt"),
                               os.path.join(base, "list_eval_partition.txt"))
    else:  # original Google-Drive layout (FAMO)
        paths = cd.CelebaPaths(os.path.join(root, "Img", "img_align_celeba"),
                               os.path.join(root, "Anno", "list_attr_celeba.txt"),
                               os.path.join(root, "Eval", "list_eval_partition.txt"))
    for p in (paths.img_dir, os.path.dirname(paths.attr_file), os.path.dirname(paths.partition_file)):
        os.makedirs(p, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    labels = rng.choice([-1, 1], size=(n, 40))
    for f in files:
        colour = rng.integers(0, 256, size=3)
        img = np.broadcast_to(colour, (218, 178, 3)).astype(np.uint8).copy()
        img[50:150, 40:140] = rng.integers(0, 256, size=3)
        Image.fromarray(img).save(os.path.join(paths.img_dir, f), quality=90)
    with open(paths.attr_file, "w") as fh:
        fh.write(f"{n}\n" + " ".join(cd.ATTRIBUTES) + " \n")
        for f, row in zip(files, labels):
            fh.write(f + " " + " ".join(f"{v:2d}" for v in row) + "\n")
    with open(paths.partition_file, "w") as fh:
        fh.writelines(f"{f} {c}\n" for f, c in zip(files, PARTITION[:n]))
    return paths


@pytest.fixture
def celeba_root(tmp_path):
    write_celeba(tmp_path)
    return str(tmp_path)


# ---------------------------------------------------------------------- metric
def test_f1_known_answers():
    y = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0]])
    perfect = torch.where(y > 0, 5.0, -5.0)
    assert f1_from_counts(*f1_counts(perfect, y)).item() == pytest.approx(1.0, abs=1e-7)
    assert f1_from_counts(*f1_counts(-perfect, y)).item() == pytest.approx(0.0, abs=1e-7)
    # TP = 2, FP = 1, FN = 1 → P = R = 2/3 → F1 = 2/3
    logits = torch.tensor([[3.0], [2.0], [-1.0], [4.0], [-2.0]])
    tp, fp, fn = f1_counts(logits, y)
    assert (tp.item(), fp.item(), fn.item()) == (2, 1, 1)
    assert f1_from_counts(tp, fp, fn).item() == pytest.approx(2 / 3, abs=1e-7)
    # σ(0) = 0.5 is not > 0.5: the official threshold predicts negative
    assert f1_counts(torch.zeros(1, 1), torch.ones(1, 1))[0].item() == 0


def test_f1_accumulates_over_batches_like_the_whole_split():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 40, generator=g), torch.randint(0, 2, (50, 40), generator=g).float()
    whole = f1_from_counts(*f1_counts(logits, y))
    parts = [f1_counts(logits[s:s + 7], y[s:s + 7]) for s in range(0, 50, 7)]
    summed = [sum(p[i] for p in parts) for i in range(3)]
    torch.testing.assert_close(f1_from_counts(*summed), whole)


def test_metrics_baselines_and_delta_m():
    specs = Celeba.metrics
    assert len(specs) == 40 and all(s.higher_is_better and s.primary for s in specs)
    assert [s.baseline for s in specs] == list(STL_F1) and Celeba.tasks == cd.ATTRIBUTES
    assert delta_m({s.name: s.baseline for s in specs}, specs) == pytest.approx(0.0)
    # every F1 10 % below STL → Δm = +10
    assert delta_m({s.name: 0.9 * s.baseline for s in specs}, specs) == pytest.approx(10.0)
    assert Celeba().default_objective() == ("val/mean_f1", "max")


def test_model_parameter_count():
    model = CelebaNet()
    assert sum(p.numel() for p in model.trunk.parameters()) == 5_176_640
    assert sum(p.numel() for p in model.heads.parameters()) == 20_520


# ---------------------------------------------------------------------- data
def test_both_layouts_and_label_mapping(tmp_path):
    for layout in ("torchvision", "original"):
        root = tmp_path / layout
        write_celeba(root, layout)
        paths = cd.resolve_paths(str(root))
        Celeba(data_root=str(root)).check_data()
        index = cd.load_index(paths)
        raw = np.loadtxt(paths.attr_file, skiprows=2, usecols=range(1, 41), dtype=int)
        np.testing.assert_array_equal(index.labels, (raw == 1).astype(np.uint8))
        files, labels = index.split("val")
        assert list(files) == [f"{i + 1:06d}.jpg" for i in range(8, 13)] and labels.shape == (5, 40)
    Celeba(data_root=str(tmp_path / "torchvision" / "celeba")).check_data()  # root = the celeba folder itself


def test_env_var_root(celeba_root, monkeypatch):
    monkeypatch.setenv("MTL_TUNE_CELEBA_ROOT", celeba_root)
    Celeba().check_data()


def test_image_transform_equals_torchvision(celeba_root):
    from torchvision import transforms

    path = os.path.join(celeba_root, "celeba", "img_align_celeba", "000001.jpg")
    ref = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])(Image.open(path).convert("RGB"))
    ours = torch.from_numpy(cd.load_image(path, 64)).float() / 255
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=0)


def _break(root: str, case: str) -> str:
    base = os.path.join(root, "celeba")
    attr, part = os.path.join(base, "list_attr_celeba.txt"), os.path.join(base, "list_eval_partition.txt")
    img = os.path.join(base, "img_align_celeba")
    lines = open(attr).read().splitlines()
    if case == "partial":
        os.remove(part)
        return "missing"
    if case == "truncated_table":
        open(attr, "w").write("\n".join(lines[:-3]) + "\n")
        return "announces 18 images"
    if case == "wrong_names":
        lines[1] = lines[1].replace("Bangs", "Bangz")
        open(attr, "w").write("\n".join(lines) + "\n")
        return r"line 2: attribute 6 is 'Bangz', expected 'Bangs'; expected the 40 CelebA attributes"
    if case == "label_out_of_range":
        lines[4] = lines[4].replace("-1", " 0", 1) if "-1" in lines[4] else lines[4].replace(" 1", " 2", 1)
        open(attr, "w").write("\n".join(lines) + "\n")
        return r"line 5 \(000003\.jpg\) attribute \w+ = '[02]'; labels must be -1 or 1"
    if case == "bad_partition_code":
        rows = open(part).read().splitlines()
        rows[2] = rows[2][:-1] + "3"
        open(part, "w").write("\n".join(rows) + "\n")
        return r"list_eval_partition\.txt line 3 \(000003\.jpg\) has partition code '3'"
    if case == "missing_image":
        os.remove(os.path.join(img, "000005.jpg"))
        return r"1 of 18 images .* are missing from .*img_align_celeba: 000005\.jpg; get CelebA"
    if case == "truncated_image":
        p = os.path.join(img, "000001.jpg")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 3])
        return r"image .*000001\.jpg: cannot decode it \(.*truncated"
    if case == "swapped_rows":
        rows = open(part).read().splitlines()
        rows[3], rows[4] = rows[4], rows[3]
        open(part, "w").write("\n".join(rows) + "\n")
        return (r"list_eval_partition\.txt line 4 names 000005\.jpg, but line 6 of list_attr_celeba\.txt names "
                r"000004\.jpg .*2 line\(s\) differ")
    if case == "names_missing":
        lines[1] = " ".join(cd.ATTRIBUTES[:38])
        open(attr, "w").write("\n".join(lines) + "\n")
        return r"38 attribute names, the last 2 missing \(from 'Wearing_Necktie'\)"
    if case == "wrong_image_size":
        Image.new("RGB", (100, 100)).save(os.path.join(img, "000001.jpg"))
        return "178×218"
    if case in ("no_val", "no_train", "no_test"):  # every row of that split moved to another one
        split = case[3:]
        code, other = cd.SPLIT_CODES[split], (cd.SPLIT_CODES[split] + 1) % 3
        rows = [r[:-1] + str(other) if r.endswith(str(code)) else r for r in open(part).read().splitlines()]
        open(part, "w").write("\n".join(rows) + "\n")
        return (rf"list_eval_partition\.txt gives the {split} split \(code {code}\) 0 image\(s\), it needs at least "
                rf"{cd.MIN_SPLIT[split]} \(rows found: .*0 {split}")
    if case in ("latin1_partition", "latin1_attr"):  # a renamed image, the file saved as Latin-1
        path, k = (part, 3) if case == "latin1_partition" else (attr, 5)
        rows = open(path).read().splitlines()
        rows[k] = rows[k].replace("00000", "0000é", 1)
        open(path, "w", encoding="latin-1").write("\n".join(rows) + "\n")
        return rf"{os.path.basename(path)} line {k + 1} is not UTF-8 text \(byte b'\\xe9'"
    if case == "broken_link_image":  # an image linked from a disk that is not mounted
        os.remove(os.path.join(img, "000006.jpg"))
        os.symlink("/mnt/unmounted/000006.jpg", os.path.join(img, "000006.jpg"))
        return r"celeba: cannot read \S+/000006\.jpg \(a broken symbolic link to /mnt/unmounted/000006\.jpg\)"
    if case == "broken_link_folder":  # the whole celeba/ folder on that disk (was: "no CelebA data under")
        shutil.rmtree(base)
        os.symlink("/mnt/unmounted/celeba", base)
        return (r"celeba: cannot read \S+/celeba/img_align_celeba \(\S+/celeba is a broken symbolic link to "
                r"/mnt/unmounted/celeba\)")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["partial", "truncated_table", "wrong_names", "label_out_of_range",
                                  "bad_partition_code", "missing_image", "truncated_image", "wrong_image_size",
                                  "swapped_rows", "names_missing", "no_val", "no_train", "no_test",
                                  "latin1_partition", "latin1_attr", "broken_link_image", "broken_link_folder"])
def test_data_errors(celeba_root, case):
    match = _break(celeba_root, case)
    with pytest.raises(DataError, match=match) as err:
        Celeba(data_root=celeba_root).check_data()
    assert "np.str_" not in str(err.value) and "\n" not in str(err.value)


def _sample_picks(n: int) -> set[int]:
    """The images the default pre-flight check decodes (check_images: first, last, 8 seeded)."""
    return {0, n - 1, *np.random.default_rng(0).integers(0, n, size=8).tolist()}


def _corrupt_unsampled_train_image(root: str) -> str:
    """A train image outside the decode sample, replaced by junk between JPEG start/end markers
    (passes the marker screen; only decoding finds it)."""
    k = min(set(range(8)) - _sample_picks(len(PARTITION)))
    path = os.path.join(root, "celeba", "img_align_celeba", f"{k + 1:06d}.jpg")
    open(path, "wb").write(b"\xff\xd8\xff" + np.random.default_rng(1).bytes(4000) + b"\xff\xd9")
    return path


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_the_precheck_did_not_decode_stops_the_run_with_its_name(celeba_root, workers):
    path = _corrupt_unsampled_train_image(celeba_root)
    Celeba(data_root=celeba_root).check_data()  # the default check does not decode it
    with pytest.raises(DataError, match=f"celeba: image {path}: cannot decode it"):
        Celeba(data_root=celeba_root, data_check="full").check_data()
    bench = Celeba(data_root=celeba_root)
    setup = bench.build(_config(bench, num_workers=workers, batch_size=8), CPU)
    with pytest.raises(DataError) as err:
        list(setup.train_batches(0))
    assert str(err.value).startswith(f"celeba: image {path}: cannot decode it (")


def test_cache_build_with_a_corrupt_image_names_it_and_leaves_no_partial_cache(celeba_root, tmp_path):
    path = _corrupt_unsampled_train_image(celeba_root)
    paths = cd.resolve_paths(celeba_root)
    files, _ = cd.load_index(paths).split("train")
    with pytest.raises(DataError, match=f"celeba: image {path}: cannot decode it"):
        cl.cached_split(str(tmp_path / "cache"), paths.img_dir, files, "train", 32, num_workers=0)
    key = cl.cache_key(paths.img_dir, files)
    assert sorted(os.listdir(tmp_path / "cache")) == [f"celeba_train_32px_{key}.npy.lock"]


def test_missing_root_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_TUNE_CELEBA_ROOT", raising=False)
    with pytest.raises(DataError, match="no data root"):
        Celeba().check_data()
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        Celeba(data_root=str(tmp_path / "nope")).check_data()
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="list_attr_celeba.txt"):
        Celeba(data_root=str(tmp_path / "empty")).check_data()


# ---------------------------------------------------------------------- end to end
def _config(bench, **kw):
    return {**bench.defaults, "seed": 0, "image_size": 32, "batch_size": 4, "eval_batch_size": 3,
            "num_workers": 0, **kw}


@pytest.mark.parametrize("device", DEVICES)
def test_short_training_and_evaluate(celeba_root, device):
    bench = get_benchmark("celeba", data_root=celeba_root)
    bench.check_data()
    config = _config(bench)
    setup = bench.build(config, torch.device(device))
    assert setup.eval_splits == ("val", "test") and len(setup.task_parameters) == 40
    balancer = get_balancer("ls", bench.n_tasks)
    optimizer = bench.make_optimizer([{"params": list(setup.model.parameters())}], config)
    setup.model.train()
    n_batches = 0
    for batch in setup.train_batches(0):
        losses, _ = balancer.train_step(lambda: setup.forward(batch), optimizer, setup.shared_parameters,
                                        setup.task_parameters)
        assert losses.shape == (40,) and bool(torch.isfinite(losses).all())
        n_batches += 1
    assert n_batches == 2  # 8 training images, batch 4
    setup.model.eval()
    out = setup.evaluate("val")
    assert set(out) == {f"{a}/f1" for a in cd.ATTRIBUTES} | {"mean_f1"}
    assert out["mean_f1"] == pytest.approx(np.mean([out[f"{a}/f1"] for a in cd.ATTRIBUTES]))


def test_evaluate_known_answer_constant_predictions(celeba_root):
    """Heads with zero weights predict their bias sign for every image: all-positive gives
    F1 = 2p/(p + 1) with p the positive rate of the split, all-negative gives 0."""
    bench = Celeba(data_root=celeba_root)
    setup = bench.build(_config(bench), CPU)
    with torch.no_grad():
        for k, head in enumerate(setup.model.heads):
            head.weight.zero_()
            head.bias.fill_(10.0 if k % 2 == 0 else -10.0)
    _, labels = cd.load_index(cd.resolve_paths(celeba_root)).split("test")
    out = setup.evaluate("test")
    for k, a in enumerate(cd.ATTRIBUTES):
        p = labels[:, k].mean()
        expected = 2 * p / (p + 1) if k % 2 == 0 else 0.0
        assert out[f"{a}/f1"] == pytest.approx(expected, abs=1e-6)


def test_cache_holds_the_same_images(celeba_root, tmp_path):
    paths = cd.resolve_paths(celeba_root)
    files, labels = cd.load_index(paths).split("train")
    path = cl.cached_split(str(tmp_path / "cache"), paths.img_dir, files, "train", 32, num_workers=0)
    assert cl.cached_split(str(tmp_path / "cache"), paths.img_dir, files, "train", 32, 0) == path  # reused
    live, cached = cl.CelebaImages(paths.img_dir, files, labels, 32), cl.CachedImages(path, labels)
    for i in range(len(files)):
        assert torch.equal(live[i][0], cached[i][0]) and torch.equal(live[i][1], cached[i][1])
    bench = Celeba(data_root=celeba_root)
    setup = bench.build(_config(bench, cache_dir=str(tmp_path / "cache")), CPU)
    assert len(setup.evaluate("val")) == 41


def _first_val_images(bench, **config):
    loader = bench._loaders(_config(bench, eval_batch_size=5, **config), CPU)[1]["val"]
    return next(iter(loader))[0]


def test_cache_is_never_reused_for_other_images(tmp_path):
    """Two data roots with the same counts share a cache_dir: each trains on its own images (the
    cache was keyed by split and size only); replacing an image rebuilds it."""
    cache = str(tmp_path / "cache")
    for seed in (0, 5):
        root = str(tmp_path / f"root{seed}")
        write_celeba(root, seed=seed)
        bench = Celeba(data_root=root)
        assert torch.equal(_first_val_images(bench, cache_dir=cache), _first_val_images(bench))
    img = os.path.join(tmp_path, "root5", "celeba", "img_align_celeba", "000010.jpg")  # a val image
    Image.new("RGB", cd.IMAGE_SIZE, (255, 0, 0)).save(img)
    os.utime(img, ns=(1, 1))
    assert torch.equal(_first_val_images(bench, cache_dir=cache), _first_val_images(bench))


def test_a_damaged_cache_is_rebuilt_and_says_so(celeba_root, tmp_path):
    paths = cd.resolve_paths(celeba_root)
    files, labels = cd.load_index(paths).split("train")
    path = cl.cached_split(str(tmp_path / "cache"), paths.img_dir, files, "train", 32, num_workers=0)
    os.truncate(path, os.path.getsize(path) // 2)  # was: "ValueError: mmap length is greater than file size"
    with pytest.warns(UserWarning, match=rf"celeba: image cache {path} cannot be read \(.*\); rebuilding it"):
        assert cl.cached_split(str(tmp_path / "cache"), paths.img_dir, files, "train", 32, 0) == path
    live, cached = cl.CelebaImages(paths.img_dir, files, labels, 32), cl.CachedImages(path, labels)
    assert all(torch.equal(live[i][0], cached[i][0]) for i in range(len(files)))


def test_a_last_training_batch_of_one_image_is_left_out(celeba_root):
    """8 training images in batches of 7: the official loader's last batch of 1 crashes BatchNorm1d
    ("Expected more than 1 value per channel"), as the release does with batch_size 139."""
    bench = Celeba(data_root=celeba_root)
    setup = bench.build(_config(bench, batch_size=7), CPU)
    setup.model.train()
    files, labels = cd.load_index(cd.resolve_paths(celeba_root)).split("train")
    live = cl.CelebaImages(os.path.join(celeba_root, "celeba", "img_align_celeba"), files, labels, 32)
    for epoch in range(2):
        batches = list(setup.train_batches(epoch))
        assert [len(x) for x, _ in batches] == [7]
        # the first 7 draws of the epoch's full permutation (the shuffle is unchanged)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(epoch))
        assert torch.equal(batches[0][0], torch.stack([live[int(i)][0] for i in perm[:7]]))
        assert bool(torch.isfinite(setup.forward(batches[0]).losses).all())
    full = bench.build(_config(bench, batch_size=3), CPU)  # 8 = 3 + 3 + 2: nothing left out
    assert [len(x) for x, _ in full.train_batches(0)] == [3, 3, 2]
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 2"):
        bench.check_config({"batch_size": 1})
    # the release's 162,770 training images = 139·1171 + 1 (the synthetic loader has the real sizes)
    synthetic = Celeba(synthetic=True).build(_config(bench, batch_size=139, image_size=8), CPU)
    assert sum(len(x) for x, _ in synthetic.train_batches(0)) == 162769


def test_optimizer_and_scheduler_options():
    bench = Celeba()
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.025}]
    assert len(bench.make_optimizer(groups, {"lr": 3e-4}).param_groups) == 2
    official = bench.make_optimizer(groups, {"lr": 3e-4, "train_balancer_params": False})
    assert len(official.param_groups) == 1 and official.param_groups[0]["lr"] == 3e-4
    assert bench.make_scheduler(official, {"epochs": 15}) is None
    cosine = bench.make_scheduler(official, {"epochs": 15, "scheduler": "cosine"})
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR) and cosine.T_max == 15
    with pytest.raises(ValueError):
        bench.make_scheduler(official, {"epochs": 15, "scheduler": "step"})


def test_synthetic_needs_no_data(monkeypatch):
    monkeypatch.delenv("MTL_TUNE_CELEBA_ROOT", raising=False)
    bench = Celeba(synthetic=True)
    bench.check_data()
    setup = bench.build(_config(bench), CPU)
    batch = next(iter(setup.train_batches(0)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[0].dtype == torch.uint8 and batch[1].shape == (4, 40)
    out = setup.forward(batch)
    assert out.losses.shape == (40,) and out.representation.shape == (4, 512)


def test_an_image_listed_twice_is_refused(tmp_path):
    """000003.jpg's row copied over 000004.jpg's (and its partition): it sat in two splits — a test-set
    leak — and 000004.jpg was dropped, with data_check=full passing."""
    paths = write_celeba(tmp_path)
    lines = open(paths.attr_file).read().splitlines(keepends=True)
    lines[2 + 3] = lines[2 + 2]
    open(paths.attr_file, "w").writelines(lines)
    with pytest.raises(DataError, match=r"lists 000003.jpg twice \(lines 5 and 6"):
        cd.parse_attributes(paths.attr_file)


def test_an_image_of_another_size_is_refused_when_loaded(tmp_path):
    """The default pre-flight decodes a sample; an image outside it with another crop was resized silently."""
    paths = write_celeba(tmp_path)
    odd = os.path.join(paths.img_dir, "000002.jpg")
    Image.fromarray(np.zeros((178, 218, 3), np.uint8)).save(odd)  # width and height swapped
    with pytest.raises(DataError, match=r"000002.jpg: it is 218×178, expected the aligned & cropped 178×218"):
        cd.load_image(odd, 64)
    assert cd.load_image(os.path.join(paths.img_dir, "000001.jpg"), 64).shape == (3, 64, 64)
