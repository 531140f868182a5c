"""Data roots that are there but may not be read, as an unprivileged user meets them: a folder or a
file without read permission, a folder that may not be entered, a read-only QM9 root.

Every benchmark's pre-flight answers ``cannot read <path> (Permission denied)`` naming the path to
fix — never "folder missing", "is missing", "corrupt or truncated" or a PermissionError traceback —
and QM9 loads a read-only root that holds its processed file. Root ignores permission bits, so as
root the checks run in a child process as user nobody (``setpriv``); as anyone else, as that user.
All cases run in one child process (one interpreter start). Symbolic links that point nowhere or
loop are covered where each benchmark's other data errors are (tests/test_bench_<name>.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from test_bench_celeba import write_celeba
from test_bench_dense import write_release
from test_bench_multi_mnist import write_mnist

ROOT = Path(__file__).resolve().parents[1]
HAS_PYG = importlib.util.find_spec("torch_geometric") is not None
NOBODY = 65534
DENSE = {"image_shape": [32, 64], "expected_counts": None}


def _write_qm9(root: str) -> None:
    from test_bench_qm9 import molecules, write_processed

    write_processed(root, molecules(12))


def _dense(root: str) -> None:
    write_release(root, "nyuv2", 5, 3)


def _celeba(root: str) -> None:
    write_celeba(root)


def _mnist(root: str) -> None:
    write_mnist(root)


def _read_only(root: str) -> list[tuple[str, int]]:
    """Every folder and file under ``root`` without write permission (a read-only mount, say)."""
    paths = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files] + [root]
    return [(p, 0o555 if os.path.isdir(p) else 0o444) for p in paths]


#: case: (benchmark, builder, what to chmod (path under the root → mode, or a function of the root),
#: benchmark options, config for check_config, expected pre-flight outcome: a regex of the DataError
#: ({root} = the case's root) or "PASSED")
CASES = {
    "nyuv2 folder": ("nyuv2", _dense, {"val/normal": 0}, DENSE, {},
                     r"NYUv2 data: cannot read {root}/val/normal \(Permission denied\)\. Expected: train/ and val/"),
    "nyuv2 file": ("nyuv2", _dense, {"train/depth/3.npy": 0}, DENSE, {},
                   r"NYUv2 data: cannot read {root}/train/depth/3\.npy \(Permission denied\)\. Expected:"),
    "nyuv2 root": ("nyuv2", _dense, {".": 0}, DENSE, {}, r"NYUv2 data: cannot read {root} \(Permission denied\)"),
    # listed but not entered (r, no x): its folders are "there", reading them names the split
    "nyuv2 split not enterable": ("nyuv2", _dense, {"train": 0o644}, DENSE, {},
                                  r"NYUv2 data: cannot read {root}/train \(Permission denied\)"),
    "celeba annotations": ("celeba", _celeba, {"celeba/list_attr_celeba.txt": 0}, {}, {},
                           r"celeba: cannot read {root}/celeba/list_attr_celeba\.txt \(Permission denied\); "
                           r"get CelebA"),
    "celeba image": ("celeba", _celeba, {"celeba/img_align_celeba/000004.jpg": 0}, {}, {},
                     r"celeba: cannot read {root}/celeba/img_align_celeba/000004\.jpg \(Permission denied\)"),
    "celeba image folder": ("celeba", _celeba, {"celeba/img_align_celeba": 0}, {}, {},
                            r"celeba: cannot read {root}/celeba/img_align_celeba \(Permission denied\)"),
    "celeba root": ("celeba", _celeba, {".": 0}, {}, {}, r"celeba: cannot read {root} \(Permission denied\)"),
    "multi_mnist folder": ("multi_mnist", _mnist, {"MNIST/raw": 0}, {}, {},
                           r"multi_mnist: cannot read {root}/MNIST/raw \(Permission denied\); expected the MNIST"),
    "multi_mnist file": ("multi_mnist", _mnist, {"MNIST/raw/t10k-labels-idx1-ubyte": 0}, {}, {},
                         r"multi_mnist: cannot read {root}/MNIST/raw/t10k-labels-idx1-ubyte \(Permission denied\)"),
    "qm9 processed file": ("qm9", _write_qm9, {"processed/data_v3.pt": 0}, {}, {"n_test": 4, "n_val": 4},
                           r"qm9: cannot read {root}/processed/data_v3\.pt \(Permission denied\); expected a readable"),
    # PyG made raw/ before loading the processed file: refused as "corrupt or truncated"
    "qm9 read-only root": ("qm9", _write_qm9, _read_only, {}, {"n_test": 4, "n_val": 4}, "PASSED"),
}

CHECK = textwrap.dedent("""
    import json, sys, traceback
    from mtl_tune.benchmarks.base import DataError
    from mtl_tune.registry import get_benchmark

    out = {}
    for case, (name, root, options, config) in json.loads(sys.argv[1]).items():
        try:
            bench = get_benchmark(name, data_root=root, **options)
            bench.check_config(config)
            bench.check_data()
            out[case] = "PASSED"
        except DataError as err:
            out[case] = "DataError: " + str(err)
        except Exception as err:  # noqa: BLE001 - what the bug looked like: a traceback
            out[case] = "".join(traceback.format_exception_only(err)).strip()
    print(json.dumps(out))
