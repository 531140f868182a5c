"""``toy`` — the two-task toy problem of Nash-MTL / FAMO / Aligned-MTL (docs/benchmarks.md#toy).

x ∈ R² is the only (shared) parameter; no data. With ε = 5e-6,
c₁ = max(tanh(x₂/2), 0), c₂ = max(tanh(−x₂/2), 0):

    f₁ = c₁ (log max(|½(−x₁ − 7) − tanh(−x₂)|, ε) + 6) + c₂ (((−x₁ + 7)² + 0.1(−x₂ − 8)²)/10 − 20)
    f₂ = c₁ (log max(|½(−x₁ + 3) + tanh(−x₂) + 2|, ε) + 6) + c₂ (((−x₁ − 7)² + 0.1(−x₂ − 8)²)/10 − 20)

Reported losses are L₁ = scale·f₁ and L₂ = f₂ (Nash-MTL/FAMO convention, ``scale`` = 0.1).
The five initial points of the papers are :data:`INITS`. The true Pareto set is
{(x₁, x₂*(x₁)) : x₁ ∈ [−7, 7]} with x₂* from a 1-D minimisation (docs/benchmarks.md#toy-pareto-set-and-front);
:func:`pareto_front` returns it densely and ``pareto_distance`` measures how far a point
is from it in objective space.

Search protocol: one trial = one start, Adam on x with ``steps_per_epoch`` steps per epoch.
The start follows the seed: ``INITS[init]`` plus an isotropic Gaussian offset with standard
deviation ``init_jitter`` (default 0.5, in x units) drawn from ``numpy.random.default_rng(seed)``,
so ``--seeds`` re-runs start from different nearby points and their spread measures how
sensitive a method is to where it starts. ``init_jitter=0`` gives the papers' exact start
(the trajectory gallery's fixed five); the benchmark is then deterministic and says so
(:meth:`Toy.seed_changes_results`). The papers use lr 1e-3 for 35 000 steps;
the search default (lr 1e-2, 5 × 1 000 steps) covers the same distance ten times faster.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any

from mtl_tune.benchmarks.base import Benchmark, ConfigError, Setting, Setup
from mtl_tune.metrics import MetricSpec

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import Tensor

# NumPy, SciPy and torch are imported inside the functions that compute: the class itself (its
# settings, metrics and defaults) is what a search validates before it starts, in well under a
# second (tests/test_registry_names.py); ``ToyPoint`` is built on first use (``__getattr__``).

LOWER = 5e-6
INITS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def _gate(t: Tensor) -> Tensor:
    """max(t, 0) whose derivative at t = 0 is 1, as ``torch.clamp`` had in the papers' code
    (current PyTorch gives 0 there, which would pin the init (0, 0) forever; the papers'
    gradient at (0, 0) is (0, 10.856) for both tasks, docs/benchmarks.md#toy-losses)."""
    import torch

    return torch.where(t >= 0, t, torch.zeros_like(t))


def toy_objectives(x: Tensor, scale: float = 0.1) -> Tensor:
    """Scaled losses (L₁, L₂) for points ``x`` of shape (..., 2); returns shape (..., 2)."""
    import torch

    x1, x2 = x[..., 0], x[..., 1]
    c1 = _gate(torch.tanh(x2 / 2))
    c2 = _gate(torch.tanh(-x2 / 2))
    g1 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 - 7) - torch.tanh(-x2)), min=LOWER)) + 6
    g2 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 + 3) + torch.tanh(-x2) + 2), min=LOWER)) + 6
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f1 = c1 * g1 + c2 * q1
    f2 = c1 * g2 + c2 * q2
    return torch.stack([scale * f1, f2], dim=-1)


def _pareto_x2(x1: float) -> float:
    import numpy as np
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda x2: np.tanh(-x2 / 2) * (0.01 * (x2 + 8) ** 2 - 15.1 - 0.1 * x1 ** 2),
                          bounds=(-12.0, -4.0), method="bounded", options={"xatol": 1e-10})
    return float(res.x)


@lru_cache(maxsize=8)
def _pareto_set(n: int) -> np.ndarray:
    import numpy as np

    x1 = np.linspace(-7.0, 7.0, n)
    return np.stack([x1, np.array([_pareto_x2(v) for v in x1])], axis=1)


def pareto_set(n: int = 1001) -> np.ndarray:
    """(n, 2) points (x₁, x₂*(x₁)) of the exact Pareto set, x₁ ∈ [−7, 7]."""
    return _pareto_set(n).copy()


def pareto_front(scale: float = 0.1, n: int = 1001) -> np.ndarray:
    """(n, 2) scaled objective values (L₁, L₂) along the exact Pareto set."""
    import torch

    ps = torch.from_numpy(_pareto_set(n))
    return toy_objectives(ps, scale).numpy()


def pareto_distance(losses: np.ndarray, scale: float = 0.1, n: int = 2001) -> np.ndarray:
    """Euclidean distance in objective space from each row of ``losses`` (…, 2) to the front.

    Points that dominate no front point and lie beyond it cannot exist (the front is the
    boundary of the attainable set), so the distance is ≥ 0 and 0 exactly on the front.
    """
    import numpy as np

    front = pareto_front(scale, n)
    pts = np.asarray(losses, dtype=np.float64).reshape(-1, 2)
    d = np.sqrt(((pts[:, None, :] - front[None, :, :]) ** 2).sum(-1)).min(axis=1)
    return d.reshape(np.asarray(losses).shape[:-1])


