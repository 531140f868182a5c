"""The plain pieces every balancer is made of, apart from the :class:`~mtl_tune.balancers.base.Balancer`
class itself: the records a step and an epoch exchange with the training loop, the model's
forward output, the error type, input checks, the solver-failure counter, the choice of the
gradient path (Jacobian or Gram matrix), and small gradient helpers.

Public names are re-exported by :mod:`mtl_tune.balancers.base`, the one module a method or a
plug-in imports from; this module exists to keep that one short.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mtl_tune.jacobian import gram_of


class BalancerError(RuntimeError):
    """A balancer cannot produce a valid update (bad input or repeated solver failure)."""


@dataclass
class StepInfo:
    """What one balancer step did. ``weights`` are the effective per-task weights.

    Values stay tensors (no host sync); the trainer converts them at logging time.
    """

    weights: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochInfo:
    """Epoch-level information a training loop hands to :meth:`Balancer.on_epoch_end`.

    ``train_losses``: mean training loss per task over the epoch (K,).
    ``scores``: per-task performance gaps (K,), positive = worse than the single-task
    baseline, in percent (PIVRG's scores); ``None`` when the benchmark has no baseline.
    """

    epoch: int
    train_losses: Tensor | None = None
    scores: Tensor | None = None


@dataclass
class ForwardOutput:
    """What a model's forward pass gives a balancer: K losses and, optionally,
    the representation(s) the task heads consumed (for representation-level methods)."""

    losses: Tensor
    representation: Tensor | Sequence[Tensor] | None = None


class SolverFailureCounter:
    """Counts solver failures; warns on each and raises after ``max_consecutive``.

    The official Nash-MTL swallows solver errors and silently keeps its previous
    weights; we count them, report the count in every step's extras, warn, and stop
    the run when failures keep happening.
    """

    def __init__(self, method: str, max_consecutive: int = 20) -> None:
        self.method = method
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def success(self) -> None:
        self.consecutive = 0

    def failure(self, reason: str) -> None:
        self.total += 1
        self.consecutive += 1
        warnings.warn(f"{self.method}: solver failed ({reason}); failure #{self.total}", RuntimeWarning,
                      stacklevel=3)
        if self.consecutive >= self.max_consecutive:
            raise BalancerError(
                f"{self.method}: solver failed {self.consecutive} times in a row (last: {reason})"
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


def check_losses(losses: Tensor, n_tasks: int, method: str, finite: bool = True, graph: bool = False) -> None:
    """Type and shape check, (``graph=True``: a step's losses) that they hang on an autograd graph,
    and (``finite=True``) a non-finite-loss check; each raises BalancerError saying what is wrong.

    The finiteness check reads one K-vector on the host: gradient methods sync for their solvers
    anyway, and so do loss methods whose weights are computed on the host; ``ls`` and DWA's epoch
    mode skip it (``finite=False``) to keep their step free of host syncs, and the trainer checks
    their losses every few steps instead.
    """
    if not isinstance(losses, Tensor):
        raise BalancerError(f"{method}: losses must be one tensor of shape ({n_tasks},) (torch.stack the task "
                            f"losses), got {type(losses).__name__}")
    if graph and not losses.requires_grad:
        raise BalancerError(f"{method}: the losses are not attached to an autograd graph (computed under "
                            "torch.no_grad() or detached); backward needs the graph that produced them")
    if losses.dim() != 1 or losses.shape[0] != n_tasks:
        raise BalancerError(f"{method}: expected a loss vector of shape ({n_tasks},), got {tuple(losses.shape)}")
    if finite and not bool(torch.isfinite(losses.detach()).all()):
        raise BalancerError(f"{method}: non-finite task loss {losses.detach().tolist()}")


def _as_param_list(params: Sequence[Tensor] | Tensor | None) -> list[Tensor]:
    """The tensors of ``params``: a tensor, an iterable of tensors, or of per-task groups of them.

    TypeError for anything else — a string would recurse forever (its characters are strings), and
    ``model.named_parameters()`` gives (name, parameter) pairs, an easy mistake to make."""
    if params is None:
        return []
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"parameters must be tensors or iterables of tensors, got {type(params).__name__} "
                        f"{params!r:.60}")
    out: list[Tensor] = []
    for p in params:
        if isinstance(p, Tensor):
            out.append(p)
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            raise TypeError(f"parameters must be tensors, got a (name, parameter) pair ({p[0]!r}, ...): pass "
                            "model.parameters(), not model.named_parameters()")
        else:  # a per-task group of parameters
            out.extend(_as_param_list(p))
    return out


def power_decay(value: float, t: float, sigma: float) -> float:
    """``value / t**sigma`` (MoCo's and DB-MTL's decaying step sizes); 0.0 where ``t**sigma``
    overflows a float (a huge exponent, t > 1: the decayed value is 0 to float precision), which
    Python's ``**`` raises as an OverflowError."""
    try:
        return value / t ** sigma
    except OverflowError:
        return 0.0


def check_epoch_info(method: str, info: Any) -> None:
    """``on_epoch_end`` takes an :class:`EpochInfo` (``on_epoch_end(0)`` failed on a missing attribute)."""
    if not isinstance(info, EpochInfo):
        raise TypeError(f"{method}: on_epoch_end takes an EpochInfo(epoch=..., train_losses=..., scores=...), "
                        f"got {type(info).__name__}")


def check_weights(method: str, weights: Any, n_tasks: int, source: str) -> None:
    """A method's per-task weights must be a (K,) tensor: a plug-in's ``objective``/``combine``
    returning None failed deep inside, and one of another shape was broadcast into made-up
    logged weights (shape (1,)) or broke the trainer's logging later (shape (7,) for K = 2)."""
    if not isinstance(weights, Tensor) or weights.shape != (n_tasks,):
        got = f"shape {tuple(weights.shape)}" if isinstance(weights, Tensor) else type(weights).__name__
        raise BalancerError(f"{method}: {source} must return the per-task weights as a tensor of shape "
                            f"({n_tasks},), got {got}")


def trainable_split(name: str, shared_params: Any, task_params: Any) -> tuple[list[Tensor], list[Tensor]]:
    """(shared, task-specific) parameters that require grad; ValueError when a tensor is in both.

    A method writes its combined direction into the shared ``.grad`` and the heads' own gradients
    into the task parameters; a tensor in both lists (``model.parameters()`` passed as the heads)
    would silently get the plain loss sum's gradient on top of the method's direction."""
    shared = [p for p in _as_param_list(shared_params) if p.requires_grad]
    heads = [p for p in _as_param_list(task_params) if p.requires_grad]
    if heads and shared:
        both = {id(p) for p in shared}.intersection(map(id, heads))
        if both:
            shapes = [tuple(p.shape) for p in shared if id(p) in both]
            raise ValueError(f"{name}: {len(both)} tensor(s) are in both shared_params and task_params (shapes "
                             f"{shapes[:4]}{' ...' if len(shapes) > 4 else ''}); a parameter is either shared by "
                             "the tasks or one task's own — pass the task heads' parameters only as task_params")
    return shared, heads


def accumulate_grad(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add a flat vector (sum of numels) into ``.grad`` of ``params``, in order."""
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p).to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        offset += n
    if offset != flat.numel():
        raise BalancerError(f"direction has {flat.numel()} entries but the shared parameters have {offset}")


def half_scale(dtype: torch.dtype, *coefs: Tensor) -> float:
    """1.0, or for float16 with coefficients beyond 1 a power of two s ≥ max|cᵢ|.

    float16's range ends at 65504: weights such as FairGrad's or Nash-MTL's grow like 1/‖gᵢ‖ and
    reach 1e5 for gradients of 1e-4, whose weighted sum Σ cᵢ gᵢ is of order one. Cast to float16 they
    became inf and the direction NaN (silently on the Gram path). Forming Σ (cᵢ/s) gᵢ and multiplying
    by s in float32 keeps it finite; a power of two changes no rounding."""
    if dtype != torch.float16:
        return 1.0
    largest = max(float(c.detach().abs().max()) for c in coefs)
    return 2.0 ** math.ceil(math.log2(largest)) if 1.0 < largest < math.inf else 1.0


def weighted_rows(coef: Tensor, jacobian: Tensor) -> Tensor:
    """Σᵢ cᵢ gᵢ (P,) of the K×P ``jacobian``'s rows, in its dtype and on its device (see :func:`half_scale`)."""
    scale = half_scale(jacobian.dtype, coef)
    if scale == 1.0:
        return coef.to(device=jacobian.device, dtype=jacobian.dtype) @ jacobian
    scaled = (coef.double() / scale).to(device=jacobian.device, dtype=jacobian.dtype) @ jacobian
    return (scaled.float() * scale).to(jacobian.dtype)


def backward_weighted(losses: Tensor, coef: Tensor, shared: Sequence[Tensor], heads: Sequence[Tensor],
                      head_coef: Tensor) -> None:
    """Add ∇ Σ cᵢ ℓᵢ to the shared ``.grad`` and ∇ Σ hᵢ ℓᵢ to the heads' (one pass when c = h)."""
    scale = half_scale(losses.dtype, coef, head_coef)
    if scale != 1.0:
        _backward_weighted_scaled(losses, coef, shared, heads, head_coef, scale)
        return
    c = coef.detach().to(device=losses.device, dtype=losses.dtype)
    h = head_coef.detach().to(device=losses.device, dtype=losses.dtype)
    if not heads:
        (losses * c).sum().backward(inputs=list(shared))
    elif torch.equal(c, h):
        (losses * c).sum().backward(inputs=[*shared, *heads])
    else:  # the second pass only walks the heads' part of the graph
        (losses * c).sum().backward(inputs=list(shared), retain_graph=True)
        (losses * h).sum().backward(inputs=list(heads))


def _backward_weighted_scaled(losses: Tensor, coef: Tensor, shared: Sequence[Tensor], heads: Sequence[Tensor],
                              head_coef: Tensor, scale: float) -> None:
    """:func:`backward_weighted` for float16 losses with coefficients beyond float16's range: the
    gradients of Σ (cᵢ/s) ℓᵢ (every value in the backward at most as large as an unweighted loss's),
    multiplied by s in float32 and added to ``.grad``."""
    def add(coefficients: Tensor, params: Sequence[Tensor], retain: bool) -> None:
        c = (coefficients.detach().double() / scale).to(device=losses.device, dtype=losses.dtype)
        grads = torch.autograd.grad((losses * c).sum(), list(params), retain_graph=retain, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                g = (g.float() * scale).to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g

    same = torch.equal(coef.detach().double(), head_coef.detach().to(device=coef.device, dtype=torch.float64))
    add(coef, [*shared, *heads] if same else list(shared), retain=bool(heads) and not same)
    if heads and not same:
        add(head_coef, heads, retain=False)


def gram(jacobian: Tensor, block: int | None = None) -> Tensor:
    """K×K Gram matrix ``J Jᵀ`` in float64 (solvers are run in double precision).

    Built over column blocks so that only one block at a time is copied to float64 (the
    full float64 copy of a K×P Jacobian doubled the step's memory on large models); ``block``
    columns each, by default cache-sized on a CPU and large on a GPU (:func:`mtl_tune.jacobian.gram_columns`)."""
    return gram_of(jacobian, block)


def state_like(state: Tensor | None, jacobian: Tensor, method: str, what: str) -> Tensor:
    """A method's K×P state (``moco``'s tracked gradients, ``excessmtl``'s squared sums, ``dbmtl``'s
    moving average) ready for a step on ``jacobian`` (..., K, P): zeros at the first step, moved to the
    Jacobian's device and dtype after a checkpoint was loaded elsewhere; a state of another shape (the
    shared parameters changed during a run) raises :class:`BalancerError` naming both shapes."""
    if state is None:
        return torch.zeros_like(jacobian)
    if state.shape != jacobian.shape:
        raise BalancerError(f"{method}: the per-task gradients have shape {tuple(jacobian.shape)}, the {what} "
                            f"{tuple(state.shape)}; the shared parameters must stay the same during a run")
    if state.device != jacobian.device or state.dtype != jacobian.dtype:
        return state.to(device=jacobian.device, dtype=jacobian.dtype)
    return state


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, by one reduction (any NaN/inf entry makes the sum
    non-finite) instead of an elementwise mask the size of ``x``; only a non-finite sum — a NaN/inf
    entry, or a float overflow of finite entries — pays the elementwise pass that decides."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def finite_or_raise(x: Tensor, what: str) -> Tensor:
    if not bool(torch.isfinite(x).all()):
        raise BalancerError(f"{what} is not finite: {x.tolist() if x.numel() <= 50 else '...'}")
    return x


GradientPath = Literal["auto", "jacobian", "gram"]
GRADIENT_PATHS = ("auto", "jacobian", "gram")
#: ``"auto"`` takes the Gram path when the K×P Jacobian would be at least this large (bytes) or
#: K ≥ :data:`GRAM_MIN_TASKS`; below both the Jacobian path's saved backward pass wins
#: (measured in
#: docs/performance.md#8-gradient-methods-against-the-official-step-structure-benchgradient_steppy).
#: On a device whose memory size is known (CUDA) the limit is that memory ÷
#: :data:`GRAM_DEVICE_FRACTION` when larger (docs/performance.md §6.1).
GRAM_MIN_JACOBIAN_BYTES = 256 * 2**20
GRAM_MIN_TASKS = 8
#: a Jacobian buffer of up to 1/16 of the device's memory is worth the Gram path's extra backward
#: pass: on an H200, NYUv2's 0.5 GiB buffer saved 21 % of a Gram-method step (docs/performance.md §6.1);
#: trials packed on one GPU (fractional GPUs) each see the whole device, and eight such buffers still fit in half of it
GRAM_DEVICE_FRACTION = 16


@functools.lru_cache(maxsize=None)
def _cuda_memory(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


def device_memory_bytes(device: torch.device | str) -> int | None:
    """Total memory of ``device`` in bytes where torch reports it (a CUDA GPU), else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_memory(torch.cuda.current_device() if device.index is None else device.index)


def pick_gradient_path(name: str, setting: str, supports_gram: bool, n_tasks: int, shared: Sequence[Tensor],
                       can_stream: bool, group: Any = None) -> str:
    """The path of one step: ``setting`` unless ``"auto"`` (then :func:`choose_gradient_path`).

    Data parallel (``group`` set) always takes the Jacobian path: every rank must combine the
    rank-mean Jacobian, and its Gram matrix J̄J̄ᵀ is not the mean of the ranks' Gram matrices,
    so the Gram path would need the Jacobian anyway; a forced ``"gram"`` is refused there.
    """
    if group is not None:
        if setting == "gram":
            raise BalancerError(f"{name}: gradient_path='gram' is not data-parallel correct (the Gram matrix of "
                                "the rank-mean Jacobian needs the Jacobian); use 'auto' or 'jacobian' under DDP")
        return "jacobian"
    if setting != "auto":
        return setting
    if not supports_gram:
        return "jacobian"
    device = device_memory_bytes(shared[0].device) if can_stream and shared else None
    return choose_gradient_path(n_tasks, sum(p.numel() * p.element_size() for p in shared), can_stream, device)


def choose_gradient_path(n_tasks: int, shared_bytes: int, can_stream: bool, device_bytes: int | None = None) -> str:
    """``"gram"`` when the engine can stream the Gram matrix and K ≥ :data:`GRAM_MIN_TASKS` (the extra
    backward pass is then at most 1/8 of the K passes) or the K×P Jacobian is large: at least
    :data:`GRAM_MIN_JACOBIAN_BYTES`, or ``device_bytes`` / :data:`GRAM_DEVICE_FRACTION` when the
    device's memory is known and that is more; else ``"jacobian"`` (one backward pass fewer)."""
    if not can_stream:
        return "jacobian"
    if n_tasks >= GRAM_MIN_TASKS:
        return "gram"
    limit = GRAM_MIN_JACOBIAN_BYTES if device_bytes is None else max(GRAM_MIN_JACOBIAN_BYTES,
                                                                       device_bytes // GRAM_DEVICE_FRACTION)
    return "gram" if n_tasks * shared_bytes >= limit else "jacobian"
