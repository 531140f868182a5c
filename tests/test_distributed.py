"""Data-parallel balancing (2 CPU processes, gloo): a DDP step equals a single-process step
on the concatenated batch, and the ranks' parameters stay identical (mtl_tune.distributed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as worker  # noqa: E402

METHODS = ["ls", "famo", "mgda", "cagrad", "nashmtl", "uw"]  # uw: a learnable balancer parameter
WORLD = 2


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker.run, args=(WORLD, str(tmp / "init"), str(tmp), METHODS), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_step_equals_single_process_step_on_the_whole_batch(ddp_results, method):
    torch.set_num_threads(1)
    reference = worker.train(method, rank=0, world=1)
    for rank in range(WORLD):
        for step, (got, want) in enumerate(zip(ddp_results[rank][method], reference)):
            for p, q in zip(got, want):
                # float64 throughout: the only difference is summation order (1e-16 relative),
                # amplified at most by the solvers' conditioning on this small problem
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"{method} rank {rank} step {step}")


@pytest.mark.parametrize("method", METHODS)
def test_ranks_stay_bit_identical(ddp_results, method):
    for step, (a, b) in enumerate(zip(ddp_results[0][method], ddp_results[1][method])):
        assert all(torch.equal(p, q) for p, q in zip(a, b)), f"{method}: ranks differ after step {step + 1}"


def test_balancing_each_shard_alone_is_not_the_whole_batch_step(ddp_results):
    """The control: MGDA solved per rank on its shard (then DDP-averaged) differs from the
    whole batch's step, so the equality above is due to the rank-mean Jacobian."""
    torch.set_num_threads(1)
    reference = worker.train("mgda", rank=0, world=1)[0]
    got = ddp_results[0]["mgda/unsynced"][0]
    assert max(float((p - q).abs().max()) for p, q in zip(got, reference)) > 1e-4
