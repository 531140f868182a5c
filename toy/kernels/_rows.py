"""The generic kernel: any balancer with a batch-first rule, on all rows of one variant at once.

A method whose math is a batch-first rule (``weights_rows``, :mod:`mtl_tune.balancers._rows`)
needs no kernel of its own: this one calls the balancer's rule on the B rows (the inits of one
hyperparameter variant) — the very function the balancer's ``backward`` calls on one row — and
does what the balancer's ``backward`` does around it, row by row:

* the input checks of its base class (a non-finite loss, then a non-finite Jacobian, fail the row
  with the balancer's message; loss methods check nothing, as ``LossBalancer``);
* x.grad = Σᵢ cᵢ ∇ℓᵢ with the rule's coefficients (the Jacobian is the one w.r.t. x, which is also
  z for representation methods: the toy's encoder is the identity), then ``max_norm`` clipping;
* the rule's failed rows fail with its reason; its solver failures are counted, warned about, and
  fail the row after the balancer's limit of failures in a row (``SolverFailureCounter``);
* a rule that reports gradients of the balancer's own learnable parameters (``param_grads``: UW's
  log-variances, which the *training* optimizer trains) gets them stepped as the training loop
  steps them after the backward: the optimizer of :func:`toy.common.balancer_optimizer` (torch's
  float32 Adam, the lockstep path's arithmetic) over the balancer's parameters, which
  ``start_rows`` gave a leading row dimension. Adam is element-wise, so one Adam over a (B, …)
  parameter is B independent Adams (bit for bit: checked against one Adam per row, and by the
  kernel tests). Failed rows keep stepping their own entries, which nothing reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from mtl_tune.balancers._adam import adam_step
from mtl_tune.balancers._rows import RowStep, gram_rows
from mtl_tune.balancers.base import Balancer
from ..common import balancer_optimizer
from ._base import Kernel, clip_rows, combine


def rule_kind(balancer_cls: type[Balancer]) -> str | None:
    """Which rule a class has (None: none): ``"loop"`` (``train_rows``: a training-loop method),
    ``"meta"`` (``meta_rows`` then ``weights_rows`` on losses: Auto-λ), ``"representation"`` / ``"gradient"`` (``weights_rows`` on Gram matrices), ``"jacobian"``
    (``direction_rows``) or ``"loss"`` (``weights_rows`` on losses) — which inputs the rule takes and
    which input checks the balancer's ``backward`` makes."""
    if not balancer_cls.has_rows_rule():
        return None
    if balancer_cls.train_step is not Balancer.train_step:
        return "loop"            # a training-loop rule (train_rows): several optimizer steps per batch
    if balancer_cls.needs_meta_batch:
        return "meta"            # a meta step (meta_rows) at other parameters before each step
    if balancer_cls.needs_representation:
        return "representation"
    if balancer_cls.has_jacobian_rule():
        return "jacobian"
    return "gradient" if balancer_cls.needs_jacobian else "loss"


