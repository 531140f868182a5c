"""Float32 state of the GradNorm kernel (its weights), batched.

GradNorm (like FAMO, whose batch-first rule runs torch's own Adam on its (B, K) logits) keeps its
learnable weights as float32 tensors stepped by a private ``torch.optim.Adam``. Their trajectories are sensitive to the last bit of that state: FAMO's
logit gradient is a difference of two float32 logs of nearly equal losses (δ ≈ 1e-5, float32
resolution 6e-8), GradNorm's is the sign of G − target; Adam divides either by its own running
RMS, so a one-ulp difference in one step becomes a different step of the weights. The kernels
therefore redo the state updates **bit for bit** in float32: NumPy float32 for +, −, ×, ÷,
comparisons and casts (correctly rounded in both libraries; NumPy's are the cheaper calls), and
torch's own CPU kernels where torch does not round like NumPy (checked on torch 2.14, AVX512,
over 10⁴–10⁵ random inputs each):

* ``sqrt``, ``log`` and ``exp`` (softmax) of float32 go through MKL-VML / Sleef and differ from
  the correctly rounded value in ~10–30 % of inputs; they do the same on a (2,) tensor and on a
  (B, 2) tensor (one vectorised routine whatever the length), so batched torch calls reproduce
  the balancer's per-row ones; the float64 ``norm`` of a row differs from NumPy's √Σx² in the last bit;
* ``lerp_`` / ``addcmul_`` / ``add(·, alpha=)`` are one fused multiply-add in torch (NumPy has
  none), and again the same on (2,) and (B, 2) tensors;
* ``pow`` with a scalar exponent is ``std::pow`` on a (2,) tensor (its length is below the
  vector width, so the scalar tail loop runs) but Sleef on longer contiguous tensors: it runs on
  a non-contiguous view (:class:`ScalarPow`), which takes the same scalar loop;
* a two-element ``sum``/``mean`` is one addition (then a halving), ``reciprocal`` is 1/x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

F32 = np.float32


class Float32Adam:
    """The balancers' private ``torch.optim.Adam`` (single-tensor CPU path, no amsgrad) on the
    rows of a (B, n) float32 tensor, in place; row r follows ``optimizers[r]``'s hyperparameters.

    Per step t, as torch's ``_single_tensor_adam`` (γ = L2 weight decay, lr and γ per row):

        g ← g + γ·ξ                   (``grad.add(param, alpha=γ)``: one fused multiply-add)
        m ← m + (1 − β₁)(g − m)       (``lerp_``, fused)
        v ← β₂ v + (1 − β₂)·g·g       (``mul_`` then ``addcmul_``, fused)
        ξ ← ξ + (−lr/(1 − β₁ᵗ))·m / (√v / √(1 − β₂ᵗ) + ε)

    with the bias corrections in Python floats and every tensor op in float32, as there. All rows
    step together (a kernel's rows are stepped together; a failed row's state is never read).
    """

    def __init__(self, param: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if param.dtype != torch.float32 or param.dim() != 2 or param.shape[0] != len(optimizers):
            raise ValueError("Float32Adam steps a (B, n) float32 tensor, one optimizer per row")
        groups = [self._group(opt) for opt in optimizers]
        shared = {(g["betas"], g["eps"]) for g in groups}
        if len(shared) != 1:
            raise ValueError(f"Float32Adam: rows with different betas/eps {shared}")
        (self.beta1, self.beta2), self.eps = shared.pop()
        self.param, self.p = param, param.numpy()               # NumPy views of the same memory
        self.m = torch.zeros_like(param)
        self.m_np = self.m.numpy()
        self.v = torch.zeros_like(param)
        self.t = 0.0  # torch keeps a float32 step tensor and reads it with .item(): a Python float
        self.lr = np.array([g["lr"] for g in groups], dtype=np.float64)
        self.lr0 = float(self.lr[0]) if bool((self.lr == self.lr[0]).all()) else None
        wd = np.array([g["weight_decay"] for g in groups], dtype=np.float64)
        # torch skips the decay term when γ = 0; rows with γ = 0 next to decayed rows get g + 0·ξ = g
        self.wd = torch.from_numpy(wd).float()[:, None] if bool((wd != 0).any()) else None

    @staticmethod
    def _group(opt: torch.optim.Optimizer) -> dict:
        """The one parameter group of a fresh Adam, refused unless its step is the one reproduced here."""
        if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or opt.state:
            raise ValueError(f"Float32Adam reproduces a fresh torch.optim.Adam with one group, got {opt!r}")
        g = opt.param_groups[0]
        other = {k: g.get(k) for k in ("amsgrad", "maximize", "foreach", "fused", "capturable", "differentiable",
                                         "decoupled_weight_decay") if g.get(k)}
        if other:  # foreach/fused would be other kernels, the rest other arithmetic
            raise ValueError(f"Float32Adam reproduces the plain single-tensor Adam step, not {other}")
        return g

    def step(self, grad: np.ndarray) -> None:
        """One Adam step of every row with ``grad`` (B, n) float32 (NumPy)."""
        b1, b2 = self.beta1, self.beta2
        g = torch.from_numpy(grad)
        self.t += 1.0
        if self.wd is not None:
            # addcmul: g + (1·ξ)·γ, the same single rounding as torch's g + γ·ξ (add with alpha)
            g = torch.addcmul(g, self.param, self.wd)
        self.m.lerp_(g, 1 - b1)                                 # fused: torch
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)             # fused: torch
        bias1 = 1 - b1 ** self.t
        bias2_sqrt = (1 - b2 ** self.t) ** 0.5
        # torch casts the Python scalars to float32 and divides / adds in float32 (NumPy, same bits);
        # its float32 sqrt is VML's (torch)
        denom = self.v.sqrt().numpy() / F32(bias2_sqrt) + F32(self.eps)
        step = F32(-(self.lr0 / bias1)) if self.lr0 is not None else (-(self.lr / bias1)).astype(F32)[:, None]
        self.p += (step * self.m_np) / denom                    # addcdiv_: ξ + (value·m)/denom, unfused


class ScalarPow:
    """``r ** α`` per row with torch's scalar ``pow`` loop (what the balancer's (K,) tensor gets).

    ``alphas`` (B,) may differ between rows (variants): rows are grouped by value and each group
    is raised on a non-contiguous view (a stride-2 slice of a scratch buffer), so torch takes its
    element-by-element loop instead of the vectorised one (see the module docstring)."""

    def __init__(self, alphas: Sequence[float], width: int) -> None:
        alphas = [float(a) for a in alphas]
        self.groups: list[tuple[float, np.ndarray | None, np.ndarray, torch.Tensor]] = []
        for a in dict.fromkeys(alphas):
            rows = np.array([r for r, b in enumerate(alphas) if b == a])
            index = None if rows.size == len(alphas) else rows
            scratch = torch.empty(rows.size, width, 2, dtype=torch.float32)[..., 0]
            assert not scratch.is_contiguous()
            self.groups.append((a, index, scratch.numpy(), scratch))

    def __call__(self, r: np.ndarray) -> np.ndarray:
        """(B, width) float32 → r ** α row by row, float32."""
        if len(self.groups) == 1:
            a, _, view, scratch = self.groups[0]
            view[...] = r
            return torch.pow(scratch, a).numpy()
        out = np.empty_like(r)
        for a, index, view, scratch in self.groups:
            view[...] = r[index]
            out[index] = torch.pow(scratch, a).numpy()
        return out
