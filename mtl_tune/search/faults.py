"""Fault injection for the reliability tests (a test hook, off unless its variables are set).

Shared by the single-worker trainable (:mod:`mtl_tune.search.trainable`) and the Ray Train
workers of a multi-worker trial (:mod:`mtl_tune.search.data_parallel`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def maybe_inject_fault(metrics: dict[str, Any], trial_id: str, delay_s: float = 0.0) -> None:
    """Fault injection for the reliability tests: with ``MTL_TUNE_FAULT_KILL_AT_EPOCH=N`` and
    ``MTL_TUNE_FAULT_DIR`` set, the worker process dies once per trial right after reporting
    epoch N (as a lost node would), so Tune must restart it from its checkpoint. In a
    multi-worker trial the last Train worker dies ``delay_s`` after its report, in the next
    epoch (:mod:`mtl_tune.search.data_parallel`)."""
    at, marker_dir = os.environ.get("MTL_TUNE_FAULT_KILL_AT_EPOCH"), os.environ.get("MTL_TUNE_FAULT_DIR")
    if not at or not marker_dir or float(metrics.get("epoch", -1)) != float(at):
        return
    marker = Path(marker_dir) / trial_id
    if not marker.exists():
        marker.write_text("killed")
        time.sleep(delay_s)
        os._exit(1)
