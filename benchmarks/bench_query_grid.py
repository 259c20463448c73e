"""Propagate's query grid: every 2nd voxel (``--query-grid voxels``) against no finer than the
features' cells (``--query-grid cells``), seconds per case and round-0 pool Dice.

For each finished run folder given (``WORK``, whose ``round0/pseudo/stage.json`` holds the propagate
settings the run used), the propagate stage is run again twice with those settings, once per query
grid, into ``--scratch``; each pseudo-label is compared with the real label (read by this benchmark
only: the run's dataset's ``labelsTr`` when it has the case, else ``--truth DIR`` of masks named like
the images). Both grids run in one process, one after the other, so their seconds compare.

    python -m benchmarks.bench_query_grid --runs WORK_A WORK_B ... --names A B ... \\
        [--truth DIR_A DIR_B ...] --scratch /tmp/qgrid --write benchmarks/results/encode.json

Updates the key ``propagate_working_spacing`` of ``encode.json`` (issue: "propagate at the working
spacing or on the feature cells"): per dataset (``datasets``; a later call replaces the rows of the
datasets it measures and keeps the others) both grids' seconds per case, mean Dice, the strides used,
the command and CPU of its measurement; ``speedup`` (per dataset, seconds-per-case ratio voxels /
cells; 1.0 where the strides are equal) and ``dice_loss`` per dataset (voxels' mean Dice minus
cells').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.folder_input import list_images
from semisam_o1.data.images import read_label_values
from semisam_o1.data.store import FeatureStore
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.methods.template_vote import MethodOptions, query_strides
from semisam_o1.stages.propagate import PropagateSettings, propagate

REPO = Path(__file__).resolve().parents[1]
GRIDS = ("voxels", "cells")
KEY = "propagate_working_spacing"


def _truth_files(dataset: Path, truth: Path | None) -> dict[str, Path]:
    files = {p.name.split(".")[0]: p for p in (dataset / "labelsTr").glob("*")}
    if truth is not None:
        files.update(list_images(truth, "--truth"))
    return files


def _settings(work: Path, grid: str, out: Path) -> PropagateSettings:
    signed = json.loads((work / "round0" / "pseudo" / "stage.json").read_text())["signed"]["settings"]
    names = {f.name for f in dataclasses.fields(PropagateSettings)}
    kw = {k: v for k, v in signed.items() if k in names}
    kw.update(query_grid=grid, output=str(out), quiet=True)
    return PropagateSettings(**kw)


def _strides(s: PropagateSettings) -> list[list[int]]:
    """The distinct query strides ``cells`` takes over the run's cases."""
    store = FeatureStore(s.features)
    axes = tuple(s.axes) if s.axes else store.axes
    params = MethodOptions(query_grid="cells", query_stride=s.query_stride)
    return sorted({tuple(query_strides(params, axes, store.load(c))) for c in s.cases})


def measure(work: Path, truth: Path | None, scratch: Path) -> dict:
    """Both grids on one run's pool: seconds per case, mean foreground Dice, per-case Dice."""
    row, files = {}, None
    for grid in GRIDS:
        out = scratch / work.name / grid
        s = _settings(work, grid, out)
        files = files or _truth_files(Path(s.input), truth)
        t0 = time.perf_counter()
        propagate(s)
        sec = (time.perf_counter() - t0) / len(s.cases)
        dice = []
        for case in s.cases:
            gt = read_label_values(files[case]).array
            classes = [int(v) for v in np.unique(gt) if v]
            dice.append(mean_dice(read_label_values(find_case_file(out, case)).array, gt, classes))
        row[grid] = {"seconds_per_case": round(sec, 3), "mean_dice": round(float(np.mean(dice)), 4),
                     "cases": len(s.cases)}
    row["cells"]["strides"] = [list(t) for t in _strides(s)]
    row["speedup"] = round(row["voxels"]["seconds_per_case"] / row["cells"]["seconds_per_case"], 2)
    row["dice_loss"] = round(row["voxels"]["mean_dice"] - row["cells"]["mean_dice"], 4)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="finished run folders (WORK)")
    ap.add_argument("--names", nargs="+", required=True, help="a dataset name per run")
    ap.add_argument("--truth", nargs="*", default=None,
                    help="per run, a folder of real masks named like the images, or - (labelsTr is used)")
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--write", type=Path, default=REPO / "benchmarks" / "results" / "encode.json")
    args = ap.parse_args(argv)
    truths = args.truth or ["-"] * len(args.runs)
    command = "python -m benchmarks.bench_query_grid " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        rows = json.loads(args.write.read_text())[KEY]["datasets"]
    except (OSError, ValueError, KeyError):
        rows = {}
    for work, name, truth in zip(args.runs, args.names, truths):
        rows[name] = {**measure(work, None if truth == "-" else Path(truth), args.scratch),
                      "command": command, "cpu": cpu_model()}
        print(name, json.dumps(rows[name]), flush=True)
    entry = {"what": "propagate --query-grid voxels (every 2nd voxel) vs cells (no finer than the feature "
                     "cells), both grids in one process per dataset",
             "speedup": {n: r["speedup"] for n, r in rows.items()},
             "dice_loss": {n: r["dice_loss"] for n, r in rows.items()}, "datasets": rows}
    write_json_key(args.write, KEY, entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
