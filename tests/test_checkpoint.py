"""Checkpoints a weights-only torch.load reads: NumPy state converted exactly, crafted files refused."""

from __future__ import annotations

import io
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_tune import checkpoint
from mtl_tune.training.loop import Trainer


class _WritesMarker:
    """Unpickling this writes a file: any code a crafted checkpoint could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.normal(size=(3, 2)), "f32": rng.normal(size=4).astype(np.float32),
        "i64": np.arange(5), "u32": np.arange(7, dtype=np.uint32) * 600_000_000, "bool": np.array([True, False]),
        "zero_d": np.array(2.5), "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
        "big_endian": np.array([0.1, 1.1, 2.1], dtype=">f8"), "empty": np.zeros((0, 3)),
        "scalars": (np.float64(0.1), np.int64(-3), np.bool_(True), np.float32(1.5)),
    }


def _assert_same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_numpy_state_survives_a_weights_only_load_exactly():
    state = {"arrays": _arrays(), "nested": [(np.ones(2), "text", 3, None)], "plain": {"x": 1.0}}
    buffer = io.BytesIO()
    torch.save(checkpoint.to_plain(state), buffer)
    buffer.seek(0)
    loaded = checkpoint.from_plain(torch.load(buffer, weights_only=True))
    _assert_same(loaded, state)
    # big-endian values come back equal, in the same dtype
    assert loaded["arrays"]["big_endian"].dtype == np.dtype(">f8")


def test_a_raw_numpy_state_is_what_torch_refuses():
    """The conversion is needed: torch's default refuses a NumPy array (so the test above can fail)."""
    buffer = io.BytesIO()
    torch.save({"a": np.ones(2)}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)


def test_module_state_dicts_and_object_arrays_are_left_alone_or_refused():
    ordered = OrderedDict(w=torch.ones(2))
    ordered._metadata = {"": {"version": 2}}  # a module state_dict's metadata must survive
    assert checkpoint.to_plain({"model": ordered})["model"] is ordered
    with pytest.raises(TypeError, match="object"):
        checkpoint.to_plain({"bad": np.array([object()])})


def test_load_refuses_a_crafted_or_legacy_checkpoint_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "state.pt"
    torch.save({"epoch": 1, "payload": _WritesMarker(marker)}, crafted)
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=str(crafted)):
        checkpoint.load(crafted)
    assert not marker.exists()
    legacy = tmp_path / "legacy.pt"
    torch.save({"rng": {"numpy": np.random.get_state()}}, legacy)  # how checkpoints held NumPy before
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="older mtl_tune"):
        checkpoint.load(legacy)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_load_names_a_cut_short_or_modified_checkpoint(tmp_path, legacy_format):
    """A state.pt cut short (a kill or a full disk during the write or the copy) or overwritten is a
    DamagedCheckpointError naming the file — an UnusableCheckpointError, so a trial fails once."""
    whole = tmp_path / "whole.pt"
    torch.save({"epoch": 3, "model": {"w": torch.arange(1000.0)}}, whole,
               _use_new_zipfile_serialization=not legacy_format)
    data = whole.read_bytes()
    assert checkpoint.load(whole)["epoch"] == 3
    cuts = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 97))]
    for damaged_bytes in (*cuts, b"\x00" * len(data)):
        damaged = tmp_path / "state.pt"
        damaged.write_bytes(damaged_bytes)
        with pytest.raises(checkpoint.UnusableCheckpointError, match=f"checkpoint {damaged}") as err:
            checkpoint.load(damaged)
        # a legacy-format file cut inside its pickle may read as a weights-only refusal instead
        assert isinstance(err.value, checkpoint.DamagedCheckpointError) or legacy_format
    with pytest.raises(FileNotFoundError):  # not the file's content: an ordinary OS error
        checkpoint.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("method", ["nashmtl", "pivrg", "stgu", "famo"])
def test_a_trial_checkpoint_loads_weights_only_and_continues_identically(tmp_path, method):
    """A trial's full state (model, optimizer, balancer with its NumPy warm starts/scores/affinities,
    NumPy's global random state) through a file and checkpoint.load: the resumed run's reports are
    the uninterrupted run's."""
    config = {"benchmark": "toy", "method": method, "epochs": 3, "steps_per_epoch": 15, "seed": 0}
    full: list[dict] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        Trainer(config).run(lambda metrics, state: full.append(metrics))
        states: list = []
        first = Trainer({**config, "epochs": 1})
        first.run(lambda metrics, state: states.append(state))
        path = tmp_path / "state.pt"
        torch.save(states[-1], path)
        resumed_reports: list[dict] = []
        resumed = Trainer(config)
        resumed.load_state_dict(checkpoint.load(path))
        resumed.run(lambda metrics, state: resumed_reports.append(metrics))
    timing = {"epoch_time_s", "resumed_from_epoch"}  # (how long an epoch took; where the run resumed)
    for a, b in zip(full[1:], resumed_reports):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert len(resumed_reports) == 2
