"""The Ray Tune function trainable: one trial = :func:`mtl_tune.training.train` on one config.

Reports once per epoch with a checkpoint (the full training state) so a trial restarted
after a crash or node loss continues from its last finished epoch. The checkpoint is a
``torch.save`` file of tensors and plain data, read back with torch's safe default
``weights_only=True`` (:mod:`mtl_tune.checkpoint`): a checkpoint file cannot run code. One that
holds anything else (an older mtl_tune's) fails the trial with that reason, once, as bad data does.

Bad data or configuration met at run time (``DataError``/``ConfigError``) would fail the
same way on every restart, so it is not raised to Tune (which would retry it up to
``--max-failures`` times): the trial reports one final result with ``failed = 1`` and the
error, and ends; the searcher tells Optuna FAIL and the table shows status FAILED.

Every result carries ``workers`` (1 here); with ``--workers-per-trial N > 1`` the trial drives
a Ray Train run of N workers instead (:mod:`mtl_tune.search.data_parallel`) and reports
worker 0's results and checkpoints through the same ``_report``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.trainable.function_trainable import wrap_function

from mtl_tune.benchmarks.base import ConfigError, DataError
from mtl_tune.checkpoint import UnusableCheckpointError
from mtl_tune.checkpoint import load as load_checkpoint
from mtl_tune.search.faults import maybe_inject_fault
from mtl_tune.training import train
from mtl_tune.training.loop import failure_metrics

STATE_FILE = "state.pt"


def _placement() -> dict[str, Any]:
    """Where Ray put this trial: its logical resources and node (reported every epoch)."""
    import ray

    required = tune.get_context().get_trial_resources().required_resources
    return {"resources/cpu": float(required.get("CPU", 0.0)), "resources/gpu": float(required.get("GPU", 0.0)),
            "node_id": ray.get_runtime_context().get_node_id()}


def train_trial(config: dict[str, Any]) -> None:
    if int(config.get("workers_per_trial", 1) or 1) > 1:
        _train_on_workers(config)
        return
    cpus = float(config.get("cpus_per_trial", 1) or 1)
    torch.set_num_threads(max(1, int(cpus)))
    placement = _placement()
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            try:
                state = load_checkpoint(Path(directory) / STATE_FILE)
            except UnusableCheckpointError as err:  # the same on every retry: one failed result, no retries
                tune.report({**failure_metrics(config, err, 0), **placement, "workers": 1.0})
                return
    if placement["resources/gpu"] > 0 and not torch.cuda.is_available():
        warnings.warn(f"trial was assigned {placement['resources/gpu']} GPU but torch sees no CUDA device; "
                      "training on the CPU", RuntimeWarning)

    def report(metrics: dict[str, Any], training_state: dict[str, Any] | None) -> None:
        if training_state is None:
            _report({**metrics, **placement}, None)
            return
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory) / (STATE_FILE + ".tmp")
            torch.save(training_state, tmp)
            os.replace(tmp, Path(directory) / STATE_FILE)
            _report({**metrics, **placement}, directory)

    try:
        train(config, report, state)
    except (DataError, ConfigError) as err:
        epoch = int(state["epoch"]) if state else 0
        tune.report({**failure_metrics(config, err, epoch), **placement, "workers": 1.0})
    except UnusableCheckpointError as err:  # a checkpoint that does not fit: the same on every retry
        err.args = (f"{STATE_FILE} of the trial's checkpoint: {err}",)
        tune.report({**failure_metrics(config, err, 0), **placement, "workers": 1.0})


def _report(metrics: dict[str, Any], checkpoint_dir: str | None, inject_fault: bool = True) -> None:
    """One epoch's result to Tune, with the folder holding ``state.pt`` as its checkpoint."""
    metrics = {"workers": 1.0, **metrics}
    if checkpoint_dir is None:
        tune.report(metrics)
        return
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
    if inject_fault:
        maybe_inject_fault(metrics, tune.get_context().get_trial_id())


def _train_on_workers(config: dict[str, Any]) -> None:
    """``--workers-per-trial N > 1``: a Ray Train run inside this trial (:mod:`.data_parallel`);
    resources are the workers' (this driver reserves none), reported as one worker's share."""
    import ray

    from mtl_tune.search.data_parallel import run_trial

    placement = {"resources/cpu": float(config.get("cpus_per_trial", 1) or 1),
                 "resources/gpu": float(config.get("gpus_per_trial", 0) or 0),
                 "node_id": ray.get_runtime_context().get_node_id()}
    config = {**config, "_trial_id": tune.get_context().get_trial_id()}  # names the fault-injection marker
    # the fault-injection test kills a Train worker (worker_loop), not this driver
    run_trial(config, lambda metrics, directory: _report({**metrics, **placement}, directory, inject_fault=False))


class MultiWorkerTrial(wrap_function(train_trial)):
    """:func:`train_trial` for ``--workers-per-trial N > 1``: when Tune stops the trial it
    aborts the trial's Ray Train run before the process ends, freeing the workers' resources
    (:func:`mtl_tune.search.data_parallel.abort_train_runs`)."""

    def cleanup(self) -> None:
        from mtl_tune.search.data_parallel import abort_train_runs

        abort_train_runs()
        super().cleanup()


def trainable_for(workers_per_trial: int):
    """The Tune trainable: :func:`train_trial` (one worker) or :class:`MultiWorkerTrial`."""
    return MultiWorkerTrial if workers_per_trial > 1 else train_trial
