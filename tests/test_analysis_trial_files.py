"""Rebuilding a sweep's table from Tune's plain files (no trials.csv, no pickles)."""

import json

from mtl_tune.analysis import load_sweep


def _trial(exp, name, epochs_done, epochs=2, error=None, cut_last_line=False):
    trial = exp / name
    trial.mkdir(parents=True)
    config = {"benchmark": "toy", "method": exp.name.split(".")[0], "seed": 0, "epochs": epochs,
              "hparams": {"c": 0.3}}
    (trial / "params.json").write_text(json.dumps(config))
    lines = [json.dumps({"val/loss1": 1.0 / e, "epoch": e, "epochs": epochs, "training_iteration": e,
                         "trial_id": name.split("_")[1]}) for e in range(1, epochs_done + 1)]
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"val/loss1": 0.1, "epoch'  # the driver died mid-write
    (trial / "result.json").write_text(text)
    if error:
        (trial / "error.txt").write_text(f"Traceback ...\n\x1b[31mValueError: {error}\x1b[0m\n")


def test_table_from_trial_folders_without_experiment_state(tmp_path):
    sweep = tmp_path / "sw"
    _trial(sweep / "cagrad", "cagrad_aaaa0001", 2)
    _trial(sweep / "cagrad", "cagrad_aaaa0002", 1, cut_last_line=True)
    _trial(sweep / "cagrad", "cagrad_aaaa0003", 1, error="loss is nan")
    _trial(sweep / "cagrad.seeds", "cagrad_bbbb0001", 2)
    table = load_sweep(sweep).set_index("trial_id")
    assert table.loc["aaaa0001", "status"] == "TERMINATED" and table.loc["aaaa0001", "val/loss1"] == 0.5
    assert table.loc["aaaa0002", "status"] == "INCOMPLETE" and table.loc["aaaa0002", "training_iteration"] == 1
    assert table.loc["aaaa0003", "status"] == "ERROR" and table.loc["aaaa0003", "error"] == "ValueError: loss is nan"
    assert table.loc["bbbb0001", "phase"] == "seeds" and table.loc["aaaa0001", "phase"] == "search"
    assert set(table["hp/c"]) == {0.3} and set(table["sweep"]) == {"sw"}


def test_the_experiment_state_names_the_trials_and_their_status(tmp_path):
    exp = tmp_path / "sw" / "ls"
    _trial(exp, "ls_cccc0001", 1)
    _trial(exp, "ls_cccc0009", 2)  # an orphan folder left by a restore: not in the state
    state = {"trial_id": "cccc0001", "status": "RUNNING", "relative_logdir": "ls_cccc0001"}
    (exp / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [[json.dumps(state), "{}"]]}))
    table = load_sweep(tmp_path / "sw")
    assert table[["trial_id", "status"]].values.tolist() == [["cccc0001", "RUNNING"]]
