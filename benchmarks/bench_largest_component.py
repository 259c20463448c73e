"""What keeping each class's largest connected component does to a run's predictions.

Reads a finished ``semisam-o1 run`` folder (its rounds' pool predictions ``WORK/roundR/pred``
and test predictions ``WORK/roundR/test``, written without the post-processing) and scores, per
round, the mean foreground Dice against the real labels with and without
:func:`semisam_o1.methods.components.largest_component` applied to the classes the template shows in one
piece (:func:`semisam_o1.stages.plan.plan_largest_component`, the plan's rule, taken afresh from the
template's label), and the same for the
agreement with the run's registration referee (``WORK/referee``, label-free).

    python -m benchmarks.bench_largest_component --work WORK --write FILE.json --key NAME

The real labels are read for the report only (a benchmark); the rule itself reads only the
template's label.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import read_label
from semisam_o1.methods.components import largest_component
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.stages.plan import plan_largest_component, template_fingerprint
from semisam_o1.stages.predict import label_file


def _score(folder: Path, cases: list[str], truths: dict, classes: list[int], lcc: list[int], label_map) -> dict:
    """Per-case mean foreground Dice of the labels in ``folder`` against each of ``truths``
    ({name: case -> (X, Y, Z) labels}), as written and with the largest component of ``lcc``
    kept; each prediction is read once."""
    raw = {t: [] for t in truths}
    kept = {t: [] for t in truths}
    removed = []
    for case in cases:
        lab = read_label(label_file(folder, case), label_map).array
        post = largest_component(lab, lcc)
        removed.append(int((lab != post).sum()))
        for t, truth in truths.items():
            ref = truth(case)
            raw[t].append(mean_dice(lab, ref, classes))
            kept[t].append(mean_dice(post, ref, classes))
    out = {}
    for t in truths:
        d = np.array(kept[t]) - np.array(raw[t])
        out[t] = {"cases": len(cases), "dice": round(float(np.mean(raw[t])), 4),
                  "dice_largest_component": round(float(np.mean(kept[t])), 4),
                  "gain": round(float(d.mean()), 4), "gain_se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4),
                  "cases_changed": int((d != 0).sum()), "voxels_removed_mean": round(float(np.mean(removed)), 1)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a finished run's WORK folder")
    ap.add_argument("--write", type=Path, help="JSON file to write the result into (key --key)")
    ap.add_argument("--key", default=None, help="key in --write (default: the dataset's name)")
    a = ap.parse_args(argv)
    run = json.loads((a.work / "run.json").read_text())
    ds = Dataset(Path(run["settings"]["input"]))
    split = load_split(run["settings"]["split"])
    # the rule from the template's label with this code (WORK's plan.json may predate it)
    lcc, reason = plan_largest_component({"template": template_fingerprint(ds, split["template"])})
    classes = list(range(1, ds.label_map.num_classes))
    truths = {"real": lambda case: ds.read_label(case).array}
    referee = next((p for p in sorted((a.work / "referee").glob("*")) if p.is_dir()), None)
    pool_truths = dict(truths)
    if referee is not None:
        pool_truths["referee"] = lambda case: read_label(find_case_file(referee, case, what="referee"),
                                                         ds.label_map).array
    rounds = sorted(int(p.name[5:]) for p in a.work.glob("round[0-9]*") if (p / "pred").is_dir())
    name = ds.meta.get("name", ds.root.name)
    out = {"command": "python -m benchmarks.bench_largest_component " + shlex.join(sys.argv[1:] if argv is None
                                                                                     else argv),
           "cpu": cpu_model(), "dataset": name, "template": split["template"], "classes": lcc,
           "reason": reason, "rounds": {}}
    for r in rounds:
        rd = a.work / f"round{r}"
        pool = [c for c in split["unlabeled"] if label_file(rd / "pred", c).is_file()]
        test = [c for c in split["test"] if label_file(rd / "test", c).is_file()]
        scored = _score(rd / "pred", pool, pool_truths, classes, lcc, ds.label_map)
        entry = {"pool": scored["real"]}
        if "referee" in scored:
            entry["pool_referee"] = scored["referee"]
        if test:
            entry["test"] = _score(rd / "test", test, truths, classes, lcc, ds.label_map)["real"]
        out["rounds"][str(r)] = entry
        print(f"round {r}: {json.dumps(entry)}", flush=True)
    if a.write:
        write_json_key(a.write, a.key or name, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
