"""Seconds per volume of ``encode --engine local`` vs ``--engine ray`` on this machine.

Real Hippocampus cases, the default encoder (LiteMedSAM). The reduction (PCA) is fitted once on the
split's template into a base store; every configuration starts from a copy of it (same basis, same
store signature) and encodes the same N pool cases with ``semisam-o1 encode`` run as a command
(so its wall time includes Python start-up, imports and, for Ray, starting the local instance and
its actors):

* ``local``: ``--engine local --threads T`` (T = all cores)
* ``ray_w{W}_t{t}``: ``--engine ray --workers W --threads t`` for the (W, t) given

Per configuration: the command, its wall seconds and wall seconds per volume, the mean of the
cases' own seconds (``meta.json``: reading, encoding and writing one case in its worker), and the
load average before and after (the machine may be shared). Each Ray store is compared with the
local one: same signature, and the largest feature difference in float16 ulps. Writes
``benchmarks/results/engine.json`` with ``--write``. Run from the repository root::

    python -m benchmarks.bench_engine --cases 4 --ray 2x1 1x2 [--work DIR] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SEMISAM_DATA", REPO.parent / "shared" / "data" / "hippocampus"))
RESULT = REPO / "benchmarks" / "results" / "engine.json"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(argv: list[str]) -> float:
    """Run ``semisam-o1 ARGV`` (this interpreter's install); returns its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "semisam_o1", *argv], check=True)
    return time.perf_counter() - t0


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in float16 units in the last place between two float16 arrays."""
    ia = a.view(np.int16).astype(np.int32)
    ib = b.view(np.int16).astype(np.int32)
    ia = np.where(ia < 0, -32768 - ia, ia)  # sign-magnitude -> ordered integers
    ib = np.where(ib < 0, -32768 - ib, ib)
    return int(np.abs(ia - ib).max())


def compare(local: Path, other: Path, cases: list[str]) -> dict:
    from semisam_o1.data.store import FeatureStore

    a, b = FeatureStore(local), FeatureStore(other)
    worst, equal, total = 0, 0, 0
    for case in cases:
        fa, fb = a.load(case), b.load(case)
        for axis in fa.axes:
            ga, gb = np.asarray(fa.grid(axis)), np.asarray(fb.grid(axis))
            worst = max(worst, ulps(ga, gb))
            equal += int((ga == gb).sum())
            total += ga.size
    return {"same_signature": a.config["signature"] == b.config["signature"], "max_float16_ulps": worst,
            "fraction_equal": round(equal / total, 6)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4, help="pool cases to encode")
    ap.add_argument("--ray", nargs="+", default=["2x1", "1x2"], metavar="WxT", help="Ray workers x threads")
    ap.add_argument("--work", type=Path, default=Path("work/bench_engine"), help="scratch folder for the stores")
    ap.add_argument("--keep", action="store_true", help="keep WORK's base store and every configuration that "
                    "finished there (its bench.json), measure only the others")
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/engine.json")
    args = ap.parse_args(argv)

    split = json.loads((DATA / "splits.json").read_text())
    template, pool = split["template"], list(split["unlabeled"][: args.cases])
    threads = os.cpu_count() or 1
    work = args.work.resolve()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    common = ["-i", str(DATA), "--quiet"]
    base_argv = ["encode", "-o", str(work / "base"), "--cases", template, "--threads", str(threads), *common]
    base_json = work / "base.json"
    if not base_json.is_file():
        base_json.write_text(json.dumps({"wall_seconds": round(run(base_argv), 1)}))
    base_s = json.loads(base_json.read_text())["wall_seconds"]
    configs = {"local": ["--engine", "local", "--threads", str(threads)]}
    for wt in args.ray:
        w, t = (int(x) for x in wt.split("x"))
        configs[f"ray_w{w}_t{t}"] = ["--engine", "ray", "--workers", str(w), "--threads", str(t)]
    results = {}
    for name, extra in configs.items():
        out = work / name
        if (out / "bench.json").is_file():  # finished in an earlier call (--keep)
            results[name] = json.loads((out / "bench.json").read_text())
            continue
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(work / "base", out)
        cmd = ["encode", "-o", str(out), "--cases", template, *pool, *common, *extra]
        before = load_average()
        wall = run(cmd)
        after = load_average()
        seconds = [json.loads((out / "cases" / c / "meta.json").read_text())["seconds"] for c in pool]
        results[name] = {"command": shlex.join(["semisam-o1", *cmd]), "wall_seconds": round(wall, 1),
                         "wall_seconds_per_volume": round(wall / len(pool), 2),
                         "mean_case_seconds": round(float(np.mean(seconds)), 2),
                         "load_average_before": before, "load_average_after": after,
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out / "bench.json").write_text(json.dumps(results[name]))
        print(f"{name}: {wall:.1f} s wall, {wall / len(pool):.1f} s per volume, cases {np.mean(seconds):.1f} s "
              f"each (load {before} -> {after})", flush=True)
    for name in results:
        if name != "local":
            results[name]["vs_local"] = compare(work / "local", work / name, pool)
    record = {"command": shlex.join(["python", "-m", "benchmarks.bench_engine", *(argv if argv is not None
                                                                                   else sys.argv[1:])]),
              "cpu": cpu_model(), "cores": threads, "dataset": str(DATA), "template": template, "cases": pool,
              "base_store": {"command": shlex.join(["semisam-o1", *base_argv]), "wall_seconds": base_s},
              "configs": results,
              "note": "wall seconds include Python start-up and imports and, for Ray, starting the local instance "
                      "and its actors; mean_case_seconds is each case's own time in its worker (read, encode, "
                      "write). The machine is shared: see the load averages."}
    print(json.dumps(record, indent=1))
    if args.write:
        RESULT.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
