"""Per-task gradients of the shared parameters: the K×P Jacobian, or only its K×K Gramian.

Two ways to differentiate the K losses, which must agree (tested):

* ``"batched"``: one backward pass vectorised over the K rows of the identity (``torch.vmap``
  over ``torch.autograd.grad``), so the trunk's backward graph is walked once with a batch of
  K cotangents.
* ``"loop"``: K calls of ``torch.autograd.grad(retain_graph=True)`` — always works.

``"auto"`` (default) takes the loop on a CPU, where it measured faster than the batched pass on
every benchmark model (one CPU thread: MultiMNIST 0.85×, NYUv2 0.93×, CelebA's K = 40 0.67× the time
and ⅙ of the memory; docs/performance.md §8). Elsewhere (a GPU) it tries the batched path and falls
back to the loop when an operator has no batching rule; the fallback is remembered and announced
once with a warning. Such an operator
counts as missing even where ``torch.vmap`` would run it through its generic per-row fallback
(the op once per task inside the batched pass, with a "performance drop" warning): that is the
loop in disguise with vmap's overhead on top. On the QM9 model (the LSTM of its Set2Set
readout: ``mkldnn_rnn_layer_backward`` has no rule) the batched pass with that fallback took 250 CPU s per
step and > 16 GB against the loop's 67 s (docs/performance.md §8.2), so ``"auto"`` runs the batched
pass with the fallback switched off and takes the loop instead; ``"batched"`` keeps torch's default. For a tiny
Jacobian (at most :data:`LOOP_MAX_ENTRIES` entries, e.g. the toy's 2 × 2) ``"auto"`` takes the
loop: there every backward operator costs its fixed dispatch time, and vmap's batching layer
costs more than a second walk of the graph (toy: 10–20 % less time per Jacobian, and a
trial's metrics are the same bit for bit, tests/test_training.py).

What leaves the backward pass is never a list of per-parameter gradients that would then be
concatenated (that held two K×P copies at the peak). A hook on every parameter receives its
K×n gradient block while autograd still runs and either

* copies it into one K×P buffer the engine keeps and reuses from step to step
  (:meth:`JacobianEngine.jacobian` with ``reuse=True``: no per-step allocation), or
* adds its contribution ``B Bᵀ`` to a float64 K×K Gram matrix and drops it
  (:meth:`JacobianEngine.gram`): the K×P Jacobian never exists, only one parameter's block
  at a time. Methods whose update is a weighted sum of the task gradients then need one
  ordinary backward of Σ wᵢ ℓᵢ (``mtl_tune.balancers.base.GradientBalancer``).

The hook hands autograd a stride-0 zero tensor back, so what ``autograd.grad`` returns costs
no memory. Parameters that a task does not reach get zeros in its row (not ``None``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch._C import _functorch

Mode = Literal["auto", "batched", "loop"]

#: columns per block of the Gram product on a CPU. Each block is cast to float64 before its product,
#: so the Gram matrix carries float64 rounding only (relative error ≲ 1e-16·√P, far below the float32
#: gradients' own); the block keeps the temporary at K × 2^16 doubles (1.5 MiB for K = 3), in cache.
GRAM_BLOCK = 1 << 16
#: entries per block on a GPU (K × columns): 2^24 doubles, a 128 MiB temporary. With CPU-sized blocks
#: NYUv2's 44 M-parameter Jacobian took 673 blocks of four small kernels each, and MGDA's ``combine``
#: (mostly this product) 37–42 ms of a step on an H200 (docs/performance.md §6.1); here 8 blocks.
GRAM_BLOCK_ENTRIES_GPU = 1 << 24


def gram_columns(n_tasks: int, device: torch.device | str) -> int:
    """Columns per block of the float64 Gram product for a K-row block on ``device``: cache-sized
    on a CPU (:data:`GRAM_BLOCK`), :data:`GRAM_BLOCK_ENTRIES_GPU` entries elsewhere."""
    if torch.device(device).type == "cpu":
        return GRAM_BLOCK
    return max(1, GRAM_BLOCK_ENTRIES_GPU // max(n_tasks, 1))   # the temporary stays 128 MiB for any K


#: K × P at or below which ``"auto"`` computes a Jacobian row by row (see the module docstring)
LOOP_MAX_ENTRIES = 64
#: device types on which ``"auto"`` always takes the loop (see the module docstring)
AUTO_LOOP_DEVICES: frozenset[str] = frozenset({"cpu"})


def add_gram(out: Tensor, block: Tensor, columns: int | None = None) -> None:
    """``out += block blockᵀ`` in float64, over column chunks of a (K, n) ``block`` (``columns``
    per chunk; default :func:`gram_columns` for the block's device)."""
    n = block.shape[1]
    if columns is None:
        columns = gram_columns(block.shape[0], block.device)
    for start in range(0, n, columns):
        part = block[:, start:start + columns].to(torch.float64)
        out += part @ part.T


class JacobianEngine:
    """Computes per-task gradients of shared parameters; see the module docstring."""

    def __init__(self, mode: Mode = "auto") -> None:
        if mode not in ("auto", "batched", "loop"):
            raise ValueError(f"jacobian mode must be 'auto', 'batched' or 'loop', got {mode!r}")
        self.mode: Mode = mode
        self._batched_failed = False
        self._buffer: Tensor | None = None

    @property
    def fell_back(self) -> bool:
        """Whether ``"auto"`` found an operator without a batching rule and now always loops."""
        return self._batched_failed

    def mode_on(self, device: torch.device | str) -> str:
        """The pass this engine runs for tensors on ``device``: ``"batched"`` or ``"loop"``."""
        if self.mode != "auto":
            return self.mode
        if self._batched_failed or torch.device(device).type in AUTO_LOOP_DEVICES:
            return "loop"
        return "batched"

    def can_stream_gram(self, device: torch.device | str) -> bool:
        """Whether :meth:`gram` avoids the K×P Jacobian on ``device`` (only the batched pass streams)."""
        return self.mode_on(device) == "batched"

    # ------------------------------------------------------------------ public
    def jacobian(self, losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False,
                 reuse: bool = False) -> Tensor:
        """Return the (K, P) matrix whose row i is the flattened ∇_params ℓ_i.

        ``reuse=True`` writes into the engine's own buffer (allocated once per shape) and
        returns it: valid until the next ``reuse=True`` call, so callers must not keep it.
        """
        params = _trainable(params)
        k, total = losses.shape[0], sum(p.numel() for p in params)
        dtype = _common_dtype(params)
        buf = self._take_buffer(k, total, params[0], dtype) if reuse else None
        if buf is None:
            buf = params[0].new_empty(k, total, dtype=dtype)
        sinks = [_copy_sink(buf, off, p.numel()) for p, off in zip(params, _offsets(params))]
        self._run(losses, params, sinks, retain_graph)
        return buf

    def gram(self, losses: Tensor, params: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
        """The float64 K×K Gram matrix J Jᵀ of the per-task gradients, without the K×P Jacobian
        when the batched pass works (else via the reusable Jacobian buffer)."""
        params = _trainable(params)
        k = losses.shape[0]
        if not self.can_stream_gram(losses.device):
            return gram_of(self.jacobian(losses, params, retain_graph=retain_graph, reuse=True))
        out = torch.zeros(k, k, dtype=torch.float64, device=losses.device)
        sinks = [_gram_sink(out) for _ in params]
        self._run(losses, params, sinks, retain_graph)
        if not self.can_stream_gram(losses.device):  # the batched pass failed just now and fell back to the loop
            return gram_of(self.jacobian(losses, params, retain_graph=retain_graph, reuse=True))
        return out

    # ------------------------------------------------------------------ internals
    def _take_buffer(self, k: int, total: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        buf = self._buffer
        if buf is None or buf.shape != (k, total) or buf.dtype != dtype or buf.device != like.device:
            self._buffer = None  # free the old one before allocating
            buf = self._buffer = like.new_empty(k, total, dtype=dtype)
        return buf

    def _run(self, losses: Tensor, params: list[Tensor], sinks: list[Callable[[Tensor], None]],
             retain_graph: bool) -> None:
        tiny = (self.mode == "auto" and all(s.copies_rows for s in sinks)
                and losses.shape[0] * sum(p.numel() for p in params) <= LOOP_MAX_ENTRIES)
        if tiny:  # keeps the graph, as the batched pass does (callers may backpropagate through it again)
            _stream_loop(losses, params, sinks, retain_graph=True)
            return
        if self.mode_on(losses.device) == "batched":
            try:
                with _vmap_fallback(allowed=self.mode == "batched"):
                    _stream_batched(losses, params, sinks, retain_graph)
                return
            except RuntimeError as err:  # an op without a vmap rule: fall back, but say so
                if self.mode == "batched":
                    raise
                self._batched_failed = True
                warnings.warn(f"batched Jacobian unavailable for this model ({err!s:.200}); "
                              "using the per-task loop from now on", RuntimeWarning, stacklevel=3)
                if not any(s.copies_rows for s in sinks):  # a Gram sink cannot take rows one task at a time
                    return
        _stream_loop(losses, params, sinks, retain_graph)


def gram_of(jacobian: Tensor, block: int | None = None) -> Tensor:
    """K×K Gram matrix ``J Jᵀ`` of an existing Jacobian, in float64 over column blocks
    (``block`` columns each; default :func:`gram_columns`)."""
    out = torch.zeros(jacobian.shape[0], jacobian.shape[0], dtype=torch.float64, device=jacobian.device)
    add_gram(out, jacobian, block)
    return out


def _trainable(params: Sequence[Tensor]) -> list[Tensor]:
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError("jacobian: no shared parameter requires grad")
    return out


def _offsets(params: Sequence[Tensor]) -> list[int]:
    offs, off = [], 0
    for p in params:
        offs.append(off)
        off += p.numel()
    return offs


class _Sink:
    """Receives one parameter's gradient block: (K, n) for the batched pass, or (n,) with the
    task index for the loop. ``fired`` tells the caller which parameters no task reached."""

    copies_rows = False

    def __init__(self) -> None:
        self.fired = False

    def batched(self, block: Tensor) -> None:
        raise NotImplementedError

    def row(self, task: int, grad: Tensor | None) -> None:
        raise NotImplementedError

    def missing(self) -> None:
        """The parameter was reached by no task: its gradient is zero."""


class _copy_sink(_Sink):  # noqa: N801 - used like a function
    copies_rows = True

    def __init__(self, buf: Tensor, offset: int, numel: int) -> None:
        super().__init__()
        self.view = buf[:, offset:offset + numel]

    def batched(self, block: Tensor) -> None:
        self.view.copy_(block)

    def row(self, task: int, grad: Tensor | None) -> None:
        if grad is None:
            self.view[task].zero_()
        else:
            self.view[task].copy_(grad.reshape(-1))

    def missing(self) -> None:
        self.view.zero_()


class _gram_sink(_Sink):  # noqa: N801
    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def batched(self, block: Tensor) -> None:
        add_gram(self.out, block)


@contextlib.contextmanager
def _vmap_fallback(allowed: bool) -> Iterator[None]:
    """Within the block, ``torch.vmap`` runs an operator without a batching rule through its slow
    per-row fallback (``allowed``) or raises a RuntimeError (the module docstring says why)."""
    getter = getattr(_functorch, "_is_vmap_fallback_enabled", None)
    setter = getattr(_functorch, "_set_vmap_fallback_enabled", None)
    if getter is None or setter is None or getter() == allowed:
        yield
        return
    before = getter()
    setter(allowed)
    try:
        yield
    finally:
        setter(before)


def _stream_batched(losses: Tensor, params: list[Tensor], sinks: list[_Sink], retain_graph: bool) -> None:
    k = losses.shape[0]
    for s in sinks:
        s.fired = False

    def make_hook(sink: _Sink) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            sink.fired = True
            sink.batched(_unbatch(grad, k))
            # autograd only needs a tensor of the right shape back: a stride-0 zero costs nothing
            return grad.new_zeros(()).expand(grad.shape)
        return hook

    handles = [p.register_hook(make_hook(s)) for p, s in zip(params, sinks)]
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    def one_row(v: Tensor) -> Tensor:
        torch.autograd.grad(losses, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return v.sum()  # vmap must return a tensor; the gradients went to the sinks

    try:
        torch.vmap(one_row)(eye)
    finally:
        for h in handles:
            h.remove()
    for s in sinks:
        if not s.fired:
            s.missing()
    # ``retain_graph`` is not honoured here: vmap runs the rows with retain_graph=True, so the
    # graph lives until the caller drops the losses (what the loop does for rows 1..K-1 anyway)
    del retain_graph


def _common_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The dtype every parameter's gradient fits in: the first's, or the widest of mixed ones (a
    float16 buffer for float16 and float32 parameters would overflow the float32 gradients)."""
    first = params[0].dtype
    if all(p.dtype == first for p in params):
        return first
    return functools.reduce(torch.promote_types, (p.dtype for p in params))


def _unbatch(grad: Tensor, k: int) -> Tensor:
    """The (K, n) physical block behind the per-row gradient seen inside ``torch.vmap``."""
    if not _functorch.is_batchedtensor(grad):  # the same for every row (did not depend on the cotangent)
        return grad.reshape(1, -1).expand(k, -1)
    level = _functorch.maybe_get_level(grad)
    inner = _functorch.get_unwrapped(grad)
    if _functorch.is_batchedtensor(inner):  # nested vmap from the caller: not ours to unwrap
        raise RuntimeError(f"nested vmap (level {level}) around the Jacobian engine")
    return inner.movedim(_functorch.maybe_get_bdim(grad), 0).reshape(k, -1)


def _stream_loop(losses: Tensor, params: list[Tensor], sinks: list[_Sink], retain_graph: bool) -> None:
    k = losses.shape[0]
    task = 0

    def make_hook(sink: _Sink) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            # each parameter's gradient goes to its sink while autograd runs and is dropped there:
            # task i never holds a P-sized list of gradients next to the buffer
            sink.fired = True
            sink.row(task, grad)
            return grad.new_zeros(()).expand(grad.shape)
        return hook

    handles = [p.register_hook(make_hook(s)) for p, s in zip(params, sinks)]
    try:
        for task in range(k):
            for s in sinks:
                s.fired = False
            keep = retain_graph or task < k - 1
            torch.autograd.grad(losses[task], params, retain_graph=keep, allow_unused=True)
            for s in sinks:
                if not s.fired:  # this task does not reach the parameter
                    s.row(task, None)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- kept as functional entry points
def jacobian_loop(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    return JacobianEngine("loop").jacobian(losses, params, retain_graph=retain_graph)


def jacobian_batched(losses: Tensor, params: Sequence[Tensor], retain_graph: bool = False) -> Tensor:
    return JacobianEngine("batched").jacobian(losses, params, retain_graph=retain_graph)
