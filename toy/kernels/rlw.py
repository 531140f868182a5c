"""Kernel of ``rlw`` (random loss weighting): x.grad = clip(Σ_i w_i ∇ℓ_i), fresh w ∈ Δ each step.

Each row draws from its own balancer's ``torch.Generator`` (seeded per init on both paths),
so the weights are the balancer's. Drawing them one step at a time (torch.randn(2) per row
and step) would cost ~3 µs per row and step; instead every row pre-draws the uniforms of a
chunk of steps with one ``torch.rand`` call on its generator and turns them into weights the
way torch does. That takes the same numbers off each generator in the same order because
(PyTorch CPU, checked bit for bit against :func:`~mtl_tune.balancers.rlw.rlw_weights`):

* ``torch.rand(n, float64)`` is n serial draws of ``uniform_real_distribution<double>`` — one
  64-bit draw each, the same a normal draw uses for its two uniforms;
* ``torch.randn(n, float64)`` for n < 16 is element by element Box–Muller: without a cached
  value it takes u₁, u₂ and returns √(−2 log1p(−u₂))·cos(2π u₁), caching the sine partner
  in the generator for the next normal draw (also across calls).

``normal``: w = softmax(σ·z) with z the (cos, sin) pair of one Box–Muller draw (no cache is
ever left: randn(2) uses both halves). ``dirichlet``: :func:`~mtl_tune.balancers.rlw.sample_gamma`
replayed draw by draw (Marsaglia–Tsang rejection loop, the cache carried across calls, the
α < 1 boost) in Python scalars on the pre-drawn stream — its randomness decides how many
uniforms a step takes, so it cannot be vectorised over steps. The scalar maths goes through
``math`` (the C library functions PyTorch's CPU sampler calls), softmax and the α < 1 power
through torch on the shapes the balancer uses, so the weights agree bit for bit.

The generators run up to one chunk ahead of the steps taken (their state is not part of
the toy's output).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._base import Kernel, clip_rows, combine

#: steps pre-drawn per refill: the per-refill overhead (a few torch calls per row) is
#: amortised; 35 000 steps take 35 refills
CHUNK = 1024


class _Stream:
    """A generator's uniform doubles, pre-drawn in blocks, and its cached normal (if any)."""

    def __init__(self, generator: torch.Generator, block: int) -> None:
        self.generator, self.block = generator, block
        self.buf: list[float] = []
        self.i = 0
        self.cache: float | None = None

    def uniform(self) -> float:
        if self.i == len(self.buf):
            self.buf = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
            self.i = 0
        u = self.buf[self.i]
        self.i += 1
        return u

    def normal(self) -> float:
        """One element of ``torch.randn`` (CPU, float64, small tensor): Box–Muller with a cache."""
        if self.cache is not None:
            z, self.cache = self.cache, None
            return z
        u1, u2 = self.uniform(), self.uniform()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self.cache = r * math.sin(theta)
        return r * math.cos(theta)


def dirichlet_pair(stream: _Stream, alpha: float) -> tuple[float, float]:
    """One draw of ``rlw_weights(2, …, "dirichlet", concentration=alpha)`` from ``stream``:
    ``sample_gamma(alpha, 2)`` normalised, operation for operation."""
    a = alpha + 1.0 if alpha < 1 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = [0.0, 0.0]
    todo = [0, 1]
    while todo:
        xs = [stream.normal() for _ in todo]     # randn(len(todo)), then rand(len(todo))
        us = [stream.uniform() for _ in todo]
        rejected = []
        for j, x, u in zip(todo, xs, us):
            b = 1.0 + c * x
            v = b * b * b                        # torch's pow(·, 3) is x·x·x
            if v > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(max(v, 1e-300)):
                out[j] = d * v
            else:
                rejected.append(j)
        todo = rejected
    if alpha < 1:  # boost: Gamma(α) = Gamma(α + 1)·u^{1/α}, the power as torch computes it for 2 values
        boost = (torch.tensor([stream.uniform(), stream.uniform()], dtype=torch.float64) ** (1.0 / alpha)).tolist()
        out = [out[0] * boost[0], out[1] * boost[1]]
    total = out[0] + out[1]
    return out[0] / total, out[1] / total


class RLWKernel(Kernel):
    name = "rlw"

    def setup(self) -> None:
        dist = [b.distribution for b in self.balancers]
        self.normal_rows = np.array([k == "normal" for k in dist])
        self.sigma = torch.from_numpy(self.attr("sigma")[self.normal_rows])[:, None, None]
        self.alpha = self.attr("concentration")
        self.streams = [_Stream(b.generator, 2 * CHUNK) for b in self.balancers]
        self.buffer = np.empty((self.rows, CHUNK, 2))
        self.pos = CHUNK                      # empty: refill on the first step
        self.max_norm = self.max_norms()
        self.clip = bool(np.isfinite(self.max_norm).any())

    def refill(self) -> None:
        """Weights of the next ``CHUNK`` steps for every row."""
        rows = np.flatnonzero(self.normal_rows)
        if rows.size:
            z = torch.tensor([[self._box_muller(self.streams[r]) for _ in range(CHUNK)] for r in rows],
                             dtype=torch.float64)
            self.buffer[rows] = torch.softmax(self.sigma * z, dim=-1).numpy()
        for r in np.flatnonzero(~self.normal_rows):
            s, alpha = self.streams[r], float(self.alpha[r])
            self.buffer[r] = [dirichlet_pair(s, alpha) for _ in range(CHUNK)]
        self.pos = 0

    @staticmethod
    def _box_muller(stream: _Stream) -> tuple[float, float]:
        """torch.randn(2): both halves of one Box–Muller pair (the cache is empty before and after)."""
        return stream.normal(), stream.normal()

    def direction(self, step: int, losses: np.ndarray, jac: np.ndarray) -> np.ndarray:
        if self.pos == CHUNK:
            self.refill()
        self.weights = self.buffer[:, self.pos].copy()  # the buffer is refilled later
        self.pos += 1
        d = combine(self.weights, jac)
        return clip_rows(d, self.max_norm) if self.clip else d
