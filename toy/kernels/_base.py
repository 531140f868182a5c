"""The batched kernel interface of the fast toy engine, and the NumPy pieces kernels share.

A kernel is one balancer's per-step rule for the toy problem run on B rows at once (the inits
of one hyperparameter variant, K = 2 tasks, P = 2 coordinates): ``direction`` takes the losses
(B, 2) and the Jacobian (B, 2 tasks, 2 coordinates) and returns the gradient the balancer's
``backward`` would write into x.grad (B, 2) — after its ×K scaling and its ``max_norm``
clipping. Why batch: one call of the public API costs 50 µs–1 ms on a 2 × 2 problem (autograd,
torch dispatch, host syncs), which made all methods × 5 inits × 35 000 steps take ~18 min; one
NumPy call over all rows costs a few µs whatever B is.

The kernel of a method is the generic :class:`~toy.kernels._rows.RowsKernel`, which calls the
balancer's own batch-first rule (:mod:`mtl_tune.balancers._rows`) — the function its
``backward`` calls on one row — so the method's math exists once. A method not yet written
batch-first keeps a module ``toy/kernels/<method>.py`` with a :class:`Kernel` subclass that
restates its step (the kernel registry refuses a method with both); ``tests/test_toy_kernels.py``
runs every kernel and the lockstep path (the public API on the exact linearisation) side by side
from the papers' inits and from points on the front, and requires the same directions at every
step, trajectories, statuses, failure counts and weights. A method with neither still runs, on
the lockstep path, and the table's ``path`` column says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from mtl_tune.balancers.base import Balancer


class Kernel:
    """Batched per-step rule of one balancer (see the module docstring).

    Class attributes: ``name`` (registry name of the method), ``needs_post_step_losses`` (FAMO: :meth:`after_step` gets the losses after the
    optimizer step), ``training_loop`` (the kernel moves x itself in :meth:`train_step`,
    e.g. STGU's several optimizer steps per iteration).

    State a kernel keeps up to date for the table: ``weights`` (B, 2) of the last step,
    ``solver_failures`` (B,) int or ``None`` when the method has no solver. Failures and
    warnings go through :meth:`fail` / :meth:`warn` (per row, never silent).
    """

    name: ClassVar[str] = ""
    needs_post_step_losses: ClassVar[bool] = False
    training_loop: ClassVar[bool] = False
    #: :meth:`step_rows` returns the step's direction itself (clipped), not only coefficients
    direct: ClassVar[bool] = True
    #: :meth:`step_rows` takes the rows' Gram matrices (the engine computes them once for all rows)
    uses_gram: bool = False

    def __init__(self, balancers: Sequence[Balancer], cfg: Any) -> None:
        self.balancers = list(balancers)
        self.cfg = cfg
        self.rows = len(self.balancers)
        self.weights = np.full((self.rows, 2), np.nan)
        self.solver_failures: np.ndarray | None = None
        self.failed = np.zeros(self.rows, dtype=bool)
        self.fail_step = np.zeros(self.rows, dtype=np.int64)
        self.fail_reason = [""] * self.rows
        self.new_failures = False           # set by fail(); the engine reads and clears it
        self.warning_count = np.zeros(self.rows, dtype=np.int64)
        self.first_warning = [""] * self.rows
        self.setup()

    # ------------------------------------------------------------------ to implement
    @classmethod
    def unsupported(cls, balancer: Balancer) -> str | None:
        """Why this kernel cannot run ``balancer``'s configuration (None = it can). Such a
        variant runs on the lockstep/reference path instead, and the table's ``path`` says so."""
        return None

    def setup(self) -> None:
        """Read hyperparameters from ``self.balancers`` and allocate state (called by __init__)."""

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        """x.grad (B, 2) the balancer writes for losses (B, 2) and Jacobian (B, 2, 2) at ``step``."""
        raise NotImplementedError

    def step_rows(self, step: int, losses: np.ndarray, jac: np.ndarray, gram: np.ndarray | None,
                  inputs_ok: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """What the engine calls: (coefficients c (B, 2), None), the engine then forming x.grad =
        Σᵢ cᵢ ∇ℓᵢ for all its rows at once and clipping it at :meth:`max_norms` (kernels with
        ``direct = False``), or (weights, the clipped x.grad (B, 2)). ``gram``: the rows' Gram
        matrices when ``uses_gram``; ``inputs_ok``: every loss and Jacobian entry of the step is
        finite (checked once by the engine for all rows). Default: :meth:`direction`."""
        return self.weights, self.direction(step, losses, jac)

    def after_step(self, losses: np.ndarray) -> None:
        """Losses (B, 2) at the new x after the optimizer step (``needs_post_step_losses``)."""

    def epoch_end(self, epoch: int, mean_losses: np.ndarray, scores: np.ndarray) -> None:
        """``on_epoch_end``: the epoch's mean (shifted) losses (B, 2) and gap scores (B, 2)."""

    def train_step(self, step: int, x: np.ndarray, adam_step: Callable[[np.ndarray], None],
                   landscape: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                   at_x: tuple[np.ndarray, np.ndarray] | None = None,
                   losses_at: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Training-loop kernels: one iteration on this block's rows. ``x`` (B, 2) is a view of the
        engine's points; ``adam_step(grad)`` is one Adam step of those rows (x's optimizer);
        ``landscape(points)`` gives (shifted losses (B, 2), Jacobian (B, 2, 2)) — a forward;
        ``at_x``: ``landscape(x)`` when the engine has already evaluated it (else None);
        ``losses_at(points)``: ``landscape(points)[0]`` alone, cheaper (None: from ``landscape``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def attr(self, name: str, dtype: Any = np.float64) -> np.ndarray:
        """The balancers' attribute ``name`` as a (B,) array (hyperparameters after validation)."""
        return np.array([getattr(b, name) for b in self.balancers], dtype=dtype)

    def max_norms(self) -> np.ndarray:
        """(B,) ``max_norm`` per row, +inf where clipping is off."""
        return np.array([np.inf if b.max_norm is None else float(b.max_norm) for b in self.balancers])

    def fail(self, mask: np.ndarray, step: int, reason: str | Sequence[str]) -> None:
        """Rows in ``mask`` (that had not failed yet) fail at ``step`` with ``reason`` (one, or one per row)."""
        for r in np.flatnonzero(np.asarray(mask) & ~self.failed):
            self.failed[r] = True
            self.fail_step[r] = step
            self.fail_reason[r] = reason if isinstance(reason, str) else reason[r]
            self.new_failures = True

    def fail_bad_inputs(self, step: int, losses: np.ndarray, jac: np.ndarray,
                        jacobian_error: str = "non-finite per-task gradient") -> None:
        """The input checks of a gradient balancer's ``backward`` on every row: a non-finite loss
        (``check_losses``), then a non-finite Jacobian sum (``GradientBalancer``; representation
        methods fail later, on their d_z, with their own ``jacobian_error``) — each row fails with the
        balancer's message.

        The common case costs two reductions: every |J entry| below 1e307 (NaN fails the comparison)
        means no row's sum of 4 entries can overflow, and a finite sum of the losses means none is
        NaN or ±inf; only otherwise are the rows looked at one by one.
        """
        if np.abs(jac).max() < 1e307 and np.isfinite(losses.sum()):
            return
        with np.errstate(all="ignore"):
            bad_loss = ~np.isfinite(losses).all(-1)
            bad_jac = ~np.isfinite(jac.sum((-2, -1))) & ~bad_loss
        if bad_loss.any():
            self.fail(bad_loss, step, [f"BalancerError: {self.name}: non-finite task loss {row.tolist()}"
                                       for row in losses])
        if bad_jac.any():
            self.fail(bad_jac, step, f"BalancerError: {self.name}: {jacobian_error}")

    def warn(self, mask: np.ndarray, message: str | Sequence[str]) -> None:
        """Count a warning on the rows in ``mask`` (what ``warnings.warn`` in the balancer does)."""
        for r in np.flatnonzero(mask):
            if not self.first_warning[r]:
                self.first_warning[r] = message if isinstance(message, str) else message[r]
        self.warning_count += np.asarray(mask, dtype=np.int64)


def combine(coef: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """Σ_i coef[:, i] · J[:, i, :] for K = 2: (B, 2) directions from (B, 2) coefficients."""
    return coef[:, 0:1] * jac[:, 0] + coef[:, 1:2] * jac[:, 1]


def clip_rows(d: np.ndarray, max_norm: np.ndarray) -> np.ndarray:
    """``torch.nn.utils.clip_grad_norm_`` per row: d · min(max_norm / (‖d‖ + 1e-6), 1).

    Rows with ``max_norm`` = inf are returned unchanged (clipping off)."""
    norm = np.sqrt((d * d).sum(-1))
    coef = np.minimum(max_norm / (norm + 1e-6), 1.0)
    return d * coef[:, None]


class NumpyAdam:
    """``torch.optim.Adam`` (single-tensor CPU path, no weight decay, no amsgrad) on rows of a
    (B, n) NumPy array, with a step counter per row block so blocks can step on their own.

    The arithmetic is torch's own, run through torch on views that share the NumPy memory:
    m.lerp_(g, 1 − β₁), v.mul_(β₂).addcmul_(g, g, value=1 − β₂), bias corrections as Python
    floats, x.addcdiv_(m, √v/√(1 − β₂ᵗ) + ε, value=−lr/(1 − β₁ᵗ)). A NumPy transcription of the
    same formulas differs in the last bit now and then (torch's CPU kernels fuse some
    multiply-adds), and at a Pareto-stationary point Adam turns last-bit differences into
    visible ones; with torch's kernels the fast path reproduces the API path bit for bit when
    the row layout is the same. ~10 µs per step whatever B is.
    """

    def __init__(self, param: np.ndarray, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        import torch  # the engine's only torch use: Adam's exact arithmetic

        self.param = param
        self.lr = float(lr)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.m = np.zeros_like(param)
        self.v = np.zeros_like(param)
        self.t = np.zeros(param.shape[0], dtype=np.int64)
        self._p, self._m, self._v = (torch.from_numpy(a) for a in (param, self.m, self.v))
        self._views: dict[tuple[int | None, int | None], tuple] = {}
        self._torch = torch

    def step(self, grad: np.ndarray, rows: slice = slice(None)) -> None:
        """One Adam step of ``param[rows]`` (a slice: every row of it has taken as many steps) with ``grad``."""
        key = (rows.start, rows.stop)
        views = self._views.get(key)
        if views is None:  # the torch views of a block's rows, made once (a block steps every step)
            views = self._views[key] = (self.t[rows], self._m[rows], self._v[rows], self._p[rows])
        t, m, v, p = views
        t += 1
        step = int(t[0])
        g = self._torch.from_numpy(np.ascontiguousarray(grad))
        m.lerp_(g, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1 ** step)
        denom = (v.sqrt() / (1 - self.beta2 ** step) ** 0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)
