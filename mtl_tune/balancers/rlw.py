"""``rlw`` — random loss weighting (Lin et al., "Reasonable Effectiveness of Random
Weighting", TMLR'22, arXiv 2111.10603; docs/methods.md#rlw).

Every step draws fresh weights and backpropagates L = Σ_i w_i ℓ_i:

* ``distribution="normal"`` (default, the official FAMO-family / Samsung code):
  λ̃ ~ N(0, σ² I_K), w = softmax(λ̃). The official code has σ = 1; ``sigma`` is exposed
  as a temperature (σ → 0 gives equal weights 1/K, large σ nearly one-hot weights).
* ``distribution="dirichlet"`` (one of the paper's variants): w ~ Dir(α·1_K), sampled as
  normalised Gamma(α) draws. α = 1 is uniform on the simplex.

The weights sum to **1**, as in the official code — not K — so the update is at the scale
of the *mean* loss, 1/K of LS (this matters through Adam's ε and clipping only); we keep
it to reproduce the published numbers.

Unlike the official code (``torch.randn`` on the global RNG, so the weights depend on
everything else that draws random numbers), the balancer owns a seeded CPU
``torch.Generator``; its state is part of :meth:`state_dict`, so a resumed run draws the
same weights (lockstep rows draw blocks of steps ahead without changing this:
:mod:`~mtl_tune.balancers._random_rows`). ``seed=None`` takes the seed from the global torch RNG at construction,
which makes a seeded trial reproducible without a separate seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_tune.balancers._random_rows import BlockDraws, OwnGenerator, block_steps, checked_seed, rows_mismatch
from mtl_tune.balancers._rows import RowStep
from mtl_tune.balancers.base import Balancer, LossBalancer

DISTRIBUTIONS = ("normal", "dirichlet")
#: ``normal_`` fills a contiguous tensor of this many entries or more with a vectorised sampler whose
#: numbers depend on the call's size; below, and on any non-contiguous tensor, entry by entry
SERIAL_NORMALS = 16


def sample_gamma(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """n draws of Gamma(α, 1) in float64 from ``generator`` (Marsaglia & Tsang, ACM TOMS 2000).

    For α ≥ 1: d = α − 1/3, c = 1/√(9d); propose v = (1 + c x)³ with x ~ N(0, 1) and accept
    d·v when log u < x²/2 + d − d v + d log v (u ~ U(0, 1)). For α < 1 use the boost
    Gamma(α) = Gamma(α + 1) · u^{1/α}. (``torch.distributions`` cannot take a generator.)
    """
    if alpha <= 0:
        raise ValueError(f"gamma shape must be > 0, got {alpha}")
    a = alpha + 1.0 if alpha < 1 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if alpha < 1:
        out = out * torch.rand(n, generator=generator, dtype=torch.float64) ** (1.0 / alpha)
    return out


def rlw_weights(generators: Sequence[torch.Generator], n_tasks: int, distribution: str = "normal",
                sigma: float = 1.0, concentration: float = 1.0) -> np.ndarray:
    """One draw of simplex weights per generator: (len(generators), K) float64; row r takes its
    numbers from ``generators[r]`` alone, exactly as a balancer stepping with that generator would.

    ``normal``: w = softmax(σ z), z ~ N(0, I_K) drawn as ``torch.randn(K, generator=…)`` draws
    (``normal_`` on a row of K < 16 entries is the same element-by-element sampler); the softmax
    runs once on the stacked rows, in torch so that the weights stay those of the published runs
    bit for bit. ``dirichlet``: w = γ / Σγ with γ = :func:`sample_gamma` (α, K) per row (its
    rejection loop takes a data-dependent number of draws, so it runs row by row).
    """
    if distribution == "normal":
        z = torch.empty(len(generators), n_tasks, dtype=torch.float64)
        for row, generator in zip(z, generators):
            row.normal_(generator=generator)
        return torch.softmax(sigma * z, dim=-1).numpy()
    if distribution == "dirichlet":
        gamma = torch.stack([sample_gamma(concentration, n_tasks, generator) for generator in generators])
        return (gamma / gamma.sum(-1, keepdim=True)).numpy()
    raise ValueError(f"rlw: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def normal_draws(generator: torch.Generator, steps: int, n_tasks: int) -> Tensor:
    """z (steps, K) float64: what ``steps`` one-step draws (:func:`rlw_weights`, K < :data:`SERIAL_NORMALS`)
    draw from ``generator``, in one call. Those draw K entries with torch's entry-by-entry sampler
    (Box–Muller pairs, the second of a pair kept in the generator for the next entry); a block of
    ``steps`` × K entries written through a strided (non-contiguous) view runs the same sampler over the
    same sequence, so it holds the same numbers and leaves the generator in the same state
    (tests/balancers/test_rlw.py compares both)."""
    z = torch.empty(steps * n_tasks, 2, dtype=torch.float64)[:, 0]
    return z.normal_(generator=generator).reshape(steps, n_tasks)


def lockstep_weights(rows: Sequence[RandomLossWeighting], n_tasks: int, distribution: str, sigma: float,
                     concentration: float) -> BlockDraws:
    """The weights of lockstep rows (the balancers ``rows``), each row's from its own generator
    (:mod:`~mtl_tune.balancers._random_rows`): for ``normal`` with K < :data:`SERIAL_NORMALS` a block of steps'
    logits per call (:func:`normal_draws`) and one softmax for the block; otherwise (the vectorised
    normal sampler, or the Dirichlet's rejection loop, whose number of draws depends on the numbers)
    one step at a time, as :func:`rlw_weights`."""
    if distribution == "normal" and n_tasks < SERIAL_NORMALS:
        return BlockDraws(rows, partial(normal_draws, n_tasks=n_tasks), partial(_softmax_block, sigma=sigma),
                          block_steps(n_tasks))
    return BlockDraws(rows, partial(_one_step, n_tasks=n_tasks, distribution=distribution, sigma=sigma,
                                    concentration=concentration), _stack_rows, 1)


# (functions, not lambdas, so that a balancer holding them can be pickled)
def _softmax_block(blocks: list[Tensor], sigma: float) -> np.ndarray:
    return torch.softmax(sigma * torch.stack(blocks, 1), dim=-1).numpy()


def _one_step(generator: torch.Generator, steps: int, n_tasks: int, distribution: str, sigma: float,
              concentration: float) -> np.ndarray:
    return rlw_weights([generator], n_tasks, distribution, sigma, concentration)   # (steps is 1)


def _stack_rows(blocks: list[np.ndarray]) -> np.ndarray:
    return np.stack(blocks, 1)


class RandomLossWeighting(OwnGenerator, LossBalancer):
    """Random loss weighting (Lin et al., TMLR'22): fresh random simplex weights each step.

    Args:
        n_tasks: K, the number of tasks.
        distribution: ``"normal"`` (softmax of Gaussian logits, official) or
            ``"dirichlet"``.
        sigma: std of the Gaussian logits (float > 0, default 1).
        concentration: Dirichlet concentration (float > 0, default 1; dirichlet only).
        seed: seed of the method's generator (default: drawn from torch's global RNG).

    Common keyword arguments ``max_norm`` (shared-gradient clipping) and ``jacobian_engine``:
    see :class:`~mtl_tune.balancers.base.Balancer`. Call :meth:`backward` (or
    :meth:`train_step`) once per batch; the returned ``StepInfo.weights`` are the
    effective task weights (K,).

    Fresh random simplex weights each step (see the module docstring).
    """

    name = "rlw"

    def __init__(self, n_tasks: int, distribution: str = "normal", sigma: float = 1.0,
                 concentration: float = 1.0, seed: int | None = None, **kw) -> None:
        super().__init__(n_tasks, **kw)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"rlw: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if not sigma > 0:
            raise ValueError(f"rlw: sigma must be > 0, got {sigma}")
        if not concentration > 0:
            raise ValueError(f"rlw: concentration must be > 0, got {concentration}")
        self.distribution, self.sigma, self.concentration = distribution, float(sigma), float(concentration)
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed = checked_seed(self.name, seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        #: the rows' weights in lockstep (:meth:`start_rows`); None for one row
        self.row_draws: BlockDraws | None = None

    def start_rows(self, rows: Sequence[Balancer]) -> None:
        # the rows' generators are used, not copied: row r draws what its own balancer would, and that
        # balancer's generator ends where its own run would have left it
        self.row_draws = lockstep_weights(rows, self.n_tasks, self.distribution, self.sigma, self.concentration)

    def weights_rows(self, losses: np.ndarray) -> RowStep:
        """The rule: fresh weights (..., K) from each row's generator (the losses only give the shape)."""
        shape = losses.shape[:-1]
        if shape == ():
            return RowStep(rlw_weights([self.generator], self.n_tasks, self.distribution, self.sigma,
                                       self.concentration)[0])
        if self.row_draws is None:
            raise rows_mismatch(math.prod(shape), None)
        return RowStep(self.row_draws.take(math.prod(shape)).reshape(*shape, self.n_tasks))

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
