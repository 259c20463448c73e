"""Class planes (``semisam_o1.methods.class_planes``): does the rule hold on real labels, and what does
re-splitting do to pseudo-labels and predictions?

1. On the real labels of the first ``--max-cases`` cases of the unlabeled pool: the fraction of
   foreground voxels the best monotone planes misassign, per canonical axis (mean over cases),
   and the same for the template (what ``propagate`` checks).
2. For every label folder given with ``--labels NAME=FOLDER`` (pseudo-labels or predictions,
   e.g. ones made with ``--class-planes off``): mean foreground Dice against the real labels as
   they are and after :func:`semisam_o1.methods.class_planes.apply` with the template's rule, and the
   error of the Posterior/Anterior plane in slices (predicted minus real first slice of the
   second class in the rule's order; mean, standard deviation).

    python -m benchmarks.bench_class_planes \\
        --labels round0_off=work/exp/prop_off unet_r1_off=work/cpu_w1/round1/test \\
        --write benchmarks/results/quality.json

Writes the key "class_planes" of quality.json. Only this benchmark reads the pool's and the
test set's real labels.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from semisam_o1.core.files import write_json_key
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import read_label
from semisam_o1.methods import class_planes as CP
from semisam_o1.methods.metrics import dice_per_class

REPO = Path(__file__).resolve().parents[1]

KEY = "class_planes"


def _first_slice(split: np.ndarray, rule: CP.ClassPlanes) -> int:
    """First slice (along the rule's axis) of the rule's second class in a re-split label."""
    other = tuple(a for a in range(3) if a != rule.axis)
    idx = np.flatnonzero((split == rule.order[1]).any(axis=other))
    return int(idx[0]) if len(idx) else split.shape[rule.axis]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--split", default=None, help="default: DATA/splits.json")
    ap.add_argument("--max-cases", type=int, default=60, help="pool cases whose real labels are checked")
    ap.add_argument("--labels", nargs="*", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--write", default=None)
    args = ap.parse_args(argv)

    ds = Dataset(args.data)
    sp = load_split(args.split or Path(args.data) / "splits.json")
    K = ds.label_map.num_classes
    fg_classes = list(range(1, K))
    rule, t_errors = CP.learn(ds.read_label(sp["template"]).array, K)
    if rule is None:
        print(f"the template's classes are not separated by planes (errors per axis {t_errors})")
        return 1
    argv = sys.argv[1:] if argv is None else argv
    result = {"command": "python -m benchmarks.bench_class_planes " + " ".join(shlex.quote(a) for a in argv),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "template": sp["template"], "rule": rule.to_json(ds.label_map.names),
              "template_misassigned_per_axis": [round(e, 5) for e in t_errors]}

    pool = [c for c in sp["unlabeled"] if c != sp["template"]][: args.max_cases]
    errs = np.array([CP.learn(ds.read_label(c).array, K, tolerance=0.99)[1] for c in pool])
    result["real_labels"] = {"cases": len(pool), "misassigned_per_axis_mean": errs.mean(0).round(5).tolist(),
                             "misassigned_per_axis_max": errs.max(0).round(5).tolist()}
    print(f"real labels of {len(pool)} pool cases: misassigned fraction per axis, mean "
          f"{errs.mean(0).round(4).tolist()}, max {errs.max(0).round(4).tolist()}")

    rows = {}
    for spec in args.labels:
        name, _, folder = spec.partition("=")
        folder = Path(folder)
        names = {p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz")}
        cases = sorted(c for c in names & set(ds.labels) if c != sp["template"])
        before, after, shift = [], [], []
        for c in cases:
            real = ds.read_label(c).array
            lab = read_label(find_case_file(folder, c, what="label"), ds.label_map).array
            split = CP.apply(lab, rule)
            before.append(np.mean(dice_per_class(lab, real, fg_classes)))
            after.append(np.mean(dice_per_class(split, real, fg_classes)))
            shift.append(_first_slice(split, rule) - _first_slice(CP.apply(real, rule), rule))
        rows[name] = {"folder": str(folder), "cases": len(cases), "mean_fg_dice": round(float(np.mean(before)), 4),
                      "mean_fg_dice_class_planes": round(float(np.mean(after)), 4),
                      "plane_error_slices_mean": round(float(np.mean(shift)), 2),
                      "plane_error_slices_sd": round(float(np.std(shift)), 2)}
        print(f"{name}: {len(cases)} cases, mean fg Dice {np.mean(before):.4f} -> {np.mean(after):.4f} with class "
              f"planes; plane error {np.mean(shift):+.2f} +- {np.std(shift):.2f} slices")
    result["label_folders"] = rows
    if args.write:
        write_json_key(args.write, KEY, result)
        print(f"wrote key {KEY!r} of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
