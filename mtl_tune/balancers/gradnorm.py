"""``gradnorm`` — GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML'18; docs/methods.md#gradnorm).

Learnable task weights w (init 1, Σw = K) train the network on L = Σ_i w_i ℓ_i while a
second loss pulls the per-task gradient norms on the last shared layer W toward a
common scale adjusted by each task's relative training rate:

    G_i = ‖∇_W (w_i ℓ_i)‖₂ = w_i ‖∇_W ℓ_i‖₂,          Ḡ = mean_i G_i,
    L̃_i = ℓ_i(t) / ℓ_i(0),   r_i = L̃_i / mean_j L̃_j,   target_i = Ḡ · r_i^α  (held constant),
    L_grad = Σ_i |G_i − target_i|.

The gradient on w follows the official code (SamsungLabs/MTL), which builds G_i from the
renormalised weights w̃ = w·K/Σw, so that ∂L_grad/∂w passes through the renormalisation.
With u_i = ∂L_grad/∂w̃_i = sign(G_i − target_i) · ‖∇_W ℓ_i‖ and ∂w̃_i/∂w_j = (K/Σw)(δ_ij − w̃_i/K):

    ∂L_grad/∂w_j = (K/Σw) · (u_j − Σ_i (w̃_i/K) u_i)           (:func:`gradnorm_weight_grad`)

i.e. u centred by its w̃/K-weighted mean (plain mean at w = 1). The centring removes the
component along w that the next renormalisation would undo anyway; it matters because Adam
scales each coordinate by its own running RMS, so the uncentred u = sign · n (the paper's
formula read literally) gives a different step. Tested against torch autograd through
w·K/Σw (``test_gradnorm_weight_grad_is_autograd_through_the_renormalisation``).

Per step (the paper's Algorithm 1): the network gets ∇ Σ_i w_i(t) ℓ_i (weights *before*
their update; heads weighted the same way), then w takes one step of its own Adam
(``lr``) on ∂L_grad/∂w, and is renormalised to Σw = K (so at every step K/Σw = 1 and w̃ = w
up to rounding). A task that trains slower than average (r_i > 1) or whose gradient is
smaller than the target gains weight. α sets how strongly rates matter (α = 0: equalise
gradient norms). ℓ_i(0) are the losses of the first step this balancer sees.

Which W: the trailing ``last_shared_params`` tensors of ``shared_params`` (default 2 —
the weight and bias of a final Linear/Conv layer when parameters are listed in module
order, as ``nn.Module.parameters()`` does); all of them if fewer exist; 0 = every shared
parameter (exact, expensive). The benchmark decides the order of its shared list, so a
benchmark whose last shared layer is not listed last must pass its own value. Only
``autograd.grad`` on W is needed (K backward passes that stop at W, batched by the
Jacobian engine), then one full backward of the weighted loss.

Differences from the SamsungLabs/MTL code (the only official implementation): it
computes the K norms with full per-task ``backward`` calls that leave Σ_i ∇ℓ_i in every
other parameter, so those get Σ(1 + w_i)∇ℓ_i (double counting) — we do not; it trains w
with the model optimizer and never projects, so weights can go negative — we clamp w at
0 before renormalising (the paper is silent; a negative loss weight has no meaning); it
never renormalises w itself (only w̃ enters its losses), so its gradient carries the factor
K/Σw of a Σw that drifts under Adam, where ours is 1 (renormalised every step: the paper's
rule). The centring of the weight gradient is the official one (see above).
Non-positive losses raise :class:`BalancerError` (the ratios need ℓ > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._adam import adam_step
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.base import (Balancer, BalancerError, StepInfo, check_losses, rebind_private_optimizer,
                                     trainable_split)


_APART_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}   # shape → strides of rows K + 1 apart


def _rows_apart(x: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``x`` (..., K) whose rows lie K + 1 elements apart (one
    allocation, no copy: the destination of an op's ``out=``)."""
    shape = tuple(x.shape)
    strides = _APART_STRIDES.get(shape)
    if strides is None:   # (computed once per shape: the toy asks for the same one every step)
        rows, step = [1], shape[-1] + 1
        for n in reversed(shape[1:-1]):
            rows.insert(0, step)
            step *= n
        rows.insert(0, step)
        strides = _APART_STRIDES[shape] = tuple(rows)
    return torch.empty_strided(shape, strides, dtype=x.dtype, device=x.device)


