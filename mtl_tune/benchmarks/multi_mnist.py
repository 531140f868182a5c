"""``multi_mnist`` — Sener & Koltun's MultiMNIST: classify the left and the right digit.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(code: isl-org/MultiObjectiveOptimization; also SamsungLabs/MTL, docs/benchmarks.md#multi_mnist).
Images: two overlapping digits on a 36×36 canvas resized to 28×28 (see
:mod:`mtl_tune.benchmarks._multi_mnist_data`), normalised with MNIST's (0.1307, 0.3081).
Tasks ``left`` and ``right`` are 10-way classifications, loss = NLL of log-softmax
(= cross-entropy on logits).

Model (``MultiLeNetR`` + 2 × ``MultiLeNetO``): shared trunk conv 1→10 k5, max-pool 2, ReLU,
conv 10→20 k5, max-pool 2, ReLU, FC 320→50, ReLU (the 50-d representation); heads FC 50→50,
ReLU, FC 50→10. The official trunk multiplies conv2 and the head's hidden layer by a
Bernoulli(½) mask that is shared by the whole batch and *not* rescaled (so train and eval
activations differ in scale); SamsungLabs' port drops it. Default ``dropout=0`` (no dropout);
``dropout=p`` gives standard inverted ``Dropout2d``/``Dropout`` at those two places.

Data sources (reported by :meth:`MultiMnist.info` and in ``Setup.extras["data_source"]``):

* ``mnist`` — when a data root is given (``--data-root`` or ``MTL_TUNE_MNIST_ROOT``):
  torchvision's ``<root>/MNIST/raw`` idx files. Train pool = the 60k training images minus a
  seeded ``val_fraction`` (1/6 → 10k) kept for validation, test = the 10k test images; one
  random partner per image (as the official pairing). The official code validates on the
  test set; a search must not, hence the validation carve-out.
* ``sklearn_digits`` — default when no root is given (no ``--data-root``, the variable unset
  or empty): scikit-learn's bundled 8×8 digits upscaled to
  MNIST frames; the 1,797 images are split into disjoint pools before pairing (test =
  ``test_fraction`` 0.2, val = ``val_fraction`` 1/6 of the rest: ≈ 67/13/20 %) and
  every image is the left digit of ``pairs_per_image`` (10) pairs. Offline, deterministic
  (``data_seed``), ≈ 1 s per LS epoch on 2 CPU cores: the real-data benchmark for CI-sized
  searches. Its absolute accuracies are not comparable with MNIST numbers.

``--data-root ""`` (an unset shell variable, ``--data-root "$MNIST"``) is *not* "no root": the
pre-flight check refuses it rather than silently training on the digits. (In a trial's config,
``data_root=""`` means "the driver resolved no root", :meth:`Benchmark.resolve_root`, so the
constructor accepts it and only :meth:`MultiMnist.check_data` — the driver's pre-flight —
refuses an explicitly empty root.)

Protocol: Adam (lr 1e-3, our choice: the official config for MultiMNIST is not published),
batch 256, lr × 0.85 at the start of every 10th epoch (official script), 10 epochs by default
(the official script runs 100). No published single-task baseline exists, so metrics carry no
baseline and the default objective is the validation mean accuracy.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

from mtl_tune.benchmarks.base import (Benchmark, ConfigError, DataError, Setting, Setup, data_check_level,
                                     warn_test_only)
from mtl_tune.metrics import MetricSpec

if TYPE_CHECKING:
    import numpy as np
    import torch

# The LeNet and the data code (torch, NumPy) are imported where a run or the data check needs them:
# the class's settings, metrics and options are what a search validates before it starts, in well
# under a second (tests/test_registry_names.py). The model's names stay importable from here.
_MODEL_NAMES = ("MNIST_MEAN", "MNIST_STD", "LeNetTrunk", "DigitHead", "MultiLeNet", "normalise", "accuracy_and_nll")
SOURCES = ("mnist", "sklearn_digits")


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from mtl_tune.benchmarks import _multi_mnist_model

        return getattr(_multi_mnist_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def step_decay(epoch: int, factor: float, every: int) -> float:
    """lr multiplier for epoch index ``epoch``: factor^⌊(epoch+1)/every⌋.

    The official script multiplies the lr by ``factor`` at the start of epoch e whenever
    (e + 1) % every == 0 (e = 9, 19, …); with LambdaLR stepped after each epoch this is it.
    """
    return factor ** ((epoch + 1) // every)


SKLEARN_DIGITS = 1797  # the images of scikit-learn's bundled digits
MNIST_TRAIN, MNIST_TEST = 60000, 10000  # the release's train-* and t10k-* files


def _split_fractions(source: str, val_fraction: float, test_fraction: float) -> tuple[float, ...]:
    """MNIST: (train, val) of its training file (test = its test file); sklearn: (train, val, test)."""
    if source == "mnist":
        return 1 - val_fraction, val_fraction
    rest = 1.0 - test_fraction
    return rest * (1 - val_fraction), rest * val_fraction, test_fraction


@functools.lru_cache(maxsize=4)
def _build_arrays(source: str, root: str | None, data_seed: int, val_fraction: float, test_fraction: float,
                  pairs_per_image: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (n, 28, 28), labels int64 (n, 2))}; cached per process."""
    import numpy as np

    from mtl_tune.benchmarks import _multi_mnist_data as data

    rng = np.random.default_rng(data_seed)
    fractions = _split_fractions(source, val_fraction, test_fraction)
    if source == "mnist":
        assert root is not None
        train_pool, val_pool = data.split_pool(data.load_mnist_split(root, "train"), fractions, rng)
        test_pool = data.load_mnist_split(root, "test")
    else:
        train_pool, val_pool, test_pool = data.split_pool(data.load_sklearn_digits(), fractions, rng)
    return {split: data.make_pairs(pool, pairs_per_image, rng)
            for split, pool in (("train", train_pool), ("val", val_pool), ("test", test_pool))}


