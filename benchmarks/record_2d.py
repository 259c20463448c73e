"""Record a finished 2D `semisam-o1 run --images ...` in benchmarks/results/datasets.json, with the
keys of the 3D entries (benchmarks/record_datasets.py).

Usage (from the repository root):

    python -m benchmarks.record_2d WORK --name "PH2 (2D)" --truth ../shared/data/ph2/labels \\
        --command "semisam-o1 run ..." --seconds S

A folder-input run reads no pool label, so its report has no pool Dice: here the pool Dice of the
round-0 pseudo-labels (``WORK/round0/pseudo``) and of the handed-back labels (``WORK/final/labels``,
in the inputs' format) are computed against ``--truth`` (a folder of the real masks, named like the
images), as a diagnostic no stage reads. Full supervision and the registration baseline are not
measured by this script (recorded as null, their targets as null).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from benchmarks.record_datasets import finished_run
from semisam_o1.core.files import write_json_key
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.folder_input import list_images
from semisam_o1.data.images import read_label_values
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.stages.plan import read_plan

REPO = Path(__file__).resolve().parents[1]


def pool_dice(work: Path, truth: Path, pool: list[str]) -> tuple[float, float]:
    """Mean foreground Dice over ``pool`` of the round-0 pseudo-labels and of the final labels."""
    files = list_images(truth, "--truth")
    final = list_images(work / "final" / "labels", "final labels")
    r0, fin = [], []
    for case in pool:
        gt = read_label_values(files[case]).array
        classes = [int(v) for v in np.unique(gt) if v]
        r0.append(mean_dice(read_label_values(find_case_file(work / "round0" / "pseudo", case)).array, gt, classes))
        fin.append(mean_dice(read_label_values(final[case]).array, gt, classes))
    return float(np.mean(r0)), float(np.mean(fin))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--name", required=True, help="the entry's key")
    ap.add_argument("--truth", type=Path, required=True, help="folder of the real masks")
    ap.add_argument("--command", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "datasets.json")
    args = ap.parse_args(argv)
    r = finished_run(args.work)
    report, split = r["report"], r["split"]
    pool = [c for c in split["unlabeled"] if c != split["template"]]
    round0, final_pool = pool_dice(args.work, args.truth, pool)
    final_test = float(report["final_test_metrics"]["mean_foreground"]["dice"])
    plan = read_plan(args.work / "plan.json") if (args.work / "plan.json").is_file() else None
    out = {
        "command": args.command,
        "final_test_dice": round(final_test, 4),
        "round0_pool_dice": round(round0, 4),
        "final_pool_dice": round(final_pool, 4),
        "full_supervision_test_dice": None,
        "atlas_syn_test_dice": None,
        "seconds": round(args.seconds, 1),
        "plan": plan["decisions"] if plan else None,
        "n_unlabeled": report["n_unlabeled"],
        "n_test": report["n_test"],
        "whole_split": False,
        "chosen": report.get("chosen"),
        "rounds_run": len(report["rounds"]) - 1,
        "stage_seconds": r["run"].get("seconds"),
        "targets_met": {"final_test >= 0.90 x full_supervision": None, "final_pool >= round0_pool":
                        final_pool >= round0, "final_test > atlas_syn": None},
        "cpu": cpu_model(),
        "note": "2D (issue #33): the first 20 pool and 20 test images of the split; pool Dice computed by "
                "benchmarks/record_2d.py from labels no stage reads; full supervision and atlas baselines "
                "not measured yet",
    }
    write_json_key(args.results, args.name, out)
    print(json.dumps({args.name: {k: v for k, v in out.items() if k != "plan"}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
