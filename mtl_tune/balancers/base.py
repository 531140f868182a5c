"""The balancer interface: how K task losses (or K task gradients) become one update.

A balancer has two layers, kept apart on purpose (as TorchJD separates *what direction*
from *how to get the Jacobian*):

* **Pure part** – small functions of plain tensors that live next to each method
  (e.g. :func:`mtl_tune.balancers.mgda.mgda_weights` takes a K×K Gram matrix and returns
  simplex weights). They have no state and are unit-tested on hand-made matrices.
* **Stateful part** – a :class:`Balancer` subclass that keeps state across steps
  (FAMO's logits, DWA's loss history, Nash-MTL's warm start), asks the Jacobian engine
  for per-task gradients when it needs them, and writes ``.grad`` on the shared and
  task-specific parameters.

A :class:`Balancer` is a :class:`torch.nn.Module`: its state lives in parameters (UW's
log-variances, which the *training* optimizer updates), buffers (FAMO's logits, GradNorm's
weights, DWA's loss buffer: moved and cast by ``.to()``) and a versioned extra state for
host-side solver state (Nash-MTL's warm start α, counters, random generators), so
``balancer.state_dict()`` is a complete, loadable checkpoint and a balancer can be a
submodule of the model.

Lifecycle inside *any* PyTorch training loop::

    balancer = get_balancer("cagrad", n_tasks=K, c=0.4).to(device)
    optimizer = Adam([{"params": model.parameters()}, *balancer.param_groups()])
    for batch in loader:
        optimizer.zero_grad()
        losses = torch.stack([...])                   # shape (K,)
        info = balancer.backward(losses, shared_params, task_params)
        optimizer.step()
        balancer.after_optimizer_step(new_losses=...)  # only if balancer.needs_post_step_losses
    balancer.on_epoch_end(EpochInfo(epoch=e, scores=...))   # epoch-level methods (DWA, PIVRG)

``backward`` *adds* to ``.grad`` (like ``Tensor.backward``) so extra regularisers compose;
clipping (``max_norm``) is applied to the shared parameters after the balancer wrote them.
Training-loop methods (STGU) override :meth:`Balancer.train_step` instead.
"""

from __future__ import annotations

import abc
import copy
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from mtl_tune.balancers._adam import adam_step, clear_grads
from mtl_tune.balancers._common import (GRADIENT_PATHS, GRAM_MIN_JACOBIAN_BYTES, GRAM_MIN_TASKS,
                                        BalancerError, EpochInfo, ForwardOutput, GradientPath, SolverFailureCounter,
                                        StepInfo, _as_param_list, accumulate_grad, all_finite, backward_weighted,
                                        check_losses, check_weights, choose_gradient_path, finite_or_raise, gram,
                                        pick_gradient_path, trainable_split, weighted_rows)
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.checkpoint import from_plain, to_plain
from mtl_tune.distributed import (AUTO, active_group, add_grad_through_autograd, distributed_run,
                                  mean_across_ranks)
from mtl_tune.jacobian import JacobianEngine

#: version of the layout of :meth:`Balancer.state_dict`'s extra state; 0 = the plain dict
#: written before balancers were modules (still loadable, see :meth:`Balancer.load_state_dict`).
STATE_FORMAT = 1


def _non_finite_entries(obj: Any, path: str = "_extra_state") -> list[str]:
    """Paths of the NaN/inf floats, float tensors and float arrays in nested dicts, lists and tuples
    (no method keeps one in its state: a moving average, a warm start or an optimizer moment)."""
    if torch.is_tensor(obj):
        return [] if not obj.is_floating_point() or bool(torch.isfinite(obj).all()) else [path]
    if isinstance(obj, np.ndarray):
        return [] if obj.dtype.kind != "f" or bool(np.isfinite(obj).all()) else [path]
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, Mapping):
        return [p for key, value in obj.items() for p in _non_finite_entries(value, f"{path}[{key!r}]")]
    if isinstance(obj, (list, tuple)):
        return [p for i, value in enumerate(obj) for p in _non_finite_entries(value, f"{path}[{i}]")]
    return []


