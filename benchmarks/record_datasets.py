"""Record a finished whole-split `semisam-o1 run` in benchmarks/results/datasets.json, beside its references.

Usage (from the repository root):

    python -m benchmarks.record_datasets WORK --command "semisam-o1 run ..." --seconds S \\
        --full-supervision FS_WORK/test_metrics.json --atlas benchmarks/results/registration.json

Writes one key, the dataset's name from its ``dataset.json``, with the keys of the issue "Work on
any dataset": ``command``, ``final_test_dice``, ``round0_pool_dice``, ``final_pool_dice``,
``full_supervision_test_dice``, ``atlas_syn_test_dice``, ``seconds``, ``plan`` (WORK/plan.json's
decisions), and beside them the split's sizes, the round the rule kept, the targets and whether
each is met. All Dice values are the mean foreground Dice over the cases named. The references
must have been measured on the run's test cases (checked: refused otherwise). The
full-supervision metrics come from ``benchmarks.bench_full_supervision --plan WORK/plan.json``
(the same planned network and budget, the real labels of template + pool); atlas SyN from
``benchmarks.bench_registration`` (the template registered to every test case).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.stages.plan import read_plan

REPO = Path(__file__).resolve().parents[1]


def _atlas(path: Path, name: str, test: list[str]) -> float:
    entry = json.loads(path.read_text())[name]["test"]
    cases = [c["case"] for c in entry["per_case"]]
    if sorted(cases) != sorted(test):
        raise SystemExit(f"{path}: atlas SyN of {name} was measured on {len(cases)} other test cases than the run's")
    return float(entry["mean_fg_dice"]["atlas_syn"])


def _full_supervision(path: Path, test: list[str]) -> tuple[float, dict]:
    """Mean foreground and per-class test Dice of bench_full_supervision's metrics file."""
    m = json.loads(path.read_text())
    cases = list(m["cases"]) if isinstance(m["cases"], list) else list(m["cases"].keys())
    if sorted(cases) != sorted(test):
        raise SystemExit(f"{path}: full supervision was scored on other test cases than the run's")
    per_class = {k: round(float(v["dice"]["mean"]), 4) for k, v in m.get("per_class", {}).items()}
    return float(m["mean_foreground"]["dice"]), per_class


def finished_run(work: Path) -> dict:
    """What the entry reads of a finished run: its report, run.json, split, dataset name and the
    test cases it scored (the split's first ``n_test``)."""
    report = json.loads((work / "report.json").read_text())
    run = json.loads((work / "run.json").read_text())
    split = json.loads(Path(run["all_settings"]["split"]).read_text())
    dataset = Path(run["all_settings"]["input"])
    name = json.loads((dataset / "dataset.json").read_text()).get("name", dataset.name)
    return {"work": work, "report": report, "run": run, "split": split, "name": name,
            "test": list(split["test"])[:report["n_test"]]}


def entry(r: dict, command: str, seconds: float, full_supervision: float | None, atlas: float,
          full_supervision_per_class: dict | None = None) -> dict:
    """The datasets.json entry of a finished run (``r``: :func:`finished_run`)."""
    report, split, work = r["report"], r["split"], r["work"]
    whole_split = (report["n_unlabeled"] == len([c for c in split["unlabeled"] if c != split["template"]])
                   and report["n_test"] == len(split["test"]))
    plan = read_plan(work / "plan.json") if (work / "plan.json").is_file() else None
    final_test = float(report["final_test_metrics"]["mean_foreground"]["dice"])
    round0 = float(report["rounds"][0]["pseudo_label_dice_unlabeled"]["mean_foreground_dice"])
    final_pool = float(report["final_pool_dice"]["mean_foreground_dice"])
    targets = {
        "final_test >= 0.90 x full_supervision": None if full_supervision is None else final_test >= 0.9 * full_supervision,
        "final_pool >= round0_pool": final_pool >= round0,
        "final_test > atlas_syn": final_test > atlas,
    }
    out = {
        "command": command,
        "final_test_dice": round(final_test, 4),
        "round0_pool_dice": round(round0, 4),
        "final_pool_dice": round(final_pool, 4),
        "full_supervision_test_dice": None if full_supervision is None else round(full_supervision, 4),
        "atlas_syn_test_dice": round(atlas, 4),
        "final_test_dice_per_class": {k: round(float(v), 4) for k, v in report["final_test_metrics"]["dice"].items()},
        "full_supervision_test_dice_per_class": full_supervision_per_class or None,
        "seconds": round(float(seconds), 1),
        "plan_estimate": (plan or {}).get("estimate"),
        "plan": plan["decisions"] if plan else None,
        "n_unlabeled": report["n_unlabeled"],
        "n_test": report["n_test"],
        "whole_split": whole_split,
        "chosen": report["chosen"],
        "rounds_run": len(report["rounds"]) - 1,
        "stage_seconds": r["run"].get("seconds"),
        "targets_met": targets,
        "cpu": cpu_model(),
        "note": "pool and test Dice are diagnostics computed from labels no stage reads",
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--command", required=True, help="the command that produced WORK")
    ap.add_argument("--seconds", type=float, required=True, help="wall seconds of that command")
    ap.add_argument("--full-supervision", type=Path, default=None, metavar="TEST_METRICS.json",
                    help="bench_full_supervision's test metrics (omitted: recorded as not measured, null)")
    ap.add_argument("--atlas", type=Path, default=REPO / "benchmarks" / "results" / "registration.json")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "datasets.json")
    args = ap.parse_args(argv)
    r = finished_run(args.work)
    full, per_class = (None, None) if args.full_supervision is None else _full_supervision(args.full_supervision,
                                                                                           r["test"])
    name = r["name"]
    out = entry(r, args.command, args.seconds, full, _atlas(args.atlas, name, r["test"]), per_class)
    write_json_key(args.results, name, out)
    print(json.dumps({name: {k: v for k, v in out.items() if k != "plan"}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
