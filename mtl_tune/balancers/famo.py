"""``famo`` — Fast Adaptive Multitask Optimization (Liu et al., NeurIPS'23).

State: logits ξ ∈ R^K (init 0) with a private Adam(lr = ``w_lr``, weight_decay = ``gamma``).

Step: z = softmax(ξ), D_i = ℓ_i − ℓ*_i + ε, c = Σ_i z_i / D_i (detached) and the
objective L = Σ_i z_i log D_i / c, whose gradient is Σ_i (z_i / (c D_i)) ∇ℓ_i — effective
raw-loss weights z_i/(c D_i) that sum to 1.

Update (after the model's optimizer step, on the **same batch**): δ_i = log D_i(before) −
log D_i(after); ξ.grad = J_softmax(ξ)ᵀ δ; one Adam step on ξ. Tasks whose log-loss fell
the most lose weight, so the weights move toward the task that improves slowest.

``min_losses`` (ℓ*) must lie below every loss (the toy problem has negative losses; FAMO's
toy trainer uses (−21·scale, −21)). A loss at or below ℓ* raises instead of producing NaN.
Details: docs/methods.md#famo; ``gamma`` defaults to the NYUv2 run.sh value 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._adam import adam_step
from mtl_tune.balancers._rows import PerVersion, RowStep, host, one_row
from mtl_tune.balancers.base import Balancer, BalancerError, LossBalancer, check_losses, rebind_private_optimizer

EPS = 1e-8


def famo_weights(logits: Tensor, losses: Tensor, min_losses: Tensor) -> Tensor:
    """Effective raw-loss weights z_i/(c·D_i) (they sum to 1), batch-first: (..., K)."""
    z = torch.softmax(logits, dim=-1)
    d = losses - min_losses + EPS
    c = (z / d).sum(-1, keepdim=True)
    return z / (c * d)


def famo_logit_grad(logits: Tensor, prev_losses: Tensor, new_losses: Tensor, min_losses: Tensor) -> Tensor:
    """J_softmax(ξ)ᵀ δ with δ_i = log D_i(prev) − log D_i(new), batch-first: (..., K)."""
    delta = (prev_losses - min_losses + EPS).log() - (new_losses - min_losses + EPS).log()
    return softmax_vjp(torch.softmax(logits, dim=-1), delta)


def softmax_vjp(z: Tensor, delta: Tensor) -> Tensor:
    """J_softmax(ξ)ᵀ δ from z = softmax(ξ): the Jacobian is diag(z) − z zᵀ (symmetric), so
    Jᵀδ = z ⊙ (δ − zᵀδ); batch-first: (..., K)."""
    return z * (delta - (z * delta).sum(-1, keepdim=True))


def _softmax_vjp2_host(z: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """:func:`softmax_vjp` for K = 2 on float32 NumPy arrays, bit for bit: its products and differences
    round the same in either library, and its sum of two terms is one addition in either (a longer sum
    may add in another order: larger K stays in torch)."""
    return z * (delta - (z * delta).sum(-1, keepdims=True))


def _floor_copies(floor: Tensor) -> tuple[np.ndarray, np.ndarray, bool]:
    """``min_losses`` on the host: float64, its float32 values, and whether the buffer is float32."""
    wide = host(floor)
    return wide, wide.astype(np.float32), floor.dtype == torch.float32


def _softmax_of(logits: Tensor) -> Tensor:
    """z = softmax(ξ) in the logits' dtype, on their device."""
    return torch.softmax(logits, dim=-1)


