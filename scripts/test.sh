#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# The CUDA sources must at least compile here (no GPU runs on CI).
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  bash scripts/build_cuda.sh
fi
python -m pytest -q tests "$@"
