"""benchmarks/device_check.sh (issue #34 item 6): the GPU check, run here as its --dry-run (the same
script on the CPU with tiny sizes, written to a temporary file), and its refusal on a machine
without a CUDA GPU. The real run needs a GPU: `bash benchmarks/device_check.sh` writes
benchmarks/results/gpu.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, **extra}


def test_dry_run_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu.json"
    results = REPO / "benchmarks" / "results" / "gpu.json"
    before = results.read_bytes() if results.exists() else None
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--dry-run"], cwd=tmp_path,
                          env=_env(DEVICE_CHECK_OUT=str(out)), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["command"] == "bash benchmarks/device_check.sh --dry-run" and r["dry_run"] is True and r["ok"] is True
    assert r["device"].startswith("CPU: ")
    # tests/test_kernels.py -k cuda: the emulation and boundary tests pass, the device test skips on a CPU
    assert r["kernel_tests"]["rc"] == 0 and "passed" in r["kernel_tests"]["outcome"]
    ort = r["onnxruntime"]
    assert ort["session_providers"] == ["CPUExecutionProvider"] and ort["cuda_active"] is False and ort["ok"]
    assert r["encode"]["canvases"] == 8 and r["encode"]["output_shape"] == [4, 3, 64, 64]
    assert r["encode"]["canvases_per_s"] > 0
    assert r["train"]["iterations"] == 3 and r["train"]["finite"] and r["train"]["iterations_per_s"] > 0
    assert r["predict"]["probs_shape"] == [3, 24, 24, 24] and r["predict"]["probs_sum_to_1"]
    assert r["predict"]["seconds_per_case"] > 0
    assert r["knn_vote"]["cpu_labels_agree"] == 1.0 and r["knn_vote"]["seconds"] > 0
    # the recorded results are left alone
    assert (results.read_bytes() if results.exists() else None) == before
    print(f"dry run: {seconds:.1f} s")


def test_a_real_run_without_a_gpu_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the real run would measure it")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and not out.exists()


def test_bad_arguments_are_refused(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--fast"], env=_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
