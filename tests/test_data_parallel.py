"""``--workers-per-trial``: a trial on several data-parallel workers (Ray Train inside Tune).

Known answers: with the global batch split into equal per-worker slices, a 2-worker run
equals the 1-worker run on the same global batches (mgda: the rank-mean Jacobian is the
global batch's Jacobian, the rank-mean losses its losses). The refusals (method without a
data-parallel step, batch not divisible, too many CPUs, toy) are in test_search_validation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mtl_tune.benchmarks.base import ConfigError
from mtl_tune.training import train
from mtl_tune.training.data_parallel import shard_batch, sharded

#: small and exactly divisible: 1,198 training pairs = 4 × 256 + 174 (even), 240 val, 360 test
CONFIG = {"benchmark": "multi_mnist", "method": "mgda", "seed": 0, "pairs_per_image": 1, "batch_size": 256}
#: float32 rounding of the shard means and of DDP's sum differs from the full batch's by
#: ~1e-7 relative; Adam (lr 1e-3) moves a parameter by up to ~lr per step, so an error
#: in the combined step (one shard's gradient, an unsynchronised balancer) shows as ~1e-4
#: after a few steps, far above this tolerance
PARAM_ATOL = 1e-5


# ---------------------------------------------------------------------------- sharding (no processes)
def test_each_rank_takes_an_equal_contiguous_slice_and_the_remainder_is_cut():
    x, y = torch.arange(7), torch.arange(7) * 10
    assert [shard_batch((x, y), r, 2)[0].tolist() for r in range(2)] == [[0, 1, 2], [3, 4, 5]]  # sample 6 cut
    assert shard_batch({"image": x, "label": y}, 1, 3)["label"].tolist() == [20, 30]
    assert shard_batch([x[:1]], 0, 2) is None  # shorter than the worker count: skipped by every rank
    with pytest.raises(ConfigError, match="cannot split a training batch"):
        shard_batch((x, y[:3]), 0, 2)

    batches = sharded(lambda epoch: [(x,), (x[:1],), (x[:4],)], 1, 2)
    assert [b[0].tolist() for b in batches(0)] == [[3, 4, 5], [2, 3]]  # same step count on every rank


def reference_run(epochs: int) -> tuple[list[dict], list[torch.Tensor], object]:
    reports: list[dict] = []
    torch.set_num_threads(1)
    trainer = train({**CONFIG, "epochs": epochs}, lambda metrics, state: reports.append(metrics))
    return reports, [p.detach().clone() for p in trainer.setup.model.parameters()], trainer


# ---------------------------------------------------------------------------- 2 gloo processes, no Ray
@pytest.mark.slow
def test_two_workers_equal_one_worker_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    import _dp_worker

    config = {**CONFIG, "epochs": 1}
    mp.spawn(_dp_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path), config), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reports, params, _ = reference_run(1)

    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # DDP + the balancer's rank averaging: one model on every rank
    for single, parallel in zip(params, ranks[0]["params"]):
        torch.testing.assert_close(parallel, single, atol=PARAM_ATOL, rtol=0)
    one, two = reports[0], ranks[0]["reports"][0]
    assert set(two) == set(one) | {"workers"} and two["workers"] == 2.0
    for key in ("train/loss/left", "train/loss/right", "weights/left", "val/left/loss", "test/right/loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key  # losses: means of the global batch
    # rank 1 holds the same numbers (rank-mean losses, rank 0's broadcast evaluation)
    assert {k: v for k, v in ranks[1]["reports"][0].items() if k != "epoch_time_s"} == {
        k: v for k, v in two.items() if k != "epoch_time_s"}


# ---------------------------------------------------------------------------- a search (Ray Train in Tune)
@pytest.mark.slow
def test_search_with_two_workers_per_trial_restarts_from_its_checkpoint(faulty_cluster, tmp_path, capsys):
    """faulty_cluster (conftest): the last Train worker of the trial dies once, some seconds
    after reporting epoch 1."""
    import ray

    from mtl_tune.analysis import load_sweep
    from mtl_tune.search.cli import main

    # ASHA stops the trial at its last epoch (Tune's stop, not the function's return): the
    # path where the trial's Train run must be aborted or its workers' CPUs stay reserved
    code = main(["--benchmark", "multi_mnist", "--method", "mgda", "--num-samples", "1", "--epochs", "2",
                 "--config", "pairs_per_image=1", "--workers-per-trial", "2", "--max-failures", "1",
                 "--objective", "mean_acc", "--scheduler", "asha",
                 "--storage-path", str(tmp_path), "--name", "dp", "--verbose", "0"])
    assert code == 0, capsys.readouterr().err
    assert len(list(faulty_cluster.iterdir())) == 1  # the worker was really killed
    leftover = {k: v["state"] for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
    assert not leftover, leftover  # no Train run still holds its workers' resources
    table = load_sweep(tmp_path / "dp")
    row = table.iloc[0]
    assert row["status"] == "TERMINATED" and row["training_iteration"] == 2 and row["workers"] == 2
    assert row["failures"] == 1 and row["resumed_from_epoch"] == 1.0  # continued after epoch 1

    reports, params, trainer = reference_run(2)  # one process, the same global batches
    metric_keys = {k for k in reports[-1] if "/" in k}
    assert metric_keys == {c for c in table.columns if "/" in c and not c.startswith(("hp/", "resources/"))}
    for key in ("train/loss/left", "val/left/loss", "val/right/loss", "test/left/loss"):
        assert row[key] == pytest.approx(reports[-1][key], rel=1e-5), key

    trial_dir = Path(row["logdir"])
    results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    # Tune's result.json of a restarted trial sometimes lacks the lines before the failure (the
    # JSON logger is reopened on restore); the epoch-1 report is checked by resumed_from_epoch above
    assert results[-1]["epoch"] == 2.0 and all(r["workers"] == 2.0 for r in results)
    last = max(trial_dir.glob("checkpoint_*"))
    state = torch.load(last / "state.pt", map_location="cpu", weights_only=True)  # a weights-only checkpoint
    assert state["epoch"] == 2
    for name, single in zip(dict(trainer.setup.model.named_parameters()), params):
        torch.testing.assert_close(state["model"][name], single, atol=PARAM_ATOL, rtol=0)


def test_resume_keeps_the_number_of_workers():
    from mtl_tune.search.runner import SearchOptions
    from mtl_tune.search.validate import SearchError, resume_options

    stored = {"benchmark": "multi_mnist", "methods": ["mgda"], "workers_per_trial": 2}
    with pytest.raises(SearchError, match=r"--workers-per-trial 1 \(stored 2\)"):
        resume_options(SearchOptions(workers_per_trial=1), {"workers_per_trial"}, stored)
    assert resume_options(SearchOptions(), set(), stored).workers_per_trial == 2  # reused when not given


def test_a_space_that_allows_the_gram_path_is_refused(tmp_path):
    from mtl_tune.search.runner import SearchOptions, prepare
    from mtl_tune.search.validate import SearchError

    space = tmp_path / "nashmtl.yaml"
    space.write_text("method: nashmtl\nparams:\n  gradient_path: {type: categorical, choices: [auto, gram], "
                     "default: auto, search: true}\n")
    options = SearchOptions(benchmark="multi_mnist", methods=["nashmtl"], search_space=str(space),
                            workers_per_trial=2, storage_path=str(tmp_path / "results"))
    with pytest.raises(SearchError, match="allows gradient_path=gram, which is not data-parallel correct"):
        prepare(options)
    space.write_text(space.read_text().replace("[auto, gram]", "[auto, jacobian]"))
    assert prepare(options).options.workers_per_trial == 2  # the Jacobian path is fine


def test_ray_train_v1_is_refused_up_front(tmp_path, monkeypatch):
    from mtl_tune.search.runner import SearchOptions, prepare
    from mtl_tune.search.validate import SearchError

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    with pytest.raises(SearchError, match="RAY_TRAIN_V2_ENABLED=0 switches it off"):
        prepare(SearchOptions(benchmark="multi_mnist", methods=["mgda"], workers_per_trial=2,
                              storage_path=str(tmp_path)))


def test_on_a_cluster_each_worker_fits_a_node_and_all_fit_the_cluster(monkeypatch):
    import ray

    from mtl_tune.search.runner import SearchOptions
    from mtl_tune.search.validate import SearchError, check_cluster_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_cluster_resources(SearchOptions(address="h:1", workers_per_trial=4, cpus_per_trial=1))  # 2 + 2 nodes
    with pytest.raises(SearchError, match=r"--workers-per-trial 3 × --cpus-per-trial 2 = 6 CPUs, .* has 4"):
        check_cluster_resources(SearchOptions(address="h:1", workers_per_trial=3, cpus_per_trial=2))
    with pytest.raises(SearchError, match=r"--cpus-per-trial 3: .* has 2 CPU\(s\) per node"):
        check_cluster_resources(SearchOptions(address="h:1", workers_per_trial=2, cpus_per_trial=3))
