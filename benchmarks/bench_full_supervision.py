"""Full-supervision reference: the upper bound one-label runs are compared with.

Trains ``semisam-o1 train`` (preset ``cpu`` by default) on the *real* labels of
the split's template + the whole unlabeled pool (199 + 1 Hippocampus cases),
predicts the split's 60 ``test`` cases and scores them with
``semisam_o1.stages.evaluate`` (Dice, Jaccard, HD95, ASD per class, mm).

    python -m benchmarks.bench_full_supervision --write benchmarks/results/quality.json

(from the repository root). The stages are the package's own: ``train.STAGE``,
``predict.STAGE`` and ``evaluate.STAGE`` called with their settings objects.

Writes the key "full_supervision" of ``quality.json`` (read-modify-write of that
key only, atomic): the command, the preset and its parameters, training and
prediction times (wall and CPU seconds, iterations per second, the load average
of the shared machine), and the test-set metrics per class, and the commands that reproduce each stage
alone (from the stage records). ``--spatial-aug P``
trains with train's random affine augmentation (off by default, as in ``run``;
key ``spatial_augmentation``). Re-running resumes: a finished model and finished
predictions of the same settings are reused (their stage records); other settings
in the same ``--work`` folder are refused unless ``--overwrite``.
This reference reads labels the one-label protocol never reads -- that is its
point; it is never used for model selection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from semisam_o1.core.files import write_json_key
from semisam_o1.core.resume import read_record
from semisam_o1.stages import evaluate, nets, predict, train

REPO = Path(__file__).resolve().parents[1]

KEY = "full_supervision"


def write_results(path: Path, entry: dict, key: str = KEY) -> None:
    """Read-modify-write of one key (default "full_supervision") only, atomically."""
    write_json_key(path, key, entry)


def _clean(obj):
    """JSON-safe copy: NaN / inf as strings."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's options (data, split, work folder, train settings, where to write)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--split", default=None, help="default: DATA/splits.json")
    ap.add_argument("--work", default=str(REPO / "work" / "full_supervision"), help="model, predictions, metrics")
    ap.add_argument("--preset", default="cpu", choices=tuple(nets.PRESETS), help="train's --preset")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--plan", default=None, metavar="PLAN.json",
                    help="train's --plan: the planned network and budget of a run (its WORK/plan.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spatial-aug", type=float, default=0.0, metavar="P",
                    help="train's --spatial-aug (random affine of each drawn volume; default 0, off)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--write", default=None, help="quality.json to update (key --key)")
    ap.add_argument("--key", default=KEY, help="key of quality.json to write (default: %(default)s)")
    return ap.parse_args(argv)


def run_stages(args: argparse.Namespace) -> dict:
    """Train on the real labels, predict the test cases and score them, through the package's stages.

    Returns:
        {"split", "work", "command", "summary" (train's), "pred" (predict's), "metrics" (evaluate's),
        "times" (t0 .. t3, s), "loads" (load averages at the start and after training)}.
    """
    data = Path(args.data)
    split_path = Path(args.split or data / "splits.json")
    split = json.loads(split_path.read_text())
    work = Path(args.work)
    command = "python -m benchmarks.bench_full_supervision " + shlex.join(sys.argv[1:])
    compute = dict(device=args.device, threads=args.threads, quiet=True)
    load_start = os.getloadavg()
    t0 = time.time()

    # the real labels of the split's template + unlabeled cases (train never reads 'test')
    summary = train.STAGE(train.SETTINGS(input=data, labels=data / "labelsTr", split=split_path,
                                         output=work / "model", preset=args.preset, iterations=args.iterations,
                                         plan=None if args.plan is None else Path(args.plan),
                                         spatial_aug=args.spatial_aug, seed=args.seed, overwrite=args.overwrite,
                                         **compute))
    t1 = time.time()
    load_after_train = os.getloadavg()
    test = list(split["test"])
    pred = predict.STAGE(predict.SETTINGS(input=data, model=work / "model", output=work / "test_pred",
                                          cases=tuple(test), overwrite=args.overwrite, **compute))
    t2 = time.time()
    metrics = evaluate.STAGE(evaluate.SETTINGS(input=work / "test_pred", gt=data, cases=tuple(test),
                                               output=work / "test_metrics.json", quiet=True))
    t3 = time.time()
    return dict(split=split, work=work, command=command, summary=summary, pred=pred, metrics=metrics,
                times=(t0, t1, t2, t3), loads=(load_start, load_after_train))


