"""Does the registration referee beat the pasted template? (semisam_o1.pipeline.referee)

For the first N pool cases of a dataset's split: the template registered to each case (ANTs SyN,
the run's referee, cached in --work) and the template's label pasted at the box centre
(semisam_o1.methods.paste), each scored against the case's REAL label (mean foreground Dice; real
labels are read here for measurement only, the run never does), and, with --round0 (a run's
WORK/round0/pseudo), the run's own rule against the round-0 labels. Writes one key of
benchmarks/results/referee_reliability.json.

    python -m benchmarks.bench_referee --data ../shared/data/la2018 --cases 10 --work work/referee_la
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import read_label
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.methods.paste import paste_at_centre
from semisam_o1.methods.registration import registration_labels
from semisam_o1.pipeline.referee import reliability

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "referee_reliability.json"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--cases", type=int, default=10, help="the first N pool cases of the split")
    ap.add_argument("--work", required=True, type=Path, help="cache folder for the registrations")
    ap.add_argument("--round0", type=Path, help="a run's WORK/round0/pseudo covering those cases")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--key", help="key in the results file (default: the dataset folder's name)")
    args = ap.parse_args(argv)
    ds = Dataset(args.data)
    split = load_split(args.data / "splits.json")
    template, cases = split["template"], split["unlabeled"][: args.cases]
    t0 = time.perf_counter()
    warped = registration_labels(ds, template, cases, args.work, threads=1, workers=args.workers, quiet=False)
    seconds = time.perf_counter() - t0
    t_label = ds.read_label(template)
    fg = ds.label_map.foreground
    rows = {}
    for case in cases:
        truth = ds.read_label(case)
        reg = read_label(warped[case], ds.label_map, reference=truth).array
        pasted = paste_at_centre(t_label.array, truth.shape, t_label.spacing, truth.spacing)
        rows[case] = {"registered_vs_real": round(float(mean_dice(reg, truth.array, fg)), 4),
                      "pasted_vs_real": round(float(mean_dice(pasted, truth.array, fg)), 4)}
    beats = sum(r["registered_vs_real"] > r["pasted_vs_real"] for r in rows.values())
    out = {"command": "python -m benchmarks.bench_referee " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpu": cpu_model(), "load_average": os.getloadavg()[0], "cases": rows,
           "mean_registered_vs_real": round(float(np.mean([r["registered_vs_real"] for r in rows.values()])), 4),
           "mean_pasted_vs_real": round(float(np.mean([r["pasted_vs_real"] for r in rows.values()])), 4),
           "registration_beats_paste_on_real_labels": f"{beats} of {len(rows)}",
           "registration_seconds": round(seconds, 1)}
    if args.round0 is not None:
        rule = reliability(ds, template, cases, Path(warped[cases[0]]).parent, args.round0)
        out["rule_on_round0_labels"] = {k: rule[k] for k in ("reliable", "reliable_cases", "pool_cases")}
    write_json_key(RESULTS, args.key or args.data.name, out)
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}, indent=1))
    return out


if __name__ == "__main__":
    main()
