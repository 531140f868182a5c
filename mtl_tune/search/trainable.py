"""The Ray Tune function trainable: one trial = :func:`mtl_tune.training.train` on one config.

Reports once per epoch with a checkpoint (the full training state) so a trial restarted
after a crash or node loss continues from its last finished epoch. The checkpoint is a
``torch.save`` file written by this search; it is the only pickle we ever load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from mtl_tune.training import train

STATE_FILE = "state.pt"


def train_trial(config: dict[str, Any]) -> None:
    cpus = float(config.get("cpus_per_trial", 1) or 1)
    torch.set_num_threads(max(1, int(cpus)))
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # our own checkpoint (written below), hence weights_only=False is safe here
            state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)

    def report(metrics: dict[str, Any], training_state: dict[str, Any] | None) -> None:
        if training_state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            tmp = Path(directory) / (STATE_FILE + ".tmp")
            torch.save(training_state, tmp)
            os.replace(tmp, Path(directory) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    train(config, report, state)
