"""How many voxels thick must a class stay at the working spacing?  (plan's MIN_CLASS_THICKNESS)

The plan refines the working spacing on an axis where the thinnest template class would be under
``MIN_CLASS_THICKNESS`` voxels thick (:func:`semisam_o1.stages.plan.plan_spacing`). This measures
what thickness costs, on the real labels of every dataset handed to us: each label is taken to a
coarser spacing and back the way the pipeline moves labels and predictions between grids
(:func:`semisam_o1.stages.nets.resample_label`: one-hot masks resampled trilinearly, largest
share wins), and the Dice of the round trip against the label is the best a perfect network at
that spacing could score: the resampling ceiling. Each class of each case is one record per
coarsening factor, with its thickness in voxels at the coarse spacing (:func:`plan.thickness_mm`
over the coarsest axis, the one the floor binds).

    python -m benchmarks.bench_thickness_floor --write benchmarks/results/thickness_floor.json

What it does not measure: a network's own loss on thin structures (its bottom level, its
receptive field); only the grid's. Measured (thickness_floor.json): the loss follows
1 - Dice = k / t with k 0.36-0.53 on all five datasets, so a ceiling of 0.95 needs t >= 11. Cases: each split's template and first unlabeled cases (never
the test split). 2D images are coarsened in their plane only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.methods.metrics import dice_per_class
from semisam_o1.stages import nets
from semisam_o1.stages.plan import MIN_CLASS_THICKNESS, thickness_mm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = ("hippocampus", "la2018", "openkbp", "ph2", "hc18")
#: coarsening factors of the native spacing (1.0 would be the identity: no measurement)
FACTORS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
#: thickness bins (voxels at the coarse spacing) the summary reports, [lo, hi)
BINS = ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 10), (10, 12), (12, 16), (16, 24), (24, 1e9))


def read_case_label(root: Path, case: str) -> tuple[np.ndarray, list[float]]:
    """(X, Y, Z) int label and its spacing in mm per array axis (a 2D mask: X x Y x 1, unit pixels)."""
    nii = root / "labelsTr" / f"{case}.nii.gz"
    if nii.is_file():
        import nibabel as nib

        from semisam_o1.data.images import affine_spacing

        img = nib.load(str(nii))
        return np.asarray(img.dataobj).astype(np.int16), [float(s) for s in affine_spacing(img.affine)]
    from PIL import Image

    png = next((root / "labels").glob(f"{case}.*"))
    mask = np.asarray(Image.open(png))
    if mask.ndim == 3:
        mask = mask[..., 0]
    return mask.T[:, :, None].astype(np.int16), [1.0, 1.0, 1.0]


def round_trip(label: np.ndarray, spacing, coarse, classes: list[int]) -> dict[int, float]:
    """Dice per class of ``label`` taken to ``coarse`` mm and back (nets.resample_label both ways)."""
    k = int(label.max()) + 1
    shape = label.shape
    down = nets.resample_label(label, nets.working_shape(shape, spacing, coarse), k)
    back = nets.resample_label(down, shape, k)
    return dict(zip(classes, dice_per_class(label, back, classes), strict=True))


def measure(name: str, cases: int) -> list[dict]:
    """One record per (case, class, factor) of dataset ``name``'s template + first pool cases."""
    root = DATA / name
    split = json.loads((root / "splits.json").read_text())
    names = [split["template"]] + [c for c in split["unlabeled"] if c != split["template"]][: cases - 1]
    records = []
    for case in names:
        label, spacing = read_case_label(root, case)
        flat = label.shape[2] == 1
        classes = [int(c) for c in np.unique(label) if c > 0]
        thick = {c: thickness_mm(label == c, spacing) for c in classes}
        for f in FACTORS:
            coarse = [s * f for s in spacing]
            if flat:
                coarse[2] = spacing[2]
            binding = max(coarse[:2] if flat else coarse)
            dice = round_trip(label, spacing, coarse, classes)
            for c in classes:
                records.append({"dataset": name, "case": case, "class": c, "factor": f,
                                "thickness_mm": round(thick[c], 3),
                                "thickness_vox": round(thick[c] / binding, 2), "ceiling_dice": round(dice[c], 4)})
    return records


