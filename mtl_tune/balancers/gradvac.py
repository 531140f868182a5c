"""``gradvac`` — Gradient Vaccine (Wang, Tsvetkov, Firat, Cao, ICLR'21).

GradVac generalises PCGrad: instead of only removing negative similarity it raises the
cosine between task gradients to an adaptive target. State: targets φ̂ ∈ R^{K×K} (init 0).
For each task i, g_i' ← g_i; for every j ≠ i in a random order, with φ_ij = cos(g_i', g_j):

    if φ_ij < φ̂_ij:   g_i' ← g_i' + ‖g_i'‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j
    φ̂_ij ← (1 − β) φ̂_ij + β φ_ij

after which cos(g_i', g_j) = φ̂_ij exactly. The update is d = Σ_i g_i' (a sum, so already
at the scale of the summed loss; no extra ×K). With φ̂ ≡ 0 and β = 0 the correction is
−⟨g_i', g_j⟩/‖g_j‖² g_j when φ_ij < 0: exactly PCGrad.

``target_update`` (docs/methods.md#gradvac):
* ``"paper"`` (default): the EMA is updated for every visited pair, so φ̂ tracks the
  observed similarities (and can become positive, which is the point of the method).
* ``"official"``: SamsungLabs/MTL and LibMTL update φ̂ only inside the ``if`` — φ̂ can then
  only move down from 0 and the method reduces to a damped PCGrad. No published table of
  our benchmarks needs it; offered for comparisons with those codes.

Like :mod:`mtl_tune.balancers.pcgrad` every g_i' stays a combination of the original
gradients, so we run the loop on coefficient vectors with the K×K Gram matrix (O(K³), not
O(K²P)), keeping A c and ‖g_i'‖² up to date incrementally. Orders come from the balancer's
own seeded generator (same draws as ``pcgrad`` for the same seed). Guards (documented, the
official code has none and NaNs): a zero g_j or a zero g_i' is skipped (no cosine exists);
cosines are clipped to [−1, 1] and targets to [−1 + 1e-6, 1 − 1e-6] when used (a target of
exactly ±1 would need an infinite correction).

Heads get the unweighted task gradients. Samsung's GradVac writes only the shared gradient,
so its decoders are never trained (an apparent bug, docs/methods.md#gradvac); we fix that.
Granularity (LibMTL's per-layer / per-matrix targets) is not offered: whole shared vector.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers.base import GradientBalancer

TARGET_UPDATES = ("paper", "official")
#: targets are kept this far from ±1 when used (the correction diverges at ±1).
TARGET_MARGIN = 1e-6


def vaccine_step(gi_norm: float, gj_norm: float, phi: float, target: float) -> float:
    """Coefficient of g_j that moves cos(g_i', g_j) from ``phi`` up to ``target``."""
    return gi_norm * (target * math.sqrt(1.0 - phi * phi) - phi * math.sqrt(1.0 - target * target)) / (
        gj_norm * math.sqrt(1.0 - target * target))


def gradvac_coefficients(gram_matrix: np.ndarray, targets: np.ndarray, orders: list[list[int]], beta: float,
                         target_update: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """Coefficients c (K,) with d = Σ_j c_j g_j, and the updated targets φ̂ (K×K).

    ``orders[i]`` lists the tasks j visited for task i (i itself is skipped).
    """
    a = np.asarray(gram_matrix, dtype=np.float64)
    phi_hat = np.array(targets, dtype=np.float64, copy=True)
    k = a.shape[0]
    norms = np.sqrt(np.clip(np.diag(a), 0.0, None))
    total = np.zeros(k)
    for i in range(k):
        c = np.zeros(k)
        c[i] = 1.0
        ac = a[:, i].copy()  # A c, so ⟨g_i', g_j⟩ = (A c)_j
        sq = float(a[i, i])  # ‖g_i'‖²
        for j in orders[i]:
            if j == i or norms[j] == 0.0 or sq <= 0.0:
                continue
            gi_norm = math.sqrt(sq)
            phi = float(np.clip(ac[j] / (gi_norm * norms[j]), -1.0, 1.0))
            target = float(np.clip(phi_hat[i, j], -1.0 + TARGET_MARGIN, 1.0 - TARGET_MARGIN))
            if phi < target:
                step = vaccine_step(gi_norm, float(norms[j]), phi, target)
                sq = max(sq + 2.0 * step * ac[j] + step * step * a[j, j], 0.0)
                c[j] += step
                ac += step * a[:, j]
                if target_update == "official":
                    phi_hat[i, j] = (1.0 - beta) * phi_hat[i, j] + beta * phi
            if target_update == "paper":
                phi_hat[i, j] = (1.0 - beta) * phi_hat[i, j] + beta * phi
        total += c
    return total, phi_hat


class GradVac(GradientBalancer):
    """Gradient Vaccine (Wang et al., ICLR'21): pairwise corrections towards adaptive
    cosine-similarity targets.

    Args:
        n_tasks: K, the number of tasks.
        beta: EMA rate of the target similarities, in [0, 1] (default 0.5).
        target_update: ``"paper"`` (update every pair's target, default) or ``"official"``
            (only when the correction fires).
        seed: seed of the random task orders (int, default 0).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "gradvac"
    supports_gram = True  # the vaccinated gradients stay combinations of the originals

    def __init__(self, n_tasks: int, beta: float = 0.5, target_update: str = "paper", seed: int = 0,
                 **kw) -> None:
        super().__init__(n_tasks, **kw)
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"gradvac: beta must lie in [0, 1], got {beta}")
        if target_update not in TARGET_UPDATES:
            raise ValueError(f"gradvac: target_update must be one of {TARGET_UPDATES}, got {target_update!r}")
        self.beta, self.target_update = float(beta), target_update
        self.generator = torch.Generator().manual_seed(int(seed))
        self.targets = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        orders = [torch.randperm(self.n_tasks, generator=self.generator).tolist() for _ in range(self.n_tasks)]
        coef, targets = gradvac_coefficients(gram_matrix.detach().cpu().numpy(), self.targets.numpy(), orders,
                                             self.beta, self.target_update)
        self.targets = torch.from_numpy(targets)
        return torch.from_numpy(coef).to(gram_matrix.device)

    def _extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "targets": self.targets.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        targets = torch.as_tensor(state["targets"], dtype=torch.float64)
        if targets.shape != (self.n_tasks, self.n_tasks):
            raise ValueError(f"gradvac: saved targets have shape {tuple(targets.shape)}, "
                             f"expected ({self.n_tasks}, {self.n_tasks})")
        self.targets = targets.clone()
