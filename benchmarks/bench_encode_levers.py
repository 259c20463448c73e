"""Encode levers measured from existing feature stores, without encoding again.

A lever that only removes or coarsens what the encoder writes can be applied to a full store
after the fact and give the same features a cheaper encode would have written:

- ``axes``: slice along a subset of the axes (each axis is its own file);
- ``stride``: encode every n-th slice along each slicing axis (centred: the first encoded slice
  is ``((S - 1) - n (m - 1)) // 2``, ``m = (S - 1) // n + 1``), the store's cell -> voxel map
  then has step n along the slicing axis and :func:`semisam_o1.data.store.voxel_features`
  interpolates between encoded slices (clamped beyond the first and last), as for a store
  ``encode --slice-stride n`` writes. Not bit for bit: a slice's features depend on the other
  slices packed into its canvas (benchmarks/encode.md: median per-cell cosine 0.93 between two
  packing orders), and a strided encode packs other companions;
- ``channels``: keep the first k of the stored PCA channels (the basis is ordered by energy, so
  this is a k-channel reduction fitted on the same template);
- ``dtype``: int8 with one scale per channel and axis file (:func:`semisam_o1.data.store.quantise_int8`),
  read as the store reads it (``CaseFeatures.stored``).

Each variant's round-0 pool labels come from propagate's own functions (the template model,
``score_case``, ``pseudo_label`` with the class-planes rule learned from the template), with
propagate's default options; the benchmark alone reads each pool case's real label and records
the mean foreground Dice (:mod:`semisam_o1.methods.metrics`). The relative encode cost is the number
of encoder canvases (slices over the encoded axes, packed ``per_canvas`` to a canvas) against
the full store's; the store size is the bytes the variant's axis files would take.

    python -m benchmarks.bench_encode_levers --dataset NAME DATA STORE --template ID \
        --cases C1 C2 ... --variant "axes=0,1 stride=2" ... --cache FILE --write FILE

Writes (``--write``) the key ``levers`` of that JSON file: {dataset: rows}, each row with the
variant, mean Dice, loss against the full store, canvas ratio and store bytes per volume.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from semisam_o1.core.files import atomic_path, write_json_key
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.store import CaseFeatures, FeatureStore, quantise_int8
from semisam_o1.methods import class_planes as CP
from semisam_o1.methods import template_vote as TV
from semisam_o1.methods.metrics import dice_per_class
from semisam_o1.stages.encode import strided_slices


def parse_variant(text: str) -> dict:
    """``"axes=0,1 stride=2 channels=32 dtype=int8"`` -> dict (missing keys: the full store)."""
    v = {"axes": None, "stride": 1, "channels": None, "dtype": "float16"}
    for part in text.split():
        key, _, val = part.partition("=")
        if key == "axes":
            v["axes"] = tuple(int(a) for a in val.split(","))
        elif key == "stride":
            v["stride"] = int(val)
        elif key == "channels":
            v["channels"] = int(val)
        elif key == "dtype":
            v["dtype"] = val
        else:
            raise SystemExit(f"--variant {text!r}: unknown key {key}")
    return v


class VariantFeatures(CaseFeatures):
    """A store entry with a variant applied (see the module docstring); reads like CaseFeatures."""

    def __init__(self, cf: CaseFeatures, variant: dict):
        super().__init__(cf.folder, cf.meta)
        self.variant = variant
        if variant["axes"] is not None:
            self.axes = tuple(variant["axes"])
        self._maps: dict = {}
        self.bytes = 0

    def stored(self, axis: int):
        """The variant's (array, scale) as the store would hold it (int8 + per-channel scale, or float16)."""
        axis = int(axis)
        if axis not in self._grids:
            g, _ = CaseFeatures.stored(self, axis)  # the full store's float16 file
            if self.variant["channels"]:
                g = g[: self.variant["channels"]]
            first, m = strided_slices(g.shape[1 + axis], self.variant["stride"])
            idx = [slice(None)] * 4
            idx[1 + axis] = slice(first, first + self.variant["stride"] * (m - 1) + 1, self.variant["stride"])
            g = np.ascontiguousarray(g[tuple(idx)])
            scale = None
            if self.variant["dtype"] == "int8":
                g, scale = quantise_int8(g)
                self.bytes += scale.nbytes
            self.bytes += g.nbytes
            offset, step = super().cell_to_voxel(axis)  # the store's own map (a strided store steps > 1)
            offset[axis], step[axis] = offset[axis] + first * step[axis], step[axis] * self.variant["stride"]
            self._maps[axis] = (offset, step)
            self._grids[axis] = (g, scale)
        return self._grids[axis]

    def cell_to_voxel(self, axis: int):
        self.stored(axis)
        return tuple(a.copy() for a in self._maps[int(axis)])


