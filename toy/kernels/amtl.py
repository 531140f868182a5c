"""Kernel of ``amtl`` (Aligned-MTL): x.grad = clip(Σ_i (W p)_i ∇ℓ_i), W = σ V_r Λ_r^{-1/2} V_rᵀ.

The 2 × 2 alignment in closed form (:mod:`toy.kernels._aligned`): eigenvalues with the
balancer's LAPACK arithmetic, so the rank truncation — a jump of the update that the
toy's trajectories hit on the Pareto set — switches at the same steps.
"""

from __future__ import annotations

from ._aligned import AlignedKernel


class AMTLKernel(AlignedKernel):
    name = "amtl"
    # not {"scale_mode": "rmse", "max_norm": 0.5}: from init 4 its free-running trajectory grows a
    # 1e-14 perturbation of x to 3e-8 in 150 steps (the balancer alone does the same), past the check
