"""``imtl`` — IMTL-G, gradient part of Impartial Multi-Task Learning (Liu et al., ICLR'21).

IMTL-G looks for weights α (Σα = 1) such that d = Σ_i α_i g_i has the **same projection
on every unit task gradient** u_i = g_i/‖g_i‖:  u_iᵀ d = t for all i. The paper solves it
in closed form with D = [g_1 − g_j]_{j≥2}, U = [u_1 − u_j]_{j≥2}:

    α_{2:K} = g_1 Uᵀ (D Uᵀ)^{-1},   α_1 = 1 − Σ_{j≥2} α_j.

For K = 2 this is α = (‖g_2‖, ‖g_1‖)/(‖g_1‖ + ‖g_2‖) and d = ‖g_1‖‖g_2‖/(‖g_1‖+‖g_2‖)·(u_1 + u_2).

We solve the same conditions as one linear system in the well-scaled variables β_j = ‖g_j‖α_j
(so d = Σ_j β_j u_j), with the cosine matrix C_ij = u_iᵀu_j and w_j = 1/‖g_j‖:

    [ C   −1 ] [β]   [0]
    [ wᵀ   0 ] [t] = [1]      (last row divided by ‖w‖, which leaves the solution unchanged),

by least squares (SVD, relative cut-off 1e-12). Where the closed form is defined the
solution is unique and identical to it. For K = 2 we use the closed form itself, on every row
at once (:func:`imtl_rows`): the 3×3 system has condition number ~1/(1 − cos θ), so near
parallel gradients its solve returns the closed form plus rounding noise of relative size
~ε/(1 − cos θ), and for exactly parallel ones (where every α has equal projections) its
minimum-norm answer; the closed form is exact in both cases. Degenerate cases, documented choices:

* collinear / duplicated gradients, K ≥ 3 (D Uᵀ singular, the official code inverts it or adds a
  1e-8 ridge): the conditions have many solutions; we take the minimum-norm one — finite,
  and still with equal projections. For K = 2 the closed form (opposite gradients: d = 0).
* an exactly zero gradient has no unit vector: the task is dropped from the equal-projection
  conditions and gets α_i = 0 (its gradient adds nothing to d). This is NOT the limit
  ‖g_i‖ → 0 of the closed form (which puts all weight on the vanishing task and sends d → 0);
  we prefer letting the other tasks progress. Counted in ``extras["zero_grad_tasks"]``.
  With weighted heads, such a task's head gets no gradient on that step.
* all gradients zero: any α gives d = 0; we report the minimum-norm α = 1/K.
* no α with Σα = 1 satisfies the conditions (e.g. g_3 = (g_1 + g_2)/2 with g_1 ⟂ g_2 and
  equal norms: only d = 0 has equal projections, and 0 is not an affine combination):
  raises :class:`BalancerError` — the method is undefined there.

α may be negative, and t (reported as ``extras["projection"]``) may even be negative for
K ≥ 3, in which case d increases every loss to first order — a property of IMTL-G itself.

Conventions (docs/methods.md#imtl, FAMO-family ``IMTLG``): heads are **weighted** by α (the
official code backpropagates Σ α_i ℓ_i); α sums to 1 and there is **no ×K** (the official
code does not rescale), so the update is at the scale of the mean loss; no clipping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._rows import RowStep, host
from mtl_tune.balancers.base import BalancerError, GradientBalancer

#: singular values below this fraction of the largest are treated as zero.
RCOND = 1e-12
#: relative residual above which the equal-projection system counts as inconsistent.
RESIDUAL_TOL = 1e-6
UNDEFINED = ("imtl: no combination of the task gradients with weights summing to 1 has equal projections on "
             "every unit gradient (the gradients are affinely dependent); IMTL-G is undefined here")


def imtl_rows(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IMTL-G on float64 Gram matrices (..., K, K): α (..., K), the number of zero-gradient tasks (...),
    the common projection t (...) and whether the conditions are consistent (...; α is NaN where not).

    K = 2: the closed form α = (‖g₂‖, ‖g₁‖)/(‖g₁‖ + ‖g₂‖) on every row (a zero gradient's task is
    dropped and the other gets α = 1; both zero: ½ each). K ≥ 3: the least-squares system of the
    module docstring, row by row.
    """
    k = gram.shape[-1]
    norms = np.sqrt(np.maximum(gram.diagonal(0, -2, -1), 0.0))
    if k == 2:
        # the common case first: every norm nonzero and finite on every row (a zero, an infinite or a
        # NaN norm makes the product 0, ∞ or NaN; so may an under- or overflow, which only costs the
        # general path)
        return _imtl2_nonzero(gram, norms) if 0.0 < norms.prod() < np.inf else _imtl2(gram, norms)
    rows, shape = gram.reshape(-1, k, k), gram.shape[:-2]
    alpha, n_zero, t = np.full((len(rows), k), np.nan), np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows))
    ok = np.ones(len(rows), dtype=bool)
    for r, (a, n_all) in enumerate(zip(rows, norms.reshape(-1, k))):
        alpha[r], n_zero[r], t[r], ok[r] = _imtl_one(a, n_all)
    return alpha.reshape(*shape, k), n_zero.reshape(shape), t.reshape(shape), ok.reshape(shape)


