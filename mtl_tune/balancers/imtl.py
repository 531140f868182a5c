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
solution is unique and identical to it. Degenerate cases, documented choices:

* collinear / duplicated gradients (D Uᵀ singular, the official code inverts it or adds a
  1e-8 ridge): the conditions have many solutions; we take the minimum-norm one — finite,
  and still with equal projections (e.g. opposite gradients give d = 0 and the K = 2 α).
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

import torch
from torch import Tensor

from mtl_tune.balancers.base import BalancerError, GradientBalancer

#: singular values below this fraction of the largest are treated as zero.
RCOND = 1e-12
#: relative residual above which the equal-projection system counts as inconsistent.
RESIDUAL_TOL = 1e-6


def imtl_g_weights(gram_matrix: Tensor) -> tuple[Tensor, int, float]:
    """IMTL-G weights α (K,), the number of zero-gradient tasks and the common projection t.

    Works on the K×K Gram matrix A = G Gᵀ only (float64, CPU). See the module docstring.
    """
    a = gram_matrix.detach().double().cpu()
    k = a.shape[0]
    norms = a.diagonal().clamp_min(0).sqrt()
    nonzero = norms > 0
    n_zero = int((~nonzero).sum())
    if n_zero == k:
        return torch.full((k,), 1.0 / k, dtype=torch.float64), n_zero, 0.0
    idx = nonzero.nonzero().flatten()
    n = norms[idx]
    m = idx.numel()
    cos = (a[idx][:, idx] / torch.outer(n, n)).clamp(-1.0, 1.0)
    w = 1.0 / n
    w_norm = torch.linalg.vector_norm(w)
    system = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    system[:m, :m] = cos
    system[:m, m] = -1.0
    system[m, :m] = w / w_norm
    rhs = torch.zeros(m + 1, dtype=torch.float64)
    rhs[m] = 1.0 / w_norm
    sol = torch.linalg.lstsq(system, rhs.unsqueeze(1), rcond=RCOND, driver="gelsd").solution.squeeze(1)
    residual = torch.linalg.vector_norm(system @ sol - rhs)
    if not bool(torch.isfinite(sol).all()) or float(residual) > RESIDUAL_TOL * float(rhs[m]):
        raise BalancerError("imtl: no combination of the task gradients with weights summing to 1 has equal "
                            "projections on every unit gradient (the gradients are affinely dependent); "
                            f"IMTL-G is undefined here (residual {float(residual):.3g})")
    alpha = torch.zeros(k, dtype=torch.float64)
    alpha[idx] = sol[:m] / n
    return alpha, n_zero, float(sol[m])


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

    def gram_weights(self, gram_matrix: Tensor, losses: Tensor) -> Tensor:
        alpha, n_zero, t = imtl_g_weights(gram_matrix)
        self._last = {"zero_grad_tasks": n_zero, "projection": t}
        return alpha.to(gram_matrix.device)

    def _step_extras(self) -> dict[str, Any]:
        return dict(self._last)
