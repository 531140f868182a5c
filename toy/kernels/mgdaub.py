"""Kernel of ``mgdaub`` (MGDA-UB): x.grad = clip(Σ_i (w*_i/n_i) ∇_z ℓ_i), no ×K.

On the toy the representation is x itself (identity encoder: the lockstep path passes the
proxy leaf as ``representation``), so J_z = J and the single ``backward(z, d_z)`` of
:class:`~mtl_tune.balancers._representation.RepresentationBalancer` writes d_z into x.grad; the
base class then clips it (``max_norm``). w* is the min-norm simplex point of the normalised
Gram matrix A_ij/(n_i n_j) — for K = 2 the solver's own closed form
(:func:`toy.kernels.mgda.min_norm_weights_2`, the batched ``_two_task``) — and n the
``normalization`` divisors of :func:`mtl_tune.balancers.mgda.gradient_normalizers`.
Weights are the raw-gradient coefficients w*/n (they sum to 1 for ``none``).
"""

from __future__ import annotations

import numpy as np

from mtl_tune.balancers.mgda import NORMALIZATIONS
from ._aligned import gram_entries
from ._base import Kernel, clip_rows, combine
from .mgda import min_norm_weights_2


def normalizers(kinds: np.ndarray, norms: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Divisors n (B, 2): 1, |ℓ|, |ℓ|·‖g‖ or ‖g‖ per row kind (index into ``NORMALIZATIONS``);
    a zero divisor leaves that task unnormalised (n = 1), as ``gradient_normalizers``."""
    a = np.abs(losses)
    n = np.where(kinds == 0, 1.0, np.where(kinds == 1, a, np.where(kinds == 2, a * norms, norms)))
    return np.where(n > 0, n, 1.0)


class MGDAUBKernel(Kernel):
    name = "mgdaub"
    # "norm": from the init (0, 0) its trajectory amplifies a 1e-14 change of x to 1e-3 within
    # 150 steps; the free-running check holds because the engine's Adam is torch's bit for bit
    variants = ({"normalization": "loss"}, {"normalization": "loss+"}, {"normalization": "norm"}, {"max_norm": 0.5})

    def setup(self) -> None:
        kinds = [NORMALIZATIONS.index(b.normalization) for b in self.balancers]
        self.kinds = np.array(kinds)[:, None]
        self.plain = not any(kinds)          # every row "none": n = 1, skip the divisors
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        a11, a12, a22 = gram_entries(jac)
        # check_losses(finite=True); a non-finite J_z gives a NaN d_z, which the balancer rejects
        self.fail_bad_inputs(step, losses, jac, "produced a non-finite representation gradient")
        if self.plain:
            self.weights = min_norm_weights_2(a11, a12, a22)
        else:
            norms = np.sqrt(np.maximum(np.stack([a11, a22], -1), 0.0))
            n = normalizers(self.kinds, norms, losses)
            n1, n2 = n[:, 0], n[:, 1]
            self.weights = min_norm_weights_2(a11 / (n1 * n1), a12 / (n1 * n2), a22 / (n2 * n2)) / n
        d = combine(self.weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
