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
created on the Jacobian's device so U is drawn where the gradients live.
Reported weights: the least-squares effective weight of each task,
w_i = ⟨m_i ⊙ g_i, g_i⟩ / ‖g_i‖² with m_i = λ + (1 − λ) M_i (1 for a zero gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import Balancer, GradientBalancer


def purity(jacobian: Tensor) -> Tensor:
    """P_c = ½(1 + Σ_i g_ic / Σ_i |g_ic|) per coordinate (..., P) of Jacobians (..., K, P), ½ where
    all g_ic are 0. Accumulated task by task: P-sized temporaries only (a ``jacobian.abs()`` would be
    a K×P copy)."""
    rows = jacobian.unbind(-2)
    total = jacobian.sum(-2)
    magnitude = torch.zeros_like(total)
    for row in rows:
        magnitude.add_(row.abs())
    nonzero = magnitude > 0
    ratio = torch.where(nonzero, total / torch.where(nonzero, magnitude, torch.ones_like(magnitude)),
                        torch.zeros_like(total))
    return 0.5 * (1.0 + ratio)


def graddrop_multipliers(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> Tensor:
    """Per-entry multipliers m_ic = λ + (1 − λ) M_ic (..., K, P) for uniforms U (..., P)."""
    keep_positive = uniform < purity(jacobian)  # (..., P)
    return torch.stack([_row_multiplier(row, keep_positive, leak) for row in jacobian.unbind(-2)], -2)


def _row_multiplier(row: Tensor, keep_positive: Tensor, leak: float) -> Tensor:
    """m_i (..., P) of one task: λ + (1 − λ)·[row's sign is the kept one]·[row ≠ 0]."""
    mask = torch.where(row > 0, keep_positive, ~keep_positive) & (row != 0)
    return leak + (1.0 - leak) * mask.to(row.dtype)


def masked_sum(jacobian: Tensor, uniform: Tensor, leak: float = 0.0) -> tuple[Tensor, Tensor]:
    """The GradDrop direction d = Σ_i m_i ⊙ g_i (..., P) and the effective weights (..., K) of
    Jacobians (..., K, P), one task at a time: P-sized temporaries instead of the K×P multipliers."""
    keep_positive = uniform < purity(jacobian)
    direction = torch.zeros_like(jacobian.select(-2, 0))
    weights = []
    for row in jacobian.unbind(-2):
        mg = _row_multiplier(row, keep_positive, leak).mul_(row)
        direction.add_(mg)
        weights.append(_effective_weight(row, mg))
    return direction, torch.stack(weights, -1)


def _effective_weight(row: Tensor, masked: Tensor) -> Tensor:
    """⟨m ⊙ g, g⟩/‖g‖² (...) (1 for a zero gradient), on g/max|g| so the squares neither overflow nor
    underflow: ⟨m ⊙ g, g⟩/‖g‖² = ⟨m ⊙ g/s, g/s⟩/‖g/s‖² for any s > 0."""
    peak = row.abs().amax(-1, keepdim=True)
    scale = torch.where(peak > 0, peak, torch.ones_like(peak))  # no host sync (K of them per step on a GPU)
    r = row / scale
    energy, kept = (r * r).sum(-1), ((masked / scale) * r).sum(-1)
    return torch.where(energy > 0, kept / torch.where(energy > 0, energy, torch.ones_like(energy)),
                       torch.ones_like(energy))


def effective_weights(jacobian: Tensor, multipliers: Tensor) -> Tensor:
    """w_i = ⟨m_i ⊙ g_i, g_i⟩/‖g_i‖² (..., K) (1 for a zero gradient); rows are rescaled by their
    max |entry| first so the squares neither overflow nor underflow."""
    return torch.stack([_effective_weight(g, m * g) for g, m in zip(jacobian.unbind(-2), multipliers.unbind(-2))], -1)


class GradDrop(GradientBalancer):
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
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _generator_on(self, device: torch.device) -> torch.Generator:
        # Draw U where the gradients live (no P-sized host→device copy per step). The first
        # move to a new device re-seeds from ``seed``, so a run is reproducible per device.
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        self.row_generators = [b.generator for b in rows]  # each init's own stream

    def direction_rows(self, jacobian: Tensor, losses: Tensor) -> RowStep:
        """Batch-first rule on Jacobians (..., K, P): uniforms U (..., P) from the generator (one per row
        after :meth:`start_rows`), then the masked sum; ``weights`` and ``direction`` are tensors on
        the Jacobian's device."""
        p = jacobian.shape[-1]
        if jacobian.dim() == 2:
            gen = self._generator_on(jacobian.device)
            uniform = torch.rand(p, generator=gen, device=jacobian.device, dtype=jacobian.dtype)
        else:  # one draw per row from its own generator (CPU: the toy)
            uniform = torch.stack([torch.rand(p, generator=g, dtype=jacobian.dtype) for g in self.row_generators])
        direction, weights = masked_sum(jacobian, uniform, self.leak)
        return RowStep(weights, direction=direction)

    def combine(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        out = self.direction_rows(jacobian, losses)
        return out.direction, out.weights

    def _extra_state(self) -> dict[str, Any]:
        return {"generator_device": str(self.generator.device), "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator = torch.Generator(device=torch.device(state["generator_device"]))
        self.generator.set_state(state["generator"])
