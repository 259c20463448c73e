"""Peak memory of ``train`` as the cohort grows, for one or more source trees, in one run.

``train`` used to keep every prepared training volume in memory (image, label and the int64
foreground / background indices: 0.76 MB per Hippocampus volume, ``scale.json``); it now spills them
to disk and memory-maps one patch at a time (:func:`semisam_o1.stages.train.spill_volume`). This
benchmark trains the same few iterations on the template + the first N - 1 pseudo-labelled cases of a
finished run, for every size and every ``--source`` (a checkout's root: its ``python/`` is put first
on ``PYTHONPATH``), sampling the resident memory of the process tree
(:class:`benchmarks.bench_scale.StageMeter`).

    python -m benchmarks.bench_train_memory --data ../shared/data/hippocampus --labels WORK/round0/pseudo \\
        --template hippocampus_001 --sizes 25 200 --source OLD_CHECKOUT --source . --iterations 20 \\
        --write benchmarks/results/scale.json

With ``--write`` the result goes under the key ``train_memory`` of that JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_scale import StageMeter
from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key

REPO = Path(__file__).resolve().parents[1]


def peak_of(cmd: list[str], env: dict, interval: float) -> tuple[float, float]:
    """Run ``cmd``; returns (peak tree MiB, wall seconds). Exits on a failed command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meter = StageMeter(proc, interval)  # train announces no stage: everything is the "start" stage
    sampler = threading.Thread(target=meter.sample, daemon=True)
    sampler.start()
    out = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{out[-2000:]}")
    return round(max(meter.peak.values(), default=0.0), 1), round(time.perf_counter() - t0, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the dataset (imagesTr/)")
    ap.add_argument("--labels", type=Path, required=True, help="a folder of pseudo-labels (a run's round0/pseudo)")
    ap.add_argument("--template", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 200])
    ap.add_argument("--source", type=Path, action="append", default=None,
                    help="a checkout's root to train with (repeatable; default: this one)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between memory samples")
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args(argv)
    labelled = sorted(p.name.split(".")[0] for p in a.labels.glob("*.nii.gz"))
    others = [c for c in labelled if c != a.template]
    sources = [s.resolve() for s in (a.source or [REPO])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            if n - 1 > len(others):
                raise SystemExit(f"--sizes {n}: {a.labels} has only {len(others)} labels besides the template")
            for src in sources:  # sources interleaved size by size
                env = dict(os.environ, PYTHONPATH=f"{src / 'python'}{os.pathsep}{src}")
                cmd = [sys.executable, "-m", "semisam_o1", "train", "--input", str(a.data), "--labels", str(a.labels),
                       "--template", a.template, "--cases", *others[: n - 1], "--output",
                       str(Path(tmp) / f"{src.name}_{n}"), "--preset", a.preset, "--iterations", str(a.iterations),
                       "--quiet"]
                peak, wall = peak_of(cmd, env, a.interval)
                rows.append({"source": str(src), "volumes": n, "peak_mib": peak, "wall_s": wall})
                print(json.dumps(rows[-1]), flush=True)
    ratio = {}
    for src in sources:
        mine = [r for r in rows if r["source"] == str(src)]
        ratio[str(src)] = round(mine[-1]["peak_mib"] / mine[0]["peak_mib"], 3)
    out = {"command": "python -m benchmarks.bench_train_memory " + shlex.join(sys.argv[1:] if argv is None else argv),
           "cpu": cpu_model(), "rows": rows, "peak_ratio_largest_over_smallest": ratio}
    print(json.dumps(out["peak_ratio_largest_over_smallest"], indent=1))
    if a.write:
        write_json_key(a.write, "train_memory", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
