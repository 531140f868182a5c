"""The registry's cheap name listing (read from the modules' source, no import) equals the
full registry's, and the search command's `--help` and name errors answer without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtl_tune import registry

ROOT = Path(__file__).resolve().parents[1]


def test_cheap_names_equal_the_full_registry():
    registry.clear_cache()  # the cheap path must read the sources, not the filled cache
    cheap = registry.balancer_names(), registry.benchmark_names()
    assert cheap == (registry.available_balancers(), registry.available_benchmarks())
    assert "cagrad" in cheap[0] and "toy" in cheap[1]


def test_a_class_name_attribute_is_read_from_source():
    import ast

    tree = ast.parse(textwrap.dedent('''
        class A:
            name = "a_name"
        class B:
            name: str = "b_name"
        class C:
            name = ""
        class D:
            label = "d"
    '''))
    assert [registry._class_name_attr(node) for node in tree.body] == [["a_name"], ["b_name"], [], []]


def test_unknown_name_lists_the_valid_ones_without_loading_the_modules():
    with pytest.raises(registry.UnknownNameError, match="valid methods: .*cagrad"):
        registry.check_names("method", ["ls", "nope"])
    with pytest.raises(registry.UnknownNameError, match="valid benchmarks: .*multi_mnist"):
        registry.check_names("benchmark", ["nope"])
    registry.check_names("method", ["ls", "cagrad"])  # known names pass


@pytest.mark.parametrize("argv, code, text", [
    (["--help"], 0, "valid: amtl"),
    (["--method", "ls,nope"], 2, "unknown method 'nope'; valid methods:"),
    (["--benchmark", "nope"], 2, "unknown benchmark 'nope'; valid benchmarks:"),
    (["--num-samples", "0"], 2, "--num-samples 0: must be at least 1"),
    (["--sampler", "x"], 2, "invalid choice"),
])
def test_help_and_early_errors_do_not_import_torch_or_ray(argv, code, text):
    # a fresh interpreter: this test process has torch loaded already
    script = textwrap.dedent(f"""
        import sys
        from mtl_tune.search.cli import main
        try:
            code = main({argv!r})
        except SystemExit as exit:
            code = exit.code
        heavy = sorted(m for m in ("torch", "ray", "scipy", "sklearn") if m in sys.modules)
        print("EXIT", code, "HEAVY", heavy)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert f"EXIT {code} HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert text in proc.stdout + proc.stderr


def test_one_name_lookup_gives_the_full_registrys_class():
    full_b, full_m = registry.balancer_classes(), registry.benchmark_classes()
    registry.clear_cache()
    for name, cls in full_b.items():
        assert registry._one_class("mtl_tune.balancers", "Balancer", registry.BALANCER_GROUP, name) is cls
    for name, cls in full_m.items():
        assert registry._one_class("mtl_tune.benchmarks", "Benchmark", registry.BENCHMARK_GROUP, name) is cls
    assert registry._one_class("mtl_tune.balancers", "Balancer", registry.BALANCER_GROUP, "nope") is None


def test_a_trial_imports_only_its_own_method_and_benchmark():
    script = textwrap.dedent("""
        import sys
        from mtl_tune.registry import balancer_class, benchmark_class
        balancer_class("cagrad"), benchmark_class("toy")
        print(sorted(m for m in sys.modules if m.startswith(("mtl_tune.balancers.", "mtl_tune.benchmarks."))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    loaded = proc.stdout.strip()
    assert "mtl_tune.balancers.cagrad" in loaded and "mtl_tune.benchmarks.toy" in loaded, proc.stderr
    assert "nashmtl" not in loaded and "multi_mnist" not in loaded, loaded


#: benchmarks whose class (settings, metrics, options, data check) loads without torch: all of them
#: (qm9's check needs torch once its files are there, to read them)
LIGHT_BENCHMARKS = ("celeba", "cityscapes", "multi_mnist", "nyuv2", "qm9", "toy")


def _declared(cls) -> dict:
    """What a search validates of a benchmark class before it starts (prepare)."""
    bench = cls(synthetic=True)
    return {"settings": {k: repr(v) for k, v in cls.all_settings().items()}, "metrics": repr(cls.metrics),
            "tasks": list(cls.tasks), "defaults": repr(cls.defaults), "options": cls.option_names(),
            "data_env": cls.data_env, "objective": list(bench.default_objective()),
            "primary": [m.name for m in bench.primary_metrics()], "baselines": bench.has_baselines(),
            "balancer_options": repr(bench.balancer_options({})), "data_parallel": repr(cls.data_parallel)}


def test_light_benchmarks_declare_the_same_without_torch():
    # a fresh interpreter loads each class alone, without torch; what it declares must equal the class
    # as the full registry (with torch and every module loaded, in this process) sees it
    script = textwrap.dedent(f"""
        import json, sys
        from mtl_tune.registry import benchmark_class
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_registry_names import LIGHT_BENCHMARKS, _declared
        out = {{name: _declared(benchmark_class(name)) for name in LIGHT_BENCHMARKS}}
        out["heavy"] = sorted(m for m in ("torch", "scipy", "sklearn", "ray") if m in sys.modules)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    cheap = __import__("json").loads(proc.stdout)
    assert cheap.pop("heavy") == []
    full = registry.benchmark_classes()
    assert cheap == __import__("json").loads(__import__("json").dumps(
        {name: _declared(full[name]) for name in LIGHT_BENCHMARKS}))


@pytest.mark.parametrize("argv, text", [
    (["--objective", "nope"], "unknown objective 'nope' for benchmark toy; valid: pareto, default, loss1"),
    (["--config", "nope=1"], "--config nope: not a setting of benchmark toy; valid: amp"),
    (["--config", "steps_per_epoch=0"], "--config steps_per_epoch=0: steps_per_epoch must be an integer >= 1"),
    (["--benchmark", "multi_mnist", "--config", "benchmark_options={source: x}"], "source must be one of"),
    (["--benchmark", "multi_mnist", "--data-root", "{missing}"], "{missing}/MNIST/raw does not exist; expected the MNIST idx files"),
    (["--benchmark", "nyuv2", "--data-root", "{missing}"], "NYUv2 data at {missing}: folder does not exist. Expected: train/ and val/"),
    (["--benchmark", "cityscapes", "--objective", "seg/nope"], "unknown objective 'seg/nope' for benchmark cityscapes"),
    (["--benchmark", "qm9", "--data-root", "{missing}"], "qm9: data root {missing} is not a directory; expected processed"),
    (["--benchmark", "qm9", "--data-root", "{empty}"], "qm9: no QM9 data under {empty}: expected processed"),
    (["--benchmark", "celeba", "--data-root", "{missing}"], "celeba: data root {missing} is not a directory"),
    (["--benchmark", "celeba", "--data-root", "{empty}"], "celeba: no CelebA data under {empty} (looked for {empty}/"),
])
def test_errors_that_need_the_benchmark_do_not_import_torch(argv, text, tmp_path):
    missing, empty = str(tmp_path / "missing"), str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{missing}", missing).replace("{empty}", empty) for a in argv]
    text = text.replace("{empty}", empty)
    script = textwrap.dedent(f"""
        import sys
        from mtl_tune.search.cli import main
        code = main({argv!r} + ["--storage-path", {str(tmp_path)!r}])
        heavy = sorted(m for m in ("torch", "ray", "scipy", "sklearn") if m in sys.modules)
        print("EXIT", code, "HEAVY", heavy)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert "EXIT 2 HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert text.replace("{missing}", missing) in proc.stderr, proc.stderr
