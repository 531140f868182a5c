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
from mtl_tune.analysis.published import NYUV2

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
                 "Δm% and mean rank", "Variance–performance correlation", "All sweeps: best scalar objective per method",
                 "All sweeps: hypervolume per method", "toy-demo: HV at (0, 0)"):
        assert text in report, text
    # the two-objective toy sweep is never ranked on one of its objectives (nor its x1/x2 coordinates)
    toy_part = report.split("## Sweep city-demo")[0]
    assert "Best trial per method" not in toy_part and "toy-demo_bars.png" not in toy_part
    assert "toy-demo_hp_cagrad_val_loss1.png" in toy_part and "toy-demo_hp_cagrad_val_loss2.png" in toy_part
    images = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images and all(is_png(tmp_path / "md" / p) for p in images)
    assert main([str(sweeps[1]), "--out", str(tmp_path / "html"), "--format", "html"]) == 0
    page = (tmp_path / "html" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page and '<img src="city-demo_pareto.png"' in page
    assert "`" not in page.split("<body>")[1]  # inline code is <code>, in headings too
    assert "<h3>Best trial per method on <code>val/delta_m</code> (min)</h3>" in page
    assert "wrote" in capsys.readouterr().out


def test_rank_by_adds_a_scalar_view_to_a_multi_objective_sweep(sweeps, tmp_path):
    assert main([str(sweeps[0]), "--out", str(tmp_path), "--rank-by", "val/loss2"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Best trial per method on `val/loss2` (min) — a scalar view asked for with --rank-by" in report
    assert main([str(sweeps[0]), "--out", str(tmp_path), "--rank-by", "val/nope"]) == 2


def test_method_front_summary_known_answer_and_degenerate_warnings():
    from mtl_tune.analysis.summary import degenerate_notes, distinct_seed_stats, method_front_summary

    df = pd.DataFrame({
        "method": ["a", "a", "a", "b", "b", "c"], "seed": [0, 0, 1, 0, 0, 0], "status": "TERMINATED",
        "val/l1": [1.0, 3.0, 2.0, 0.5, 0.6, 5.0], "val/l2": [3.0, 1.0, 4.0, 0.5, 0.7, 5.0]})
    ref = [4.0, 4.0]
    s = method_front_summary(df, ["val/l1", "val/l2"], ["min", "min"], ref)
    # a: boxes of (1,3) and (3,1) under (4,4): 3·1 + 1·3 − overlap 1·1 = 5; b: (0.5,0.5) → 3.5² = 12.25; c beats nothing
    assert s.loc["a", "hypervolume"] == pytest.approx(5.0) and s.loc["b", "hypervolume"] == pytest.approx(12.25)
    assert s.loc["c", "hypervolume"] == 0.0 and s.loc["c", "beats_reference"] == 0
    assert list(s.index) == ["(all)", "b", "a", "c"]
    assert s.loc["a", "n_front"] == 2 and s.loc["a", "on_global_front"] == 0 and s.loc["b", "on_global_front"] == 1
    assert s.loc["a", "seeds"] == 2 and s.loc["b", "seeds"] == 1  # distinct seeds, not runs
    notes = degenerate_notes(s, ref, ["val/l1", "val/l2"])
    assert any("hypervolume of c is 0" in n and "val/l1 = 4" in n for n in notes)
    assert any("front of b is a single point" in n for n in notes)
    assert not any(" of a " in n for n in notes)
    stats = distinct_seed_stats(df, "val/l1")
    assert stats.loc["a", "n"] == 2 and stats.loc["a", "mean"] == pytest.approx((2.0 + 2.0) / 2)
    assert stats.loc["b", "n"] == 1 and np.isnan(stats.loc["b", "std"])  # one seed run twice: no spread


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
    assert "toy-demo: multi-objective, no scalar ranking" in text  # the (loss1, loss2) sweep is never ranked on loss1
    assert is_png(tmp_path / "toy-demo_parallel.png")  # drawn over the declared objectives only
    assert (tmp_path / "report" / "report.md").is_file() and is_png(tmp_path / "toy-demo_pareto.png")
    assert is_png(tmp_path / "published_nyuv2_variance.png")


# --------------------------------------------------------------------------- Ray fallback
@pytest.mark.slow
def test_load_sweep_rebuilds_the_table_from_ray_experiments(tmp_path, capsys):
    import ray

    from mtl_tune.search.cli import main as search

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
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


def test_point_labels_of_the_nyuv2_spread_plot_do_not_overlap():
    import itertools

    from mtl_tune.analysis._figure import label_points, new_figure

    res = variance_performance_from_metrics(NYUV2.frame(), NYUV2.metrics, n_boot=50)
    x = res.table[f"task_{res.spread}"].to_numpy(float)
    y = res.table[res.performance].to_numpy(float)
    fig = new_figure(6.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x, y)
    texts = label_points(ax, x, y, list(res.table.index))
    fig.canvas.draw()
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert len(boxes) == 21  # DB-MTL and NTKMTL-SR, DWA and GradDrop sit almost on top of each other
    assert not [(a, b) for (a, ba), (b, bb) in itertools.combinations(zip(res.table.index, boxes), 2) if ba.overlaps(bb)]