class Balancer(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every balancing method. See the module docstring for the lifecycle.

    Args:
        n_tasks: K, the number of task losses each step receives (a positive integer).
        max_norm: clip the shared parameters' gradient to this L2 norm after the balancer
            wrote it; ``None`` = no clipping; ``"default"`` = the method's ``default_max_norm``.
        jacobian_engine: how per-task gradients are computed (default: a new
            :class:`~mtl_tune.jacobian.JacobianEngine` in ``"auto"`` mode).

    Class attributes a subclass sets:
      ``name``: registry name (``"cagrad"``).
      ``needs_jacobian``: it needs the K×P per-task gradient matrix of the shared params.
      ``needs_post_step_losses``: it wants the losses recomputed after the optimizer step
      (FAMO); trainers then call :meth:`after_optimizer_step`.
      ``needs_scores``: it reads per-task performance scores from :meth:`on_epoch_end`.
      ``needs_meta_batch``: before each training step it takes a step of its own on a second,
      independently drawn training batch (Auto-λ); trainers then call :meth:`meta_step`.
      ``default_max_norm``: gradient clipping on the shared parameters (``None`` = off).
      ``supports_distributed``: the method is data-parallel correct (see
      :mod:`mtl_tune.distributed`); the others raise under an active process group.

    Optional hooks, all with defaults here so a training loop calls them unconditionally:
    :meth:`train_step`, :meth:`meta_step`, :meth:`after_optimizer_step`, :meth:`on_epoch_end`,
    :meth:`param_groups`; :attr:`failures` counts solver failures (0 for methods without a
    solver).
    """

    name: ClassVar[str] = ""
    needs_jacobian: ClassVar[bool] = False
    needs_representation: ClassVar[bool] = False
    needs_post_step_losses: ClassVar[bool] = False
    needs_scores: ClassVar[bool] = False
    needs_meta_batch: ClassVar[bool] = False
    default_max_norm: ClassVar[float | None] = None
    supports_distributed: ClassVar[bool] = True

    def __init__(self, n_tasks: int, *, max_norm: float | None | str = "default",
                 jacobian_engine: JacobianEngine | None = None) -> None:
        super().__init__()
        if isinstance(n_tasks, (bool, np.bool_)) or not hasattr(n_tasks, "__index__") or operator.index(n_tasks) < 1:
            raise ValueError(f"{self.name}: n_tasks must be a positive integer, got {n_tasks!r}")
        self.n_tasks = operator.index(n_tasks)  # a NumPy or 0-d torch integer becomes a plain int
        self.max_norm = self.default_max_norm if max_norm == "default" else max_norm
        if self.max_norm is not None and (isinstance(self.max_norm, bool) or not isinstance(self.max_norm, (int, float))
                                          or not 0 < self.max_norm < math.inf):
            raise ValueError(f"{self.name}: max_norm must be a finite positive number or None (off), "
                             f"got {self.max_norm!r}")
        self.engine = jacobian_engine or JacobianEngine()
        self.step_count = 0
        #: solver failures (total / consecutive); methods with a solver count into it
        self.failures = SolverFailureCounter(self.name)
        self.process_group: Any = AUTO

    def __setattr__(self, name: str, value: Any) -> None:
        # Rules keep plain per-step state (arrays, counters, warm starts) on the balancer; nn.Module's
        # __setattr__ checks every assignment for parameters, buffers and submodules (~2 µs, several
        # times a step). A name that is already a plain attribute (in __dict__, hence none of those)
        # getting a value that is no parameter, buffer or module (a plain tensor included: a rule's
        # moving average, its last losses) is exactly what nn.Module would store there: store it.
        if name in self.__dict__ and not isinstance(value, (nn.Parameter, nn.Buffer, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def has_rows_rule(cls) -> bool:
        """Whether the method's math is a batch-first rule ``weights_rows`` (see
        :mod:`mtl_tune.balancers._rows`), which the toy's generic driver runs on many rows."""
        return False

    def rows_unsupported(self) -> str | None:
        """Why this configuration cannot run as rows in lockstep (None = it can); such a variant runs
        one row at a time on the public API instead (the toy's table says which path ran)."""
        return None

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule of a method whose update is not Σ cᵢ gᵢ of Gram-matrix weights: the
        direction (..., P) and the reported weights (..., K) from torch Jacobians (..., K, P) of the
        shared parameters (see :mod:`mtl_tune.balancers._rows`)."""
        raise NotImplementedError(f"{self.name} has no batch-first Jacobian rule")

    @classmethod
    def has_jacobian_rule(cls) -> bool:
        """Whether the method's rule is :meth:`direction_rows` (on Jacobians, in torch)."""
        return cls.direction_rows is not Balancer.direction_rows

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        """Run one independent copy of this method per balancer in ``rows`` (same class and
        hyperparameters as this one) in lockstep, through this balancer's rule: from here on its
        per-row state has a leading dimension of ``len(rows)``, initialised from each row's own
        balancer (its random generator, say: the toy seeds every init's balancer). Used by the toy's
        generic driver; methods whose rule keeps state across steps override it; the default has
        none to reshape."""

    def _step_extras(self) -> dict[str, Any]:
        """Method extras of a step's :class:`StepInfo` (``solver_failures`` for methods with a solver)."""
        return {}

    def after_rows(self, new_losses: np.ndarray) -> RowStep | None:
        """Batch-first post-step hook of a rule (``needs_post_step_losses``): the losses (..., K) after
        the optimizer step; returns the rows that fail, or None. ``after_optimizer_step`` of such a
        method calls it with one row."""
        return None

    def epoch_rows(self, mean_losses: np.ndarray, scores: np.ndarray | None) -> RowStep | None:
        """Batch-first epoch hook of a rule: the epoch's mean losses and scores (..., K); returns the
        rows that fail (their ``reason``), or None. ``on_epoch_end`` of such a method calls it with one row."""
        return None

    # ------------------------------------------------------------------ data parallel
    def distribute(self, group: Any = AUTO) -> Balancer:
        """Choose the ranks this balancer averages losses and per-task gradients over.

        ``"auto"`` (the default): the default process group whenever ``torch.distributed``
        is initialised with more than one rank; a process group: that group; ``None``:
        never (each rank balances on its own shard). Returns ``self``.
        See :mod:`mtl_tune.distributed` for what is averaged."""
        self.process_group = group
        return self

    def _sync_group(self) -> Any | None:
        group = active_group(self.process_group)
        if group is not None and not self.supports_distributed:
            raise BalancerError(f"{self.name} is not data-parallel correct (see mtl_tune.distributed); "
                                "train it in one process, or call balancer.distribute(None) to balance "
                                "each rank's shard on its own")
        return group

    def _rank_mean(self, tensor: Tensor, group: Any | None) -> Tensor:
        """``tensor`` averaged over ``group``'s ranks (``tensor`` itself when ``group`` is None)."""
        return tensor if group is None else mean_across_ranks(tensor, group)

    def _write_shared(self, shared: list[Tensor], direction: Tensor, group: Any | None) -> None:
        if group is None and not distributed_run():
            accumulate_grad(shared, direction)
        else:  # through autograd, so that DDP's reducer sees these parameters this step
            add_grad_through_autograd(shared, direction)

    # ------------------------------------------------------------------ per step
    @abc.abstractmethod
    def backward(self, losses: Tensor, shared_params: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None,
                 representation: Tensor | Sequence[Tensor] | None = None) -> StepInfo:
        """Write (add to) ``.grad`` of the shared and task parameters for one step.

        Args:
            losses: the K task losses, shape ``(K,)``, still attached to the graph.
            shared_params: the parameters every task uses (the encoder).
            task_params: the task-specific parameters, a flat list or one list per task.
            representation: the shared representation z the heads read (only methods with
                ``needs_representation``).

        Returns:
            a :class:`StepInfo` with the effective per-task weights (K,) and method extras.

        Raises:
            BalancerError: non-finite losses or gradients, or repeated solver failures.
        """

    def train_step(self, forward: Callable[[], ForwardOutput], optimizer: torch.optim.Optimizer,
                   shared_params: Sequence[Tensor], task_params: Sequence[Sequence[Tensor]] | None = None
                   ) -> tuple[Tensor, StepInfo]:
        """One full training step on one batch; the hook training-loop methods override.

        The default: zero grads, forward, :meth:`backward`, optimizer step, and the
        post-step update for methods that need it. Returns the (detached) losses and the
        step's :class:`StepInfo`.
        """
        clear_grads(optimizer)   # zero_grad(set_to_none=True) and step(), the same results without
        out = forward()          # their wrappers (a tenth of a toy step): mtl_tune.balancers._adam
        info = self.backward(out.losses, shared_params, task_params, out.representation)
        adam_step(optimizer)
        if self.needs_post_step_losses:
            with torch.no_grad():
                self.after_optimizer_step(forward().losses.detach())
        return out.losses.detach(), info

    def meta_step(self, forward: Callable[[], ForwardOutput], meta_forward: Callable[[], ForwardOutput],
                  optimizer: torch.optim.Optimizer, shared_params: Sequence[Tensor],
                  task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None) -> None:
        """Update the method's own state from a second batch, right before :meth:`train_step` on a batch.

        Only methods with ``needs_meta_batch`` (Auto-λ) use it; trainers then call it before every
        training step with ``forward`` (the losses of the batch the step trains on), ``meta_forward``
        (the losses of another training batch, drawn from an independently shuffled stream), the
        model's optimizer (its learning rate and weight decay) and the parameters. The method must
        leave the parameters as it found them; buffers its forwards move (BatchNorm's running
        statistics) are the trainer's to keep or not. The default does nothing."""

    def after_optimizer_step(self, new_losses: Tensor) -> None:
        """Called with the losses (K,) recomputed on the same batch after the optimizer step.

        Only methods with ``needs_post_step_losses`` (FAMO) use it; the default does nothing."""

    def on_epoch_end(self, info: EpochInfo) -> None:
        """Epoch-level hook (DWA's epoch losses, PIVRG's scores). Default: nothing."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer param groups for the learnable balancer parameters (UW's log-variances).

        Add them to the *training* optimizer. A group without ``"lr"`` takes the
        optimizer's default; methods with a learning-rate hyperparameter set it. Buffers
        updated by a method's own rule (FAMO's logits, GradNorm's weights) are not here.
        Default: one group with :meth:`parameters`, or no group when there are none.
        """
        params = list(self.parameters())
        return [{"params": params}] if params else []

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        """Non-tensor state (step count, solver failures, warm starts, generators), versioned."""
        # NumPy arrays (warm starts, scores) as tensors: torch.load's default weights_only=True reads it
        return to_plain({"format": STATE_FORMAT, "method": self.name, "n_tasks": self.n_tasks,
                         "step_count": self.step_count, "failures": self.failures.state_dict(), **self._extra_state()})

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"{self.name}: the balancer state's _extra_state must be a dict (from state_dict()), "
                             f"got {type(state).__name__}")
        try:
            fmt = int(state.get("format", 0))
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: the balancer state's format must be an integer, "
                             f"got {state.get('format')!r}") from None
        if fmt > STATE_FORMAT:
            raise ValueError(f"{self.name}: balancer state has format {fmt}, newer than this mtl_tune "
                             f"reads ({STATE_FORMAT}); upgrade mtl_tune to load it")
        method = state.get("method", self.name)
        if method != self.name:
            raise ValueError(f"{self.name}: the balancer state was saved by method {method!r}")
        if int(state.get("n_tasks", self.n_tasks)) != self.n_tasks:
            raise ValueError(f"{self.name}: the balancer state is for {state['n_tasks']} tasks, "
                             f"this balancer has {self.n_tasks}")
        # a copy: the state may be another live balancer's (``b.load_state_dict(a.state_dict())`` in one
        # process), whose private optimizers' moments torch's Optimizer.load_state_dict would take by
        # reference — stepping one balancer would then move the other, as module loads never do
        state = from_plain(copy.deepcopy(state))
        self.step_count = int(state.get("step_count", 0))
        try:
            if "failures" in state:
                self.failures.load_state_dict(state["failures"])
            self._load_extra_state(state)
        except KeyError as err:  # a hand-made or truncated state: say what is missing, not just the key
            raise ValueError(f"{self.name}: the balancer state lacks {err.args[0]!r}; load a state_dict() "
                             "this method wrote") from err

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a :meth:`state_dict` (format 1), or the plain dict of format 0."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{self.name}: load_state_dict needs a state_dict() mapping, got {type(state_dict).__name__}")
        if "_extra_state" not in state_dict and "step_count" in state_dict:
            state_dict = self._from_format_0(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # here, not in load_state_dict: a model that holds the balancer as a submodule loads it through
        # this hook only. A NaN or infinite weight, logit or log-variance is never a state a step
        # leaves (the trainer stops a trial at the first non-finite loss): it comes from a run that
        # diverged outside that guard, or a damaged file, and would turn every later step into NaN
        for name, current in (*self._parameters.items(), *self._buffers.items()):
            value = state_dict.get(prefix + name)
            if current is not None and torch.is_tensor(value) and value.is_floating_point() \
                    and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{self.name}: the balancer state's {prefix + name!r} holds non-finite values "
                                 f"({value.flatten()[:8].tolist()}); a state saved after the balancer diverged, or a "
                                 "damaged file — not loaded")
        # the same for the rest of the state (moving averages, warm starts, private optimizers' moments),
        # checked here too so that nothing is loaded from a refused state
        bad = _non_finite_entries(state_dict.get(prefix + "_extra_state"), prefix + "_extra_state")
        if bad:
            raise ValueError(f"{self.name}: the balancer state's {', '.join(bad[:4])} hold(s) non-finite values; a "
                             "state saved after the balancer diverged, or a damaged file — not loaded")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _from_format_0(self, old: dict[str, Any]) -> dict[str, Any]:
        # format 0 kept everything in one flat dict; tensors that are now parameters or
        # buffers sat under the same names (those it did not have keep their current value)
        current = super().state_dict(keep_vars=False)
        new: dict[str, Any] = {k: (old[k] if k in old else v) for k, v in current.items() if k != "_extra_state"}
        new["_extra_state"] = {**old, "format": 0}
        return new

    def _extra_state(self) -> dict[str, Any]:
        """A subclass's non-tensor state (buffers and parameters are saved by ``nn.Module``)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    #: buffers that keep their value and dtype (float32 at least) when the balancer is cast to
    #: float16/bfloat16 (``model.half()`` casts a balancer that is a submodule): those a private optimizer steps (FAMO's logits, GradNorm's weights,
    #: Auto-λ's λ — Adam's eps (1e-8) is 0 in float16, and the logits became ±inf then NaN for good) and
    #: loss floors ℓ* (``min_losses``: a hyperparameter, which bfloat16 would round to 2–3 digits)
    float32_state: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Any, recurse: bool = True) -> Balancer:
        # ``.to()``/``.double()`` replace buffers: let methods with a private optimizer re-bind it
        before = {name: self._buffers[name] for name in self.float32_state if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        half = (torch.float16, torch.bfloat16)
        for name, old in before.items():
            buffer = self._buffers.get(name)
            if buffer is not None and buffer.dtype in half:  # the value before the cast, on the new device
                self._buffers[name] = old.to(device=buffer.device, dtype=torch.float32 if old.dtype in half else old.dtype)
        self._after_move()
        return out

    def _after_move(self) -> None:
        """Called after ``.to()`` / ``.cuda()`` / ``.double()`` moved or cast the buffers."""

    # ------------------------------------------------------------------ helpers
    def _clip(self, shared: Sequence[Tensor]) -> None:
        if self.max_norm is not None:
            # each tensor once: a parameter listed twice (tied weights gathered from two modules) would
            # count twice in the norm and be scaled twice
            once = {id(p): p for p in shared if p.grad is not None}
            torch.nn.utils.clip_grad_norm_(list(once.values()), self.max_norm)

    def extra_repr(self) -> str:
        return f"n_tasks={self.n_tasks}"


def rebind_private_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> torch.optim.Optimizer:
    """A new optimizer of the same class on ``params`` carrying ``optimizer``'s hyperparameters
    and state (cast to the new tensors' device and dtype), after ``.to()`` replaced a buffer."""
    state = optimizer.state_dict()
    fresh = type(optimizer)(params, **optimizer.defaults)
    fresh.load_state_dict(state)
    return fresh


class LossBalancer(Balancer):
    """A method that only needs the K losses: one backward of ``objective(losses)``.

    Subclasses implement :meth:`objective` (a differentiable scalar of the losses).
    Task heads receive the gradient of the same objective (weighted), as in the papers.
    """

    #: ``backward`` raises BalancerError on a non-finite loss before the method's state changes (FAMO's
    #: logits, a loss history). False for methods whose step never reads the losses on the host (``ls``,
    #: DWA's epoch mode), where the check would add a device sync to every step: a NaN loss then shows
    #: in ``.grad``, as ``sum(losses).backward()`` shows it, and the trainer checks every few steps.
    checks_finite_losses: ClassVar[bool] = True

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(scalar loss to backpropagate, effective per-task weights (K,))``.

        Default, for a method with a batch-first rule: Σᵢ wᵢ ℓᵢ with w = ``weights_rows(ℓ)``
        detached (the same gradient as the method's objective, whose ∂f/∂ℓ the rule returns)."""
        if not self.has_rows_rule():
            raise NotImplementedError(f"{self.name}: implement objective() or weights_rows()")
        w = torch.from_numpy(one_row(self.weights_rows(host(losses)))).to(losses)
        return (losses * w).sum(), w

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """Batch-first rule: ∂f/∂ℓ (..., K) for float64 losses (..., K) (see :mod:`mtl_tune.balancers._rows`)."""
        raise NotImplementedError(f"{self.name} has no batch-first rule")

    @classmethod
    def has_rows_rule(cls) -> bool:
        return cls.weights_rows is not LossBalancer.weights_rows

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name, finite=self.checks_finite_losses, graph=True)
        shared = _as_param_list(shared_params)
        heads = _as_param_list(task_params)
        model_params = [p for p in (*shared, *heads) if p.requires_grad]
        if not model_params:  # torch's own error names no argument
            raise ValueError(f"{self.name}: no shared or task parameter requires grad (shared_params holds "
                             f"{len(shared)} tensors, task_params {len(heads)}); pass the model's parameters")
        group = self._sync_group()
        if group is None:
            total, weights = self.objective(losses)
            check_weights(self.name, weights, self.n_tasks, "objective()")
            total.backward(inputs=model_params + [p for p in self.parameters() if p.requires_grad])
        else:
            weights = self._distributed_backward(losses, model_params, group)
        self._clip(shared)
        self.step_count += 1
        return StepInfo(weights=weights.detach(), extras=self._step_extras())

    def _distributed_backward(self, losses: Tensor, model_params: list[Tensor], group: Any) -> Tensor:
        """f linearised at the rank-mean losses ℓ̄: back-propagate Σ_i ∂f/∂ℓ_i(ℓ̄) ℓ_i, which
        DDP's gradient average turns into ∇f of the concatenated batch; state updates see ℓ̄."""
        mean = self._rank_mean(losses.detach(), group).requires_grad_(True)
        total, weights = self.objective(mean)
        check_weights(self.name, weights, self.n_tasks, "objective()")
        own = [p for p in self.parameters() if p.requires_grad]
        coef, *own_grads = torch.autograd.grad(total, [mean, *own], allow_unused=True)
        coef = torch.zeros_like(mean) if coef is None else coef
        (losses * coef.detach().to(losses.dtype)).sum().backward(inputs=model_params)
        own_used = [(p, g) for p, g in zip(own, own_grads) if g is not None]
        if own_used:  # the same on every rank (computed from ℓ̄); via autograd in case DDP holds them
            torch.autograd.backward([p for p, _ in own_used], grad_tensors=[g for _, g in own_used])
        return weights


class GradientBalancer(Balancer):
    """A method that combines the K per-task gradients of the shared parameters.

    Two ways to get there, with the same update (tested to float tolerance):

    * **Jacobian path**: the K×P Jacobian (in the engine's reusable buffer), then
      :meth:`combine` on it; the direction is written into the shared ``.grad``.
    * **Gram path**, for methods whose update is a weighted sum of the task gradients
      (d = Σ cᵢ gᵢ with c from the K×K Gram matrix; they set ``supports_gram`` and implement
      :meth:`gram_weights`): the engine streams the Gram matrix without ever holding the
      Jacobian, and one ordinary backward of Σ cᵢ ℓᵢ writes d. It trades one extra backward pass
      for the K×P memory. ``gradient_path="auto"`` picks it for many tasks, or for Jacobians that
      are large (for a GPU: against its memory) (:func:`choose_gradient_path`); ``"jacobian"`` /
      ``"gram"`` force a path.

    Task heads receive ``∇ Σ_i c_i ℓ_i`` where ``c = head_weights(weights)`` (unweighted ones by
    default, as in the official code of most gradient methods; see
    docs/methods.md#what-the-task-heads-receive).
    """

    needs_jacobian: ClassVar[bool] = True
    #: whether heads get the method's weights (True) or the plain sum of task losses.
    weighted_heads: ClassVar[bool] = False
    #: the update is Σ cᵢ gᵢ with c a function of the Gram matrix (:meth:`gram_weights`).
    supports_gram: ClassVar[bool] = False

    def __init__(self, n_tasks: int, *, gradient_path: GradientPath = "auto", **kw: Any) -> None:
        super().__init__(n_tasks, **kw)
        if gradient_path not in GRADIENT_PATHS:
            raise ValueError(f"{self.name}: gradient_path must be one of {GRADIENT_PATHS}, got {gradient_path!r}")
        if gradient_path == "gram" and not self.supports_gram:
            raise ValueError(f"{self.name}: its update is not a weighted sum of the task gradients, so it "
                             "needs the Jacobian (gradient_path='jacobian' or 'auto')")
        self.gradient_path = gradient_path

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        """Coefficients c (K,) with d = Σ cᵢ gᵢ, from the float64 K×K Gram matrix (``supports_gram``).

        Default: the batch-first rule :meth:`weights_rows` on one row; a failed row raises
        :class:`BalancerError`, a solver failure is counted in :attr:`failures`."""
        if not self.has_rows_rule():
            raise NotImplementedError(f"{self.name} has no Gram-only form")
        w = one_row(self.weights_rows(host(gram_matrix), host(losses)), self.failures)
        return torch.from_numpy(w).to(gram_matrix.device)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        """Batch-first rule: coefficients (..., K) from float64 Gram matrices (..., K, K) and losses
        (..., K) (see :mod:`mtl_tune.balancers._rows`)."""
        raise NotImplementedError(f"{self.name} has no batch-first rule")

    @classmethod
    def has_rows_rule(cls) -> bool:
        return cls.weights_rows is not GradientBalancer.weights_rows or cls.has_jacobian_rule()

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(direction (P,), effective weights (K,))`` for the K×P ``jacobian``."""
        coef = self.gram_weights(gram(jacobian), losses)
        return weighted_rows(coef, jacobian), coef

    def head_weights(self, weights: Tensor, losses: Tensor) -> Tensor:
        """Coefficients hᵢ (K,) of the heads' gradient ∇ Σ hᵢ ℓᵢ for a step with ``weights``: the weights
        themselves (``weighted_heads``) or ones. Methods whose heads follow another rule (``imtlfull``:
        the scaled losses' e^{sᵢ}; ``dbmtl``: the log-losses' 1/ℓᵢ) override it."""
        return weights.detach() if self.weighted_heads else torch.ones_like(losses)

    def path_for(self, losses: Tensor, shared: Sequence[Tensor], group: Any = None) -> str:
        """The path this step takes (see :func:`pick_gradient_path`)."""
        return pick_gradient_path(self.name, self.gradient_path, self.supports_gram, losses.shape[0], shared,
                                  self.engine.can_stream_gram(losses.device), group)

    def backward(self, losses, shared_params, task_params=None, representation=None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name, graph=True)
        shared, heads = trainable_split(self.name, shared_params, task_params)
        group = self._sync_group()
        if self.path_for(losses, shared, group) == "gram":
            weights = self._gram_step(losses, shared, heads)
        else:
            weights = self._jacobian_step(losses, shared, heads, group)
        self._clip(shared)
        self.step_count += 1
        return StepInfo(weights=weights.detach(), extras=self._step_extras())

    def _jacobian_step(self, losses: Tensor, shared: list[Tensor], heads: list[Tensor], group: Any = None) -> Tensor:
        # data parallel: every rank combines the rank-mean Jacobian (= the concatenated batch's)
        jac = self._rank_mean(self.engine.jacobian(losses, shared, retain_graph=bool(heads), reuse=True), group)
        if not all_finite(jac):  # finite losses can still have inf/NaN gradients
            raise BalancerError(f"{self.name}: non-finite per-task gradient")
        direction, weights = self.combine(jac, self._rank_mean(losses.detach(), group))
        check_weights(self.name, weights, self.n_tasks, "combine()")
        if not all_finite(direction):
            raise BalancerError(f"{self.name}: produced a non-finite update direction")
        self._write_shared(shared, direction, group)
        if heads:
            coef = self.head_weights(weights, losses)
            (losses * coef.to(losses.dtype)).sum().backward(inputs=heads)
        return weights

    def _gram_step(self, losses: Tensor, shared: list[Tensor], heads: list[Tensor]) -> Tensor:
        a = self.engine.gram(losses, shared)
        # a NaN/inf entry of any gradient makes its diagonal entry ‖gᵢ‖² non-finite (float64: no overflow)
        if not bool(torch.isfinite(a).all()):
            raise BalancerError(f"{self.name}: non-finite per-task gradient")
        coef = self.gram_weights(a, losses.detach())
        check_weights(self.name, coef, self.n_tasks, "gram_weights()")
        if not bool(torch.isfinite(coef).all()):  # finite c and finite gᵢ give a finite Σ cᵢ gᵢ
            raise BalancerError(f"{self.name}: produced a non-finite update direction")
        backward_weighted(losses, coef, shared, heads, self.head_weights(coef, losses))
        return coef


__all__ = [
    "GRADIENT_PATHS", "GRAM_MIN_JACOBIAN_BYTES", "GRAM_MIN_TASKS", "GradientPath", "STATE_FORMAT", "Balancer", "BalancerError", "EpochInfo", "ForwardOutput", "GradientBalancer", "LossBalancer",
    "SolverFailureCounter", "StepInfo", "accumulate_grad", "backward_weighted", "check_losses", "choose_gradient_path",
    "gram", "finite_or_raise", "pick_gradient_path", "rebind_private_optimizer", "RowStep", "check_weights",
    "trainable_split",
]
