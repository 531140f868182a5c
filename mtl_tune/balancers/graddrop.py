"""``graddrop`` — Gradient Sign Dropout (Chen et al., "Just Pick a Sign", NeurIPS'20).

At every coordinate c of the shared-parameter gradients (rows g_i of the K×P Jacobian):

    purity  P_c = ½ (1 + Σ_i g_ic / Σ_i |g_ic|)          (½ where every g_ic = 0)
    U_c ~ U(0, 1);  keep the positive entries if U_c < P_c, else the negative ones:
    M_ic = [U_c < P_c]·[g_ic > 0] + [U_c ≥ P_c]·[g_ic < 0]
    d_c  = Σ_i (λ + (1 − λ) M_ic) g_ic                   (leak λ ∈ [0, 1])

So a coordinate where all tasks agree in sign is always kept (P = 1 or 0), and a
conflicting one keeps one sign with probability proportional to its share of the total
magnitude. λ = 0 is full sign dropout, λ = 1 the plain sum of gradients. Splitting the
uniform draw as "< P" / "≥ P" (instead of the paper's two strict inequalities) makes the
two sign groups partition [0, 1): exactly one is kept even for a discrete RNG.

Variants (docs/methods.md#graddrop) — we implement the first:
* **FAMO-family / CAGrad repo** (default here; it produced the published NYUv2/Cityscapes/
  QM9/CelebA numbers): per shared-*parameter* coordinate, no sign(z) factor, no leak
  (λ = 0), written as the masked **sum** (= K × their masked mean), clipped at 1.0 in the
  official benchmarks (``max_norm``), heads unweighted. We add the paper's leak λ.
* Paper / LibMTL: per *activation* of the shared representation, with the signed
  gradient s_i = Σ_batch sign(z)·∂ℓ_i/∂z, then backprop through the encoder (not offered).
* SamsungLabs: representation version with one purity per step over all of z (whole
  tasks kept or attenuated), their ``leak`` = 1 − λ (not offered).

Randomness: the balancer's own generator (seeded by ``seed``, saved in ``state_dict``),
created on the Jacobian's device so U is drawn where the gradients live (lockstep rows, the toy's,
draw on the CPU, blocks of steps ahead: :mod:`~mtl_tune.balancers._random_rows`).

The formulas run on the whole Jacobian when it is small (few torch calls: each costs microseconds
whatever its size) and on column blocks of a model's (cache-sized temporaries: :func:`masked_sum`).
Sums over the tasks are taken task by task in order, so the direction does not depend on the blocks.
Reported weights: the least-squares effective weight of each task,
w_i = ⟨m_i ⊙ g_i, g_i⟩ / ‖g_i‖² with m_i = λ + (1 − λ) M_i (1 for a zero gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers._random_rows import BlockDraws, OwnGenerator, block_steps, checked_seed, rows_mismatch
from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import Balancer, GradientBalancer

#: a Jacobian of at most this many entries (all rows) is taken all at once (the toy's); a larger one
#: in column blocks of at most this many entries on a CPU (:func:`masked_sum`)
BLOCK_ENTRIES = 2 ** 16
#: the column blocks' size elsewhere (a GPU: few, large kernels; the temporaries stay bounded)
BLOCK_ENTRIES_GPU = 2 ** 24


def purity(jacobian: Tensor) -> Tensor:
    """P_c = ½(1 + Σ_i g_ic / Σ_i |g_ic|) per coordinate (..., P) of Jacobians (..., K, P), ½ where
    all g_ic are 0."""
    return _purity(jacobian, _magnitude(jacobian)).squeeze(-2)


def _task_sum(group: Tensor, keepdim: bool = False) -> Tensor:
    """g₀ + g₁ + … over the tasks (..., K, P), from left to right: the task-by-task sum, the same numbers
    for any column block (torch's sum over a dimension regroups the terms from 5 on; for two terms
    it is the one addition, so it serves there, in one call)."""
    if group.shape[-2] <= 2:
        return group.sum(-2, keepdim=keepdim)
    total = None
    for part in (group.split(1, dim=-2) if keepdim else group.unbind(-2)):
        total = part if total is None else total + part
    assert total is not None
    return total


def _magnitude(group: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """Σ_i |g_ic| (..., 1, P), from |g| when given."""
    return _task_sum(group.abs() if magnitude is None else magnitude, keepdim=True)


def _purity(jacobian: Tensor, magnitude: Tensor) -> Tensor:
    """P (..., 1, P) from the Jacobian and Σ_i |g_ic|. Where that is 0, so is Σ_i g_ic, and 0/0 = NaN
    becomes the ratio 0 (P = ½); |Σ_i g_ic| ≤ Σ_i |g_ic| keeps every other ratio in [−1, 1] (a NaN entry
    gives ½ too; infinite entries, which balancers refuse before, would give ½ instead of NaN)."""
    return (_task_sum(jacobian, keepdim=True) / magnitude).nan_to_num_(0.0).add_(1.0).mul_(0.5)


def _keep_positive(uniform: Tensor, purity_: Tensor) -> Tensor:
    """[U_c < P_c] (..., 1, P) for uniforms (..., P) or (..., 1, P) (lockstep rows draw them so: one call less)."""
    return (uniform if uniform.dim() == purity_.dim() else uniform.unsqueeze(-2)) < purity_


def _kept(group: Tensor, keep_positive: Tensor) -> Tensor:
    """M (..., K, P) bool: the entry's sign is the kept one (a zero entry has neither sign)."""
    return torch.where(keep_positive, group > 0, group < 0)


