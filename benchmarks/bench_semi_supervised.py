"""Plain training against ``--ssl w2s`` on the same round-0 labels and plan (issue #31 item 2).

Make the round-0 labels and the plan once (``semisam-o1 run -i DATA --split SPLIT -o WORK --preset demo
--rounds 1`` writes ``WORK/round0/pseudo`` and ``WORK/plan.json``), then::

    python benchmarks/bench_semi_supervised.py --data DATA --split SPLIT --work WORK --out OUT \\
        --iterations N [--modes none w2s] [--seed 0] [--threads 1] [--json benchmarks/results/semi_supervised.json]

Per mode: ``semisam-o1 train`` (round 1, the split's template + pool, ``--plan WORK/plan.json``),
``predict`` on the pool and the test cases (with round 0's class-planes rule when there is one),
``evaluate`` against the real labels; the pool and test mean foreground Dice, the training seconds
and every command go into the JSON under ``runs`` (appended; a run of the same dataset (the data
folder's name), mode, iterations and seed replaces the earlier one). The pool's real labels are
read only here, as a diagnostic.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model  # noqa: E402


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _cli(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "semisam_o1", *args]
    subprocess.run(cmd, check=True)
    return "semisam-o1 " + " ".join(shlex.quote(a) for a in args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--split", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path, help="the run folder with round0/pseudo and plan.json")
    ap.add_argument("--out", required=True, type=Path, help="folder for the models, predictions and metrics")
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--modes", nargs="+", default=["none", "w2s"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/semi_supervised.json"))
    a = ap.parse_args()

    split = json.loads(a.split.read_text())
    pool, test = list(split["unlabeled"]), list(split["test"])
    rule = a.work / "round0" / "pseudo" / "class_planes.json"
    common = ["--device", "cpu", "--threads", str(a.threads), "--quiet"]
    for mode in a.modes:
        tag = f"{mode}_it{a.iterations}_s{a.seed}"
        model = a.out / tag / "model"
        load0 = _load()
        t0 = time.time()
        cmds = [_cli(["train", "-i", str(a.data), "--split", str(a.split), "-l", str(a.work / "round0" / "pseudo"),
                      "-o", str(model), "--plan", str(a.work / "plan.json"), "--iterations", str(a.iterations),
                      "--ssl", mode, "--seed", str(a.seed), "--round", "1", *common])]
        train_wall = time.time() - t0
        dice = {}
        for subset, cases in (("pool", pool), ("test", test)):
            pred = a.out / tag / subset
            planes = ["--class-planes", str(rule)] if rule.is_file() else []
            cmds.append(_cli(["predict", "-i", str(a.data), "-m", str(model), "-o", str(pred), "--cases", *cases,
                              *planes, *common]))
            metrics = pred / "metrics.json"
            cmds.append(_cli(["evaluate", "-i", str(pred), "-g", str(a.data), "--cases", *cases, "-o", str(metrics),
                              "--quiet"]))
            m = json.loads(metrics.read_text())
            dice[subset] = {"mean_foreground": round(m["mean_foreground"]["dice"], 4),
                            "per_class": {k: round(v, 4) for k, v in m["summary"]["dice"].items()}}
        cfg = json.loads((model / "config.json").read_text())
        planned = json.loads((a.work / "plan.json").read_text())["decisions"]["iterations"]["value"]
        run = {"dataset": a.data.resolve().name, "mode": mode, "iterations": a.iterations, "plan_iterations": planned,
               "seed": a.seed, "threads": a.threads, "pool_cases": len(pool), "test_cases": len(test),
               "pool_dice": dice["pool"], "test_dice": dice["test"],
               "train_seconds": cfg["train_seconds"], "train_wall_seconds": round(train_wall, 1),
               "cpu": cpu_model(), "load_before": load0, "load_after": _load(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commands": cmds}
        # read just before writing: another process may be measuring another mode into the same file
        record = json.loads(a.json.read_text()) if a.json.is_file() else {
            "what": "round 1 trained on the same round-0 labels and plan, plain (--ssl none) against --ssl w2s; "
                    "pool and test mean foreground Dice (the pool's real labels read only here)",
            "script": "benchmarks/bench_semi_supervised.py", "runs": []}
        key = ("dataset", "mode", "iterations", "seed")
        record["runs"] = [r for r in record["runs"] if [r[k] for k in key] != [run[k] for k in key]] + [run]
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: run[k] for k in ("mode", "iterations", "pool_dice", "test_dice", "train_seconds")}))


if __name__ == "__main__":
    main()
