"""Profile of ``semisam-o1 encode``: FLOPs per canvas, achieved GFLOP/s against this machine's
float32 GEMM rate, and where the seconds of a case go.

- FLOPs per canvas of the exported encoder: torch's ``FlopCounterMode`` on the torch model the
  ONNX file is exported from (matrix products and convolutions, 2 FLOPs per multiply-add; the
  element-wise work, softmax and normalisations are not counted), per top-level stage.
- GEMM rate: NumPy float32 matmul of two N x N matrices (best of ``--repeats``) with the same
  thread count (threadpoolctl), measured right before and after the cases, in the same process.
- Time split of each case, by the stage's own code (:class:`semisam_o1.stages.encode._Encoding`'s
  phase timers): reading (``Dataset.read_image``), resampling (intensity window and slice
  resize), packing (:func:`~semisam_o1.stages.encode.pack_tiles`), ONNX Runtime, channel reduction
  (valid cells and PCA projection), writing (:func:`semisam_o1.data.store.write_case` into a
  temporary folder). The PCA basis is the existing store's.

    python -m benchmarks.bench_encode_profile --dataset NAME DATA STORE --cases C1 C2 [--threads 2] \
        [--write benchmarks/results/encode.json]

Writes the key ``profile`` ({dataset: entry}) of the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate (GFLOP/s) of NumPy's BLAS at ``threads`` threads, N x N x N."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    best = float("inf")
    with threadpool_limits(threads):
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def encoder_flops(layers, input_size: int) -> dict:
    """FLOPs of one (1, 3, S, S) canvas through the torch model: {"total": x, "<module>": x}."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from semisam_o1.stages.encoders import torch_model

    model, _ = torch_model("litemedsam", None, layers)
    counter = FlopCounterMode(display=False, depth=3)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    per = counter.get_flop_counts()
    out = {"total": int(counter.get_total_flops())}
    for mod, counts in per.items():
        out[mod] = int(sum(counts.values()))
    return out


def profile_case(ds, case: str, job, basis, out_dir: Path, storage: str) -> dict:
    """Seconds per phase of one case, as ``encode`` runs it."""
    from semisam_o1.data.store import write_case

    for k in job.timings:
        job.timings[k] = 0.0
    t0 = time.perf_counter()
    vol = ds.read_image(case)
    t_read = time.perf_counter() - t0
    grids, maps, n = job.encode_case(vol.array, basis)
    t1 = time.perf_counter()
    write_case(out_dir, case, grids, maps, {"case": case, "voxel_shape": list(vol.shape), "axes": list(job.axes)},
               storage=storage)
    t_write = time.perf_counter() - t1
    split = {"read": t_read, **dict(job.timings), "write": t_write}
    total = sum(split.values())
    canv = -(-n // job.per_canvas)
    nbytes = sum(f.stat().st_size for f in (out_dir / "cases" / case).iterdir())
    return {"case": case, "shape": list(vol.shape), "slices": n, "canvases": canv, "case_bytes": nbytes,
            "seconds": {k: round(v, 3) for k, v in split.items()}, "total_seconds": round(total, 2),
            "share": {k: round(v / total, 4) for k, v in split.items()}}


def parse_config(text: str) -> tuple[str, dict]:
    """``"NAME tile=64 stride=2 storage=int8"`` -> (NAME, options); tile 0 and storage "": the store's."""
    name, *parts = text.split()
    opts = {"tile": 0, "stride": 1, "storage": ""}
    for part in parts:
        k, _, v = part.partition("=")
        opts[k] = v if k == "storage" else int(v)
    return name, opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", nargs=3, metavar=("NAME", "DATA", "STORE"), action="append", required=True)
    ap.add_argument("--cases", nargs="+", action="append", required=True, help="one list per --dataset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[],
                    help='"NAME tile=T stride=N storage=int8|float16" (default: one "store" config, the store\'s)')
    ap.add_argument("--write", type=Path)
    a = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from semisam_o1.data.dataset import Dataset
    from semisam_o1.data.store import FeatureStore, config_storage
    from semisam_o1.stages.encode import _Encoding
    from semisam_o1.stages.encoders import load_encoder

    configs = [parse_config(c) for c in (a.config or ["store"])]
    torch.set_num_threads(a.threads)
    enc = load_encoder("litemedsam", threads=a.threads)
    flops = encoder_flops(enc.layers, enc.input_size)
    print(f"FLOPs per canvas: {flops['total'] / 1e9:.2f} GFLOP", flush=True)
    gemm_before = gemm_gflops(a.threads)
    result = {"command": "python -m benchmarks.bench_encode_profile " + " ".join(
                  f"'{x}'" if " " in x else x for x in (argv if argv is not None else sys.argv[1:])),
              "cpu": cpu_model(), "threads": a.threads, "flops_per_canvas": flops, "datasets": {}}
    onnx_s = canv_total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for (name, data, store_dir), cases in zip(a.dataset, a.cases):
            store = FeatureStore(store_dir)
            ds = Dataset(data)
            jobs = {cn: _Encoding(enc, opts["tile"] or int(store.config["packing"]["tile"]), store.axes, 4,
                                  slice_stride=opts["stride"]) for cn, opts in configs}
            rows = {cn: [] for cn, _ in configs}
            for c in cases:  # configurations interleaved case by case
                for cn, opts in configs:
                    r = profile_case(ds, c, jobs[cn], store.reduction(), Path(tmp) / name / cn,
                                     opts["storage"] or config_storage(store.config))
                    r["onnx_gflops"] = round(r["canvases"] * flops["total"] / r["seconds"]["onnx"] / 1e9, 1)
                    rows[cn].append(r)
                    if cn == configs[0][0]:
                        onnx_s += r["seconds"]["onnx"]
                        canv_total += r["canvases"]
                    print(f"{name} {cn} {r['case']}: {r['total_seconds']} s, {r['canvases']} canvases, "
                          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items())
                          + f"; ONNX Runtime {r['onnx_gflops']} GFLOP/s; {r['case_bytes'] / 1e6:.2f} MB "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            entry = {"store": store_dir, "configs": {cn: dict(opts, tile=jobs[cn].tile) for cn, opts in configs},
                     "cases": rows,
                     "seconds_per_volume": {cn: round(float(np.mean([r["total_seconds"] for r in rs])), 2)
                                            for cn, rs in rows.items()},
                     "bytes_per_volume": {cn: int(np.mean([r["case_bytes"] for r in rs])) for cn, rs in rows.items()}}
            first = configs[0][0]
            entry["speedup_vs_" + first] = {cn: round(entry["seconds_per_volume"][first] / v, 3)
                                            for cn, v in entry["seconds_per_volume"].items()}
            result["datasets"][name] = entry
    gemm_after = gemm_gflops(a.threads)
    achieved = canv_total * flops["total"] / onnx_s / 1e9
    result.update(gemm_gflops={"before": round(gemm_before, 1), "after": round(gemm_after, 1)},
                  onnx_gflops=round(achieved, 1),
                  onnx_fraction_of_gemm=round(achieved / max(gemm_before, gemm_after), 3),
                  load_avg_1min_at_end=round(os.getloadavg()[0], 2))
    print(json.dumps({k: v for k, v in result.items() if k != "datasets"}, indent=1))
    if a.write:
        from semisam_o1.core.files import write_json_key

        write_json_key(a.write, "profile", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
