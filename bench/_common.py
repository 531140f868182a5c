"""Shared pieces of the ``bench/`` scripts (a private helper module, imported by path).

* :class:`SyntheticMLP` — the default CPU workload: a ReLU MLP trunk and K small regression
  heads on one fixed random batch, sized so that one step takes a few milliseconds and
  Python-side overhead (solvers, bookkeeping) is visible.
* :func:`load_workload` — that MLP, or a registered benchmark (usually ``--synthetic``), built
  with the trainer's defaults, plus ONE training batch moved to the device once.
* :class:`Runner` — one method's balancer, its own optimizer and its own copy of the model
  state. All runners share the single model object; :meth:`Runner.swap_in` / ``swap_out``
  copy the method's parameters and buffers in and out *outside* the timed region, so each
  method trains its own trajectory on the same model and batch.
* :func:`interleaved` — warm-up, then repetitions in which every entry runs once, in a
  freshly shuffled order; a drift in machine load hits every entry alike.
* :func:`markdown_table` and :func:`context_lines` — the printed table and its caption.
"""

from __future__ import annotations

import os

# scikit-learn's OpenMP busy-waits by default and slows torch's threads ~20x on 2 cores
# (see tests/conftest.py); it must be set before torch or sklearn is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

# the bench scripts run from a checkout: the repository's top-level ``toy/`` package (not
# installed into site-packages, see pyproject.toml) must be importable whatever the cwd
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(1, _REPO_ROOT)

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mtl_tune.balancers.base import EpochInfo, ForwardOutput  # noqa: E402
from mtl_tune.benchmarks.base import Benchmark, Setup  # noqa: E402
from mtl_tune.jacobian import JacobianEngine  # noqa: E402
from mtl_tune.registry import available_balancers, balancer_class, get_benchmark, imposed_options  # noqa: E402
from mtl_tune.training.loop import resolve_device  # noqa: E402

MLP = "mlp"


