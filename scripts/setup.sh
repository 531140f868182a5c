#!/usr/bin/env bash
# Creates .venv in the repository (if missing) and installs mtl_tune with everything the
# tests, the notebooks and every benchmark need. Idempotent: a second run only checks.
# Torch comes first and pinned: on the project machines pip takes these builds from local
# disk (a pip constraint caps newer ones); elsewhere they come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.mtl_tune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[all]"
  touch "$stamp"
fi
.venv/bin/python -c "import mtl_tune, torch, ray, optuna; print('mtl_tune ready: torch', torch.__version__, '| ray', ray.__version__, '| optuna', optuna.__version__)"
