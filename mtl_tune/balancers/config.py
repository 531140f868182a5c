"""``config`` — ConFIG, Conflict-Free Inverse Gradients (Liu, Chu, Thuerey, "ConFIG: Towards
Conflict-free Training of Physics Informed Neural Networks", ICLR'25, https://arxiv.org/abs/2408.11104).

The update has the same positive cosine with every task gradient and the length of the sum of
the gradients' projections on it (eq. 2 of the paper):

    uᵢ = gᵢ/‖gᵢ‖,  U = [u₁ … u_K]ᵀ,   d_u = U⁺ w  (w = 1: U d_u = w, the equal-cosine conditions),
    d = (Σᵢ gᵢᵀ d̂) d̂,   d̂ = d_u/‖d_u‖.

**In the Gramian.** U⁺ = Uᵀ(U Uᵀ)⁺, so d_u = Uᵀ C⁺ w with C = U Uᵀ the cosine matrix
(Cᵢⱼ = Gᵢⱼ/(‖gᵢ‖‖gⱼ‖), G = J Jᵀ): the pseudo-inverse solution lies in the span of the gradients,
d_u = Σᵢ βᵢ gᵢ with β = D⁻¹C⁺w (D = diag ‖gᵢ‖). With q = Gβ, ‖d_u‖² = βᵀq and Σᵢ gᵢᵀd_u = Σᵢ qᵢ, so

    d = Σᵢ cᵢ gᵢ,   c = (Σⱼ qⱼ / βᵀq) · β,

a combination with weights from the K×K Gramian alone (``supports_gram``; batch-first: one batched
pseudo-inverse of the (…, K, K) cosine matrices). K = 2 (tested): d = ½(‖g₁‖ + ‖g₂‖)(u₁ + u₂),
i.e. c = (‖g₁‖ + ‖g₂‖)/(2‖g_i‖); exactly opposite gradients give d = 0.

C⁺ is taken on C's eigenvalues with the relative cut-off :data:`RCOND` = 1e-12 (singular values of U
below 1e-6 of the largest count as zero), the float64 counterpart of the official
``torch.linalg.lstsq``/``pinv`` on the K×P matrix U (whose own cut-off is max(K, P)·eps on the
singular values): the two agree except for nearly dependent unit gradients, where the official
solve amplifies rounding noise. A zero gradient has no unit vector: its row of U is 0 (as the
official ``nan_to_num``), it drops out of the conditions and gets cᵢ = 0; all gradients zero → d = 0.
If w has no component in the range of C (K = 2: exactly opposite gradients) d_u = 0 and d = 0.

Official code: https://github.com/tum-pbs/ConFIG (``conflictfree/grad_operator.py`` at commit
9050c3f12a5c255a238c2f5660b1f9942ae8a6aa: ``ConFIG_update`` with ``EqualWeight`` and
``ProjectionLength``). Departures (docs/methods.md#config): for K = 2 the official operator uses a
separate two-gradient form (``ConFIG_update_double``, the same vector in exact arithmetic) that
divides by the norms of the gradients' mutually orthogonal parts, undefined for parallel gradients;
we use the one Gramian formula for every K. The official momentum variant (M-ConFIG) is not
offered. TorchJD's ``ConFIG`` (compared against torchjd 0.18.0) is the same formula with ``pinv``.

Conventions: **sum** scale (the length is the *sum* of the projections, as the paper: at the scale
of the summed loss, like the ×K methods, docs/methods.md#update-scale); ``preferences`` p replace
w = 1 (only their direction matters: they tilt d̂, the length stays Σ projections); heads get their
unweighted task gradients; no clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from mtl_tune.balancers._aligned import check_preferences
from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import GradientBalancer

#: eigenvalues of the cosine matrix below this fraction of the largest are treated as zero
RCOND = 1e-12


def config_rows(gram: np.ndarray, preferences: np.ndarray | None = None) -> np.ndarray:
    """ConFIG coefficients c (..., K) with d = Σ cᵢ gᵢ for Gram matrices (..., K, K) (see the module
    docstring); ``preferences`` w (K,) replace the ones vector.

    Every step is a few K-sized NumPy calls (the toy runs this 35 000 times per init): masked
    divisions (``where=``) instead of ``np.where`` chains, ``np.add.reduce`` (what ``.sum`` calls)
    without the method's wrapper, and :func:`_pinv_hermitian` for NumPy's ``pinv``."""
    g = np.asarray(gram, dtype=np.float64)
    k = g.shape[-1]
    w = _ones(k) if preferences is None else np.asarray(preferences, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
    nonzero = norms > 0.0
    inv = np.divide(1.0, norms, out=np.zeros(norms.shape), where=nonzero)    # 1/‖gᵢ‖, 0 for a zero gradient
    cos = g * inv[..., :, None] * inv[..., None, :]
    diagonal = _arange(k)
    cos[..., diagonal, diagonal] = nonzero                    # unit rows have norm 1 exactly; zero rows 0
    beta = inv * (_pinv_hermitian(cos, RCOND) @ w)
    q = (g @ beta[..., None])[..., 0]
    energy = np.add.reduce(beta * q, axis=-1)                 # ‖d_u‖²
    length = np.add.reduce(q, axis=-1)                        # Σᵢ gᵢᵀ d_u
    ratio = np.divide(length, energy, out=np.zeros(energy.shape), where=energy > 0.0)
    return ratio[..., None] * beta


@lru_cache(maxsize=64)
def _ones(k: int) -> np.ndarray:
    """The ones vector w of the paper (made once per K; read-only, as it is shared)."""
    w = np.ones(k)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=64)
def _arange(k: int) -> np.ndarray:
    """0, …, K − 1 (made once per K; read-only, as it is shared)."""
    i = np.arange(k)
    i.flags.writeable = False
    return i


def _pinv_hermitian(a: np.ndarray, rcond: float) -> np.ndarray:
    """``np.linalg.pinv(a, rcond=rcond, hermitian=True)`` for real symmetric (..., K, K): the same
    operations in the same order (the same floats: tests/balancers/test_config.py compares them), with
    NumPy's wrappers around them left out (on the toy's 5 rows of 2 × 2: ~55 µs a call, eigh ~7).

    NumPy's hermitian SVD sorts |eigenvalues| descending with an argsort and three
    ``take_along_axis``; ``eigh`` returns them ascending, so where |λ| is strictly increasing in every
    row (a positive semi-definite matrix's, bar rounding) the order is the reversal, taken by slicing."""
    s, u = np.linalg.eigh(a)
    sgn = np.copysign(1.0, s)                                 # (avoid zero sign, as NumPy)
    s = np.abs(s)
    if (s[..., 1:] > s[..., :-1]).all():                      # argsort(s)[..., ::-1] is K − 1, …, 0
        sgn, s, u = sgn[..., ::-1], s[..., ::-1], u[..., ::-1]
    else:                                                     # ties or another order: NumPy's sort
        order = np.argsort(s)[..., ::-1]
        sgn, s = np.take_along_axis(sgn, order, axis=-1), np.take_along_axis(s, order, axis=-1)
        u = np.take_along_axis(u, order[..., None, :], axis=-1)
    large = s > rcond * np.maximum.reduce(s, axis=-1, keepdims=True)
    inverse = np.divide(1.0, s, out=np.zeros(s.shape), where=large)
    # Vᵀ = (u·sgn)ᵀ, so pinv = V diag(1/s) Uᵀ = (u·sgn) @ (1/s ⊙ uᵀ), NumPy's two products
    return np.matmul(u * sgn[..., None, :], np.multiply(inverse[..., None], u.swapaxes(-1, -2)))


class ConFIG(GradientBalancer):
    """ConFIG (Liu et al., ICLR'25): the direction with equal cosine to every task gradient,
    scaled to the sum of the gradients' projections on it.

    Args:
        n_tasks: K, the number of tasks.
        preferences: K non-negative task weights w replacing the ones vector in U d_u = w (the
            target cosines are proportional to w); ``None`` = all ones (the paper).

    Common keyword arguments ``max_norm``, ``gradient_path`` and ``jacobian_engine``: see
    :class:`~mtl_tune.balancers.base.GradientBalancer`. ``StepInfo.weights`` are the
    coefficients c of d = Σ cᵢ gᵢ (K,).
    """
    name = "config"
    supports_gram = True

    def __init__(self, n_tasks: int, preferences: Sequence[float] | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        self.preferences = check_preferences(preferences, n_tasks, self.name)

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        return RowStep(config_rows(gram, self.preferences))
