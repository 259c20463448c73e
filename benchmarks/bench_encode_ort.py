"""ONNX Runtime levers of ``semisam-o1 encode``: graph optimisation level, batch size, and int8
static quantisation (QDQ, calibrated), on real packed canvases, in one process, interleaved.

The canvases are the template's slices packed by the stage's own code
(:class:`semisam_o1.stages.encode._Encoding`, :func:`~semisam_o1.stages.encode.pack_tiles`). Every configuration
runs the same canvases, round after round (so load from other processes falls on all alike);
seconds per canvas are the best round. The features of each configuration are compared with the
default session's (per-cell cosine of the 800-channel output: mean and 5th percentile).

int8: ``onnxruntime.quantization.quant_pre_process`` then ``quantize_static`` (QDQ, per-channel
int8 weights, uint8 activations, MinMax calibration on ``--calibration`` canvases of the same
template), written to ``--work``; the CPU's VNNI / AMX flags are recorded (lscpu).

    python -m benchmarks.bench_encode_ort --data DATA --case ID [--canvases 8] [--rounds 2] \
        --work DIR [--write benchmarks/results/encode.json]

Writes the key ``onnx_runtime`` of the results file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def cpu_flags() -> dict:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    return {"model": model, "vnni": [f for f in flags if "vnni" in f], "amx": [f for f in flags if f.startswith("amx")]}


def session(path, threads: int, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def quantised(onnx_path: Path, canvases: np.ndarray, work: Path) -> Path:
    """The int8 QDQ model of ``onnx_path`` calibrated on ``canvases`` (cached in ``work``)."""
    out = work / "encoder.int8.qdq.onnx"
    if out.is_file():
        return out
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work.mkdir(parents=True, exist_ok=True)
    pre = work / "encoder.pre.onnx"
    quant_pre_process(str(onnx_path), str(pre))
    name = session(onnx_path, 1, "ORT_DISABLE_ALL").get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([canvases[i:i + 1] for i in range(len(canvases))])

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(1)
    return (num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).ravel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--case", required=True)
    ap.add_argument("--canvases", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from semisam_o1.data.dataset import Dataset
    from semisam_o1.stages.encode import _Encoding, pack_tiles
    from semisam_o1.stages.encoders import load_encoder

    torch.set_num_threads(a.threads)
    enc = load_encoder("litemedsam", threads=a.threads)
    job = _Encoding(enc, 128, (0, 1, 2), 4)
    _, _, tiles = job._tiles(Dataset(a.data).read_image(a.case).array)
    can = pack_tiles([t[2] for t in tiles], 128, enc.input_size)
    step = max(1, len(can) // a.canvases)
    x = np.ascontiguousarray(can[::step][: a.canvases])
    calib = np.ascontiguousarray(can[step // 2::step][: a.calibration])
    t0 = time.perf_counter()
    q8 = quantised(enc.onnx_path, calib, a.work)
    t_quant = time.perf_counter() - t0
    configs = {"default: optimisation ALL, batch 4": (enc.onnx_path, "ORT_ENABLE_ALL", 4),
               "batch 1": (enc.onnx_path, "ORT_ENABLE_ALL", 1),
               "batch 8": (enc.onnx_path, "ORT_ENABLE_ALL", 8),
               "optimisation EXTENDED": (enc.onnx_path, "ORT_ENABLE_EXTENDED", 4),
               "optimisation BASIC": (enc.onnx_path, "ORT_ENABLE_BASIC", 4),
               "optimisation off": (enc.onnx_path, "ORT_DISABLE_ALL", 4),
               "int8 QDQ static (calibrated), batch 4": (q8, "ORT_ENABLE_ALL", 4)}
    sessions = {k: session(p, a.threads, lvl) for k, (p, lvl, _) in configs.items()}
    name = sessions["batch 1"].get_inputs()[0].name
    best = {k: float("inf") for k in configs}
    outs = {}
    for k, s in sessions.items():  # warm-up
        s.run(None, {name: x[:1]})
    for _ in range(a.rounds):
        for k, (_, _, bs) in configs.items():
            t0 = time.perf_counter()
            outs[k] = np.concatenate([sessions[k].run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])
            best[k] = min(best[k], (time.perf_counter() - t0) / len(x))
    ref_key = "default: optimisation ALL, batch 4"
    rows = []
    for k in configs:
        c = cosine(outs[k], outs[ref_key])
        rows.append({"configuration": k, "seconds_per_canvas": round(best[k], 3),
                     "speedup_vs_default": round(best[ref_key] / best[k], 3),
                     "cosine_vs_default": {"mean": round(float(c.mean()), 4), "p05": round(float(np.percentile(c, 5)), 4)}})
        print(f"{k:45s} {best[k]:.3f} s/canvas  x{best[ref_key] / best[k]:.2f}  cos {c.mean():.3f} "
              f"(p05 {np.percentile(c, 5):.3f})", flush=True)
    result = {"command": "python -m benchmarks.bench_encode_ort " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_flags(), "threads": a.threads, "case": a.case, "canvases": len(x), "rounds": a.rounds,
              "quantisation_seconds": round(t_quant, 1), "rows": rows,
              "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
              "not_measured": {"float16 / bfloat16": "not measured in this session (no float16 model was built; "
                               "ONNX Runtime's CPU execution provider runs this graph in float32)"}}
    if a.write:
        from semisam_o1.core.files import write_json_key

        write_json_key(a.write, "onnx_runtime", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