_K: dict[int, Tensor] = {}   # K → K as a 0-d CPU tensor


def _k_tensor(k: int) -> Tensor:
    """K as a 0-d float32 CPU tensor (exact for K < 2²⁴): ``t * K`` and ``t / K`` by it are the
    products and quotients of the Python number — a 0-d tensor of the same category does not change
    the result's dtype, and the element-wise float operation is the same — at half the dispatch
    cost (no scalar to wrap per call)."""
    t = _K.get(k)
    if t is None:
        t = _K[k] = torch.tensor(float(k), dtype=torch.float32)
    return t


def _mean_last(x: Tensor) -> Tensor:
    """``x.mean(-1, keepdim=True)``: for float32/float64 on the CPU torch computes the mean as the sum
    divided by the count (``mean_out``'s CPU branch: ``sum_out(...).div_(n)``), which this does at
    two thirds of the cost; other dtypes (half types sum in float32 there) and devices (another
    kernel) call ``mean``."""
    if x.is_cpu and x.dtype in (torch.float32, torch.float64):
        return x.sum(-1, keepdim=True).div_(_k_tensor(x.shape[-1]))
    return x.mean(-1, keepdim=True)


def _pow_per_row(r: Tensor, alpha: float) -> Tensor:
    """r ** α row by row, (..., K): every row gets exactly the bits of r_row ** α on its own.

    Why it matters: torch's CPU loop over a contiguous run of n elements computes the first
    n − n mod 2V of them (V: the SIMD width) with vectorised code, which rounds differently from
    the scalar code that does the rest, and the sign of G − target flips on one ulp near balance.
    One row (K elements) alone is one such run; (B, K) rows in one contiguous tensor would be one
    run of B·K. Rows K + 1 elements apart (:func:`_rows_apart`; :func:`gradnorm_targets` computes r
    there directly) cannot be merged by TensorIterator, which then runs its loop once per row of K,
    as for one row (checked bit for bit against one call per row). Other devices compute each
    element alike in any layout: on them a row loop keeps the guarantee without assuming it."""
    if r.dim() < 2:
        return torch.pow(r, alpha)
    if r.device.type != "cpu":
        return torch.stack([torch.pow(row, alpha) for row in r.unbind(0)])
    if r.stride(-1) != 1 or r.stride(-2) != r.shape[-1] + 1:  # not rows K + 1 apart yet
        r = _rows_apart(r).copy_(r)
    return torch.pow(r, alpha)


def gradnorm_targets(weights: Tensor, norms: Tensor, losses: Tensor, initial_losses: Tensor,
                     alpha: float) -> tuple[Tensor, Tensor]:
    """(G_i = w_i‖∇_W ℓ_i‖, target_i = Ḡ · r_i^α) with r the relative inverse training rate;
    batch-first: (..., K)."""
    g = weights * norms
    ratio = losses / initial_losses
    mean = _mean_last(ratio)
    if ratio.dim() > 1 and ratio.is_cpu and not ratio.requires_grad:  # (out= takes no autograd)
        # r in rows K + 1 apart, the layout _pow_per_row powers in one call: its call, without its checks
        powered = torch.pow(torch.div(ratio, mean, out=_rows_apart(ratio)), alpha)
    else:
        powered = _pow_per_row(ratio / mean, alpha)
    return g, _mean_last(g) * powered


def gradnorm_weight_grad(weights: Tensor, norms: Tensor, losses: Tensor, initial_losses: Tensor,
                         alpha: float) -> Tensor:
    """∂/∂w Σ_i |w̃_i n_i − target_i| with w̃ = w·K/Σw and the target held constant (official rule).

    u = sign(G − target) ⊙ n is the gradient with respect to w̃; the chain rule through the
    renormalisation gives (K/Σw)(u − Σ_i (w̃_i/K) u_i): u centred by its w̃-weighted mean.
    Batch-first: (..., K).
    """
    k = weights.shape[-1]
    scale = _k_over(weights.sum(-1, keepdim=True), k)  # K/Σw (1 when the weights are normalised)
    scaled = weights * scale                           # w̃
    g, target = gradnorm_targets(scaled, norms, losses, initial_losses, alpha)
    u = torch.sign(g - target) * norms
    return scale * (u - (scaled * u).sum(-1, keepdim=True) / _k_tensor(k))


