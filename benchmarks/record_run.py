"""Record a finished `semisam-o1 run` (its WORK/report.json) in benchmarks/results/quality.json.

Usage:
    python -m benchmarks.record_run WORK --command "semisam-o1 run ..." [--key semisam_o1_demo]

Writes, under the key (default ``semisam_o1_<preset>``): the command, the configuration,
per round the pseudo-label Dice on the unlabeled pool (diagnostic) and the test-set
metrics, the final test metrics, the gap to the full-supervision reference recorded
under ``full_supervision`` (same file), and the seconds per stage. Only that key of
quality.json is rewritten (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semisam_o1.core.files import write_json_key

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--command", required=True, help="the command that produced WORK")
    ap.add_argument("--key", default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "quality.json")
    ap.add_argument("--wall-seconds", type=float, default=None, help="wall time of the whole command, if measured")
    args = ap.parse_args()

    report = json.loads((args.work / "report.json").read_text())
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    key = args.key or f"semisam_o1_{report['config']['preset']}"
    final = report.get("final_test_metrics") or {}
    entry = {
        "command": args.command,
        "what": "the whole SemiSAM-O1 loop from one template (report.json of the run)",
        "template": report["template"],
        "n_unlabeled": report["n_unlabeled"],
        "n_test": report["n_test"],
        "config": report["config"],
        "rounds": [
            {
                "round": r["round"],
                "pseudo_label_dice_unlabeled": r.get("pseudo_label_dice_unlabeled"),
                "prediction_dice_unlabeled": r.get("prediction_dice_unlabeled"),
                "test_metrics": r.get("test_metrics"),
                "voxels_changed_by_refinement": (r.get("refinement") or {}).get("voxels_changed_total"),
                "seconds": r.get("seconds"),
            }
            for r in report["rounds"]
        ],
        "final_test_metrics": final,
        "selection": report.get("selection"),
        "seconds_total_stages": report.get("seconds_total"),
        "wall_seconds": args.wall_seconds,
    }
    # the full-supervision reference on the same test cases, from its per-case metrics file
    fs = (results.get("full_supervision") or {}).get("test") or {}
    final_dice = (final.get("mean_foreground") or {}).get("dice")
    metrics_file = Path(fs.get("metrics_file", ""))
    run_metrics = args.work / f"round{report['config']['rounds']}" / "test_metrics.json"
    if final_dice is not None and metrics_file.is_file() and run_metrics.is_file():
        test_cases = list(json.loads(run_metrics.read_text())["cases"])
        per_case = json.loads(metrics_file.read_text())["cases"]
        if set(test_cases) <= set(per_case):  # the reference may hold another dataset's cases
            vals = [v["dice"] for c in test_cases for v in per_case[c].values()]
            full_same = sum(vals) / len(vals)
            entry["full_supervision_dice_same_test_cases"] = full_same
            entry["fraction_of_full_supervision_dice"] = final_dice / full_same
    write_json_key(args.results, key, entry)
    print(f"wrote key {key!r} of {args.results}: final mean foreground test Dice {final_dice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
