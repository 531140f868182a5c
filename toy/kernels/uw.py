"""Kernel of ``uw`` (uncertainty weighting): x.grad = clip(Σ_i c·e^{−s_i} ∇ℓ_i), s trained by Adam.

Objective (:func:`mtl_tune.balancers.uw.uw_objective`), with precision e^{−s}:

* ``regression``:     L = ½ Σ_i (e^{−s_i} ℓ_i + s_i),  ∂L/∂ℓ_i = ½e^{−s_i},  ∂L/∂s_i = ½ − ½ℓ_i e^{−s_i};
* ``classification``: L = Σ_i (e^{−s_i} ℓ_i + ½ s_i),   ∂L/∂ℓ_i = e^{−s_i},   ∂L/∂s_i = ½ − ℓ_i e^{−s_i}.

The s-gradient is formed as autograd forms it (float64, the two contributions added, then cast
to s's dtype). s is the balancer's ``log_vars``, an ``nn.Parameter`` in the default dtype
(float32), so its Adam runs in float32 — the toy's ``optimizers`` gives it lr from the
balancer's ``param_groups()`` (else ``method_params_lr``). :class:`~toy.kernels._base.NumpyAdam`
reproduces torch's float64 Adam, not its float32 one (torch's float32 lerp/addcmul/sqrt round
differently from NumPy's), and a last-bit difference in s stays in s and moves every later
weight by ~1e-7 relative (23× the tolerance when tried); so s's Adam is
``torch.optim.Adam``'s single-tensor step in float32 (:meth:`UWKernel.adam_step`), its
torch-only roundings done by torch on a (B, 2) tensor — element-wise ops whose results do not
depend on the tensor's size (checked), so each row gets exactly the bits of its own 2-element
parameter. s is updated inside :meth:`~UWKernel.direction`, after the step's weights are taken,
as the optimizer step follows the backward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._base import Kernel, clip_rows, combine


def _group(balancer: Any, default_lr: float) -> dict[str, Any]:
    """s's Adam settings as ``toy.common.optimizers`` builds them: the balancer's own group
    (``param_groups()``) over the optimizer defaults, lr = ``method_params_lr`` if it has none."""
    groups = balancer.param_groups()
    if len(groups) != 1:
        raise ValueError(f"uw kernel: expected one parameter group, got {len(groups)}")
    return {"lr": default_lr, "betas": (0.9, 0.999), "eps": 1e-8, **groups[0]}


class UWKernel(Kernel):
    name = "uw"

    def setup(self) -> None:
        self.s = torch.stack([b.log_vars.detach().clone() for b in self.balancers])  # (B, 2), s's dtype
        self.dtype = self.s.numpy().dtype
        classification = np.array([b.form == "classification" for b in self.balancers])[:, None]
        self.coef = np.where(classification, 1.0, 0.5)    # ∂L/∂ℓ = coef·e^{−s} (and coef·ℓ in ∂L/∂s)
        groups = [_group(b, self.cfg.method_params_lr) for b in self.balancers]
        (self.beta1, self.beta2), self.eps = groups[0]["betas"], groups[0]["eps"]
        if any((tuple(g["betas"]), g["eps"]) != ((self.beta1, self.beta2), self.eps) for g in groups):
            raise ValueError("uw kernel: rows with different Adam betas/eps")
        self.lr = np.array([float(g["lr"]) for g in groups])[:, None]
        self.m = torch.zeros_like(self.s)
        self.v = torch.zeros_like(self.s)
        self.t = 0
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        s = self.s.numpy()                                  # shares memory with the tensor
        precision = torch.exp(torch.from_numpy(-s.astype(np.float64))).numpy()  # torch's exp: the balancer's bits
        self.weights = self.coef * precision
        d = combine(self.weights, jac)
        # ∂L/∂s: ½ from the s term plus −(coef·ℓ)·e^{−s} from the precision term, cast to s's dtype
        self.adam_step((0.5 - (self.coef * losses) * precision).astype(self.dtype))
        return clip_rows(d, self.max_norm) if self.clip else d

    def adam_step(self, grad: np.ndarray) -> None:
        """``torch.optim.Adam``'s single-tensor step on s (float32), per-row lr, bit for bit.

        lerp_ (fused multiply-add inside), addcmul_ and sqrt stay torch calls (NumPy rounds
        them differently); the rest is single IEEE float32 operations, the same in NumPy:
        v·β₂, √v/√(1 − β₂ᵗ) + ε (Python-float scalars are cast to float32 first, as torch
        does) and addcdiv_'s s + (value·m)/denom with value = −lr/(1 − β₁ᵗ) cast to float32
        (checked bit for bit against torch.optim.Adam over 5 000 steps, several lrs)."""
        f32 = self.dtype.type
        g = torch.from_numpy(grad)
        self.t += 1
        self.m.lerp_(g, 1 - self.beta1)
        v = self.v.numpy()
        v *= f32(self.beta2)
        self.v.addcmul_(g, g, value=1 - self.beta2)
        denom = self.v.sqrt().numpy() / f32((1 - self.beta2 ** self.t) ** 0.5) + f32(self.eps)
        value = (-(self.lr / (1 - self.beta1 ** self.t))).astype(self.dtype)
        s = self.s.numpy()
        s += (value * self.m.numpy()) / denom