def make_entry(r: dict) -> dict:
    """The quality.json entry of one benchmark run (``r``: :func:`run_stages`'s result)."""
    summary, pred, metrics, work, command = r["summary"], r["pred"], r["metrics"], r["work"], r["command"]
    test = list(r["split"]["test"])
    t0, t1, t2, t3 = r["times"]
    load_start, load_after_train = r["loads"]
    per_class = {}
    for name, info in metrics["per_class"].items():
        per_class[name] = {m: {"mean": info[m]["mean"], "std": info[m]["std"]} for m in ("dice", "jaccard", "hd95", "asd")}
        per_class[name]["n_empty_pred"] = info["n_empty_pred"]
    entry = {
        "command": command,
        "stage_commands": {name: (read_record(work / folder) or {}).get("command")
                           for name, folder in (("train", "model"), ("predict", "test_pred"))},
        "what": "train with the REAL labels of template + the whole unlabeled pool (upper bound), predict and score the test cases",
        "preset": summary["preset"],
        "preset_params": summary["preset_params"],
        "net": summary["net"],
        "iterations": summary["iterations"],
        "round": summary["round"],
        "ssl": summary["ssl"],
        "seed": summary["seed"],
        "spatial_aug": summary["spatial_aug"],
        "model_selection": summary["model_selection"],
        "n_training_cases": summary["num_training_cases"],
        "n_test_cases": len(test),
        "device": summary.get("device"),
        "threads": summary.get("threads"),
        "train_seconds": summary.get("train_seconds"),
        "train_cpu_seconds": summary.get("train_cpu_seconds_this_run"),
        "train_load_seconds": summary.get("load_seconds"),
        "iterations_per_second": summary.get("iterations_per_second"),
        "train_cpu_seconds_per_iteration": _ratio(summary.get("train_cpu_seconds_this_run"), summary.get("iterations_this_run")),
        # what the same work takes with the machine to itself, if both threads scale perfectly (a lower bound)
        "train_seconds_unshared_estimate": _ratio(summary.get("train_cpu_seconds_this_run"), summary.get("threads")),
        "train_reused": bool(summary.get("skipped")),
        "train_stage_wall_seconds": round(t1 - t0, 1),
        "predict_seconds": pred["seconds"],
        "predict_seconds_per_case": round(pred["seconds"] / max(1, pred["predicted"]), 3) if pred["predicted"] else None,
        "predict_reused_cases": pred["skipped"],
        "evaluate_seconds": round(t3 - t2, 1),
        "wall_seconds": round(t3 - t0, 1),
        "load_average_1_5_15_at_start": [round(x, 2) for x in load_start],
        "load_average_after_train": [round(x, 2) for x in load_after_train],
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs",
        "note": "wall times were measured while other jobs shared the cores (see the load averages); "
                "CPU seconds are closer to what the work costs alone",
        "final_training_loss": summary.get("final_loss"),
        "test_mean_entropy_nats": round(sum(pred["entropy"].values()) / max(1, len(pred["entropy"])), 5),
        "test": {"per_class": per_class, "mean_foreground": metrics["mean_foreground"],
                 "metrics_file": str(work / "test_metrics.json")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return _clean(entry)


def main(argv=None) -> int:
    """Run the benchmark; print the test metrics and times; write the entry with ``--write``."""
    args = parse_args(argv)
    entry = make_entry(run_stages(args))
    print(json.dumps(entry["test"], indent=1))
    print(f"train {entry['train_seconds']} s ({entry['iterations_per_second']} it/s), predict {entry['predict_seconds']} s, "
          f"wall {entry['wall_seconds']} s")
    if args.write:
        write_results(Path(args.write), entry, args.key)
        print(f"wrote key {args.key!r} of {args.write}")
    return 0


if __name__ == "__main__":
    from semisam_o1.core.errors import InputError

    try:
        sys.exit(main())
    except InputError as exc:
        print(f"bench_full_supervision: error: {exc}", file=sys.stderr)
        sys.exit(2)