class RowsKernel(Kernel):
    """Runs ``balancers[0]``'s batch-first rule on every row (all rows are one variant: see
    :func:`toy.fast._build`). Subclassed per method by :meth:`for_method`."""

    kind: ClassVar[str] = ""

    @classmethod
    def for_method(cls, name: str, kind: str, needs_post_step_losses: bool = False) -> type[RowsKernel]:
        return type(f"RowsKernel_{name}", (cls,), {"name": name, "kind": kind, "__module__": __name__,
                                                  "needs_post_step_losses": needs_post_step_losses,
                                                  "training_loop": kind in ("loop", "meta"), "direct": kind == "jacobian"})

    @classmethod
    def unsupported(cls, balancer: Balancer) -> str | None:
        return balancer.rows_unsupported()

    def setup(self) -> None:
        self.balancer = self.balancers[0]
        self.limit = self.balancer.failures.max_consecutive   # (before start_rows: it may make state per row)
        self.balancer.start_rows(self.balancers)
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())
        # methods with a solver report its failures in every step's extras (the table's column)
        if "solver_failures" in self.balancer._step_extras():
            self.solver_failures = np.zeros(self.rows, dtype=np.int64)
        self.consecutive = np.zeros(self.rows, dtype=np.int64)
        self.params_optimizer = balancer_optimizer([self.balancer], self.cfg)
        self.params = [] if self.params_optimizer is None else \
            [p for group in self.params_optimizer.param_groups for p in group["params"]]
        if any(p.dim() == 0 or p.shape[0] != self.rows for p in self.params):
            raise ValueError(f"{self.name}: start_rows must give the balancer's parameters a leading dimension of "
                             f"{self.rows} rows, got shapes {[tuple(p.shape) for p in self.params]}")
        self.param_sizes = [p.numel() // self.rows for p in self.params]  # entries per row
        self._cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # (x, losses, jac)
        self.uses_gram = self.kind in ("gradient", "representation")
        self._balancer_attrs = vars(self.balancer)  # the plain attributes (step_count): see step_rows

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        coef, d = self.step_rows(step, losses, jac, gram_rows(jac) if self.uses_gram else None, False)
        if d is not None:  # a Jacobian rule's direction, clipped
            return d
        d = combine(coef, jac)
        return clip_rows(d, self.max_norm) if self.clip else d

    def step_rows(self, step: int, losses: np.ndarray, jac: np.ndarray, gram: np.ndarray | None,
                  inputs_ok: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One step of the rule on the rows: (coefficients (B, 2), None) — x.grad is Σᵢ cᵢ ∇ℓᵢ, which
        the engine forms for all its rows at once, then clips — or, for a Jacobian rule, (weights,
        its direction (B, 2), already clipped). ``gram``: the rows' Gram matrices (gradient and
        representation rules); ``inputs_ok``: the engine found every loss and Jacobian entry of the
        step finite (one check for all its rows), so the per-row input checks can be skipped."""
        if not inputs_ok and self.kind != "loss":
            self.fail_bad_inputs(step, losses, jac, "produced a non-finite representation gradient"
                                 if self.kind == "representation" else "non-finite per-task gradient")
        if self.kind == "jacobian":
            return self._jacobian_step(step, losses, jac)
        out = self.balancer.weights_rows(losses) if self.kind == "loss" else self.balancer.weights_rows(gram, losses)
        w = out.weights
        if out.failed is not None or out.solver_failed is not None:
            w = self._failures(step, out, w)
        self.weights = w
        # as backward does (rules that act every n steps count on it); through the instance dict, as
        # Balancer.__setattr__ stores a plain int, without its ~1.5 µs call on every row block's step
        self._balancer_attrs["step_count"] += 1
        if out.param_grads is not None:  # the optimizer step follows the backward: after taking w
            self._step_params(out.param_grads)
        return w, None

    def _jacobian_step(self, step: int, losses: np.ndarray, jac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A ``direction_rows`` rule: the rule's own direction (torch, on the rows' Jacobians)."""
        out = self.balancer.direction_rows(torch.from_numpy(jac), torch.from_numpy(losses))
        w, d = out.weights.numpy(), out.direction.numpy()
        if out.failed is not None or out.solver_failed is not None:
            w = self._failures(step, out, w)
            d = np.where(self.failed[:, None], 0.0, d) if self.failed.any() else d
        self.weights = w
        self._balancer_attrs["step_count"] += 1
        return w, (clip_rows(d, self.max_norm) if self.clip else d)

    def train_step(self, step: int, x: np.ndarray, adam_step: Callable[[np.ndarray], None],
                   landscape: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                   at_x: tuple[np.ndarray, np.ndarray] | None = None,
                   losses_at: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """A training-loop rule (``train_rows``): its forwards are landscape evaluations at the rows'
        current x, its optimizer steps Adam steps of x on Σ coefᵢ ∇ℓᵢ (clipped). The first forward of
        an iteration is ``at_x`` where the engine gives it (its evaluation at x after the last step),
        and a forward without gradient (the lookahead at the final x) then reads the losses alone
        (``losses_at``). Without ``at_x``, the last forward of an iteration is kept and reused by the
        next one's first. A meta rule (``meta_rows``) goes to :meth:`_meta_train_step`."""
        if self.kind == "meta":
            self._meta_train_step(step, x, adam_step, landscape, at_x, losses_at)
            return
        jac: list[np.ndarray] = []          # the Jacobian of the last forward with gradient
        given = [at_x]                      # at_x until the first forward has taken it

        def evaluate(with_grad: bool) -> tuple[np.ndarray, np.ndarray | None]:
            if given[0] is not None:        # the iteration's first forward, at x as the engine left it
                out, given[0] = given[0], None
                return out
            if at_x is not None:            # the engine gives the next iteration's first: nothing to keep
                if with_grad:
                    return landscape(x)
                return (landscape(x)[0] if losses_at is None else losses_at(x)), None
            cached = self._cached
            if cached is not None and (cached[0] == x).all():
                return cached[1], cached[2]
            losses, j = landscape(x)
            self._cached = (x.copy(), losses, j)
            return losses, j

        def forward(with_grad: bool) -> np.ndarray:
            losses, j = evaluate(with_grad)
            if with_grad:
                if not np.isfinite(losses.sum()):  # one reduction; the rows only when needed
                    bad = ~np.isfinite(losses).all(-1)
                    self.fail(bad, step, [f"BalancerError: {self.name}: non-finite task loss {row.tolist()}"
                                          for row in losses])
                jac[:] = (j,)
            return losses

        def group_step(coef: np.ndarray) -> None:
            d = combine(coef, jac[0])
            adam_step(clip_rows(d, self.max_norm) if self.clip else d)

        _, weights, failed, reasons = self.balancer.train_rows(forward, group_step, self.failed)
        if failed.any():
            self.fail(failed, step, reasons)
        if not np.isfinite(x.sum()):  # one reduction; the rows only when needed
            bad = ~np.isfinite(x).all(-1)
            self.fail(bad, step, [f"RuntimeError: non-finite point {row.tolist()}" for row in x])
        # a failed row's table weights are those of its last completed batch (the API's last StepInfo);
        # ``weights`` is the rule's new array, so it can be kept as it is when no row has failed
        self.weights = np.where(self.failed[:, None], self.weights, weights) if self.failed.any() else weights

    def _meta_train_step(self, step: int, x: np.ndarray, adam_step: Callable[[np.ndarray], None],
                         landscape: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                         at_x: tuple[np.ndarray, np.ndarray] | None,
                         losses_at: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """What the trainer does for a ``needs_meta_batch`` method (Auto-λ), on every row: the
        balancer's meta step (``meta_rows``: its evaluations at the virtual step and at x ± εd are
        landscape evaluations — the toy's second batch is the same objective), then the training step
        on Σ wᵢ ℓᵢ with the rule's weights (an Adam step of x on Σ wᵢ ∇ℓᵢ, clipped)."""
        losses, jac = landscape(x) if at_x is None else at_x
        out = self.balancer.meta_rows(landscape, x, losses, jac, self.cfg.lr, losses_at)
        if out.failed is not None and out.failed.any():
            self.fail(out.failed, step, [f"BalancerError: {out.reason_of((r,))}" for r in range(self.rows)])
        w = out.weights   # the step's weights, after the meta update (what weights_rows(losses) gives now)
        self._balancer_attrs["step_count"] += 1
        d = combine(w, jac)
        adam_step(clip_rows(d, self.max_norm) if self.clip else d)
        if not np.isfinite(x.sum()):  # one reduction; the rows only when needed
            bad = ~np.isfinite(x).all(-1)
            self.fail(bad, step, [f"RuntimeError: non-finite point {row.tolist()}" for row in x])
        # (``w`` is the rule's new array: kept as it is when no row has failed)
        self.weights = np.where(self.failed[:, None], self.weights, w) if self.failed.any() else w

    def after_step(self, losses: np.ndarray) -> None:
        self._row_failures(self.balancer.after_rows(losses), self.balancer.step_count)

    def epoch_end(self, epoch: int, mean_losses: np.ndarray, scores: np.ndarray) -> None:
        # the step the engine reports an epoch-end failure at
        self._row_failures(self.balancer.epoch_rows(mean_losses, scores), (epoch + 1) * self.cfg.epoch_steps)

    def _step_params(self, grads: np.ndarray) -> None:
        """One optimizer step of the balancer's own parameters on the rule's ∂f/∂θ (B, P): each
        parameter (B, …) takes its per-row entries' columns, cast to its dtype (as autograd casts
        the float64 gradient of the objective). The step is ``adam_step``: torch's Adam arithmetic
        bit for bit without ``Optimizer.step``'s wrapper (``step()`` itself where it is not plain)."""
        if grads.shape != (self.rows, sum(self.param_sizes)):
            raise ValueError(f"{self.name}: the rule's param_grads have shape {grads.shape}, the balancer's "
                             f"parameters need ({self.rows}, {sum(self.param_sizes)})")
        start = 0
        for p, n in zip(self.params, self.param_sizes):
            g = grads[:, start:start + n]
            if p.dtype == torch.float32:  # NumPy's cast rounds as torch's; ~1 µs instead of ~6
                p.grad = torch.from_numpy(g.astype(np.float32).reshape(p.shape))
            else:
                p.grad = torch.from_numpy(g).reshape(p.shape).to(p.dtype)
            start += n
        adam_step(self.params_optimizer)

    def _row_failures(self, out: RowStep | None, step: int) -> None:
        """Fail the rows a hook reports as failed, each with its reason."""
        if out is not None and out.failed is not None and out.failed.any():
            self.fail(out.failed, step, [f"BalancerError: {out.reason_of((r,))}" if out.failed[r] else ""
                                         for r in range(self.rows)])

    def _failures(self, step: int, out: RowStep, w: np.ndarray) -> np.ndarray:
        if out.solver_failed is not None and (out.solver_failed.any() or self.consecutive.any()):
            missed = out.solver_failed & ~self.failed
            self.consecutive = np.where(missed, self.consecutive + 1, 0)
            if missed.any():
                self.warn(missed, f"{self.name}: solver failed ({out.solver_message})")
                ending = missed & (self.consecutive >= self.limit)
                self.fail(ending, step, f"BalancerError: {self.name}: solver failed {self.limit} times in a row "
                                        f"(last: {out.solver_message})")
                if self.solver_failures is not None:
                    # a row failing now keeps the count of its last completed step (the balancer raised
                    # before returning this step's StepInfo)
                    self.solver_failures += missed & ~ending
        if out.failed is not None:
            failed = out.failed
            if failed.any():
                reasons = [f"BalancerError: {out.reason_of((r,))}" if failed[r] else "" for r in range(self.rows)]
                self.fail(failed, step, reasons)
                w = np.where(failed[:, None], np.nan, w)
        return np.where(self.failed[:, None], 0.0, w) if self.failed.any() else w
