"""Plots, the report CLI, the notebook, and the Ray-experiment fallback of load_sweep."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl_tune.analysis import (
    load_sweep,
    plot_hp_vs_objective,
    plot_method_bars,
    plot_parallel_coordinates,
    plot_pareto_front,
    plot_variance_vs_delta_m,
    variance_performance_from_metrics,
)
from mtl_tune.analysis.report import best_config_seeds, best_per_method, objective_of
from mtl_tune.analysis.synthetic import write_baseline_sweep, write_toy_sweep
from mtl_tune.analyze import main
from mtl_tune.data.published import NYUV2

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    return write_toy_sweep(root / "toy"), write_baseline_sweep(root / "city")


# --------------------------------------------------------------------------- plots
def test_pareto_plots_for_2_3_and_many_objectives(sweeps, tmp_path):
    from mtl_tune.benchmarks.toy import pareto_front

    df = load_sweep(sweeps[0])
    m2 = ["val/loss1", "val/loss2"]
    assert is_png(plot_pareto_front(df, m2, ["min", "min"], tmp_path / "a" / "p2.png", reference_front=pareto_front()))
    assert is_png(plot_pareto_front(df, m2, ["min", "min"], tmp_path / "p2c.png", color_by="hp/c",
                                    include_incomplete=True))
    m3 = m2 + ["val/pareto_distance"]
    assert is_png(plot_pareto_front(df, m3, ["min", "min", "max"], tmp_path / "p3.png"))
    m4 = m3 + ["time_total_s"]
    assert is_png(plot_pareto_front(df, m4, ["min"] * 4, tmp_path / "p4.png"))
    assert is_png(plot_parallel_coordinates(df, m2, ["min", "min"], tmp_path / "pc.png"))
    # nothing completed: still a (blank) figure, no crash — the search calls this on every sweep
    empty = df.assign(status="ERROR")
    assert plot_pareto_front(empty, m2, ["min", "min"], tmp_path / "empty.png").is_file()
    with pytest.raises(ValueError, match="at least 2"):
        plot_pareto_front(df, m2[:1], ["min"], tmp_path / "x.png")


def test_charts(sweeps, tmp_path):
    df = load_sweep(sweeps[1])
    famo = df[df.method == "famo"]
    assert is_png(plot_hp_vs_objective(famo, ["hp/gamma", "hp/w_lr"], "val/delta_m", "min", tmp_path / "hp.png"))
    seeds = best_config_seeds(df, "val/delta_m", "min")
    assert set(seeds["method"]) == {"ls", "famo", "cagrad"}
    assert is_png(plot_method_bars(seeds, "val/delta_m", tmp_path / "bars.png", mode="min"))
    res = variance_performance_from_metrics(NYUV2.frame(), NYUV2.metrics, n_boot=200)
    assert is_png(plot_variance_vs_delta_m(res, tmp_path / "var.png"))


def test_best_per_method_and_seed_groups(sweeps):
    df = load_sweep(sweeps[1])
    best = best_per_method(df, "val/delta_m", "min")
    assert (best["status"] == "TERMINATED").all() and best["method"].is_unique
    done = df[df.status == "TERMINATED"]
    assert best["val/delta_m"].min() == done["val/delta_m"].min()
    # best configuration's seeds all share the hyperparameters of that configuration
    seeds = best_config_seeds(df, "val/delta_m", "min")
    for _, rows in seeds.groupby("method"):
        assert rows[[c for c in rows if c.startswith("hp/")]].nunique(dropna=False).max() == 1
    assert objective_of(df, df.attrs["sweeps"]["city-demo"]) == (["val/delta_m"], ["min"])


# --------------------------------------------------------------------------- CLI
def test_cli_writes_markdown_and_html_reports(sweeps, tmp_path, capsys):
    assert main([str(sweeps[0]), str(sweeps[1]), "--out", str(tmp_path / "md")]) == 0
    report = (tmp_path / "md" / "report.md").read_text()
    for text in ("## Sweep toy-demo", "## Sweep city-demo", "Pareto front over", "Hypervolume (exact)",
                 "Δm% and mean rank", "Variance–performance correlation", "All sweeps: best objective per method"):
        assert text in report, text
    images = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images and all(is_png(tmp_path / "md" / p) for p in images)
    assert main([str(sweeps[1]), "--out", str(tmp_path / "html"), "--format", "html"]) == 0
    page = (tmp_path / "html" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page and '<img src="city-demo_pareto.png"' in page
    assert "wrote" in capsys.readouterr().out


def test_cli_missing_path_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing_sweep"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing_sweep" in err and err.startswith("error:") and "Traceback" not in err
    proc = subprocess.run([sys.executable, "-m", "mtl_tune.analyze", str(tmp_path / "nowhere")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- notebook
@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_a_sweep(sweeps, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "analysis" / "sweep_analysis.ipynb", as_version=4)
    env = {"MTL_TUNE_SWEEP": os.pathsep.join(str(p) for p in sweeps), "MTL_TUNE_ANALYSIS_OUT": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment of this process
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert str(sweeps[0]) in text and "60 trials in 2 sweep(s)" in text
    assert (tmp_path / "report" / "report.md").is_file() and is_png(tmp_path / "toy-demo_pareto.png")
    assert is_png(tmp_path / "published_nyuv2_variance.png")


# --------------------------------------------------------------------------- Ray fallback
@pytest.mark.slow
def test_load_sweep_rebuilds_the_table_from_ray_experiments(tmp_path, capsys):
    import ray

    from mtl_tune.search.cli import main as search

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        code = search(["--method", "ls,cagrad", "--num-samples", "2", "--epochs", "1", "--config",
                       "steps_per_epoch=50", "--storage-path", str(tmp_path), "--name", "sw", "--verbose", "0"])
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    written = load_sweep(tmp_path / "sw")
    (tmp_path / "sw" / "trials.csv").unlink()  # as if the driver died before writing it
    rebuilt = load_sweep(tmp_path / "sw")
    key = ["method", "trial_id"]
    a = written.sort_values(key).reset_index(drop=True)
    b = rebuilt.sort_values(key).reset_index(drop=True)
    assert a["trial_id"].tolist() == b["trial_id"].tolist()
    assert a["status"].tolist() == b["status"].tolist()
    np.testing.assert_allclose(a["val/loss1"].to_numpy(float), b["val/loss1"].to_numpy(float))
    pd.testing.assert_series_equal(a["hp/c"], b["hp/c"], check_dtype=False)