def _imtl2(gram: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`imtl_rows` for K = 2, any rows: the closed form, a zero gradient's task dropped."""
    n1, n2 = norms[..., 0], norms[..., 1]
    nonzero = (n1 > 0) & (n2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha1 = np.where(nonzero, n2 / (n1 + n2), np.where(n1 > 0, 1.0, np.where(n2 > 0, 0.0, 0.5)))
        # t = u₁ᵀd: n₁n₂(1 + cos θ)/(n₁ + n₂) = (n₁n₂ + a₁₂)/(n₁ + n₂); one task left: its ‖g‖
        t = np.where(nonzero, (n1 * n2 + gram[..., 0, 1]) / (n1 + n2), np.maximum(n1, n2))
    n_zero = (n1 == 0).astype(np.int64) + (n2 == 0)
    return np.stack([alpha1, 1.0 - alpha1], -1), n_zero, t, np.ones(n_zero.shape, dtype=bool)


def _imtl2_nonzero(gram: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_imtl2` on rows whose norms are all nonzero and finite: the branch its ``np.where`` selects
    there — the same operations on the same numbers, bit for bit — without the masks, the selections and
    the stack (~10 µs less on the toy's rows)."""
    n1, n2 = norms[..., 0], norms[..., 1]
    shape = gram.shape[:-2]
    total = n1 + n2
    alpha = np.empty((*shape, 2))
    alpha1 = np.divide(n2, total, out=alpha[..., 0])
    np.subtract(1.0, alpha1, out=alpha[..., 1])
    t = (n1 * n2 + gram[..., 0, 1]) / total
    return alpha, np.zeros(shape, dtype=np.int64), t, np.ones(shape, dtype=bool)


def _imtl_one(a: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, int, float, bool]:
    k = len(norms)
    idx = np.flatnonzero(norms > 0)
    m = len(idx)
    if m == 0:
        return np.full(k, 1.0 / k), k, 0.0, True
    n = norms[idx]
    cos = np.clip(a[np.ix_(idx, idx)] / np.outer(n, n), -1.0, 1.0)
    w = 1.0 / n
    w_norm = np.linalg.norm(w)
    system = np.zeros((m + 1, m + 1))
    system[:m, :m] = cos
    system[:m, m] = -1.0
    system[m, :m] = w / w_norm
    rhs = np.zeros(m + 1)
    rhs[m] = 1.0 / w_norm
    sol = np.linalg.lstsq(system, rhs, rcond=RCOND)[0]
    residual = np.linalg.norm(system @ sol - rhs)
    if not np.isfinite(sol).all() or residual > RESIDUAL_TOL * rhs[m]:
        return np.full(k, np.nan), k - m, float(residual), False
    alpha = np.zeros(k)
    alpha[idx] = sol[:m] / n
    return alpha, k - m, float(sol[m]), True


def imtl_g_weights(gram_matrix: Tensor) -> tuple[Tensor, int, float]:
    """IMTL-G weights α (K,), the number of zero-gradient tasks and the common projection t for one
    K×K Gram matrix (:func:`imtl_rows` on one row); raises BalancerError where IMTL-G is undefined."""
    alpha, n_zero, t, ok = imtl_rows(host(gram_matrix))
    if not ok:
        raise BalancerError(f"{UNDEFINED} (residual {float(t):.3g})")
    return torch.from_numpy(alpha), int(n_zero), float(t)


class IMTLG(GradientBalancer):
    """IMTL-G (Liu et al., ICLR'21): weights that give the combined gradient equal
    projections on every unit task gradient. No hyperparameter.

    Args:
        n_tasks: K, the number of tasks.

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).
    """
    name = "imtl"
    weighted_heads = True
    supports_gram = True

    def __init__(self, n_tasks: int, **kw) -> None:
        super().__init__(n_tasks, **kw)
        self._last: dict[str, Any] = {}

    def weights_rows(self, gram: np.ndarray, losses: np.ndarray) -> RowStep:
        alpha, n_zero, t, ok = imtl_rows(gram)
        if gram.ndim == 2:  # one row: the balancer's step reports these
            self._last = {"zero_grad_tasks": int(n_zero), "projection": float(t)} if ok else {}

        def reason(index: tuple[int, ...]) -> str:
            return f"{UNDEFINED} (residual {float(t[index]):.3g})"

        return RowStep(alpha, failed=~ok, reason=reason)

    def _step_extras(self) -> dict[str, Any]:
        return dict(self._last)