def start_point(init: int, seed: int, jitter: float) -> tuple[float, float]:
    """The search's start: the papers' ``INITS[init]`` + N(0, jitter² I) drawn from ``seed``."""
    import numpy as np

    if jitter < 0 or not np.isfinite(jitter):
        raise ValueError(f"toy: init_jitter must be a finite number >= 0, got {jitter}")
    start = np.asarray(INITS[init], dtype=np.float64)
    if jitter > 0:
        start = start + np.random.default_rng(seed).normal(0.0, jitter, size=2)
    return float(start[0]), float(start[1])


@cache
def _toy_point_class() -> type:
    import torch
    from torch import nn

    class ToyPoint(nn.Module):
        """The decision variable x as a module, so the generic trainer can drive it."""

        def __init__(self, init: tuple[float, float]) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.tensor(init, dtype=torch.float64))

    ToyPoint.__module__, ToyPoint.__qualname__ = __name__, "ToyPoint"  # pickles as toy.ToyPoint
    return ToyPoint


def __getattr__(name: str) -> Any:
    if name == "ToyPoint":  # a torch module: built when first asked for
        return _toy_point_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Toy(Benchmark):
    data_parallel = "its training is one point moved by the balancer, with no data to split between workers"
    name = "toy"
    description = "Nash-MTL's two-task toy problem in R² (no data; runs anywhere)"
    tasks = ("task1", "task2")
    metrics = (
        MetricSpec("loss1", "task1", higher_is_better=False, primary=True),
        MetricSpec("loss2", "task2", higher_is_better=False, primary=True),
        MetricSpec("pareto_distance", "all", higher_is_better=False),
    )
    defaults = {"epochs": 5, "lr": 1e-2, "steps_per_epoch": 1000, "scale": 0.1, "init": 0, "init_jitter": 0.5}
    settings = {
        "steps_per_epoch": Setting("int", low=1, help="Adam steps per epoch"),
        "scale": Setting("float", low=0, open_low=True, help="factor of the first loss"),
        "init": Setting("int", low=0, high=len(INITS) - 1, help="index of the initial point"),
        "init_jitter": Setting("float", low=0,
                               help="standard deviation of the seed-dependent Gaussian offset of the start"),
    }

    #: every point of the true front beats (0, 0) (front L₁ ∈ [−2.0, −0.04], L₂ ∈ [−20.0, −0.4] at
    #: scale 0.1); a Pareto distance of 10 is far outside the region the inits start in
    reference_points = {"loss1": 0.0, "loss2": 0.0, "pareto_distance": 10.0}

    def default_objective(self) -> tuple[str, str]:
        return "val/pareto_distance", "min"

    @classmethod
    def known_front(cls, config: Mapping[str, Any] | None = None) -> tuple[tuple[str, ...], np.ndarray]:
        scale = float((config or {}).get("scale", cls.defaults["scale"]))
        return ("loss1", "loss2"), pareto_front(scale)

    def seed_changes_results(self, config: dict[str, Any]) -> bool:
        # x, the only parameter, starts where init + jitter say; nothing else is random
        return float(config.get("init_jitter", self.defaults["init_jitter"])) > 0

    def balancer_options(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        scale = float((config or {}).get("scale", self.defaults["scale"]))
        # methods that take log(ℓ − ℓ*) (FAMO, SI, GLS, DB-MTL, ...) need a floor below the toy's losses,
        # which are negative (min ≈ −20): FAMO's toy value
        return {"min_losses": [-21.0 * scale, -21.0]}

    def build(self, config: dict[str, Any], device: torch.device) -> Setup:
        import torch

        from mtl_tune.balancers.base import ForwardOutput

        init_index = int(config.get("init", 0))
        if not 0 <= init_index < len(INITS):
            raise ConfigError(f"toy: init must be an index in [0, {len(INITS) - 1}], got {init_index}")
        scale = float(config.get("scale", 0.1))
        steps = int(config.get("steps_per_epoch", 1000))
        model = _toy_point_class()(start_point(init_index, int(config.get("seed", 0)),
                                     float(config.get("init_jitter", self.defaults["init_jitter"])))).to(device)

        def forward(_batch: Any) -> ForwardOutput:
            return ForwardOutput(losses=toy_objectives(model.x, scale))

        def evaluate(_split: str) -> dict[str, float]:
            with torch.no_grad():
                losses = toy_objectives(model.x, scale).cpu().numpy()
            x = model.x.detach().cpu().numpy()
            return {"loss1": float(losses[0]), "loss2": float(losses[1]),
                    "pareto_distance": float(pareto_distance(losses, scale)), "x1": float(x[0]), "x2": float(x[1])}

        return Setup(model=model, shared_parameters=[model.x], task_parameters=[[], []],
                     train_batches=lambda epoch: range(steps), forward=forward, evaluate=evaluate,
                     eval_splits=("val",))