# ---------------------------------------------------------------------------- workloads
class MLPModel(nn.Module):
    """Trunk: ``depth`` × (Linear(width) + ReLU) → z; head k: Linear(width, head) + ReLU + Linear(head, 1)."""

    def __init__(self, in_dim: int, width: int, depth: int, n_tasks: int, head: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(width, head), nn.ReLU(), nn.Linear(head, 1))
                                   for _ in range(n_tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return torch.cat([h(z) for h in self.heads], dim=1), z


class SyntheticMLP(Benchmark):
    """K regression tasks (MSE against fixed random targets) on a synthetic MLP; no data.

    Not registered (the registry only scans ``mtl_tune/benchmarks``): a timing workload only.
    """

    name = MLP
    description = "bench-only MLP trunk + K heads on random data"
    defaults = {"lr": 1e-3, "batch_size": 256, "tasks": 3, "in_dim": 64, "width": 256, "depth": 3, "head": 64}

    def __init__(self, n_tasks: int = 3, **options: Any) -> None:
        super().__init__(synthetic=True, **options)
        self.tasks = tuple(f"t{i}" for i in range(n_tasks))  # instance attribute: K is a flag here

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        cfg = {**self.defaults, **config}
        k, bs = len(self.tasks), int(cfg["batch_size"])
        model = MLPModel(int(cfg["in_dim"]), int(cfg["width"]), int(cfg["depth"]), k, int(cfg["head"])).to(device)
        gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        x, y = torch.randn(bs, int(cfg["in_dim"]), generator=gen), torch.randn(bs, k, generator=gen)
        batch = (x.to(device), y.to(device))

        def forward(b: tuple[Tensor, Tensor]) -> ForwardOutput:
            pred, z = model(b[0])
            # targets ~ N(0, 1) and an untrained model: every loss is ≈ 1, positive (DWA, FAMO, GO4Align need it)
            return ForwardOutput(losses=((pred - b[1]) ** 2).mean(dim=0), representation=z)

        return Setup(model=model, shared_parameters=list(model.trunk.parameters()),
                     task_parameters=[list(h.parameters()) for h in model.heads],
                     train_batches=lambda epoch: iter([batch]), forward=forward,
                     evaluate=lambda split: {}, eval_splits=("val",))


@dataclass
class Workload:
    """A built model, its parameter split and one batch on the device."""

    bench: Benchmark
    config: dict[str, Any]
    setup: Setup
    batch: Any
    device: torch.device
    label: str

    @property
    def n_tasks(self) -> int:
        return self.bench.n_tasks

    def forward(self) -> ForwardOutput:
        return self.setup.forward(self.batch)


def parse_kv(items: Sequence[str] | None) -> dict[str, Any]:
    """``["a=1", "b=[2, 3]"]`` → ``{"a": 1, "b": [2, 3]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch once, so the timed steps do not pay the copy."""
    if isinstance(batch, Tensor) or (hasattr(batch, "to") and not isinstance(batch, (dict, list, tuple))):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def add_workload_args(p: argparse.ArgumentParser, batch_size: int | None = None, width: int = 256) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--benchmark", default=MLP, help=f"'{MLP}' (bench-only MLP, default) or a registered benchmark")
    g.add_argument("--synthetic", action="store_true", help="random tensors of the benchmark's real shapes")
    g.add_argument("--option", action="append", metavar="K=V", help="benchmark constructor option (repeatable)")
    g.add_argument("--config", action="append", metavar="K=V", help="trainer/build setting, e.g. batch_size=2")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--tasks", type=int, default=3, help=f"K for '{MLP}'")
    g.add_argument("--in-dim", type=int, default=64, help=f"input size for '{MLP}'")
    g.add_argument("--width", type=int, default=width, help=f"trunk width for '{MLP}'")
    g.add_argument("--depth", type=int, default=3, help=f"trunk layers for '{MLP}'")
    g.add_argument("--head", type=int, default=64, help=f"head hidden size for '{MLP}'")


def load_workload(args: argparse.Namespace) -> Workload:
    """Build the workload the flags describe (trainer defaults + ``--config`` overrides)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    overrides = parse_kv(args.config)
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.benchmark == MLP:
        bench: Benchmark = SyntheticMLP(args.tasks)
        overrides.update(in_dim=args.in_dim, width=args.width, depth=args.depth, head=args.head)
    else:
        bench = get_benchmark(args.benchmark, synthetic=args.synthetic, **parse_kv(args.option))
        bench.check_data()
    config = {**bench.defaults, **overrides, "seed": args.seed, "device": str(device)}
    setup = bench.build(config, device)
    batch = to_device(next(iter(setup.train_batches(0))), device)
    n_params = sum(p.numel() for p in setup.model.parameters())
    n_shared = sum(p.numel() for p in setup.shared_parameters)
    if args.benchmark == MLP:
        label = (f"{MLP}: in {args.in_dim}, trunk {args.depth}×{args.width}, heads {args.head}, K={bench.n_tasks}, "
                 f"batch {config['batch_size']}")
    else:
        label = f"{bench.name}{' (synthetic)' if args.synthetic else ''}, K={bench.n_tasks}, batch {config.get('batch_size')}"
    label += f"; {n_params / 1e6:.3g} M params ({n_shared / 1e6:.3g} M shared)"
    return Workload(bench, config, setup, batch, device, label)


# ---------------------------------------------------------------------------- methods
def method_names(spec: str | None) -> list[str]:
    """``None``/``"all"`` → every registered method; else a comma-separated list (validated)."""
    if spec in (None, "", "all"):
        return available_balancers()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        balancer_class(n)  # raises UnknownNameError listing the valid names
    return names


def method_kind(cls: type) -> str:
    """Cost class of a method (docs/methods.md#per-step-cost): what its step is compared with."""
    if cls.name == "stgu":
        return "training-loop"
    if getattr(cls, "combine_representation", None) is not None:
        return "representation"
    if cls.needs_jacobian:
        return "gradient"
    if cls.name == "gradnorm":
        return "last-layer grads"
    return "loss"


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def copy_state(dst: dict[str, Tensor], src: dict[str, Tensor]) -> None:
    for key, value in dst.items():
        value.copy_(src[key])


@dataclass
class Runner:
    """One timed entry: a step function with its own balancer/optimizer/model state."""

    name: str
    workload: Workload
    step: Callable[[Runner], Any]
    balancer: Any = None
    optimizer: torch.optim.Optimizer | None = None
    kind: str = "floor"
    state: dict[str, Tensor] = field(default_factory=dict)
    last_losses: Tensor | None = None

    def swap_in(self) -> None:
        if self.state:
            copy_state(self.workload.setup.model.state_dict(), self.state)

    def swap_out(self) -> None:
        if self.state:
            copy_state(self.state, self.workload.setup.model.state_dict())


def make_optimizer(workload: Workload, balancer: Any = None) -> torch.optim.Optimizer:
    """The trainer's optimizer: model params + the balancer's own groups (UW's log-variances)."""
    groups: list[dict[str, Any]] = [{"params": list(workload.setup.model.parameters())}]
    if balancer is not None:  # as the trainer: a group without its own lr gets 0.025
        groups += [{"lr": 0.025, **g} for g in balancer.param_groups()]
    return workload.bench.make_optimizer(groups, workload.config)


def method_runner(workload: Workload, name: str, hparams: dict[str, Any] | None = None,
                  jacobian_mode: str = "auto") -> Runner:
    """A runner whose step is the trainer's: ``balancer.train_step`` (zero_grad, forward,
    backward, optimizer step, FAMO's post-step forward, STGU's group steps), after Auto-λ's meta step
    (``needs_meta_batch``; the workload's one batch serves as the second batch: the same cost)."""
    cls = balancer_class(name)
    options = {**imposed_options(name, workload.bench, workload.config), **(hparams or {})}
    balancer = cls(workload.n_tasks, jacobian_engine=JacobianEngine(jacobian_mode), **options)
    balancer.to(workload.device)
    setup = workload.setup

    def step(r: Runner) -> Any:
        if r.balancer.needs_meta_batch:
            r.balancer.meta_step(workload.forward, workload.forward, r.optimizer, setup.shared_parameters,
                                 setup.task_parameters)
        losses, _ = r.balancer.train_step(workload.forward, r.optimizer, setup.shared_parameters,
                                          setup.task_parameters)
        r.last_losses = losses
        return losses

    return Runner(name, workload, step, balancer, make_optimizer(workload, balancer), method_kind(cls),
                  state_copy(setup.model))


def prime_epoch_hooks(runner: Runner) -> None:
    """Give epoch-level methods what the trainer would after an epoch: mean train losses and
    per-task performance gaps (PIVRG's scores; synthetic, spread 0…10 %)."""
    if runner.balancer is None or runner.last_losses is None:
        return
    k = runner.workload.n_tasks
    losses = runner.last_losses.detach().double().cpu()
    runner.balancer.on_epoch_end(EpochInfo(epoch=0, train_losses=losses, scores=torch.linspace(0.0, 10.0, k).double()))


# ---------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """Per-entry step times (seconds) by repetition index, errors and warnings."""

    times: dict[str, dict[int, float]]
    errors: dict[str, str]
    warnings: dict[str, list[str]]

    def median(self, name: str) -> float:
        values = list(self.times.get(name, {}).values())
        return statistics.median(values) if values else float("nan")

    def iqr(self, name: str) -> float:
        values = sorted(self.times.get(name, {}).values())
        if len(values) < 4:
            return float("nan")
        q = statistics.quantiles(values, n=4)
        return q[2] - q[0]

    def ratio(self, name: str, ref: str) -> float:
        """Median over repetitions of the paired ratio t_name[r] / t_ref[r] (robust to load drift)."""
        a, b = self.times.get(name, {}), self.times.get(ref, {})
        pairs = [a[r] / b[r] for r in a if r in b and b[r] > 0]
        return statistics.median(pairs) if pairs else float("nan")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(runners: Sequence[Runner], reps: int, warmup: int, seed: int = 0,
                after_warmup: Callable[[Runner], None] | None = None, clock: str = "wall") -> Timings:
    """Run every runner once per repetition in a shuffled order; time only ``runner.step``.

    ``clock="cpu"`` measures this process's CPU time instead of wall time: on a shared,
    overloaded CPU machine (with ``--threads 1``) it does not count the time the process
    waited for a core. A runner that raises is dropped and its error recorded (never skipped).
    """
    now = CLOCKS[clock]
    rng = random.Random(seed)
    live = list(runners)
    out = Timings({r.name: {} for r in runners}, {}, {r.name: [] for r in runners})
    for rep in range(warmup + reps):
        if rep == warmup and after_warmup is not None:
            for r in live:
                after_warmup(r)
        order = live[:]
        rng.shuffle(order)
        for r in order:
            device = r.workload.device
            r.swap_in()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    sync(device)
                    start = now()
                    r.step(r)
                    sync(device)
                    elapsed = now() - start
                except Exception as err:  # noqa: BLE001 — any failure is reported in the table
                    out.errors[r.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                    live.remove(r)
                    continue
            r.swap_out()
            out.warnings[r.name].extend(str(w.message)[:120] for w in caught)
            if rep >= warmup:
                out.times[r.name][rep - warmup] = elapsed
    return out


# ---------------------------------------------------------------------------- output
def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # NaN
        return "—"
    return f"{x:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def context_lines(device: torch.device, load_at_start: str, extra: str = "", show_threads: bool = True) -> list[str]:
    """Where and when: device, torch version, threads, load (start and end), date, the exact command."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        where += f", torch threads: {torch.get_num_threads()}" if show_threads else ""
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    lines = [f"device: {where}; torch {torch.__version__}; python {platform.python_version()}",
             f"date: {_dt.datetime.now().isoformat(timespec='seconds')}; load average (1/5/15 min): {load_at_start} at start, "
             f"{load_average()} at end",
             f"command: `{cmd}`"]
    return lines + ([extra] if extra else [])


def emit(text: str, out: str | None) -> None:
    """Print the result and, with ``--out``, write it to that file too."""
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
