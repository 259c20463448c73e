#!/usr/bin/env bash
# Compile check of the CUDA sources (no GPU needed): configures a separate build dir with
# SEMISAM_CUDA=ON and builds both modules. CI runs this when nvcc exists (scripts/test.sh).
# Usage: bash scripts/build_cuda.sh [build-dir]   (default build/cuda-check)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build/cuda-check}
if [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
mkdir -p "$(dirname "$BUILD")"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
PYBIND11_DIR=$(python -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEMISAM_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$NVCC" -Dpybind11_DIR="$PYBIND11_DIR" \
  -DPython_EXECUTABLE="$(command -v python)" >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" --parallel 2
ls "$BUILD"/_core_cuda*.so >/dev/null
echo "build_cuda.sh: _core_cuda compiled in $BUILD"
