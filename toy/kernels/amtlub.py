"""Kernel of ``amtlub`` (Aligned-MTL-UB): Aligned-MTL on the representation Jacobian J_z.

On the toy z = x (the lockstep path hands the proxy leaf as ``representation``), so
J_z = J and ``backward(z, d_z)`` writes d_z into x.grad: the same update as ``amtl``
(:class:`toy.kernels._aligned.AlignedKernel`), then the base class's ``max_norm`` clipping.
"""

from __future__ import annotations

from ._aligned import AlignedKernel


class AMTLUBKernel(AlignedKernel):
    name = "amtlub"
    jacobian_error = "produced a non-finite representation gradient"  # RepresentationBalancer checks d_z
