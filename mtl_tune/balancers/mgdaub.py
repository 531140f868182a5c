"""``mgdaub`` — MGDA-UB: MGDA on representation gradients (Sener & Koltun, NeurIPS'18, §3.3).

Sener & Koltun bound the min-norm objective over shared parameters by one over the shared
representation z = f(x; θ_s): ‖Σ w_i ∇_θ ℓ_i‖ ≤ ‖∂z/∂θ‖ · ‖Σ w_i ∇_z ℓ_i‖, and minimise the
cheap upper bound instead,

    w* = argmin_{w ∈ Δ} ‖Σ_i w_i ∇_z ℓ_i‖² = argmin_{w ∈ Δ} wᵀ A_z w,   A_z = J_z J_zᵀ,

where J_z is the K×numel(z) Jacobian of the losses w.r.t. z (batch and spatial positions
included, so A_z scales with batch size — harmless, the simplex solution is scale-free).
The encoder receives the single vector-Jacobian product ∂z/∂θ_sᵀ (Σ_i w*_i ∇_z ℓ_i): one
backward through the trunk instead of K.

Conventions (docs/methods.md#mgdaub; the only official code is SamsungLabs/MTL):
* heads get their **unweighted** task gradients ∇_{θ_i} ℓ_i (Samsung runs the decoders on a
  detached copy of z, so only the encoder sees the weights);
* the weights sum to 1 — **no ×K** (Samsung convention), unlike our ``mgda``;
* ``normalization`` as in ``mgda`` (none / loss / loss+ / norm), applied to the z-gradients.

:class:`~mtl_tune.balancers._representation.RepresentationBalancer` (shared with ``amtlub``)
holds the contract and the back-propagation; this module only maps the representation
Jacobian to a z-direction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._representation import RepresentationBalancer
from mtl_tune.balancers._rows import RowStep, host, one_row
from mtl_tune.balancers.mgda import NORMALIZATIONS, normalized_min_norm


def mgdaub_coefficients(gram_matrix: Tensor, losses: Tensor, normalization: str = "none") -> Tensor:
    """Raw-gradient coefficients c (K,) with d_z = Σ_i c_i ∇_z ℓ_i.

    c_i = w*_i / n_i where w* is the min-norm simplex point of the normalised Gram matrix
    A_ij / (n_i n_j) and n the ``normalization`` divisors (all ones for ``"none"``, so Σc = 1).
    Raises BalancerError when the active-set solver does not converge (report, do not guess).
    """
    w = one_row(normalized_min_norm(host(gram_matrix), host(losses), normalization, "mgdaub"))
    return torch.from_numpy(w).to(gram_matrix.device)


class MGDAUB(RepresentationBalancer):
    """MGDA-UB (Sener & Koltun, NeurIPS'18): MGDA's weights from the gradients w.r.t. the
    shared representation z (needs ``representation``).

    Args:
        n_tasks: K, the number of tasks.
        normalization: as in :class:`~mtl_tune.balancers.mgda.MGDA`.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "mgdaub"

    def __init__(self, n_tasks: int, normalization: str = "none", **kw) -> None:
        super().__init__(n_tasks, **kw)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgdaub: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        return normalized_min_norm(gram, losses, self.normalization, self.name)