class MultiMnist(Benchmark):
    name = "multi_mnist"
    description = ("MultiMNIST (Sener & Koltun 2018): left/right digit of two overlapping digits, LeNet; "
                   "source 'mnist' (MNIST idx files under --data-root) or 'sklearn_digits' (offline default)")
    tasks = ("left", "right")
    metrics = (
        MetricSpec("left/acc", "left", higher_is_better=True, primary=True),
        MetricSpec("right/acc", "right", higher_is_better=True, primary=True),
        MetricSpec("left/loss", "left", higher_is_better=False),
        MetricSpec("right/loss", "right", higher_is_better=False),
        MetricSpec("mean_acc", "all", higher_is_better=True),  # the default search objective
    )
    #: hypervolume reference (no STL baselines to derive it from): accuracy 0, and for the losses ln 10 ≈ 2.303,
    #: the cross-entropy of a uniform guess over the ten digits — a model no better than chance adds nothing
    reference_points = {"left/acc": 0.0, "right/acc": 0.0, "mean_acc": 0.0,
                        "left/loss": 2.302585092994046, "right/loss": 2.302585092994046}
    defaults = {"epochs": 10, "lr": 1e-3, "batch_size": 256, "lr_decay": 0.85, "lr_decay_every": 10,
                "dropout": 0.0, "data_seed": 0, "val_fraction": 1 / 6, "test_fraction": 0.2,
                "pairs_per_image": None, "eval_batch_size": 2000}
    settings = {
        "batch_size": Setting("int", low=1), "eval_batch_size": Setting("int", low=1),
        "lr_decay": Setting("float", low=0, high=1, open_low=True, help="lr factor every lr_decay_every epochs"),
        "lr_decay_every": Setting("int", low=1),
        "dropout": Setting("float", low=0, high=1, open_high=True),
        "data_seed": Setting("int", low=0), "val_fraction": Setting("float", low=0, high=1, open_high=True),
        "test_fraction": Setting("float", low=0, high=1, open_low=True, open_high=True),
        "pairs_per_image": Setting("int", low=1, nullable=True, help="pairs per image (none: 1 for mnist, 10 else)"),
    }
    data_env = "MTL_TUNE_MNIST_ROOT"

    def __init__(self, data_root: str | None = None, synthetic: bool = False, source: str | None = None,
                 data_check: str = "headers", **options: Any) -> None:
        super().__init__(data_root=data_root, synthetic=synthetic, **options)
        self.data_check = data_check_level(data_check)  # the idx files are always read in full
        self.root = self.resolve_root(data_root)  # absolute: Ray trials chdir
        # given, but empty: see the module docstring (a trial's "" = resolved to none on the driver)
        self._root_given_empty = data_root is not None and not str(data_root).strip() and source is None
        if source is None:
            source = "mnist" if self.root else "sklearn_digits"
        if source not in SOURCES:
            raise ValueError(f"multi_mnist: source must be one of {SOURCES}, got {source!r}")
        if source == "mnist" and self.root is None and not synthetic:
            from mtl_tune.benchmarks import _multi_mnist_data as data

            raise DataError(f"multi_mnist: source 'mnist' needs a data root (--data-root or ${self.data_env}) "
                            f"holding MNIST/raw/; {data.MNIST_HINT}")
        self.source = source

    def info(self) -> dict[str, Any]:
        """Which data this benchmark uses (for the trainer to store with the results)."""
        return {"data_source": "synthetic" if self.synthetic else self.source,
                "data_root": self.root if self.source == "mnist" else None}

    def check_data(self) -> None:
        """Validate the MNIST idx files (magic, shapes, sizes, label range); sklearn needs no data.
        An explicitly empty data root is refused (the module docstring)."""
        from mtl_tune.benchmarks import _multi_mnist_data as data

        if self._root_given_empty and not self.synthetic:
            raise DataError(f"multi_mnist: the data root given is empty ({self.data_root!r}; an unset shell "
                            f"variable?); pass the folder holding MNIST/raw/ (the idx files), or leave --data-root "
                            f"out (and ${self.data_env} unset) for the offline sklearn_digits source, or pass "
                            f"benchmark_options={{source: sklearn_digits}}; {data.MNIST_HINT}")
        if self.synthetic or self.source != "mnist":
            return

        counts = {split: len(data.load_mnist_split(self.root, split).labels)  # type: ignore[arg-type]
                  for split in data.MNIST_FILES}
        if (counts["train"], counts["test"]) == (MNIST_TEST, MNIST_TRAIN):
            raise DataError(f"multi_mnist: {data.mnist_raw_dir(self.root)}: the train-* files hold {MNIST_TEST} "
                            f"images and the t10k-* files {MNIST_TRAIN}: swapped? (the release: train {MNIST_TRAIN}, "
                            f"t10k {MNIST_TEST}); {data.MNIST_HINT}")
        if (counts["train"], counts["test"]) != (MNIST_TRAIN, MNIST_TEST):
            warnings.warn(f"multi_mnist: {data.mnist_raw_dir(self.root)} holds {counts['train']} training and "
                          f"{counts['test']} test images; the release has {MNIST_TRAIN} and {MNIST_TEST} (a subset or "
                          "your own files: results are not comparable with the papers')", UserWarning, stacklevel=2)

    def check_config(self, config: Any, flag: str = "--config") -> None:
        """The schema, then the split sizes: fractions that leave no training image (or nothing to
        evaluate) failed every trial after Ray had started."""
        super().check_config(config, flag)
        if self.synthetic:
            return
        merged = {**self.defaults, **config}
        vf, tf = float(merged["val_fraction"]), float(merged["test_fraction"])
        from mtl_tune.benchmarks import _multi_mnist_data as data

        if self.source == "mnist":
            try:
                n, n_test = data.mnist_count(self.root, "train"), data.mnist_count(self.root, "test")
            except DataError:
                return  # the data check names the file
        else:
            n, n_test = SKLEARN_DIGITS, 0
        sizes = [stop - start for start, stop in data.split_bounds(n, _split_fractions(self.source, vf, tf))]
        if self.source == "mnist":
            sizes.append(n_test)
        if sizes[0] == 0 or not any(sizes[1:]):
            raise ConfigError(f"{flag} val_fraction={vf:g}, test_fraction={tf:g}: the {n} images of the "
                              f"{self.source} source split into train/val/test = {'/'.join(map(str, sizes))}; "
                              "training needs at least one image and evaluation one split with images")

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return {}

    def make_scheduler(self, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        rule = functools.partial(step_decay, factor=float(config.get("lr_decay", 0.85)),
                                 every=int(config.get("lr_decay_every", 10)))
        import torch

        return torch.optim.lr_scheduler.LambdaLR(optimizer, rule)

    def default_objective(self) -> tuple[str, str]:
        return "val/mean_acc", "max"

    # ------------------------------------------------------------------ build
    def _arrays(self, config: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        ppi = config.get("pairs_per_image")
        ppi = int(ppi) if ppi is not None else (1 if self.source == "mnist" else 10)
        if self.synthetic:
            return self._synthetic_arrays(config, ppi)
        return _build_arrays(self.source, self.root, int(config.get("data_seed", 0)),
                             float(config.get("val_fraction", 1 / 6)), float(config.get("test_fraction", 0.2)), ppi)

    def _synthetic_arrays(self, config: dict[str, Any], ppi: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Random images/labels with the sizes the real source would give (throughput only)."""
        import numpy as np

        vf, tf = float(config.get("val_fraction", 1 / 6)), float(config.get("test_fraction", 0.2))
        if self.source == "mnist":
            n_val = int(round(60000 * vf))
            sizes = {"train": 60000 - n_val, "val": n_val, "test": 10000}
        else:
            n_train = int(round(1797 * (1 - tf) * (1 - vf)))
            n_val = int(round(1797 * (1 - tf) * vf))
            sizes = {"train": n_train, "val": n_val, "test": 1797 - n_train - n_val}
        rng = np.random.default_rng(int(config.get("data_seed", 0)))
        return {s: (rng.integers(0, 256, (n * ppi, 28, 28), dtype=np.uint8), rng.integers(0, 10, (n * ppi, 2)))
                for s, n in sizes.items()}

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        import numpy as np
        import torch
        import torch.nn.functional as F
        from torch import Tensor

        from mtl_tune.balancers.base import ForwardOutput
        from mtl_tune.benchmarks._multi_mnist_model import MultiLeNet, accuracy_and_nll, normalise

        config = {**self.defaults, **config}
        arrays = self._arrays(config)
        if not len(arrays["train"][0]):  # (check_config refuses it before a search; here for the API)
            raise ConfigError(f"{self.name}: val_fraction={config.get('val_fraction')} and test_fraction="
                              f"{config.get('test_fraction')} leave no training image")
        model = MultiLeNet(self.n_tasks, float(config.get("dropout", 0.0))).to(device)
        tensors = {s: (torch.from_numpy(x).to(device), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device))
                   for s, (x, y) in arrays.items()}
        batch_size, seed = int(config["batch_size"]), int(config.get("seed", 0))
        eval_bs = int(config.get("eval_batch_size", 2000))

        def train_batches(epoch: int):
            x, y = tensors["train"]
            # own generator: the shuffle must not depend on how much RNG the balancer consumed
            gen = torch.Generator().manual_seed(seed * 100003 + epoch)
            perm = torch.randperm(x.shape[0], generator=gen).to(device)
            for s in range(0, x.shape[0], batch_size):
                idx = perm[s:s + batch_size]
                yield x[idx], y[idx]

        def forward(batch: tuple[Tensor, Tensor]) -> ForwardOutput:
            images, labels = batch
            logits, z = model(normalise(images))
            losses = torch.stack([F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits)])
            return ForwardOutput(losses=losses, representation=z)

        # a split with no images (val_fraction = 0: the papers' protocol) is not evaluated, as on the
        # dense benchmarks; selecting on test/ metrics then leaks the test set, which the warning says
        eval_splits = tuple(s for s in ("val", "test") if tensors[s][0].shape[0] > 0)
        if "val" not in eval_splits:
            warn_test_only(self.name, "the validation split is empty (val_fraction=0, or too few images for it) — "
                                      "evaluating only the test split")

        @torch.no_grad()
        def evaluate(split: str) -> dict[str, float]:
            if split not in eval_splits:
                raise ValueError(f"{self.name}: split {split!r} is not evaluated in this run (it has no images "
                                 f"or no such name); this run evaluates {list(eval_splits)}")
            x, y = tensors[split]
            was_training = model.training
            model.eval()
            outs: list[list[Tensor]] = [[] for _ in self.tasks]
            for s in range(0, x.shape[0], eval_bs):
                logits, _ = model(normalise(x[s:s + eval_bs]))
                for k, lg in enumerate(logits):
                    outs[k].append(lg)
            model.train(was_training)
            result: dict[str, float] = {}
            for k, task in enumerate(self.tasks):
                acc, nll = accuracy_and_nll(torch.cat(outs[k]), y[:, k])
                result[f"{task}/acc"], result[f"{task}/loss"] = acc, nll
            result["mean_acc"] = float(np.mean([result[f"{t}/acc"] for t in self.tasks]))
            return result

        extras = {**self.info(), **{f"n_{s}": int(t[0].shape[0]) for s, t in tensors.items()},
                  "test_leak": "val" not in eval_splits}
        return Setup(model=model, shared_parameters=list(model.trunk.parameters()),
                     task_parameters=[list(h.parameters()) for h in model.heads],
                     train_batches=train_batches, forward=forward, evaluate=evaluate,
                     eval_splits=eval_splits, extras=extras)
