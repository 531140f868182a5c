"""The examples in examples/ run and do what their docstrings say (small step counts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["cagrad", "famo", "uw", "mgdaub", "autol"])
def test_plain_loop_reduces_both_losses(method):
    # Auto-λ steps on 0.1 × the losses (its official initial λ) and needs twice the steps
    result = load("plain_loop").train(method, steps=300 if method == "autol" else 150)
    assert all(last < 0.5 * first for first, last in zip(result["first_losses"], result["last_losses"]))
    assert len(result["weights"]) == 2


def test_lightning_module_trains_and_checkpoints_the_balancer(tmp_path):
    pytest.importorskip("lightning")
    example = load("lightning_module")
    ckpt = tmp_path / "famo.ckpt"
    module = example.train("famo", steps=40, checkpoint=str(ckpt))
    assert all(last < first for first, last in zip(module.first_losses, module.last_losses))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    # the balancer is a submodule: its logits and step count are in Lightning's checkpoint
    torch.testing.assert_close(state["balancer.logits"], module.balancer.logits)
    assert state["balancer._extra_state"]["step_count"] == 40
    fresh = example.BalancedModule("famo")
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.balancer.logits, module.balancer.logits)


@pytest.mark.slow
def test_ddp_example_keeps_the_ranks_identical():
    """Run as a user would (spawned workers import the script as ``__mp_main__``)."""
    root = EXAMPLES.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(EXAMPLES / "ddp_train.py"), "--method", "mgda", "--steps", "4"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ranks_identical"] is True and len(result["weights"]) == 2
