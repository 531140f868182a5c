"""A Tune trial that spans several workers: a Ray Train ``TorchTrainer`` launched from
inside the Tune function trainable (Ray Train V2's pattern for Train inside Tune).

The trial's own process (the "driver") reserves no CPU; it starts a ``TorchTrainer`` with
``--workers-per-trial`` workers, each reserving ``--cpus-per-trial`` CPUs and
``--gpus-per-trial`` GPUs (gloo on CPUs, nccl on GPUs). Every worker runs
:func:`mtl_tune.training.data_parallel.train_data_parallel`; every epoch each worker calls
``ray.train.report`` (a barrier), rank 0 with the full training state as its checkpoint.
A callback on the Train controller passes rank 0's metrics and the persisted checkpoint
through a Ray queue to the driver, which reports them to Tune with a Tune checkpoint, so
the trial's results and checkpoints look exactly like a single-worker trial's.

Stopping: when Tune stops a trial (ASHA, the last epoch under a scheduler) the trainable's
``cleanup`` first aborts its Train run (:func:`abort_train_runs`,
:class:`mtl_tune.search.trainable.MultiWorkerTrial`), which frees the workers' resources.

Failures: the Train run itself never retries (``max_failures=0``); a lost worker fails the
run, the driver raises, and Tune restarts the trial (``--max-failures``) from its last Tune
checkpoint, which the new workers load — the same restart path as one worker. Bad data or
configuration (``DataError``/``ConfigError``) is reported once as a failed trial.
"""

from __future__ import annotations

import logging
import os
import queue as _queue
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import torch

from mtl_tune.search.faults import maybe_inject_fault

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
#: seconds between the driver's checks of the Train run while it waits for a report
POLL_S = 1.0
#: fault injection (tests): seconds between the report and the death of the killed worker
FAULT_DELAY_S = 5.0


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed is initialised by Ray Train)."""
    import ray.train
    import ray.train.torch

    from mtl_tune.benchmarks.base import ConfigError, DataError
    from mtl_tune.checkpoint import UnusableCheckpointError
    from mtl_tune.checkpoint import load as load_checkpoint
    from mtl_tune.training.data_parallel import train_data_parallel
    from mtl_tune.training.loop import failure_metrics

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(float(config.get("cpus_per_trial", 1) or 1))))
    config = dict(config)
    resume = config.pop("_resume_checkpoint", None)
    if float(config.get("gpus_per_trial", 0) or 0) > 0:
        device = ray.train.torch.get_device()  # this worker's GPU; nccl collectives use the current device
        torch.cuda.set_device(device)
        config["device"] = str(device)
    state = None
    if resume is not None:
        with resume.as_directory() as directory:
            try:  # weights-only (mtl_tune.checkpoint): a checkpoint file cannot run code
                state = load_checkpoint(Path(directory) / STATE_FILE)
            except UnusableCheckpointError as err:  # the same on every rank: each reports once
                ray.train.report({**failure_metrics(config, err, 0), "workers": float(world)})
                return

    def report(metrics: dict[str, Any], training_state: dict[str, Any] | None) -> None:
        if rank != 0 or training_state is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as directory:
                tmp = Path(directory) / (STATE_FILE + ".tmp")
                torch.save(training_state, tmp)
                os.replace(tmp, Path(directory) / STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if rank == world - 1 and training_state is not None:
            # dies a while after its report, in the next epoch: a worker dying within the Train
            # controller's poll interval (2 s) of its report takes that epoch's report with it
            maybe_inject_fault(metrics, str(config.get("_trial_id", "")), delay_s=FAULT_DELAY_S)

    try:
        train_data_parallel(config, rank, world, report, state)
    except (DataError, ConfigError) as err:  # the same on every rank: each reports once
        epoch = int(state["epoch"]) if state else 0
        ray.train.report({**failure_metrics(config, err, epoch), "workers": float(world)})
    except UnusableCheckpointError as err:  # a checkpoint that does not fit: the same on every rank and retry
        err.args = (f"{STATE_FILE} of the trial's checkpoint: {err}",)
        ray.train.report({**failure_metrics(config, err, 0), "workers": float(world)})


def _forwarder(results):
    """A Train callback (runs on the Train controller) putting rank 0's metrics and the
    persisted checkpoint on ``results``, a Ray queue read by the trial's driver; before the
    first result, the controller's own handle (see :func:`abort_train_runs`)."""
    import ray
    import ray.train

    if not hasattr(ray.train, "UserCallback"):  # Ray Train V1 (RAY_TRAIN_V2_ENABLED=0, or an old Ray)
        raise RuntimeError("--workers-per-trial needs Ray Train V2 (Ray >= 2.50 with RAY_TRAIN_V2_ENABLED unset or 1)")

    class ForwardToTune(ray.train.UserCallback):
        announced = False

        def after_report(self, run_context, metrics, checkpoint):
            if not self.announced:
                results.put(("controller", ray.get_runtime_context().current_actor))
                self.announced = True
            results.put(("result", dict(metrics[0]), checkpoint))

    return ForwardToTune()


