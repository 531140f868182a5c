"""docs/api.md: the public programmatic API is unambiguous and its example runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_execute_stays_the_function_after_its_module_is_imported():
    import mtl_tune.search as search
    import mtl_tune.search.execution  # noqa: F401 - the import that used to replace the function

    from mtl_tune.search import execute

    assert callable(execute) and execute is search.execute and execute.__module__ == "mtl_tune.search"
    assert search.Outcome is mtl_tune.search.execution.Outcome
    assert set(search.__all__) == {"Outcome", "Plan", "SearchError", "SearchOptions", "execute", "prepare"}


@pytest.mark.slow
def test_the_documented_example_runs(tmp_path):
    # the one runnable block is the search example (§2); §1's snippets are fragments of a loop
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "execute(plan)" in b]
    assert len(blocks) == 1
    repo = str(DOC.parents[1])
    done = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [repo, os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished trials are non-dominated" in done.stdout
    assert (tmp_path / "results" / "api-example" / "trials.csv").is_file()