def loss_constant(records: list[dict]) -> float:
    """k of the law the records follow, 1 - ceiling Dice = k / thickness in voxels: the median of
    (1 - Dice) x thickness over the records at least 2 voxels thick (below, the class breaks up)."""
    k = [(1.0 - r["ceiling_dice"]) * r["thickness_vox"] for r in records if r["thickness_vox"] >= 2]
    return float(np.median(k)) if k else float("nan")


def floor_voxels(records: list[dict], tolerance: float) -> tuple[int, dict]:
    """The thickness floor for a ceiling of ``tolerance``: ceil(k / (1 - tolerance)) for the
    largest k of any (dataset, class) (:func:`loss_constant`), and those k's."""
    import math

    ks = {}
    for r in records:
        ks.setdefault(f"{r['dataset']}/{r['class']}", []).append(r)
    k = {key: round(loss_constant(rows), 4) for key, rows in sorted(ks.items())}
    finite = [v for v in k.values() if math.isfinite(v)]
    return math.ceil(max(finite) / (1.0 - tolerance) - 1e-9), k


def _bin_key(lo: float, hi: float) -> str:
    return f"{lo}-{hi if hi < 1e8 else 'inf'}"


def summarise(records: list[dict], tolerance: float) -> dict:
    """Per dataset: the mean ceiling Dice in each thickness bin (over cases, classes and factors),
    the law's k (:func:`loss_constant`), and the smallest bin edge from which every bin above,
    with records, averages >= ``tolerance``."""
    out = {}
    for name in sorted({r["dataset"] for r in records}):
        rows = [r for r in records if r["dataset"] == name]
        bins = {}
        for lo, hi in BINS:
            sel = [r["ceiling_dice"] for r in rows if lo <= r["thickness_vox"] < hi]
            if sel:
                bins[_bin_key(lo, hi)] = {"records": len(sel), "mean": round(float(np.mean(sel)), 4),
                                          "p10": round(float(np.percentile(sel, 10)), 4)}
        floor = None
        for lo, hi in reversed(BINS):
            key = _bin_key(lo, hi)
            if key not in bins:
                continue
            if bins[key]["mean"] < tolerance:
                break
            floor = lo
        out[name] = {"bins": bins, "k": round(loss_constant(rows), 4),
                     f"bin_floor_for_mean_ceiling_{tolerance:g}": floor}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--cases", type=int, default=10, help="template + this many minus one pool cases per dataset")
    ap.add_argument("--tolerance", type=float, default=0.95, help="the ceiling Dice every class must keep (0.95: the grid takes at most half of the 10%% "
                         "the issue's target allows below full supervision)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None, help="JSON to update (key thickness_floor)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    records = []
    for name in args.datasets:
        records += measure(name, args.cases)
        print(f"{name}: {len(records)} records so far, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = summarise(records, args.tolerance)
    floor, ks = floor_voxels(records, args.tolerance)
    entry = {
        "command": "python -m benchmarks.bench_thickness_floor " + shlex.join(sys.argv[1:]),
        "cpu": cpu_model(), "python": platform.python_version(), "seconds": round(time.perf_counter() - t0, 1),
        "factors": list(FACTORS), "tolerance": args.tolerance, "plan_min_class_thickness": MIN_CLASS_THICKNESS,
        "law": "1 - ceiling Dice = k / thickness (voxels); k per dataset/class: the median over its records",
        "k_per_class": ks, "floor_voxels": floor,
        "floor_rule": "ceil(max k / (1 - tolerance)): every class of every dataset keeps a ceiling >= tolerance",
        "summary": summary, "records": records,
    }
    print(json.dumps({k: v for k, v in entry.items() if k != "records"}, indent=1))
    if args.write:
        write_json_key(args.write, "thickness_floor", entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
