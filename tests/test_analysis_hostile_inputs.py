"""Sweeps given twice or sharing a name, cut-off tables, malformed sweep.json, unusable --out,
and the permissions of the tables written: each gives the right table or one clear line."""

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from mtl_tune.analysis import load_sweep
from mtl_tune.analysis.sweep import SweepWarning
from mtl_tune.analysis.synthetic import write_toy_sweep
from mtl_tune.analysis.trial_table import atomic_write_text, write_sweep_json, write_table
from mtl_tune.analyze import main


def _trial_folder(exp: Path, trial_id: str, c: float) -> None:
    """One finished two-epoch trial of a Tune experiment folder, as plain files."""
    trial = exp / f"{exp.name}_{trial_id}"
    trial.mkdir(parents=True)
    config = {"benchmark": "toy", "method": exp.name, "seed": 0, "epochs": 2, "hparams": {"c": c}}
    (trial / "params.json").write_text(json.dumps(config))
    lines = [json.dumps({"val/loss1": c + e, "val/loss2": 1.0 - c, "epoch": e, "epochs": 2,
                         "training_iteration": e, "trial_id": trial_id}) for e in (1, 2)]
    (trial / "result.json").write_text("\n".join(lines) + "\n")


def _sweep_with_folders(root: Path, n: int = 4) -> Path:
    """A sweep folder with trial folders and the trials.csv the search would write from them."""
    for i in range(n):
        _trial_folder(root / "cagrad", f"aaaa000{i}", 0.1 * (i + 1))
    (root / "sweep.json").write_text(json.dumps({"name": "sw", "benchmark": "toy", "methods": ["cagrad"]}))
    load_sweep(root).drop(columns=["sweep_dir"]).to_csv(root / "trials.csv", index=False)
    return root