""")


def _unprivileged() -> list[str]:
    """The command prefix that runs a process as a user whom permission bits bind."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root (which ignores permission bits) without setpriv to drop to nobody")
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]


def _chmod(root: str, changes) -> list[tuple[str, int]]:
    """Apply the case's permission changes; return (path, old mode) to restore, deepest first."""
    pairs = changes(root) if callable(changes) else [(os.path.normpath(os.path.join(root, p)), m)
                                                     for p, m in changes.items()]
    restore = [(p, stat.S_IMODE(os.lstat(p).st_mode)) for p, _ in pairs]
    for path, mode in pairs:
        os.chmod(path, mode)
    return restore[::-1]


@pytest.fixture(scope="module")
def outcomes():
    """{case: what its pre-flight check answered, run as an unprivileged user}."""
    prefix = _unprivileged()
    base = tempfile.mkdtemp(prefix="mtl_tune_unreadable_")
    os.chmod(base, 0o755)  # the unprivileged user must reach the cases' roots (mkdtemp gives 0o700)
    above = Path(base).parents
    if prefix and not all(os.stat(p).st_mode & stat.S_IXOTH for p in above):
        shutil.rmtree(base)
        pytest.skip(f"the temporary folder {base} is not reachable by other users (TMPDIR)")
    home = os.path.join(base, "home")
    os.makedirs(home)
    os.chmod(home, 0o777)
    restore: list[tuple[str, int]] = []
    try:
        cases = {}
        for case, (name, build, changes, options, config, _) in CASES.items():
            if name == "qm9" and not HAS_PYG:
                continue
            root = os.path.join(base, re.sub(r"\W", "_", case))
            os.makedirs(root)
            build(root)
            restore += _chmod(root, changes)
            cases[case] = (name, root, options, config)
        env = {**os.environ, "HOME": home}
        proc = subprocess.run([*prefix, sys.executable, "-c", CHECK, json.dumps(cases)], capture_output=True,
                              text=True, cwd=base, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers = json.loads(proc.stdout.strip().splitlines()[-1])
        return {case: (cases[case][1], answer) for case, answer in answers.items()}
    finally:
        for path, mode in restore:
            os.chmod(path, mode)
        shutil.rmtree(base)


@pytest.mark.parametrize("case", list(CASES))
def test_a_path_that_may_not_be_read_is_named_with_the_reason(outcomes, case):
    if CASES[case][0] == "qm9" and not HAS_PYG:
        pytest.skip("qm9 needs torch-geometric")
    root, answer = outcomes[case]
    expected = CASES[case][-1]
    if expected == "PASSED":
        assert answer == "PASSED", answer
        return
    assert answer.startswith("DataError: "), answer  # not a traceback
    assert re.search(expected.format(root=re.escape(root)), answer), answer
    assert "\n" not in answer and "missing" not in answer and "corrupt" not in answer, answer

