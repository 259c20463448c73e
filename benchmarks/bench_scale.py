"""The loop at growing cohort sizes: seconds and peak memory per stage (issue #34 item 5).

For each size N of ``--sizes`` the template and the first N - 1 cases of the split's unlabeled
pool are run as one cohort, ``semisam-o1 run -i DATA --split SPLIT_N -o WORK/nN --preset PRESET
--rounds 1`` (no test cases), each size in its own work folder, one after the other in this
process (so the sizes compare: same machine, same moment). While a run goes, its process tree's
resident memory (the sum of VmRSS over the run and every process it started, read from /proc) is
sampled every ``--interval`` seconds and attributed to the stage the run last announced on its
terminal (``[run] NAME: ...``); the stage's seconds are the time between its announcement and the
next one. Writes ``benchmarks/results/scale.json`` (``--write``): per size the stages' seconds and
peak MiB, seconds per volume, and the ratios that say whether time is linear (seconds per volume
at the largest size over the smallest) and memory flat (peak at the largest over the smallest).

``--grow-store`` seeds each size's feature store with a copy of the previous size's (the sizes are
nested: the first N - 1 pool cases), so ``encode`` encodes only the new cases and the encoder's
seconds per volume are its seconds over the cases it encoded (``encoded``); every other stage runs
on the whole cohort of its size. The copy is not timed. Encoding is per volume and independent of the
cohort, so this measures the same per-volume cost at half the total encoding (200 volumes instead of
375 for the default sizes).

    python -m benchmarks.bench_scale --data ../shared/data/hippocampus --sizes 25 50 100 200 \\
        --work /tmp/scale --write benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json

REPO = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^\[run\] ([a-z][a-z0-9/_]*)[: ]")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, MiB (Linux /proc; 0 for a gone process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024.0


def split_of_size(split: dict, n: int) -> dict:
    """The template and the first ``n - 1`` unlabeled cases; no test case."""
    pool = list(split["unlabeled"])
    if n - 1 > len(pool):
        raise SystemExit(f"--sizes {n}: the split has only {len(pool) + 1} cases")
    return {"template": split["template"], "unlabeled": pool[: n - 1], "test": []}


class StageMeter:
    """Seconds and peak tree memory per announced stage of one running command."""

    def __init__(self, proc: subprocess.Popen, interval: float):
        self.proc, self.interval = proc, interval
        self.stage, self.started = "start", time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.lock = threading.Lock()

    def announce(self, name: str) -> None:
        with self.lock:
            if name != self.stage:
                now = time.perf_counter()
                self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self.started
                self.stage, self.started = name, now

    def sample(self) -> None:
        while self.proc.poll() is None:
            rss = tree_rss_mib(self.proc.pid)
            with self.lock:
                self.peak[self.stage] = max(self.peak.get(self.stage, 0.0), rss)
            time.sleep(self.interval)

    def close(self) -> None:
        self.announce("end")


def run_size(cmd: list[str], log: Path, interval: float) -> dict:
    """Run ``cmd`` (a ``semisam-o1 run``); returns its wall seconds and its stages' seconds and peak MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    meter = StageMeter(proc, interval)
    sampler = threading.Thread(target=meter.sample, daemon=True)
    sampler.start()
    with log.open("w") as out:
        for line in proc.stdout:
            out.write(line)
            m = STAGE_LINE.match(line)
            if m:
                meter.announce(m.group(1))
    if proc.wait() != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {proc.returncode}); see {log}")
    meter.close()
    sampler.join()
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "stage_seconds": {k: round(v, 1) for k, v in meter.seconds.items() if k != "start" or v > 1},
            "stage_peak_mib": {k: round(v, 1) for k, v in meter.peak.items()}}


def per_volume(row: dict) -> dict:
    """Seconds per volume of each stage of one size: ``encode`` over the cases it encoded (``encoded``),
    every other stage over the size's volumes."""
    out = {}
    for stage, sec in row["stage_seconds"].items():
        n = row.get("encoded", row["volumes"]) if stage == "encode" else row["volumes"]
        if n:
            out[stage] = round(sec / n, 3)
    return out


def summarise(rows: list[dict]) -> dict:
    """Per stage, seconds per volume and peak memory of the largest size over the smallest."""
    small, big = rows[0], rows[-1]
    a, b = small["stage_seconds_per_volume"], big["stage_seconds_per_volume"]
    time_ratio = {k: round(b[k] / a[k], 3) for k in a if k in b and a[k] > 0}
    mem_ratio = {k: round(big["stage_peak_mib"][k] / small["stage_peak_mib"][k], 3)
                 for k in small["stage_peak_mib"] if k in big["stage_peak_mib"] and small["stage_peak_mib"][k] > 0}
    total = {"small": sum(a.values()), "big": sum(b.values())}
    return {"seconds_per_volume_ratio": round(total["big"] / total["small"], 3),
            "stage_seconds_per_volume_ratio": time_ratio,
            "peak_mib_ratio": round(max(big["stage_peak_mib"].values()) / max(small["stage_peak_mib"].values()), 3),
            "stage_peak_mib_ratio": mem_ratio,
            "sizes": [small["volumes"], big["volumes"]]}


def seed_store(previous: Path | None, work: Path) -> int:
    """Copy the previous size's feature store (its configuration, reduction basis and cases, not its
    stage record) into ``work/features`` (``--grow-store``); returns the number of cases copied."""
    src, dst = (previous / "features") if previous else None, work / "features"
    if src is None or not (src / "cases").is_dir() or dst.exists():
        return 0
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("stage.json"))
    return sum(1 for p in (dst / "cases").iterdir() if p.is_dir())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    ap.add_argument("--split", type=Path, default=None, help="default: DATA/splits.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between memory samples")
    ap.add_argument("--grow-store", action="store_true",
                    help="seed each size's feature store with the previous size's (module docstring)")
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args(argv)
    split = json.loads((args.split or args.data / "splits.json").read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    rows, previous = [], None
    for n in sorted(args.sizes):
        split_file = args.work / f"split_{n}.json"
        write_json(split_file, split_of_size(split, n))
        work = args.work / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        seeded = seed_store(previous, work) if args.grow_store else 0
        previous = work
        run_argv = ["run", "-i", str(args.data), "--split", str(split_file), "-o", str(work),
                    "--preset", args.preset, "--rounds", "1", "--max-unlabeled", str(n - 1), "--max-test", "0",
                    "--quiet"]
        if args.threads:
            run_argv += ["--threads", str(args.threads)]
        load = os.getloadavg()[0]
        row = {"volumes": n, "command": "semisam-o1 " + shlex.join(run_argv), "load_1min_before": round(load, 2),
               **run_size([sys.executable, "-m", "semisam_o1", *run_argv], args.work / f"n{n}.log", args.interval)}
        row["encoded"] = n - seeded
        row["stage_seconds_per_volume"] = per_volume(row)
        row["seconds_per_volume"] = round(sum(row["stage_seconds_per_volume"].values()), 2)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("volumes", "encoded", "wall_s", "stage_seconds_per_volume",
                                              "stage_peak_mib")}), flush=True)
        entry = {"command": "python -m benchmarks.bench_scale " + shlex.join(argv or sys.argv[1:]),
                 "cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "rows": rows, "summary": summarise(rows)}
        if args.write:  # after every size: a run stopped before the largest keeps the sizes it finished
            write_json(args.write, entry)
    print(json.dumps(entry["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
