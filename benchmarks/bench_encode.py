"""Encoder speed on this machine: torch eager vs ONNX Runtime, batch 1 and 8, and 2x2 slice packing.

Measures slices per second of the default encoder (LiteMedSAM TinyViT, stages 1-3) on real
Hippocampus slices, all runs in one process with the same thread count:

* torch eager, unpacked (one slice per 256x256 canvas), batch 1 and batch 8
* ONNX Runtime (graph optimisation ALL), unpacked, batch 1 and batch 8
* ONNX Runtime, packed (4 slices per canvas, 128 px tiles), batch 1 and batch 8 canvases
* cosine similarity of packed vs unpacked features of the same slices (the unpacked 64x64 cells
  average-pooled 2x2 to the packed cell size, which covers the same voxels), per cell, mean and 5th
  percentile
* seconds per Hippocampus volume (all three axes; slices per volume from the cohort's shapes)

The slices are prepared and packed by the stage's own functions (:mod:`semisam_o1.stages.encoders`'
``intensity_range`` / ``scale_volume`` / ``SliceLayout`` / ``resize_slices``, :func:`semisam_o1.stages.encode.pack_tiles`
and :func:`semisam_o1.stages.encode.tile_cells`); the encoder is the one ``encode`` loads. Writes
the key ``packing`` of ``benchmarks/results/encode.json`` (with the command) and prints a Markdown table (``benchmarks/encode.md``).
Run from the repository root::

    python -m benchmarks.bench_encode --threads 2 [--slices 16] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISAM_DATA", REPO.parent / "shared" / "data" / "hippocampus"))


def slices_of(case: str, axis: int):
    from semisam_o1.data.images import read_image
    from semisam_o1.data.slicing import intensity_range, scale_volume

    vol = read_image(DATA / "imagesTr" / f"{case}.nii.gz")
    img = scale_volume(vol.array, *intensity_range(vol.array))
    return np.moveaxis(img, axis, 0)


def canvases(sl: np.ndarray, tile: int, size: int = 256):
    """``sl`` (N, su, sv) resized and packed as ``encode`` does: (canvases, SliceLayout)."""
    from semisam_o1.data.slicing import SliceLayout, resize_slices
    from semisam_o1.stages.encode import pack_tiles

    plan = SliceLayout(sl.shape[1], sl.shape[2], tile, 4)
    return pack_tiles(list(resize_slices(sl, plan)), tile, size), plan


def timed(fn, batches, repeats=1):
    fn(batches[0][:1])  # warm-up
    best = float("inf")
    outs = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(b) for b in batches]
        best = min(best, time.perf_counter() - t0)
    return best, outs


def split(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def cohort_slices_per_volume() -> float:
    import nibabel as nib

    sp = json.loads((DATA / "splits.json").read_text())
    cases = [sp["template"]] + list(sp["unlabeled"])
    return float(np.mean([sum(nib.load(str(DATA / "imagesTr" / f"{c}.nii.gz")).shape[:3]) for c in cases]))


def speedups(res: dict) -> dict:
    """Same-batch ratios of slices/s: ORT / torch eager (unpacked) and ORT packed / ORT unpacked."""
    sps = {k: v["slices_per_s"] for k, v in res.items()}
    return {
        "ort_vs_torch_speedup": {f"batch {b}": round(sps[f"ONNX Runtime, unpacked, batch {b}"]
                                                     / sps[f"torch eager, unpacked, batch {b}"], 2) for b in (1, 8)},
        "packing_speedup_vs_ort_unpacked": {f"batch {b}": round(sps[f"ONNX Runtime, packed 2x2, batch {b}"]
                                                                / sps[f"ONNX Runtime, unpacked, batch {b}"], 2)
                                            for b in (1, 8)},
    }


def measure(run_torch, run_ort, full: np.ndarray, packed: np.ndarray):
    """Slices/s of torch eager and ONNX Runtime on unpacked canvases and of ONNX Runtime on packed
    ones, at batch 1 and 8, interleaved (torch, ORT, packed at batch 1, then at batch 8) so that load
    from other processes on a shared machine falls on every configuration alike.

    Returns:
        ``(runs {name: {slices, seconds, slices_per_s}}, ORT unpacked features, ORT packed features)``.
    """
    res = {}
    configs = (("torch eager, unpacked", run_torch, full, 1), ("ONNX Runtime, unpacked", run_ort, full, 1),
               ("ONNX Runtime, packed 2x2", run_ort, packed, 4))
    for bs in (1, 8):
        for name, fn, x, per in configs:
            secs, outs = timed(fn, split(x, bs))
            key = f"{name}, batch {bs}"
            res[key] = {"slices": len(x) * per, "seconds": round(secs, 3),
                        "slices_per_s": round(len(x) * per / secs, 3)}
            print(f"{key}: {res[key]['slices_per_s']} slices/s (load {os.getloadavg()[0]:.1f})", flush=True)
            if name == "ONNX Runtime, unpacked" and bs == 8:
                f_full = np.concatenate(outs)
            if name == "ONNX Runtime, packed 2x2" and bs == 8:
                f_packed = np.concatenate(outs)
    names = [c[0] for c in configs]
    res = {k: res[k] for k in sorted(res, key=lambda k: (names.index(k.rsplit(", batch", 1)[0]), k))}
    return res, f_full, f_packed


def packed_vs_unpacked(f_full: np.ndarray, f_packed: np.ndarray, n: int, cell: int, plan_packed) -> np.ndarray:
    """Per-cell cosine similarity of the packed features of the first ``n`` slices with their unpacked
    features average-pooled 2x2 onto the packed cell size (the same voxels)."""
    from semisam_o1.stages.encode import tile_cells

    cos_all = []
    nu, nv = plan_packed.nu, plan_packed.nv
    for t in range(n):
        p = tile_cells(f_packed, t, 128, cell, plan_packed)
        u = f_full[t, :, : 2 * nu, : 2 * nv]
        u = u.reshape(u.shape[0], nu, 2, nv, 2).mean((2, 4))
        num = (p * u).sum(0)
        den = np.linalg.norm(p, axis=0) * np.linalg.norm(u, axis=0) + 1e-12
        cos_all.append((num / den).ravel())
    return np.concatenate(cos_all)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=16, help="slices per configuration (multiple of 8)")
    ap.add_argument("--case", default="hippocampus_003")
    ap.add_argument("--axis", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(REPO / "work" / "onnx_cache"))
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/encode.json")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    import onnxruntime as ort
    import torch

    from semisam_o1.stages.encoders import load_encoder, torch_model

    torch.set_num_threads(args.threads)
    enc = load_encoder("litemedsam", cache_dir=args.cache_dir, threads=args.threads)
    model, _ = torch_model("litemedsam", None, enc.layers)

    def run_torch(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    sl = slices_of(args.case, args.axis)
    reps = -(-args.slices // len(sl))
    sl = np.concatenate([sl] * reps)[: args.slices]
    n = len(sl)
    full, plan_full = canvases(sl, 256)
    packed, plan_packed = canvases(np.concatenate([sl] * 4), 128)  # 4n slices -> n canvases
    res, f_full, f_packed = measure(run_torch, enc.run, full, packed)
    cos_all = packed_vs_unpacked(f_full, f_packed, n, enc.cell, plan_packed)
    spv = cohort_slices_per_volume()
    t_b = res["torch eager, unpacked, batch 1"]["slices_per_s"]
    o_b = max(res["ONNX Runtime, unpacked, batch 1"]["slices_per_s"], res["ONNX Runtime, unpacked, batch 8"]["slices_per_s"])
    p_b = max(res["ONNX Runtime, packed 2x2, batch 1"]["slices_per_s"], res["ONNX Runtime, packed 2x2, batch 8"]["slices_per_s"])
    result = {
        "command": "python -m benchmarks.bench_encode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor() or platform.machine(),
                    "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__, "onnxruntime": ort.__version__},
        "encoder": {"name": "litemedsam", "layers": list(enc.layers), "channels": enc.channels},
        "slices": {"case": args.case, "axis": args.axis, "shape": list(sl.shape[1:]),
                   "unpacked_cells": [plan_full.nu, plan_full.nv], "packed_cells": [plan_packed.nu, plan_packed.nv]},
        "runs": res,
        **speedups(res),
        "cosine_packed_vs_unpacked": {"mean": round(float(cos_all.mean()), 4),
                                      "p05": round(float(np.percentile(cos_all, 5)), 4)},
        "hippocampus_slices_per_volume_3_axes": round(spv, 1),
        "seconds_per_volume_3_axes": {"torch eager unpacked": round(spv / t_b, 1), "ONNX Runtime unpacked": round(spv / o_b, 1),
                                      "ONNX Runtime packed 2x2 (default)": round(spv / p_b, 1)},
    }
    print(json.dumps(result, indent=1))
    table = ["| configuration | batch | slices/s |", "| --- | --- | --- |"]
    for k, v in res.items():
        name, bs = k.rsplit(", batch ", 1)
        table.append(f"| {name} | {bs} | {v['slices_per_s']} |")
    print("\n".join(table))
    if args.write:
        from semisam_o1.core.files import write_json_key

        out = REPO / "benchmarks" / "results" / "encode.json"
        write_json_key(out, "packing", result)  # the file's other keys: bench_encode_levers / _ort / _profile
        print(f"wrote {out} (key packing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
