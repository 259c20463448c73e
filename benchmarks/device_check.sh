#!/usr/bin/env bash
# The GPU check of issue #34 item 6, in one call (under 8 minutes on one GPU):
#   1. tests/test_kernels.py's CUDA tests (-k cuda: the device kernels against the CPU ones, the
#      host emulation of the CUDA code, the boundary checks);
#   2. python -m benchmarks.device_check: ONNX Runtime's CUDA provider really active
#      (session.get_providers()), encode canvases/s, train iterations/s, predict s per case and the
#      kNN vote on the GPU, written to benchmarks/results/gpu.json with the device name and this command.
#
# Usage (from anywhere; runs in the repository root):
#   bash benchmarks/device_check.sh             # on a machine with a CUDA GPU
#   bash benchmarks/device_check.sh --dry-run   # CPU, tiny sizes, writes to a temporary file (checks the script)
# Environment: PYTHON (default: python) is the interpreter with semisam-o1 and its CUDA extras installed;
# DEVICE_CHECK_OUT overrides the JSON path.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DRY=()
OUT="${DEVICE_CHECK_OUT:-benchmarks/results/gpu.json}"
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
  OUT="${DEVICE_CHECK_OUT:-$(mktemp -d)/gpu.json}"
elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/device_check.sh [--dry-run]" >&2
  exit 2
fi
COMMAND="bash benchmarks/device_check.sh${1:+ $1}"
echo "[device_check] $COMMAND -> $OUT" >&2
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2

set +e
TESTS=$("$PY" -m pytest tests/test_kernels.py -k cuda -q -rs -p no:cacheprovider 2>&1)
RC=$?
set -e
echo "$TESTS" | tail -n 15 >&2
SUMMARY=$(echo "$TESTS" | tail -n 1)
# on a GPU the device test must run, not skip
if [[ ${#DRY[@]} -eq 0 && "$SUMMARY" == *skipped* ]]; then
  echo "[device_check] the CUDA tests skipped on this machine: $SUMMARY" >&2
  RC=3
fi
"$PY" -m benchmarks.device_check "${DRY[@]}" --out "$OUT" --kernel-tests "$SUMMARY" --kernel-tests-rc "$RC" \
  --command "$COMMAND"
STATUS=$?
echo "[device_check] wrote $OUT (status $STATUS, kernel tests rc $RC)" >&2
exit $STATUS