class FAMO(LossBalancer):
    """FAMO, fast adaptive multitask optimisation (Liu et al., NeurIPS'23): loss-based,
    O(1) per step. Task logits ξ (a buffer) are updated by a private Adam after each
    optimizer step from the log-loss decrease, so call :meth:`after_optimizer_step`
    (``train_step`` does).

    Args:
        n_tasks: K, the number of tasks.
        gamma: weight decay of the logits' Adam (float ≥ 0, default 1e-3).
        w_lr: learning rate of the logits' Adam (float > 0, default 0.025).
        min_losses: K lower bounds of the losses (default zeros); every loss must stay above
            them (the method takes log(ℓ − min)).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "famo"
    needs_post_step_losses = True

    def __init__(self, n_tasks: int, gamma: float = 1e-3, w_lr: float = 0.025,
                 min_losses: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if gamma < 0:
            raise ValueError(f"famo: gamma must be >= 0, got {gamma}")
        if w_lr <= 0:
            raise ValueError(f"famo: w_lr must be > 0, got {w_lr}")
        self.gamma, self.w_lr = float(gamma), float(w_lr)
        floor = torch.zeros(n_tasks) if min_losses is None else torch.as_tensor(list(min_losses), dtype=torch.float32)
        if floor.shape != (n_tasks,):
            raise ValueError(f"famo: min_losses must have {n_tasks} entries, got {min_losses!r}")
        self.register_buffer("min_losses", floor)
        # a buffer, not a Parameter: the logits follow FAMO's own update (the private Adam
        # below, stepped in after_optimizer_step), never the training optimizer
        self.register_buffer("logits", torch.zeros(n_tasks))
        self.w_optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)
        self.prev_losses: Tensor | None = None
        # host-side caches of the rules, rebuilt when stale: min_losses on the host (float64, its float32
        # values, whether the buffer is float32 — after_rows' host path); z = softmax(ξ), which
        # after_rows reuses from the step's weights_rows (the logits have not moved); D(prev) in float32
        self._floors = PerVersion(_floor_copies)
        self._softmax = PerVersion(_softmax_of)
        self._prev_gap: tuple | None = None

    def _below_floor(self, losses: np.ndarray, floor: np.ndarray
                     ) -> tuple[np.ndarray, Callable[[tuple[int, ...]], str]]:
        """Rows with a loss at or below ``min_losses`` (``floor``; the logs are undefined there) or not
        finite (a NaN would enter the logits and stay there for good), and why."""
        bad = ~((losses > floor) & (losses < np.inf)).all(-1)  # NaN and -inf fail the first test

        def reason(index: tuple[int, ...]) -> str:
            if not np.isfinite(losses[index]).all():
                return f"famo: non-finite task loss {losses[index].tolist()}"
            return (f"famo: a loss {losses[index].tolist()} is not above min_losses {self.min_losses.tolist()}; "
                    "set min_losses below the lowest reachable loss")

        return bad, reason

    def _check(self, losses: np.ndarray, floor: np.ndarray, gap: np.ndarray
               ) -> tuple[np.ndarray, Callable[[tuple[int, ...]], str] | str]:
        """:meth:`_below_floor`'s rows and reason, from the gaps ``gap`` = ``losses`` − ``floor``: when
        every gap lies in (0, ∞) — two reductions, the common case — no row is below the floor or
        non-finite (a gap > 0 means ℓ > ℓ*, and an infinite or NaN loss makes its gap ±∞ or NaN), so
        no row fails; otherwise :meth:`_below_floor` decides row by row."""
        if gap.min() > 0.0 and gap.max() < np.inf:
            return np.zeros(gap.shape[:-1], dtype=bool), ""
        return self._below_floor(losses, floor)

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """∂L/∂ℓ = z_i/(c D_i) per row, z = softmax(ξ) in the logits' float32 (as the update sees it);
        remembers the losses for :meth:`after_rows`."""
        floor, floor32, host32 = self._floors(self.min_losses)
        gap = losses - floor
        bad, reason = self._check(losses, floor, gap)
        zd = host(self._softmax(self.logits)) / (gap + EPS)
        prev = np.array(losses)
        self.prev_losses = prev_t = torch.from_numpy(prev)
        # after_rows' float32 gaps D(prev), formed now from the same values (host(prev_losses) is prev
        # widened to float64); kept with the tensor and the floor they belong to
        self._prev_gap = (prev_t, self._floors.value,
                          prev.astype(np.float64, copy=False).astype(np.float32) - floor32 + EPS) if host32 else None
        return RowStep(zd / zd.sum(-1, keepdims=True), failed=bad, reason=reason)

    def after_rows(self, new_losses: np.ndarray) -> RowStep:
        """One Adam step of the logits (each row's own) on ξ.grad = J_softmax(ξ)ᵀ δ, in float32.

        :func:`famo_logit_grad`'s arithmetic, with the float32 gaps D = ℓ − ℓ* + ε formed on the host
        (NumPy's float32 subtraction and addition round exactly as torch's, and cost ~1 µs instead
        of ~4 µs a torch op; D(prev) is formed by :meth:`weights_rows`), their logs in torch (one call
        for both) and z = softmax(ξ) in torch (the one of :meth:`weights_rows`); for K = 2 on the CPU
        :func:`softmax_vjp`'s products and differences on the host too (float32 NumPy: the same
        correctly rounded operations, and a sum of two terms is one addition in either), else in torch
        on the logits' device. The Adam step is torch's (:func:`~mtl_tune.balancers._adam.adam_step`:
        the same bits as ``step()``)."""
        prev_t = self.prev_losses
        if prev_t is None:
            raise BalancerError("famo: after_optimizer_step needs a backward first (called before any backward, "
                                "or twice after one; train_step already calls it)")
        floor, floor32, host32 = self._floors(self.min_losses)
        new_losses = np.asarray(new_losses)
        bad, reason = self._check(new_losses, floor, new_losses - floor)
        logits = self.logits
        if bad.ndim == 0 and bad:  # one row: fail before touching the logits (the step raises)
            return RowStep(host(logits), failed=bad, reason=reason)
        if host32 and logits.dtype == torch.float32:
            cached = self._prev_gap
            gaps = np.empty((2, *new_losses.shape), dtype=np.float32)  # D(prev), D(new): one log call
            if cached is not None and cached[0] is prev_t and cached[1] is self._floors.value:
                gaps[0] = cached[2]
            else:  # prev_losses set elsewhere (a loaded checkpoint), or the floor changed since
                gaps[0] = host(prev_t).astype(np.float32) - floor32 + EPS
            gaps[1] = new_losses.astype(np.float32) - floor32 + EPS
            z = self._softmax(self.logits)
            if logits.is_cpu:
                logs = torch.from_numpy(gaps).log().numpy()
                delta = logs[0] - logs[1]
                if delta.shape[-1] == 2:
                    logits.grad = torch.from_numpy(_softmax_vjp2_host(z.detach().numpy(), delta))
                else:
                    logits.grad = softmax_vjp(z, torch.from_numpy(delta))
            else:
                logs = torch.from_numpy(gaps).to(logits.device).log()
                logits.grad = softmax_vjp(z, logs[0] - logs[1])
        else:  # other dtypes: famo_logit_grad as it stands
            logits.grad = famo_logit_grad(logits, prev_t.to(logits),
                                          torch.from_numpy(new_losses).to(logits), self.min_losses)
        adam_step(self.w_optimizer)
        return RowStep(host(logits), failed=bad, reason=reason)

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.logits = torch.stack([b.logits.detach().clone() for b in rows])
        self.w_optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)
        self.prev_losses = None

    def objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.logits.device != losses.device:
            self.to(losses.device)
        w = one_row(self.weights_rows(host(losses)))
        weights = famo_weights(self.logits.to(losses.dtype), losses.detach(), self.min_losses.to(losses))
        return (losses * torch.from_numpy(w).to(losses)).sum(), weights

    def after_optimizer_step(self, new_losses: Tensor) -> None:
        check_losses(new_losses, self.n_tasks, self.name, finite=False)  # (non-finite: after_rows says why)
        new_losses = self._rank_mean(new_losses.detach(), self._sync_group())  # the same update on every rank
        one_row(self.after_rows(host(new_losses)))
        self.prev_losses = None  # one logit update per backward: a second call is refused, not applied twice

    float32_state = ("logits", "min_losses")

    def _after_move(self) -> None:
        self.w_optimizer = rebind_private_optimizer(self.w_optimizer, [self.logits])
        if self.prev_losses is not None:
            self.prev_losses = self.prev_losses.to(self.logits.device)

    def _extra_state(self) -> dict[str, Any]:
        return {"w_optimizer": self.w_optimizer.state_dict(),
                "prev_losses": None if self.prev_losses is None else self.prev_losses.cpu()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        prev = state["prev_losses"]
        self.prev_losses = None if prev is None else prev.to(self.logits.device)