def _k_over(total: Tensor, k: int) -> Tensor:
    """K/total as torch evaluates the expression ``k / total`` (``Tensor.__rtruediv__``: the
    reciprocal times k), without that Python wrapper (and k as a ready tensor: :func:`_k_tensor`)."""
    return total.reciprocal() * _k_tensor(k)


def renormalise_rows(weights: Tensor, out: Tensor | None = None) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Clamp at 0 and rescale to Σw = K, per row (..., K); also the rows whose weights are not finite
    and the rows whose weights all reached 0 (left unchanged: those rows fail), as host arrays: the
    K-wide sums are read to the host once (a failing row is rare; the where() that keeps its
    weights is applied only when there is one). ``out``: where to write the result (it may be
    ``weights`` itself), else a new tensor."""
    w = weights.clamp_min(0)
    total = w.sum(-1, keepdim=True)
    sums = host(total)[..., 0]
    # every sum positive and finite (NaN fails the first test), in two reductions: the common case (or no rows)
    if not sums.size or (0 < sums.min() and sums.max() < np.inf):
        k_over = _k_over(total, w.shape[-1])
        fine = np.zeros(sums.shape, dtype=bool)
        return (w * k_over if out is None else torch.mul(w, k_over, out=out)), fine, fine.copy()
    finite = np.isfinite(sums)
    nonfinite, dead = ~finite, finite & ~(sums > 0)
    ok = torch.from_numpy(np.asarray(~(nonfinite | dead))).to(weights.device)
    renormalised = torch.where(ok[..., None], w * _k_over(total, w.shape[-1]), weights)
    return (renormalised if out is None else out.copy_(renormalised)), nonfinite, dead


def renormalise(weights: Tensor) -> Tensor:
    """Clamp at 0 and rescale to Σw = K (one row); raises when that is impossible."""
    w, nonfinite, dead = renormalise_rows(weights)
    if nonfinite.any():  # NaN/inf weights (e.g. from non-finite gradient norms)
        raise BalancerError(f"gradnorm: non-finite task weights {weights.tolist()}")
    if dead.any():
        raise BalancerError(f"gradnorm: all task weights reached 0: {weights.tolist()}")
    return w


def _row_norms(jacobian: Tensor) -> Tensor:
    """``jacobian.norm(dim=-1)``: on CPU/CUDA strided tensors that is ``torch.linalg.vector_norm``
    (``torch.functional.norm`` forwards it there), called directly without the Python wrapper."""
    if jacobian.layout == torch.strided and jacobian.device.type in ("cpu", "cuda"):
        return torch.linalg.vector_norm(jacobian, 2, [-1])
    return jacobian.norm(dim=-1)


class GradNorm(Balancer):
    """GradNorm (Chen et al., ICML'18): task weights, updated by a private Adam, that
    balance the gradient norms on the last shared layer W.

    Args:
        n_tasks: K, the number of tasks.
        alpha: strength α ≥ 0 of the training-rate term (default 1.5; 0 = equal norms).
        lr: learning rate of the weights' private Adam (float > 0, default 0.025).
        last_shared_params: the trailing tensors of the shared parameter list forming W
            (int ≥ 0, default 2; 0 = all).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    GradNorm with a private Adam on the task weights (see the module docstring).
    """

    name = "gradnorm"
    supports_distributed = False  # its weight update reads rank-local gradient norms

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025, last_shared_params: int = 2,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not alpha >= 0:
            raise ValueError(f"gradnorm: alpha must be >= 0, got {alpha}")
        if not lr > 0:
            raise ValueError(f"gradnorm: lr must be > 0, got {lr}")
        if not (isinstance(last_shared_params, int) and last_shared_params >= 0):
            raise ValueError(f"gradnorm: last_shared_params must be an integer >= 0, got {last_shared_params!r}")
        self.alpha, self.lr, self.last_shared_params = float(alpha), float(lr), last_shared_params
        # a buffer: GradNorm's own Adam steps it (never the training optimizer)
        self.register_buffer("weights", torch.ones(n_tasks))
        self.w_optimizer = torch.optim.Adam([self.weights], lr=self.lr)
        self.initial_losses: Tensor | None = None

    def last_layer(self, shared: Sequence[Tensor]) -> list[Tensor]:
        """W: the trailing ``last_shared_params`` tensors (all when 0 or when fewer exist)."""
        n = self.last_shared_params
        return list(shared) if n == 0 else list(shared[-n:])

    @classmethod
    def has_rows_rule(cls) -> bool:
        return True

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.weights = torch.stack([b.weights.detach().clone() for b in rows])
        self.w_optimizer = torch.optim.Adam([self.weights], lr=self.lr)  # B independent Adams (element-wise)
        self.initial_losses = None

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule on the Jacobians (..., K, P) of W: the step's weights w (the ones before
        their update, float32, on the weights' device), then one Adam step of w on
        :func:`gradnorm_weight_grad` and the renormalisation; ``direction`` = Σᵢ wᵢ ∇_W ℓᵢ (the whole
        update when W is every shared parameter, as on the toy). Rows fail on a non-positive loss
        (before any update) or when their weights cannot be renormalised.

        Host reads: one row checks its losses first (it must not update on a bad step) and every call
        reads the K weight sums of the renormalisation (the rows that fail); the diagnostics G and
        target (``StepInfo.extras``) are computed only by :meth:`backward`, which reports them."""
        weights = self.weights
        ell = losses.detach().to(weights.dtype)
        bad = (host(ell) <= 0).any(-1)
        w_now = weights.clone()  # (a buffer: nothing to detach)
        if ell.dim() == 1 and bad:
            return RowStep(w_now, failed=bad, reason=f"gradnorm: loss ratios need positive losses, got {ell.tolist()}")
        if self.initial_losses is None:
            self.initial_losses = ell.clone()
        norms = _row_norms(jacobian).detach().to(ell)
        self._step_inputs = (w_now, norms, ell)
        weights.grad = gradnorm_weight_grad(w_now, norms, ell, self.initial_losses, self.alpha)
        adam_step(self.w_optimizer)
        renormalised, nonfinite, dead = renormalise_rows(weights, out=weights)

        def reason(index: tuple[int, ...]) -> str:
            if bool(bad[index]):
                return f"gradnorm: loss ratios need positive losses, got {ell[index].tolist()}"
            what = "non-finite task weights" if bool(nonfinite[index]) else "all task weights reached 0:"
            return f"gradnorm: {what} {renormalised[index].tolist()}"

        # Σᵢ wᵢ Jᵢ in the Jacobian's dtype: w cast to it (a float64 Jacobian promotes w exactly as the
        # cast would, so the cast is left to the product there)
        w = w_now if jacobian.dtype in (torch.float64, w_now.dtype) else w_now.to(jacobian.dtype)
        direction = (w.unsqueeze(-1) * jacobian).sum(-2)
        return RowStep(w_now, failed=bad | nonfinite | dead, reason=reason, direction=direction)

    def backward(self, losses: Tensor, shared_params: Sequence[Tensor],
                 task_params: Sequence[Sequence[Tensor]] | Sequence[Tensor] | None = None,
                 representation: Tensor | Sequence[Tensor] | None = None) -> StepInfo:
        check_losses(losses, self.n_tasks, self.name, graph=True)
        self._sync_group()  # raises under an active process group
        shared, heads = trainable_split(self.name, shared_params, task_params)
        last = self.last_layer(shared)
        if not last:
            raise BalancerError("gradnorm: no shared parameter requires grad")
        if self.weights.device != losses.device:
            self.to(losses.device)
        out = self.direction_rows(self.engine.jacobian(losses, last, retain_graph=True), losses)
        w_now = one_row(out)
        (losses * w_now.to(losses.dtype)).sum().backward(inputs=shared + heads)
        self._clip(shared)
        self.step_count += 1
        w_step, norms, ell = self._step_inputs
        g, target = gradnorm_targets(w_step, norms, ell, self.initial_losses, self.alpha)
        return StepInfo(weights=w_now, extras={"grad_norms": g, "target_norms": target,
                                               "gradnorm_loss": (g - target).abs().sum()})

    float32_state = ("weights",)

    def _after_move(self) -> None:
        # the private optimizer holds the old tensor: rebuild it and carry its state over
        self.w_optimizer = rebind_private_optimizer(self.w_optimizer, [self.weights])
        if self.initial_losses is not None:
            self.initial_losses = self.initial_losses.to(self.weights)

    def _extra_state(self) -> dict[str, Any]:
        return {"w_optimizer": self.w_optimizer.state_dict(),
                "initial_losses": None if self.initial_losses is None else self.initial_losses.cpu()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        init = state["initial_losses"]
        self.initial_losses = None if init is None else init.to(self.weights)
