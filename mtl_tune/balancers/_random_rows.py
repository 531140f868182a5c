"""Random draws of rows in lockstep, a block of steps at a time (``rlw``, ``pcgrad``, ``gradvac``, ``graddrop``).

A method with a random stream draws each step's numbers from its balancer's own seeded generator, so a
seeded run is reproducible and a checkpoint (which stores the generator's state) resumes it. In
lockstep (the toy: 5 rows × 35 000 steps) one generator call per row and step costs more than the
step's arithmetic, so :class:`BlockDraws` takes N steps' numbers of every row in one call per row and
hands them out a step at a time. That is right only if

1. the block holds the very numbers N one-step draws would have drawn, and leaves the generator where
   they would have left it. Each method's ``draw`` function says why its sampler has this property
   (torch's CPU generator fills a tensor entry by entry, in order, for the samplers used), and the
   tests compare block and one-step draws, numbers and generator states;
2. nobody sees a generator ahead of the steps handed out. A row balancer's ``generator`` is a property
   (:class:`OwnGenerator`): reading or replacing it — ``state_dict`` and ``load_state_dict``, the
   balancer's own one-row rule, a test comparing states — first *settles* the block: every row's
   generator returns to its state at the block's start and replays the steps handed out, so it sits
   exactly where one-step draws would have left it, and the rest of the block is dropped (the next
   lockstep step draws a fresh block from there). A checkpoint taken mid-block therefore resumes with
   the same future draws. Settling costs a replay, but only when someone looks.

One row (a balancer stepping a model) draws one step at a time from its own generator, as before.
"""

from __future__ import annotations

import operator

from collections.abc import Callable, Sequence
from typing import Any

import torch

#: random numbers per row a block holds at most (its steps: this over one step's count, at most
#: :data:`MAX_BLOCK_STEPS`); small enough that a settle's replay and the dropped rest cost little
BLOCK_NUMBERS = 2 ** 14
MAX_BLOCK_STEPS = 1024


def block_steps(numbers_per_step: int) -> int:
    """Steps per block for a method drawing ``numbers_per_step`` numbers per row and step."""
    return max(1, min(MAX_BLOCK_STEPS, BLOCK_NUMBERS // max(1, numbers_per_step)))


def checked_seed(method: str, seed: Any) -> int:
    """``seed`` as an int that ``torch.Generator.manual_seed`` takes ([-2⁶³, 2⁶⁴)); else a ValueError
    naming the method (torch's own is "Overflow when unpacking long long")."""
    value = operator.index(seed) if not isinstance(seed, bool) and hasattr(seed, "__index__") else None
    if value is None or not -2 ** 63 <= value < 2 ** 64:
        raise ValueError(f"{method}: seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return value


def rows_mismatch(rows: int, have: int | None) -> ValueError:
    """The error of a lockstep rule called on a number of rows other than the balancers it adopted."""
    return ValueError(f"a rule with a random stream needs one generator per row: {rows} rows, "
                      f"generators adopted by start_rows: {'none' if have is None else have}")


class OwnGenerator:
    """Mixin of a balancer with its own random generator: ``generator`` is a property that settles a
    lockstep block which drew ahead of it (module docstring, point 2) before anyone reads or replaces it."""

    _ahead: BlockDraws | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._ahead is not None:
            self._ahead.settle()
        return self._generator

    @generator.setter
    def generator(self, value: torch.Generator) -> None:
        if self._ahead is not None:
            self._ahead.settle()
        self._generator = value

    def __getstate__(self) -> dict[str, Any]:
        # pickled (torch.save of the module, a copy): settled first, so the copy holds no block
        if self._ahead is not None:
            self._ahead.settle()
        return super().__getstate__()  # type: ignore[misc]


class BlockDraws:
    """The random draws of lockstep rows (the balancers ``owners``, one per row), a block at a time.

    Args:
        owners: the rows' balancers (:class:`OwnGenerator`); their generators are used, not copied,
            so each is left where its own run would leave it (once settled).
        draw: ``draw(generator, n)`` → the numbers of n consecutive one-step draws, stacked (n, ...),
            leaving the generator where those n draws leave it (also used to replay when settling).
        prepare: the rows' blocks (a list of ``draw`` results, one per row) → one block (n, rows, ...)
            whose step t is what :meth:`take` hands out at that step (what a rule computes from its
            draws, e.g. orders from swaps, batched over the block).
        steps: steps per block (1 draws every step: no draws ahead).
        key: what the draws were made for (GradDrop's P and dtype), for the caller to compare.
    """

    def __init__(self, owners: Sequence[OwnGenerator], draw: Callable[[torch.Generator, int], Any],
                 prepare: Callable[[list[Any]], Any], steps: int, key: Any = None) -> None:
        self.owners = list(owners)
        self.draw, self.prepare, self.steps, self.key = draw, prepare, int(steps), key
        self.block: Any = None
        self.used = 0                         # steps of the block handed out
        self.states: list[torch.Tensor] = []  # each row's generator state at the block's start

    def take(self, rows: int) -> Any:
        """This step's draws of every row (rows, ...), the next step of the block (a new block when it is spent)."""
        if rows != len(self.owners):
            raise rows_mismatch(rows, len(self.owners))
        if self.block is None or self.used == self.steps:
            self._refill()
        out = self.block[self.used]
        self.used += 1
        return out

    def generators(self, rows: int) -> list[torch.Generator]:
        """The rows' generators, settled (for draws that cannot be taken ahead)."""
        if rows != len(self.owners):
            raise rows_mismatch(rows, len(self.owners))
        return [owner.generator for owner in self.owners]

    def _refill(self) -> None:
        generators = [owner.generator for owner in self.owners]  # (settles any block that drew ahead of them)
        self.states = [g.get_state() for g in generators] if self.steps > 1 else []
        self.block = self.prepare([self.draw(g, self.steps) for g in generators])
        self.used = 0
        if self.steps > 1:
            for owner in self.owners:
                owner._ahead = self

    def settle(self) -> None:
        """Put every row's generator where one-step draws of the steps handed out would have left it, and
        drop the rest of the block."""
        spent = self.used == self.steps
        for owner, state in zip(self.owners, self.states):
            owner._ahead = None
            if not spent:          # (a spent block left the generators exactly there)
                generator = owner._generator
                generator.set_state(state)
                if self.used:
                    self.draw(generator, self.used)
        self.block, self.used, self.states = None, 0, []
