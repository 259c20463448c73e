#!/usr/bin/env bash
# Create .venv (if missing) and install semisam-o1 with its test, bench and ray extras.
# Usage: bash scripts/setup.sh        (idempotent; re-run after changing C++ sources)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision pinned (taken from this machine's disk); the rest from PyPI.
python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
python -m pip install -q --no-build-isolation ".[test,bench,ray]"
python -c "import semisam_o1.core._core as c; print('semisam_o1.core._core built:', c.__file__)"