def _kept_or_zero(group: Tensor, keep_positive: Tensor) -> Tensor:
    """M (..., K, P) bool, except that a zero (or NaN) entry is True where the negative sign is kept:
    [g > 0] = [U < P] in two calls, where M takes three. It serves any product m·g, of g or of (g/s)²:
    there m = 1 or m = λ > 0 instead of λ gives the same ±0 (and NaN stays NaN)."""
    return (group > 0).eq_(keep_positive)


def _masked(group: Tensor, keep_positive: Tensor, leak: float) -> Tensor:
    """m ⊙ g (..., K, P) (λ = 0: g·M, the same numbers as (0 + 1·M)·g in one call)."""
    kept = _kept_or_zero(group, keep_positive)
    return group * kept if leak == 0.0 else kept.to(group.dtype).mul_(1.0 - leak).add_(leak).mul_(group)


def graddrop_multipliers(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    """Per-entry multipliers m_ic = λ + (1 − λ) M_ic (..., K, P) for uniforms U (..., P)."""
    keep = _keep_positive(uniform, _purity(jacobian, _magnitude(jacobian)))
    return _kept(jacobian, keep).to(jacobian.dtype).mul_(1.0 - leak).add_(leak)


def masked_sum(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> tuple[Tensor, Tensor]:
    """The GradDrop direction d = Σ_i m_i ⊙ g_i (..., P) and the effective weights (..., K) of
    Jacobians (..., K, P) for uniforms U (..., P).

    A small Jacobian (≤ :data:`BLOCK_ENTRIES` entries, the toy's) in one go: 20 torch calls. A large one
    (a model's) in column blocks of that many entries: every formula is per coordinate, so the
    direction is the same, bit for bit; the dozen element-wise passes then run on a block that stays
    in the CPU's cache instead of sweeping the K×P Jacobian from memory a dozen times (NYUv2,
    K = 3, 44 M parameters: 4.5 → 1.5 s of CPU; docs/performance.md §8.4), and the temporaries are
    block-sized. The weights' sums are then accumulated in float64 over the blocks (no rescaling
    needed: float32 squares cannot overflow there), equal to the one-go weights to rounding."""
    if jacobian.numel() <= BLOCK_ENTRIES:
        magnitude = jacobian.abs()
        keep_positive = _keep_positive(uniform, _purity(jacobian, _magnitude(jacobian, magnitude)))
        if leak != 0.0:
            masked = _masked(jacobian, keep_positive, leak)
            return _task_sum(masked), _effective_weights(jacobian, masked, magnitude)
        # λ = 0 (the default), the weights of :func:`_effective_weights` one call shorter: with r = g/s,
        # (g·M/s)·r is (r·r)·M, bit for bit (M = 1: r·r; M = 0: (±0)·r = +0 = (r·r)·0; NaN where r is),
        # so r·r serves both sums
        kept = _kept_or_zero(jacobian, keep_positive)
        r = jacobian / magnitude.amax(-1, keepdim=True)
        square = r * r
        return _task_sum(jacobian * kept), ((square * kept).sum(-1) / square.sum(-1)).nan_to_num_(1.0)
    p = jacobian.shape[-1]
    entries = BLOCK_ENTRIES if jacobian.device.type == "cpu" else BLOCK_ENTRIES_GPU
    width = max(1, entries // (jacobian[..., :1].numel()))
    direction = jacobian.new_empty(jacobian.shape[:-2] + (p,))
    energy = torch.zeros(jacobian.shape[:-1], dtype=torch.float64, device=jacobian.device)
    kept = torch.zeros_like(energy)
    for start in range(0, p, width):
        block = jacobian[..., start:start + width]
        keep_positive = _keep_positive(uniform[..., start:start + width], _purity(block, _magnitude(block)))
        masked = _masked(block, keep_positive, leak)
        direction[..., start:start + width] = _task_sum(masked)
        wide = block.to(torch.float64)
        energy += (wide * wide).sum(-1)
        kept += (masked.to(torch.float64) * wide).sum(-1)
    return direction, (kept / energy).nan_to_num_(1.0).to(jacobian.dtype)


def _effective_weights(group: Tensor, masked: Tensor, magnitude: Tensor) -> Tensor:
    """⟨m ⊙ g, g⟩/‖g‖² (..., K) per task (1 for a zero gradient), from |g| (``magnitude``), on g/max|g| so
    the squares neither overflow nor underflow: ⟨m ⊙ g, g⟩/‖g‖² = ⟨m ⊙ g/s, g/s⟩/‖g/s‖² for any s > 0. No
    host sync (elementwise, not a branch): K of them per step on a GPU otherwise.

    A non-zero g has an entry ±1 after scaling, so ‖g/s‖² ≥ 1 and the ratio is finite; a zero g (s = 0)
    gives NaNs (0/0), and its weight becomes 1 (so does a NaN entry's)."""
    scale = magnitude.amax(-1, keepdim=True)
    r = group / scale
    energy, kept = (r * r).sum(-1), ((masked / scale) * r).sum(-1)
    return (kept / energy).nan_to_num_(1.0)


def effective_weights(jacobian: Tensor, multipliers: Tensor) -> Tensor:
    """w_i = ⟨m_i ⊙ g_i, g_i⟩/‖g_i‖² (..., K) (1 for a zero gradient); rows are rescaled by their
    max |entry| first so the squares neither overflow nor underflow."""
    return _effective_weights(jacobian, multipliers * jacobian, jacobian.abs())


# (functions, not lambdas, so that a balancer holding them can be pickled)
def _uniform_block(generator: torch.Generator, steps: int, p: int, dtype: torch.dtype) -> Tensor:
    return torch.rand(steps, p, generator=generator, dtype=dtype)


def _uniform_rows(blocks: list[Tensor]) -> Tensor:
    return torch.stack(blocks, 1).unsqueeze(-2)      # (steps, rows, 1, P)


class GradDrop(OwnGenerator, GradientBalancer):
    """GradDrop (Chen et al., NeurIPS'20): per shared-parameter coordinate, keep only the
    task gradients of one randomly drawn sign.

    Args:
        n_tasks: K, the number of tasks.
        leak: share of every gradient kept regardless of the sign draw, in [0, 1]
            (0 = full dropout, default; 1 = plain sum).
        seed: seed of the method's own random generator (int, default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "graddrop"

    def __init__(self, n_tasks: int, leak: float = 0.0, seed: int = 0, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not 0.0 <= float(leak) <= 1.0:
            raise ValueError(f"graddrop: leak must lie in [0, 1], got {leak}")
        self.leak = float(leak)
        self.seed = checked_seed(self.name, seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        #: the rows' balancers in lockstep (:meth:`start_rows`), and their uniforms (made at the first step,
        #: which gives P and the dtype); None for one row
        self.row_balancers: list[GradDrop] | None = None
        self.row_draws: BlockDraws | None = None

    def _generator_on(self, device: torch.device) -> torch.Generator:
        # Draw U where the gradients live (no P-sized host→device copy per step). The first
        # move to a new device re-seeds from ``seed``, so a run is reproducible per device.
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.row_balancers, self.row_draws = list(rows), None  # each init's own stream

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule on Jacobians (..., K, P): uniforms U (..., P) from the generator (one per row
        after :meth:`start_rows`), then the masked sum; ``weights`` and ``direction`` are tensors on
        the Jacobian's device."""
        p = jacobian.shape[-1]
        if jacobian.dim() == 2:
            gen = self._generator_on(jacobian.device)
            uniform = torch.rand(p, generator=gen, device=jacobian.device, dtype=jacobian.dtype)
        else:  # each row's draw from its own (CPU) generator, in blocks of steps (the toy)
            uniform = self._lockstep_uniforms(jacobian.shape[:-2].numel(), p, jacobian.dtype)
            if uniform.device != jacobian.device:
                uniform = uniform.to(jacobian.device)
            if jacobian.dim() != 3:
                uniform = uniform.reshape(*jacobian.shape[:-2], 1, p)
        direction, weights = masked_sum(jacobian, uniform, self.leak)
        return RowStep(weights, direction=direction)

    def _lockstep_uniforms(self, rows: int, p: int, dtype: torch.dtype) -> Tensor:
        """This step's uniforms (rows, 1, P) of the lockstep rows. ``torch.rand`` on the CPU fills entry by entry
        (53 bits of one 64-bit draw per float64, 24 of one 32-bit draw per float32), so a block of steps'
        uniforms is what one-step draws of P would draw (tests/balancers/test_graddrop.py compares both)."""
        if self.row_balancers is None:
            raise rows_mismatch(rows, None)
        draws = self.row_draws
        if draws is None or draws.key != (p, dtype):   # (a new P or dtype: settle, and draw afresh)
            if draws is not None:
                draws.settle()
            draws = BlockDraws(self.row_balancers, partial(_uniform_block, p=p, dtype=dtype), _uniform_rows,
                               block_steps(p), key=(p, dtype))
            self.row_draws = draws
        return draws.take(rows)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        return out.direction, out.weights

    def _extra_state(self) -> dict[str, Any]:
        return {"generator_device": str(self.generator.device), "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator = torch.Generator(device=torch.device(state["generator_device"]))
        self.generator.set_state(state["generator"])
