"""A normal install: build the wheel, install it elsewhere, use it from outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mtl_tune", "toy", "search_spaces")


def _clean_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment without anything pointing into the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_console_command_version_and_usage(capsys):
    import mtl_tune
    from mtl_tune.cli import main

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mtl-tune {mtl_tune.__version__}"
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "--benchmark" in capsys.readouterr().out


def test_search_spaces_come_from_the_checkout_when_there_is_one():
    from mtl_tune.spaces import SPACES_DIR

    assert SPACES_DIR == REPO / "search_spaces"


@pytest.mark.slow
def test_wheel_installs_and_searches_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, env=_clean_env(), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mtl_tune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mtl_tune", wheel.name.split("-py3")[0] + ".dist-info"}
    yamls = {p.name for p in (REPO / "search_spaces").glob("*.yaml")}
    assert yamls and {f"mtl_tune/search_spaces/{y}" for y in yamls} <= set(names)
    assert "mtl_tune/_toy/trajectories.py" in names and "mtl_tune/_toy/kernels/__init__.py" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, env=_clean_env(), cwd=tmp_path)
    assert not (target / "toy").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _clean_env(PYTHONPATH=str(target))
    command = [str(target / "bin" / "mtl-tune")]

    def run(*args: str) -> str:
        done = subprocess.run(command + list(args), env=env, cwd=work, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    import mtl_tune

    assert run("--version").strip() == f"mtl-tune {mtl_tune.__version__}"
    where = subprocess.run([sys.executable, "-c", "import mtl_tune.spaces as s; print(s.SPACES_DIR)"],
                           env=env, cwd=work, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == target / "mtl_tune" / "search_spaces"
    assert "--methods" in run("toy", "--help")
    run("search", "--method", "ls", "--num-samples", "2", "--epochs", "1", "--config", "steps_per_epoch=20",
        "--num-cpus", "2", "--storage-path", "out", "--name", "w", "--verbose", "0")
    table = pd.read_csv(work / "out" / "w" / "trials.csv")
    assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}
    assert "wrote" in run("analyze", "out/w", "--out", "report")
