"""The ``bench/`` scripts: known-answer tests of their arithmetic and smoke runs at tiny sizes.

The smoke runs execute each script as a user would (a subprocess from the repository root)
and check that it prints one Markdown table with the expected rows and no failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import _common as c  # noqa: E402
import packing  # noqa: E402
import peak_memory  # noqa: E402
import search_overhead  # noqa: E402
import search_wall  # noqa: E402
import step_time  # noqa: E402

TINY_MLP = ["--width", "16", "--depth", "2", "--head", "8", "--in-dim", "8", "--batch-size", "16", "--threads", "1"]


def run_script(name: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell → cells of every Markdown body row; asserts there is exactly one table."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    separators = [ln for ln in lines if re.fullmatch(r"\|(---\|)+", ln)]
    assert len(separators) == 1, text
    body = lines[2:]
    return {cells[0]: cells for cells in ([x.strip() for x in ln.strip("|").split("|")] for ln in body)}


# ---------------------------------------------------------------------------- arithmetic
def test_paired_ratio_is_robust_to_a_load_drift():
    # the machine slows down 3× halfway; every entry is hit alike, so the paired ratio stays 2
    t = c.Timings({"a": {0: 2.0, 1: 2.0, 2: 6.0, 3: 6.0}, "b": {0: 1.0, 1: 1.0, 2: 3.0, 3: 3.0}}, {}, {})
    assert t.ratio("a", "b") == pytest.approx(2.0)
    assert t.median("a") == pytest.approx(4.0)
    assert t.ratio("a", "missing") != t.ratio("a", "missing")  # NaN, not a number made up


def test_interleaved_reports_a_failing_entry_and_keeps_the_others():
    calls = []

    def ok(r):
        calls.append(r.name)

    def bad(r):
        raise ValueError("no representation")

    w = c.Workload(bench=None, config={}, setup=None, batch=None, device=torch.device("cpu"), label="")
    runners = [c.Runner("ok", w, ok), c.Runner("bad", w, bad)]
    t = c.interleaved(runners, reps=3, warmup=1)
    assert len(t.times["ok"]) == 3 and calls.count("ok") == 4  # warm-up not recorded
    assert t.times["bad"] == {} and t.errors["bad"] == "ValueError: no representation"


def test_cpu_clock_does_not_count_sleeping():
    def sleepy(r):
        time.sleep(0.05)

    w = c.Workload(bench=None, config={}, setup=None, batch=None, device=torch.device("cpu"), label="")
    wall = c.interleaved([c.Runner("s", w, sleepy)], reps=2, warmup=0, clock="wall")
    cpu = c.interleaved([c.Runner("s", w, sleepy)], reps=2, warmup=0, clock="cpu")
    assert wall.median("s") >= 0.05 and cpu.median("s") < 0.02


def test_solver_clock_measures_the_solver_share():
    class FakeBalancer:
        def solve(self, x):
            time.sleep(0.02)
            return x

    def step(r):
        time.sleep(0.02)
        r.balancer.solve(1)

    w = c.Workload(bench=None, config={}, setup=None, batch=None, device=torch.device("cpu"), label="")
    r = c.Runner("nash", w, step, balancer=FakeBalancer())
    assert step_time.add_solver_clock(r) == "solve"
    t = c.interleaved([r], reps=3, warmup=0)
    share = [s / t.times["nash"][i] for i, s in enumerate(r.solver_times)]
    assert all(0.4 < x < 0.6 for x in share), share  # half the step sleeps in the solver


def test_overhead_rows_known_answer():
    # 2 trials of 10 s inside Tune, trainer alone 8 s, wall 25 s at concurrency 1
    rows = {r[0]: r for r in search_overhead.overhead_rows(2, 1, 25.0, [10.0, 10.0], 8.0, 3.0)}
    assert rows["in-trial overhead per trial, S/N − A"][1] == "2.00"
    assert rows["outside-trial overhead per trial, (c·W − S)/N"][1] == "2.50"
    share = rows["**overhead share of occupied trial time, 1 − N·A/(c·W)**"][1]
    assert share == "**36.0 %**"  # 1 − 16/25


def test_parse_kv_and_markdown_table():
    assert c.parse_kv(["batch_size=2", "image_shape=[72, 96]", "name=x"]) == \
        {"batch_size": 2, "image_shape": [72, 96], "name": "x"}
    with pytest.raises(SystemExit):
        c.parse_kv(["novalue"])
    assert c.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_state_swap_gives_each_method_its_own_trajectory():
    model = torch.nn.Linear(2, 1)
    first = c.state_copy(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    second = c.state_copy(model)
    c.copy_state(model.state_dict(), first)
    assert torch.equal(model.weight, first["weight"]) and not torch.equal(model.weight, second["weight"])


def test_method_kinds_match_the_cost_classes():
    from mtl_tune.registry import balancer_class

    kinds = {n: c.method_kind(balancer_class(n)) for n in ("ls", "famo", "mgda", "nashmtl", "mgdaub", "stgu",
                                                            "gradnorm")}
    assert kinds == {"ls": "loss", "famo": "loss", "mgda": "gradient", "nashmtl": "gradient",
                     "mgdaub": "representation", "stgu": "training-loop", "gradnorm": "last-layer grads"}


# ---------------------------------------------------------------------------- smoke runs
def test_step_time_runs_every_method_on_the_mlp(tmp_path):
    out = tmp_path / "step.md"
    text = run_script("step_time.py", *TINY_MLP, "--reps", "2", "--warmup", "1", "--clock", "cpu", "--out", str(out))
    rows = table_rows(text)
    from mtl_tune.registry import available_balancers

    for name in available_balancers():
        assert name in rows, name
        assert "FAILED" not in rows[name][-1], rows[name]
    for floor in ("floor:jac", "floor:jac-loop", "floor:null-grad", "floor:ls+fwd", "floor:rep"):
        assert floor in rows and rows[floor][-1] == "", rows[floor]
    assert rows["ls"][4] == "1.00"
    assert "%" in rows["nashmtl"][10]  # the solver share is reported
    assert out.read_text().strip() == text.strip()


def test_step_time_lists_a_method_that_raises_with_its_reason(capsys):
    # the toy has no representation: the representation-level methods must say so, not vanish
    # (in-process: the CLI itself is exercised by the MLP run above)
    assert step_time.main(["--benchmark", "toy", "--methods", "ls,mgdaub,mgda", "--reps", "2", "--warmup", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert "FAILED" in rows["mgdaub"][-1] and "representation" in rows["mgdaub"][-1]
    assert "FAILED" not in rows["mgda"][-1]


def test_peak_memory_reports_the_jacobian_of_gradient_methods(capsys):
    # width 512: K×P Jacobian ≈ 6 MiB, clearly above RSS noise; the parent runs in-process
    # (its children are fresh processes, as in a real run)
    threads = torch.get_num_threads()
    try:  # the parent sets --threads for its caption: restore it for the other tests
        assert peak_memory.main(["--methods", "ls,mgda", "--width", "512", "--depth", "2", "--batch-size", "32",
                                 "--steps", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"ls", "mgda"}
    assert float(rows["mgda"][4]) > float(rows["ls"][4])  # J (and its float64 Gram copy) on top of ls


def test_packing_prints_one_row_per_group(capsys):
    # one worker process (the parent runs in-process); the multi-group run is the slow test below
    assert packing.main(["--benchmark", "toy", "--epochs", "1", "--config", "steps_per_epoch=20",
                         "--trials", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"1"} and rows["1"][1] == str(os.cpu_count() or 1)  # cores // 1 threads
    assert rows["1"][5] == "1.00" and "FAILED" not in rows["1"][-1]


@pytest.mark.slow
def test_packing_compares_groups_from_the_command_line():
    text = run_script("packing.py", "--benchmark", "toy", "--epochs", "1", "--config", "steps_per_epoch=20",
                      "--trials", "1,2")
    rows = table_rows(text)
    assert set(rows) == {"1", "2"} and rows["1"][5] == "1.00"
    assert rows["2"][1] == str(max(1, (os.cpu_count() or 1) // 2))  # cores // n threads per trial
    assert all("FAILED" not in r[-1] for r in rows.values())


@pytest.mark.slow
def test_search_overhead_runs_a_tiny_search():
    text = run_script("search_overhead.py", "--benchmark", "toy", "--method", "cagrad", "--num-samples", "2",
                      "--epochs", "1", "--config", "steps_per_epoch=20", "--repeats", "1", timeout=300)
    rows = table_rows(text)
    assert any(k.startswith("**overhead share") for k in rows)
    assert "TERMINATED: 2" in text


def test_search_wall_compares_results_by_method_hparams_and_metrics():
    import pandas as pd

    a = pd.DataFrame({"method": ["ls", "cagrad"], "hp/c": [float("nan"), 0.4], "val/loss1": [1.0, 2.0],
                      "time_total_s": [3.0, 4.0], "trial_id": ["x", "y"]})
    b = a.iloc[::-1].assign(time_total_s=[9.0, 9.0], trial_id=["p", "q"])  # order, times and ids differ
    assert search_wall.result_rows(a) == search_wall.result_rows(b)
    assert search_wall.result_rows(a) != search_wall.result_rows(b.assign(**{"val/loss1": [2.0, 1.5]}))


def test_search_wall_times_help_of_two_trees():
    # this tree against itself: the command-line workloads need no Ray
    text = run_script("search_wall.py", "--base", str(ROOT), "--workloads", "help,bad-name,bad-data", "--repeats", "1")
    rows = table_rows(text)
    assert rows["help"][5] == "exit 0" and rows["bad-name"][5] == "exit 2", text
    assert rows["bad-data"][5] == "exit 2" and rows["bad-data"][7] == "same message: yes", text


def test_toy_engine_smoke():
    # a meta method first: the warm-up takes its reference path (it has no lockstep path)
    out = run_script("toy_engine.py", "--methods", "autol,ls,mgda", "--steps", "30", "--repeats", "1", "--inits", "0,3")
    rows = table_rows(out)
    assert set(rows) == {"autol", "ls", "mgda"}
    for cells in rows.values():
        fast, api, ratio = (float(v) for v in cells[1:4])
        assert fast > 0 and api > 0 and ratio == pytest.approx(api / fast, rel=0.05)


def test_trial_step_runs_both_ways_and_finds_equal_reports():
    out = run_script("trial_step.py", "--methods", "ls,famo", "--repeats", "1", "--epochs", "2", "--steps", "30")
    rows = [line for line in out.splitlines() if line.startswith("| ls ") or line.startswith("| famo ")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| yes |") for row in rows), out


def test_search_wall_refuses_an_unknown_workload_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        search_wall.main(["--base", str(ROOT), "--workloads", "help,nope"])
    assert exit_info.value.code == 2
    assert "unknown workload(s) nope; valid: help," in capsys.readouterr().err


PARSE_ONLY = '''
import argparse, runpy, sys
if len(sys.argv) < 2 or sys.argv[1] in ("-c", "-m"):
    sys.exit(0)   # the version line and the pytest check
real = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    parsed = real(self, args, namespace)   # a flag the script does not know exits with 2 here
    if getattr(parsed, "out", None):      # stands in for the table the script would write
        open(parsed.out, "w").close()
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_gpu_session_script_runs_every_check_with_flags_its_scripts_accept(tmp_path):
    """bench/gpu_session.sh is run on a lent GPU, where a mistyped flag would waste the lease: every
    check's command line goes through its script's own argument parser here (and stops there)."""
    wrapper = tmp_path / "parse_only.py"
    wrapper.write_text(PARSE_ONLY)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {wrapper} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": str(fake)})
    assert proc.returncode == 0, proc.stderr
    log = (out / "session.log").read_text()
    checks = re.findall(r"^=== (\w+): exit (\d+)", log, flags=re.M)
    assert [name for name, _ in checks] == ["cuda_tests", "step_nyuv2", "paths_nyuv2", "memory_nyuv2", "epoch_nyuv2_ls",
                                            "epoch_nyuv2_mgda", "step_cityscapes", "step_qm9", "step_celeba",
                                            "upgrad_one_blas_thread"], log
    # the lent machine returns at most 8 files: the tables written to OUTDIR and session.log
    written = sorted(f.name for f in out.iterdir())
    assert "session.log" in written and len(written) <= 8, written
    tables = ("step_nyuv2", "paths_nyuv2", "epoch_nyuv2_ls", "epoch_nyuv2_mgda")   # the tables the docs read
    assert {f"{name}.md" for name in tables} <= set(written), written
    assert all(code == "0" for _, code in checks), log
    assert "=== done" in log


def test_search_timeline_times_the_phases_and_every_trial(tmp_path):
    text = run_script("search_timeline.py", "--method", "ls,cagrad", "--num-samples", "2", "--epochs", "1",
                      "--config", "steps_per_epoch=20", "--storage-path", str(tmp_path), "--verbose", "0",
                      timeout=300)
    driver = [ln.split("|")[2].strip() for ln in text.splitlines() if re.match(r"\| +\d+\.\d\d \|", ln)]
    for phase in ("ray.init end", "method ls end", "method cagrad end", "exit 0"):
        assert phase in driver
    trials = [ln for ln in text.splitlines() if re.match(r"\| +\d+\.\d \| ", ln)]
    assert sorted(ln.split("|")[4].strip() for ln in trials) == ["cagrad", "cagrad", "ls", "ls"]
    starts_ends = [(float(ln.split("|")[1]), float(ln.split("|")[2])) for ln in trials]
    assert all(0 < start <= end + 1 for start, end in starts_ends)  # Ray's whole-second stamps: ± 1 s