#: the Train controllers of the runs this trial's process drives, by run name
_CONTROLLERS: dict[str, Any] = {}


def abort_train_runs(timeout_s: float = 60.0) -> None:
    """Abort the Train runs of this trial: called when Tune stops the trial (ASHA, the last
    epoch under a scheduler), before its process ends.

    Killing the trial's process would kill the Train controller with it, but not its
    placement group, which Ray keeps until the search's driver exits (Ray Train's own cleaner
    needs the dashboard's state API, off in mtl_tune): the workers' CPUs would stay reserved
    and the next trials wait forever. ``abort`` releases them and ends the controller."""
    import ray

    for name, controller in list(_CONTROLLERS.items()):
        try:
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            pass  # abort ends the controller's process: the expected answer
        except Exception as err:  # noqa: BLE001 - best effort while the trial is being stopped
            logger.warning("could not abort the Ray Train run %s of this trial: %s", name, err)
        _CONTROLLERS.pop(name, None)


def _train_storage() -> tuple[str, Any]:
    """Where the Train run persists its checkpoints: under the trial's folder in the search's
    storage (reachable from every node when the search's storage is), with its filesystem."""
    from ray.train._internal.session import get_session

    storage = getattr(get_session(), "storage", None)
    if storage is not None:
        return Path(storage.trial_fs_path, "train").as_posix(), storage.storage_filesystem
    from ray import tune

    return str(Path(tune.get_context().get_trial_dir()) / "train"), None


def run_trial(config: dict[str, Any], report_to_tune) -> None:
    """The driver of one multi-worker trial; ``report_to_tune(metrics, checkpoint_dir | None)``
    reports one result to Tune (the single-worker trainable's reporter)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    workers = int(config["workers_per_trial"])
    cpus = float(config.get("cpus_per_trial", 1) or 1)
    gpus = float(config.get("gpus_per_trial", 0) or 0)
    loop_config = dict(config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        loop_config["_resume_checkpoint"] = checkpoint
    results: Queue = Queue(actor_options={"num_cpus": 0})
    storage_path, filesystem = _train_storage()
    name = f"attempt-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        worker_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             storage_filesystem=filesystem, failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=[_forwarder(results)]),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the driver's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="mtl_tune-train-run", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not results.empty():
            try:
                item = results.get(timeout=POLL_S)
            except _queue.Empty:
                continue
            if item[0] == "controller":
                _CONTROLLERS[name] = item[1]
                continue
            _, metrics, persisted = item
            if persisted is None:
                report_to_tune(metrics, None)
            else:
                with persisted.as_directory() as directory:
                    report_to_tune(metrics, directory)
        thread.join()
    finally:
        _CONTROLLERS.pop(name, None)
        results.shutdown()
    if "error" in outcome:
        raise outcome["error"]


__all__ = ["abort_train_runs", "run_trial", "worker_loop"]
