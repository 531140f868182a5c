"""Shared pieces of the toy trajectory engine: run specs, results, balancer construction.

See :mod:`toy.engine` for the protocol and the two execution paths.
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers.base import Balancer, EpochInfo
from mtl_tune.benchmarks.toy import INITS, Toy
from mtl_tune.jacobian import JacobianEngine
from mtl_tune.registry import balancer_class
from .landscape import gap_scores

#: methods whose weights depend neither on the losses nor on the step: one call serves all inits.
BATCHABLE = frozenset({"ls"})

#: methods that cannot run on a problem without task heads, and why (listed in the table).
TOY_SKIPS = {
    "consmtl": "needs task-specific heads (its lower level trains them); the toy has none. Its shared update "
               "alone is FairGrad with alpha = 2: the fairgrad panel (fairgrad:alpha=2)",
}


@dataclass(frozen=True)
class MethodSpec:
    """One method variant to run: registry ``name``, constructor ``hparams``, ``iters`` steps."""

    label: str
    name: str
    hparams: dict[str, Any]
    iters: int


@dataclass(frozen=True)
class EngineConfig:
    """Protocol knobs shared by every run (defaults = the papers': docs/benchmarks.md#toy-protocol).

    ``shift``: feed methods without a ``min_losses`` argument L − (−21s, −21) (no gradient
    changes; loss-value methods need positive losses). ``epoch_steps``: steps between
    ``on_epoch_end`` calls. ``engine``: ``"fast"`` (batched NumPy kernels of :mod:`toy.kernels`
    for the methods that have one, the lockstep path for the others), ``"lockstep"`` (every
    method through the public balancer API, fast-ish) or ``"reference"`` (``train_step`` with
    autograd through the real forward for every method). ``starts``: start points that replace
    the papers' :data:`~mtl_tune.benchmarks.toy.INITS` (init index i is then ``starts[i]``).
    """

    scale: float = 0.1
    lr: float = 1e-3
    method_params_lr: float = 0.025
    epoch_steps: int = 1000
    shift: bool = True
    seed: int = 0
    engine: str = "fast"  # or "lockstep" / "reference"
    starts: tuple[tuple[float, float], ...] | None = None


def start_point(cfg: EngineConfig, index: int) -> tuple[float, float]:
    """Start point number ``index``: the papers' init, or ``cfg.starts[index]`` when given."""
    points = INITS if cfg.starts is None else cfg.starts
    return tuple(float(v) for v in points[index])  # type: ignore[return-value]


@dataclass
class RunResult:
    """One (method, init) run. ``traj`` has ``steps_done + 1`` rows (init first)."""

    label: str
    name: str
    init_index: int
    status: str            # "ok" | "failed" | "skipped"
    reason: str = ""
    traj: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    iters: int = 0
    path: str = ""
    solver_failures: int | None = None
    final_weights: list[float] | None = None
    warnings: int = 0
    first_warning: str = ""
    seconds: float = 0.0      # wall time of the run (its share of a lockstep unit)
    x0: tuple[float, float] | None = None  # start point (None: the papers' INITS[init_index])
    cpu_seconds: float = 0.0  # process CPU time, the same share (robust to a loaded machine)
    # (tol, the first iteration within tol of the sampled front) and the losses at the end (None: not
    # measured yet; toy.report.measure_runs, which the worker processes call)
    reached: tuple[float, int | None] | None = None
    end_loss: np.ndarray | None = None


def loss_floor(scale: float) -> np.ndarray:
    """(−21·s, −21): FAMO's toy ``min_losses``, below every attainable loss (min ≈ −19.99)."""
    return np.asarray(Toy().balancer_options({"scale": scale})["min_losses"], dtype=np.float64)


def accepts(cls: type, arg: str) -> bool:
    """Whether ``cls(...)`` takes keyword ``arg`` (named or through ``**kw``)."""
    params = inspect.signature(cls.__init__).parameters
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def protocol_hparams(name: str, scale: float) -> dict[str, Any]:
    """The papers' toy settings that differ from a method's class defaults.

    ``min_losses`` = (−21·s, −21) for every method that takes it (FAMO's toy trainer calls
    ``set_min_losses`` with it; SI's log needs the same shift), and FAMO's γ = 0 (its toy
    ``run.sh``: the objective does not change, so no decay of the logits).
    """
    cls = balancer_class(name)
    out: dict[str, Any] = {}
    if "min_losses" in inspect.signature(cls.__init__).parameters:
        out["min_losses"] = loss_floor(scale).tolist()
    if name == "famo":
        out["gamma"] = 0.0  # FAMO run.sh for the toy: "objective is not changing" → no decay
    return out


class KnownJacobian(JacobianEngine):
    """A Jacobian engine that returns the already-computed J for the current proxy step.

    Any other request (other losses, other parameters) goes to ordinary autograd on the
    linearised graph, which is exact too — this is a shortcut, never a different answer.
    """

    def __init__(self) -> None:
        super().__init__("loop")
        self._losses: Tensor | None = None
        self._param: Tensor | None = None
        self._jac: Tensor | None = None

    def prime(self, losses: Tensor, param: Tensor, jac: Tensor) -> None:
        self._losses, self._param, self._jac = losses, param, jac

    def jacobian(self, losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False,
                 reuse: bool = False) -> Tensor:
        params = list(params)
        if losses is self._losses and len(params) == 1 and params[0] is self._param:
            return self._jac.clone()
        return super().jacobian(losses, params, retain_graph, reuse=reuse)


def make_balancer(spec: MethodSpec, engine: JacobianEngine | None = None) -> Balancer:
    """``registry`` class of ``spec.name`` for 2 tasks with ``spec.hparams`` (and ``engine`` if it takes one)."""
    cls = balancer_class(spec.name)
    kw = dict(spec.hparams)
    if engine is not None and accepts(cls, "jacobian_engine"):
        kw["jacobian_engine"] = engine
    return cls(2, **kw)


def optimizers(x: Tensor, balancers: Sequence[Balancer], cfg: EngineConfig) -> list[torch.optim.Optimizer]:
    """Adam(lr) on x, plus :func:`balancer_optimizer` on the balancers' own parameters if they have any."""
    own = balancer_optimizer(balancers, cfg)
    return [torch.optim.Adam([x], lr=cfg.lr)] + ([own] if own is not None else [])


def balancer_optimizer(balancers: Sequence[Balancer], cfg: EngineConfig) -> torch.optim.Optimizer | None:
    """Adam on the balancers' own ``param_groups()`` (UW's ``lr``; a group without one gets
    ``method_params_lr``, the FAMO-family second group), or None when they have no parameters.
    The toy's generic kernel steps its rows' parameters with the same optimizer."""
    groups: list[dict[str, Any]] = [g for b in balancers for g in b.param_groups()]
    return torch.optim.Adam(groups, lr=cfg.method_params_lr) if groups else None


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warn_info(caught: list[warnings.WarningMessage], res: RunResult) -> None:
    """The run's warnings in its table row. ResourceWarnings are left out: they come from the garbage
    collector closing something an earlier piece of code left open (a file a finished Ray run held,
    say), whenever it happens to run — never from the method."""
    own = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    res.warnings = len(own)
    res.first_warning = str(own[0].message)[:300] if own else ""


def extras_info(info: Any, res: RunResult) -> None:
    fails = info.extras.get("solver_failures") if info is not None else None
    if fails is not None:
        res.solver_failures = int(fails)
    if info is not None:
        res.final_weights = [float(v) for v in info.weights.detach().cpu().double().reshape(-1).tolist()]


def epoch_end(balancer: Balancer, epoch: int, mean_losses: np.ndarray, shift: np.ndarray, scale: float) -> None:
    """``on_epoch_end`` with the epoch's mean (shifted) losses and the gap scores of the raw ones."""
    balancer.on_epoch_end(EpochInfo(epoch=epoch, train_losses=torch.from_numpy(mean_losses - shift),
                                    scores=torch.from_numpy(gap_scores(mean_losses, scale))))
