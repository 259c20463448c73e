"""Case selection (``run --select``): does agreement find the good pseudo-labels, and
does training on them give a better model?

From a finished ``semisam-o1 run`` work folder (its round-0 pseudo-labels and round
1's predictions on the unlabeled pool), this benchmark

1. ranks the pool by ``semisam_o1.pipeline.selection`` agreement (mean foreground Dice of a
   case's round-0 label and round 1's prediction) and, reading the real labels (a
   diagnostic this benchmark alone does), reports how well agreement and round 1's
   mean entropy predict the real Dice of each case's round-0 label (Pearson r) and
   the real Dice of the round-0 labels of the top fraction;
2. trains a UNet from scratch (``semisam-o1 train``, preset ``cpu``) on the template
   plus the top ``fraction`` of the pool with their round-0 labels, for every
   fraction x iteration count asked, predicts the split's test cases and scores them.

    python -m benchmarks.bench_selection --run work/full \\
        --fractions 0.25 1.0 --iterations 1200 4800 --write benchmarks/results/quality.json

(from the repository root). The stages are the package's own (``selection.select_by_agreement``,
``train.STAGE``, ``predict.STAGE``, ``evaluate.STAGE`` with their settings objects).

Writes the key "case_selection" of quality.json. Models and predictions go to
``--work`` and are reused on a re-run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from semisam_o1.core.files import write_json_key
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.pipeline.selection import select_by_agreement

REPO = Path(__file__).resolve().parents[1]

KEY = "case_selection"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--split", default=None, help="default: DATA/splits.json")
    ap.add_argument("--run", required=True, help="finished `semisam-o1 run` work folder (round0/pseudo, round1/pred)")
    ap.add_argument("--work", default=str(REPO / "work" / "bench_selection"))
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 1.0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[1200])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", default=None)
    args = ap.parse_args()

    from semisam_o1.stages import evaluate, predict, train

    data = Path(args.data)
    split_path = Path(args.split or data / "splits.json")
    split = json.loads(split_path.read_text())
    run = Path(args.run)
    work = Path(args.work)
    ds = Dataset(data)
    lm = ds.label_map
    pool = [c for c in split["unlabeled"] if c != split["template"]]
    command = "python -m benchmarks.bench_selection " + shlex.join(sys.argv[1:])
    labels0, pred1 = run / "round0" / "pseudo", run / "round1" / "pred"

    # 1. the ranking against the real labels (diagnostic)
    ranking = select_by_agreement(ds, labels0, pred1, pool, 1.0)
    entropy = json.loads((pred1 / "entropy.json").read_text())
    entropy = entropy.get("entropy", entropy)
    real = {}
    for case in pool:
        gt = ds.read_label(case)
        lab = read_label(find_case_file(labels0, case, what="pseudo-label"), lm, reference=gt)
        real[case] = mean_dice(lab.array, gt.array, lm.foreground)
    ag = np.array([ranking["agreement"][c] for c in pool])
    ent = np.array([float(entropy[c]) for c in pool])
    rd = np.array([real[c] for c in pool])
    order = ranking["selected"]  # every case, best agreement first
    diag = {
        "n_pool": len(pool),
        "pearson_real_dice_vs_agreement": round(float(np.corrcoef(rd, ag)[0, 1]), 3),
        "pearson_real_dice_vs_mean_entropy": round(float(np.corrcoef(rd, ent)[0, 1]), 3),
        "round0_real_dice_all": round(float(rd.mean()), 4),
        "round0_real_dice_top": {},
    }
    for f in sorted(set(args.fractions) | {0.125, 0.25, 0.5}):
        n = max(1, int(np.ceil(f * len(pool) - 1e-9)))
        best_possible = np.sort(rd)[::-1][:n].mean()
        diag["round0_real_dice_top"][f"{f:g}"] = {
            "n": n, "by_agreement": round(float(np.mean([real[c] for c in order[:n]])), 4),
            "oracle_best_n": round(float(best_possible), 4)}
    print(json.dumps(diag, indent=1), flush=True)

    # 2. models trained on the top fraction
    rows = []
    for f in args.fractions:
        n = max(1, int(np.ceil(f * len(pool) - 1e-9)))
        chosen = order[:n]
        for it in args.iterations:
            name = f"top{n}_it{it}_seed{args.seed}"
            t0 = time.time()
            compute = dict(device="cpu", threads=args.threads, quiet=True)
            summary = train.STAGE(train.SETTINGS(input=data, labels=labels0, template=split["template"],
                                                 cases=(split["template"], *chosen), output=work / name / "model",
                                                 preset="cpu", iterations=it, seed=args.seed, **compute))
            predict.STAGE(predict.SETTINGS(input=data, model=work / name / "model", output=work / name / "test",
                                           cases=tuple(split["test"]), **compute))
            m = evaluate.STAGE(evaluate.SETTINGS(input=work / name / "test", gt=data, cases=tuple(split["test"]),
                                                 output=work / name / "test_metrics.json", quiet=True))
            row = {"fraction": f, "n_cases": n, "iterations": it, "seed": args.seed,
                   "round0_real_dice_of_training_cases": round(float(np.mean([real[c] for c in chosen])), 4),
                   "test_dice": {k: round(v["dice"]["mean"], 4) for k, v in m["per_class"].items()},
                   "test_mean_foreground_dice": round(float(np.mean([v["dice"]["mean"] for v in m["per_class"].values()])), 4),
                   "train_seconds": summary.get("train_seconds"), "wall_seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    entry = {"command": command, "run": str(run), "template": split["template"],
             "what": "agreement ranking of the pool vs the real Dice of its round-0 labels; UNets trained on the "
                     "top fraction (round-0 labels), scored on the test cases",
             "ranking": diag, "models": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.write:
        write_json_key(Path(args.write), KEY, entry)
        print(f"wrote key {KEY!r} of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