def _cut(table: Path, keep_lines: int) -> None:
    """Keep the first ``keep_lines`` lines and half of the next: a write interrupted mid-row."""
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:keep_lines]) + lines[keep_lines][: len(lines[keep_lines]) // 2])


# --------------------------------------------------------------------------- item 1: same sweep twice
def test_a_sweep_given_twice_is_read_once(tmp_path):
    path = write_toy_sweep(tmp_path / "toy", n_per_method=4)
    (tmp_path / "link").symlink_to(path)
    for twice in ([path, path], [path, path / "trials.csv"], [path, tmp_path / "x" / ".." / "toy"],
                  [path, tmp_path / "link"]):
        (tmp_path / "x").mkdir(exist_ok=True)
        with pytest.warns(SweepWarning, match="given twice"):
            df = load_sweep(twice)
        assert len(df) == 12 and set(df["sweep"]) == {"toy-demo"}


def test_cli_counts_a_sweep_given_twice_once(tmp_path, capsys):
    path = write_toy_sweep(tmp_path / "toy", n_per_method=4)
    assert main([str(path), str(path / "trials.csv"), "--out", str(tmp_path / "an")]) == 0
    assert "(given twice); read once" in capsys.readouterr().err
    assert "12 trials" in (tmp_path / "an" / "report.md").read_text()


def test_different_folders_sharing_a_sweep_name_are_kept_apart(tmp_path):
    a = write_toy_sweep(tmp_path / "a" / "s", n_per_method=4, seed=0)
    b = write_toy_sweep(tmp_path / "b" / "s", n_per_method=3, seed=1)
    with pytest.warns(SweepWarning, match="'toy-demo' is used by 2 folders"):
        df = load_sweep([a, b])
    assert df.groupby("sweep").size().to_dict() == {f"toy-demo ({a})": 12, f"toy-demo ({b})": 9}
    assert set(df.attrs["sweeps"]) == {f"toy-demo ({a})", f"toy-demo ({b})"}


# --------------------------------------------------------------------------- item 2: cut-off table
def test_a_cut_off_table_is_rebuilt_from_the_trial_folders(tmp_path):
    root = _sweep_with_folders(tmp_path / "sw")
    _trial_folder(root / "ls", "bbbb0001", 0.5)  # a method sweep.json does not list: not this table's
    _cut(root / "trials.csv", 2)  # header, one whole row, half of the next; two rows lost
    with pytest.warns(SweepWarning, match=r"fewer fields than the header.*missing from it.*rebuilt"):
        df = load_sweep(root)
    assert sorted(df["trial_id"]) == [f"aaaa000{i}" for i in range(4)]
    assert df["hp/c"].notna().all() and (df["status"] == "TERMINATED").all()


def test_a_table_lacking_trials_of_its_folder_is_rebuilt(tmp_path):
    root = _sweep_with_folders(tmp_path / "sw")
    table = pd.read_csv(root / "trials.csv")
    table.iloc[:2].to_csv(root / "trials.csv", index=False)  # whole rows, but two trials short
    with pytest.warns(SweepWarning, match="2 trial"):
        assert len(load_sweep(root / "trials.csv")) == 4


def test_an_experiment_of_a_method_the_sweep_did_not_run_is_not_missing(tmp_path, recwarn):
    root = _sweep_with_folders(tmp_path / "sw")
    _trial_folder(root / "ls", "bbbb0001", 0.5)  # sweep.json lists cagrad only
    assert len(load_sweep(root)) == 4
    assert not [w for w in recwarn if issubclass(w.category, SweepWarning)]


def test_cut_rows_without_trial_folders_are_dropped_with_a_warning(tmp_path, capsys):
    path = write_toy_sweep(tmp_path / "toy", n_per_method=4)
    _trial_folder(tmp_path / "ls", "cccc0001", 0.5)  # an experiment beside the sweep, not in it: ignored
    _cut(path / "trials.csv", 6)
    with pytest.warns(SweepWarning, match="1 row.*dropped them"):
        df = load_sweep(path)
    assert len(df) == 5 and df["seed"].notna().all()
    assert main([str(path), "--out", str(tmp_path / "an")]) == 0
    assert "warning:" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 3: permissions
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_tables_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_sweep_json(tmp_path, {"name": "s"})
        written = [tmp_path / "a.txt", tmp_path / "sweep.json",
                   write_table(pd.DataFrame({"a": [1]}), tmp_path), write_table(pd.DataFrame(), tmp_path, "c.csv")]
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {mode}


# --------------------------------------------------------------------------- item 6: --out
def test_out_that_is_or_lies_under_a_file_is_one_clear_error(tmp_path, capsys):
    path = write_toy_sweep(tmp_path / "toy", n_per_method=3)
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main([str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and "afile" in err and "exists and is not a folder" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- items 7-8: malformed files
def _with_meta(tmp_path: Path, text: str) -> Path:
    path = write_toy_sweep(tmp_path / "toy", n_per_method=3)
    (path / "sweep.json").write_text(text)
    return path


@pytest.mark.parametrize("text,match", [
    ('{"name": "toy-demo", "args": [1]}', r"field 'args' must be a JSON object, got array"),
    ('{"name": "toy-demo", "args": {"config": [1]}}', r"'args.config' must be a JSON object"),
    ('{"name": "toy-demo", "objective": "val/loss1"}', r"field 'objective' must be a JSON object"),
    ('{"name": "toy-demo", "metric_specs": [1]}', r"'metric_specs' must be a JSON object"),
    ('[1, 2]', r"must hold a JSON object, got array"),
    ('{"name": "toy-demo",\n', r"not valid JSON \(Expecting property name"),
])
def test_malformed_sweep_json_is_one_error_naming_the_file(tmp_path, capsys, text, match):
    path = _with_meta(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        load_sweep(path)
    assert str(path / "sweep.json") in str(err.value)
    assert main([str(path), "--out", str(tmp_path / "an")]) == 2
    out = capsys.readouterr().err
    assert out.startswith(f"error: {path / 'sweep.json'}") and "Traceback" not in out


def test_binary_sweep_json_and_csv_name_the_file(tmp_path, capsys):
    path = _with_meta(tmp_path, "")
    (path / "sweep.json").write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match="sweep.json: not valid JSON"):
        load_sweep(path)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    assert main([str(binary), "--out", str(tmp_path / "an")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {binary}: not a readable CSV table") and "codec" in err