def canvases(voxel_shape, axes, stride: int, per_canvas: int) -> int:
    """Encoder canvases of one volume: slices over ``axes`` (every ``stride``-th), ``per_canvas`` a canvas."""
    n = sum(strided_slices(int(voxel_shape[a]), stride)[1] for a in axes)
    return -(-n // per_canvas)


def variant_canvases(cf: VariantFeatures, per_canvas: int) -> int:
    """Encoder canvases the variant's slices take (its grids' slice counts: a store written with a
    stride or a working spacing holds fewer than the voxel shape)."""
    n = sum(cf.stored(a)[0].shape[1 + a] for a in cf.axes)
    return -(-n // per_canvas)


def run_variant(ds: Dataset, store: FeatureStore, template: str, cases: list, variant: dict, refs: dict,
                threads: int | None) -> dict:
    """Round-0 pool Dice and costs of one variant (propagate's default options)."""
    opts = TV.MethodOptions()
    t_img = ds.read_image(template)
    t_lab = ds.read_label(template, reference=t_img).array
    K = ds.label_map.num_classes
    rule = CP.learn(t_lab, K)[0]
    t_cf = VariantFeatures(store.load(template), variant)
    model = TV.build_template_model(t_cf, t_lab, K, opts, axes=t_cf.axes, spacing=t_img.spacing,
                                   class_names=ds.label_map.names)
    per, secs, nbytes, canv = [], [], [], []
    per_canvas = int(store.config["packing"]["per_canvas"])
    for c in cases:
        img = ds.read_image(c)
        cf = VariantFeatures(store.load(c), variant)
        t0 = time.perf_counter()
        _, lab = TV.pseudo_label(TV.score_case(model, cf, spacing=img.spacing, threads=threads), model, rule)
        secs.append(time.perf_counter() - t0)
        per.append(dice_per_class(lab, refs[c], list(range(1, K))))
        nbytes.append(cf.bytes)
        full = canvases(cf.voxel_shape, store.axes, 1, per_canvas)
        canv.append((variant_canvases(cf, per_canvas), full))
    d = np.asarray(per)
    return {"mean_dice": float(d.mean()), "dice_per_class": [float(x) for x in d.mean(0)],
            "per_case": [float(x) for x in d.mean(1)], "propagate_seconds_per_case": float(np.mean(secs)),
            "feature_bytes_per_volume": float(np.mean(nbytes)),
            "canvases_per_volume": float(np.mean([a for a, _ in canv])),
            "canvas_ratio": float(sum(b for _, b in canv) / sum(a for a, _ in canv))}


def pool_dice(ds: Dataset, folder: Path, cases: list) -> float:
    """Mean foreground Dice of the pseudo-labels ``folder/<case>.nii.gz`` (a propagate output)
    against the cases' real labels (benchmark only)."""
    from semisam_o1.data.images import read_label

    K = ds.label_map.num_classes
    per = []
    for c in cases:
        ref = ds.read_label(c, reference=ds.read_image(c))
        pred = read_label(Path(folder) / f"{c}.nii.gz", ds.label_map, reference=ref)
        per.append(dice_per_class(pred.array, ref.array, list(range(1, K))))
    return float(np.mean(per))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", nargs=3, metavar=("NAME", "DATA", "STORE"), required=True)
    ap.add_argument("--template", required=True)
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--variant", action="append", default=[], help='e.g. "axes=0,1 stride=2"; "" = full store')
    ap.add_argument("--evaluate", nargs="+", type=Path, metavar="LABELS",
                    help="only print the pool Dice of these propagate output folders")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="JSON of finished variants (re-runs compute only new ones)")
    ap.add_argument("--write", type=Path, help="results JSON (key levers.<dataset>)")
    a = ap.parse_args(argv)
    name, data, store_dir = a.dataset
    ds = Dataset(data)
    if a.evaluate:
        for folder in a.evaluate:
            print(f"{name} {folder}: mean foreground Dice {pool_dice(ds, folder, a.cases):.4f}", flush=True)
        return 0
    store = FeatureStore(store_dir)
    refs = {c: ds.read_label(c, reference=ds.read_image(c)).array for c in a.cases}  # benchmark only
    cache = json.loads(a.cache.read_text()) if a.cache and a.cache.is_file() else {}
    rows = []
    for text in a.variant:
        key = json.dumps([name, store.signature, a.template, a.cases, text])
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = run_variant(ds, store, a.template, a.cases, parse_variant(text), refs, a.threads)
            cache[key]["bench_seconds"] = round(time.perf_counter() - t0, 1)
            if a.cache:
                with atomic_path(a.cache) as tmp:
                    tmp.write_text(json.dumps(cache))
        r = dict(variant=text or "full store", **cache[key])
        rows.append(r)
        print(f"{name} {r['variant']:40s} Dice {r['mean_dice']:.4f} canvases x{r['canvas_ratio']:.2f} "
              f"{r['feature_bytes_per_volume'] / 1e6:.2f} MB  propagate {r['propagate_seconds_per_case']:.2f} s/case",
              flush=True)
    base = next((r for r in rows if r["variant"] == "full store"), None)
    for r in rows:
        r["dice_loss"] = round(base["mean_dice"] - r["mean_dice"], 4) if base else None
    if a.write:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")),
                     platform.processor())
        entry = {"command": "python -m benchmarks.bench_encode_levers " + " ".join(
                     f"'{x}'" if (" " in x or not x) else x for x in (argv if argv is not None else sys.argv[1:])),
                 "cpu": model, "store": store_dir, "store_signature": store.signature, "template": a.template,
                 "cases": a.cases, "propagate_options": TV.method_params(TV.MethodOptions()), "rows": rows}
        prev = json.loads(a.write.read_text()).get("levers", {}) if a.write.is_file() else {}
        prev[name] = entry
        write_json_key(a.write, "levers", prev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
