"""Every bad CLI flag and every bad benchmark setting: exit 2, one line, no traceback,
nothing written, Ray never started, each case bounded in time."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl_tune.benchmarks.base import TRAINER_SETTINGS, Setting
from mtl_tune.registry import available_benchmarks, benchmark_class
from mtl_tune.search.cli import main

CASE_SECONDS = 30  # one validation must never hang (the old failure mode: PENDING forever)


@contextlib.contextmanager
def deadline(seconds: int):
    def fail(*_):
        raise TimeoutError(f"validation took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(capsys, storage: Path, *args: str) -> str:
    """Run the CLI in-process; assert the bad-input contract; return the message."""
    start = time.monotonic()
    with deadline(CASE_SECONDS):
        try:
            code = main([*args, "--storage-path", str(storage)])
        except SystemExit as exit_:  # argparse errors exit
            code = exit_.code
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (args, out.err, out.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    assert not storage.exists() or not any(storage.iterdir()), "something was written"
    assert time.monotonic() - start < CASE_SECONDS
    return lines[0]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr("mtl_tune.search.validate.local_gpus", lambda: 0)


BLOCKER = "__file__"  # replaced by a path below an existing file

FLAG_CASES = [
    (["--benchmark", "imagenet"], r"unknown benchmark 'imagenet'; valid benchmarks: .*toy"),
    (["--method", "nope"], r"unknown method 'nope'; valid methods: .*cagrad"),
    (["--method", ","], r"--method needs at least one method name"),
    (["--num-samples", "0"], r"--num-samples 0: must be at least 1"),
    (["--num-samples", "two"], r"argument --num-samples: invalid int value: 'two'"),
    (["--objective", "accuracy"], r"unknown objective 'accuracy' for benchmark toy; valid: pareto"),
    (["--objective", "test/loss1"], r"leaks the test set"),
    (["--sampler", "cmaes"], r"argument --sampler: invalid choice: 'cmaes'"),
    (["--scheduler", "pbt"], r"argument --scheduler: invalid choice: 'pbt'"),
    (["--scheduler", "asha"], r"need a scalar objective"),
    (["--grace-period", "0"], r"--grace-period 0: must be at least 1"),
    (["--scheduler", "asha", "--objective", "loss1", "--epochs", "2", "--grace-period", "3"],
     r"--grace-period 3: must be at most --epochs \(2\)"),
    (["--gpus-per-trial", "-1"], r"--gpus-per-trial -1: must be at least 0"),
    (["--gpus-per-trial", "0.5"], r"--gpus-per-trial 0.5: this machine has 0 GPU\(s\).*--gpus-per-trial 0"),
    (["--gpus-per-trial", "1.5"], r"--gpus-per-trial 1.5: above 1 it must be a whole number"),
    (["--cpus-per-trial", "0"], r"--cpus-per-trial 0: must be a number > 0"),
    (["--cpus-per-trial", "nan"], r"--cpus-per-trial nan: must be a number > 0"),
    (["--cpus-per-trial", "4", "--num-cpus", "2"], r"--cpus-per-trial 4: the local cluster \(--num-cpus 2\) has 2 CPU"),
    (["--max-concurrent", "0"], r"--max-concurrent 0: must be at least 1"),
    (["--num-cpus", "0"], r"--num-cpus 0: must be at least 1"),
    (["--storage-path", BLOCKER], r"--storage-path: .* cannot be created: .* is not a folder"),
    (["--seed", "-1"], r"--seed -1: must be at least 0 and at most 4294967295"),
    (["--seed", str(2**32)], r"--seed 4294967296: must be at least 0"),
    (["--epochs", "0"], r"--epochs 0: must be at least 1"),
    (["--benchmark", "multi_mnist", "--data-root", "/nonexistent/mnist"], r"/nonexistent/mnist"),
    (["--synthetic=yes"], r"argument --synthetic: ignored explicit argument 'yes'"),
    (["--address", "127.0.0.1:1"], r"--address 127.0.0.1:1: could not connect"),
    (["--resume"], r"--resume needs the --name"),
    (["--resume", "--name", "never-ran"], r"--resume: .*never-ran does not exist"),
    (["--method", "cagrad", "--search-space", "/nonexistent/space.yaml"], r"/nonexistent/space.yaml does not exist"),
    (["--method", "ls,cagrad", "--search-space", "/nonexistent/space.yaml"], r"use it with a single --method"),
    (["--method", "cagrad", "--set", "c"], r"--set 'c': expects KEY=VALUE"),
    (["--method", "cagrad", "--set", "=1"], r"--set '=1': expects KEY=VALUE"),
    (["--method", "cagrad", "--set", "c=7"], r"c=7 is outside its range"),
    (["--method", "cagrad", "--set", "c=abc"], r"c must be a number, got 'abc'"),
    (["--method", "cagrad", "--set", "cc=1"], r"no hyperparameter 'cc'"),
    (["--method", "ls,cagrad", "--set", "c=0.1"], r"use it with a single --method"),
    (["--method", "ls", "--set", "task_weights=[1,2,3]"], r"--set task_weights=\[1, 2, 3\]: ls needs 2 values"),
    (["--method", "ls", "--set", "task_weights=[1,-2]"], r"task_weights must be a list of non-negative numbers"),
    (["--config", "lr"], r"--config 'lr': expects KEY=VALUE"),
    (["--config", "lr=[1"], r"--config lr=\[1: not a YAML value"),
    (["--config", "learning_rate=1"], r"--config learning_rate: not a setting of benchmark toy; valid: .*lr"),
    (["--benchmark", "multi_mnist", "--config", "val_fraction=0"], r"without a validation split"),
    (["--config", "benchmark_options=[1]"], r"--config benchmark_options=\[1\]: benchmark_options must be a mapping"),
    (["--max-failures", "-1"], r"--max-failures -1: must be at least 0"),
    (["--seeds", "-1"], r"--seeds -1: must be at least 0"),
    (["--preferences", "-2"], r"--preferences -2: must be at least 0"),
    (["--verbose", "7"], r"argument --verbose: invalid choice: 7"),
    (["--no-such-flag"], r"unrecognized arguments: --no-such-flag"),
    (["--optuna-storage", "/nonexistent/dir/journal.log"], r"--optuna-storage .*: folder /nonexistent/dir does not exist"),
    (["--name", "../outside"], r"--name '../outside' must be a single folder name"),
    # found by a hostile tester: each used to pass validation and fail later (or do nothing)
    (["--name", "a" * 300], r"--name 'a+'\.\.\. is 300 bytes long; a folder name has at most 255 bytes"),
    (["--cpus-per-trial", "1e-300"], r"--cpus-per-trial 1e-300: must be at least 0.0001"),
    (["--gpus-per-trial", "1e-9"], r"--gpus-per-trial 1e-09: must be 0 or at least 0.0001"),
    (["--method", "mgda,pcgrad", "--preferences", "3"],
     r"--preferences 3: none of --method mgda,pcgrad is preference-aware .*preference-aware methods: .*\bls\b"),
    (["--epochs", "1", "--config", "epochs=3"], r"--epochs 1 and --config epochs=3 disagree"),
    (["--config", "epochs=1", "--config", "epochs=2"], r"--config epochs is given twice \(1 and '2'\)"),
    (["--objective", ""], r"--objective is empty"),
    (["--method", "cagrad", "--set", "c=0.1", "--set", "c=0.9"], r"--set c is given twice"),
    # access() says yes to root in /proc, where no folder can be made: refused before Ray (it was after)
    (["--storage-path", "/proc/mtl_tune_probe"], r"--storage-path: .* (cannot be created|is not writable)"),
    (["--scheduler", "asha", "--objective", "loss1", "--config", "epochs=2", "--grace-period", "3"],
     r"--grace-period 3: must be at most --config epochs \(2\)"),
    (["--optuna-storage", "zz://"], r"--optuna-storage zz://\.\.\.: not a usable database URL"),
    (["--optuna-storage", "sqlite:////nonexistent/dir/x.db"],
     r"--optuna-storage sqlite:////nonexistent/dir/x.db: folder /nonexistent/dir does not exist"),
    (["--optuna-storage", "sqlite://"], r"in-memory SQLite database is lost"),
    # --workers-per-trial: refused before Ray starts (tests/test_data_parallel.py runs a real one)
    (["--workers-per-trial", "0"], r"--workers-per-trial 0: must be at least 1"),
    (["--workers-per-trial", "2"], r"--workers-per-trial 2: benchmark toy cannot be split across workers: .*no data"),
    (["--benchmark", "multi_mnist", "--method", "mgda,gradnorm,stgu", "--workers-per-trial", "2"],
     r"--workers-per-trial 2: method\(s\) gradnorm, stgu do not support data-parallel training"),
    (["--benchmark", "multi_mnist", "--method", "mgda", "--workers-per-trial", "2", "--gpus-per-trial", "0.5"],
     r"--workers-per-trial 2 with --gpus-per-trial 0.5: the workers of a trial need a whole GPU each"),
    (["--benchmark", "multi_mnist", "--method", "mgda", "--workers-per-trial", "3"],
     r"--workers-per-trial 3: batch_size 256 \(the global batch\) is not divisible by 3"),
    (["--benchmark", "multi_mnist", "--method", "mgda", "--workers-per-trial", "2", "--config", "batch_size=255"],
     r"batch_size 255 \(the global batch\) is not divisible by 2"),
    (["--benchmark", "multi_mnist", "--method", "mgda", "--workers-per-trial", "4", "--num-cpus", "2"],
     r"--workers-per-trial 4 × --cpus-per-trial 1 = 4 CPUs, but the local cluster \(--num-cpus 2\) has 2"),
    (["--benchmark", "multi_mnist", "--method", "mgda", "--workers-per-trial", "2", "--cpus-per-trial", "1.5",
      "--num-cpus", "2"], r"--workers-per-trial 2 × --cpus-per-trial 1.5 = 3 CPUs"),
]


@pytest.mark.parametrize("args,match", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_every_bad_flag_is_one_line_and_exit_2(capsys, tmp_path, no_gpu, args, match):
    import re

    storage = tmp_path / "results"
    if BLOCKER in args:
        (tmp_path / "file").write_text("x")
        args = [str(tmp_path / "file" / "sub") if a == BLOCKER else a for a in args]
        storage = tmp_path / "file" / "sub"
    if "--storage-path" in args:
        with deadline(CASE_SECONDS):
            code = main(args)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        assert re.search(match, err), err
        return
    line = refused(capsys, storage, *args)
    assert re.search(match, line), line


def every_flag() -> set[str]:
    from mtl_tune.search.cli import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings} - {"-h", "--help"}


def test_the_table_covers_every_flag():
    covered = {a.split("=")[0] for args, _ in FLAG_CASES for a in args if a.startswith("--")}
    missing = every_flag() - covered - {"--storage-path", "--wandb", "--name"}
    # --name's rules (one safe path component) and --wandb's (package present) are tested with their features
    assert not missing, f"flags without a bad-value case: {sorted(missing)}"


def bad_values(setting: Setting) -> list[str]:
    """Values outside ``setting`` as they would be typed after ``--config key=``."""
    if setting.choices:
        return ["not_a_choice", "3"]
    if setting.kind == "bool":
        return ["maybe", "2"]
    if setting.kind == "str":
        return ["[1, 2]"] + (["gpu0"] if setting.pattern else [])
    if setting.kind == "mapping":
        return ["[1]", "abc"]
    out = ["abc", "nan"] if setting.kind != "ints" else ["abc", "[]", "[1.5]"]
    if setting.low is not None:
        low = setting.low if setting.open_low else setting.low - 1
        out.append(f"[{low:g}]" if setting.kind == "ints" else f"{low:g}")
    if setting.high is not None:
        high = setting.high if setting.open_high else setting.high + 1
        out.append(f"{high:g}")
    if setting.kind == "int":
        out.append("1.5")
    if not setting.nullable:
        out.append("null")
    return out


CONFIG_CASES = [(b, key, value) for b in available_benchmarks()
                for key, setting in sorted(benchmark_class(b).all_settings().items())
                for value in bad_values(setting)]


@pytest.mark.parametrize("benchmark,key,value", CONFIG_CASES, ids=[f"{b}-{k}={v}" for b, k, v in CONFIG_CASES])
def test_every_bad_benchmark_setting_is_refused(capsys, tmp_path, benchmark, key, value):
    # the scalar objective keeps 1-primary-metric benchmarks valid; --synthetic needs no data
    line = refused(capsys, tmp_path / "results", "--benchmark", benchmark, "--method", "ls", "--objective", "default",
                   "--synthetic", "--config", f"{key}={value}")
    assert line.startswith(f"error: --config {key}="), line
    assert benchmark_class(benchmark).all_settings()[key].allowed() in line


@pytest.mark.parametrize("benchmark", available_benchmarks())
def test_every_default_is_declared_and_valid(benchmark):
    cls = benchmark_class(benchmark)
    schema = cls.all_settings()
    assert set(cls.defaults) <= set(schema), set(cls.defaults) - set(schema)
    for key, value in cls.defaults.items():
        assert schema[key].problem(value) is None, (key, value)


def test_settings_accept_what_users_type(capsys, tmp_path):
    from mtl_tune.search.runner import SearchOptions, prepare

    assert TRAINER_SETTINGS["amp"].problem("bf16") is None and TRAINER_SETTINGS["amp"].problem("none") is None
    assert TRAINER_SETTINGS["device"].problem("cuda:1") is None
    plan = prepare(SearchOptions(methods=["cagrad"], config={"lr": 1e-3, "steps_per_epoch": 10, "init": 4},
                                 storage_path=str(tmp_path)))
    assert plan.options.config["init"] == 4
    assert not any(tmp_path.iterdir())


def test_yaml_numbers_without_dot_or_exponent_sign_are_numbers(tmp_path, capsys):
    from mtl_tune.search.cli import _pairs
    from mtl_tune.spaces import load_space

    assert _pairs(["lr=1e-3", "x=1.0e40", "y=2E5", "n=10", "s=abc"], "--config") == \
        {"lr": 1e-3, "x": 1e40, "y": 2e5, "n": 10, "s": "abc"}
    space = tmp_path / "c.yaml"
    space.write_text("method: cagrad\nparams:\n  c: {type: float, low: 1e-3, high: 1.0e0, log: true, default: 5e-1}\n")
    param = load_space("cagrad", "toy", space).params[0]
    assert (param.low, param.high, param.default) == (1e-3, 1.0, 0.5)


@pytest.mark.parametrize("field,value,match", [
    ("step", -0.5, r"params.c.step must be in \(0, high − low\] = \(0, 1\], got -0.5"),
    ("step", 2.0, r"params.c.step must be in \(0, high − low\]"),
    ("step", "abc", r"params.c.step must be a number"),
])
def test_bad_grid_step_in_a_space_file(capsys, tmp_path, field, value, match):
    import re

    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method": "cagrad", "params": {
        "c": {"type": "float", "low": 0.0, "high": 1.0, "default": 0.5, field: value}}}))
    line = refused(capsys, tmp_path / "results", "--method", "cagrad", "--search-space", str(space))
    assert str(space) in line and re.search(match, line), line


def test_categorical_choice_of_the_wrong_length_is_refused(capsys, tmp_path):
    import yaml

    space = tmp_path / "famo.yaml"
    space.write_text(yaml.safe_dump({"method": "famo", "params": {
        "min_losses": {"type": "categorical", "choices": [[0.0, 0.0], [0.0, 0.0, 0.0]], "default": [0.0, 0.0]}}}))
    line = refused(capsys, tmp_path / "results", "--method", "famo", "--search-space", str(space))
    assert "choice min_losses=[0.0, 0.0, 0.0]" in line and "2 tasks of toy" in line, line


# ---------------------------------------------------------------------------- in a fresh process
SUBPROCESS_CASES = [
    ["--set", "c"],
    ["--config", "lr=abc"],
    ["--seed", "abc"],
    ["--cpus-per-trial", "4", "--num-cpus", "2"],
]
PROBE = ("import sys\nfrom mtl_tune.search.cli import main\nrc = main(sys.argv[1:])\n"
         "print(json.dumps({'ray': 'ray' in sys.modules}), file=sys.stdout)\nsys.exit(rc)\n")


@pytest.mark.parametrize("args", SUBPROCESS_CASES, ids=[" ".join(a) for a in SUBPROCESS_CASES])
def test_refused_in_a_fresh_process_without_importing_ray(tmp_path, args):
    code = "import json\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code, "--method", "cagrad", *args, "--storage-path",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    if proc.stdout.strip():  # argparse exits before the probe line
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ray": False}
    assert not (tmp_path / "r").exists()


def test_module_entry_point_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtl_tune.search", "--max-failures", "-1", "--storage-path",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --max-failures -1: must be at least 0"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- --address: ask the cluster
@pytest.fixture
def one_cpu_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("request_,match", [
    (["--cpus-per-trial", "2"], r"--cpus-per-trial 2: the cluster at .* \(2 node\(s\)\) has 1 CPU\(s\) per node"),
    (["--gpus-per-trial", "2"], r"--gpus-per-trial 2: the cluster at .* has 1 GPU\(s\) per node; ask for at most 1"),
])
def test_requests_larger_than_any_node_of_the_cluster_are_refused(one_cpu_nodes, tmp_path, capsys, request_, match):
    import re

    with deadline(120):
        code = main(["--address", one_cpu_nodes.address, "--method", "ls", *request_,
                     "--storage-path", str(tmp_path / "r"), "--name", "x"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "r").exists()
