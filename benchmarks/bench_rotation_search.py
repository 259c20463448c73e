"""Does a rotation search before SyN make the template's registration survive rotated anatomy?

A 2D dataset of ``../shared/data`` (``images/``, ``labels/``, ``pixel_size.csv``, ``splits.json``):
the template registered to each of the first ``--cases`` pool images by antspyx SyN (1 ITK thread,
seed 1) twice, in one process: from ANTs' centre-of-mass start (what ``semisam_o1.methods.registration``
does) and from ``ants.affine_initializer`` (antsAI: a multi-start search over rotations in
``--search-degrees`` steps over the whole circle, 10 local iterations each) passed as SyN's
``initial_transform``. Scored by the warped label's Dice against the real mask (benchmark only).

    python -m benchmarks.bench_rotation_search --data ../shared/data/hc18 --cases 16 \\
        --write benchmarks/results/experiments/registration_rotation_search.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core.files import write_json_key
from semisam_o1.data.folder_input import read_pixel_sizes
from semisam_o1.methods.metrics import dice


def _load(root: Path, folder: str, case: str, pixel: float):
    import ants
    from PIL import Image

    path = next(p for p in sorted((root / folder).iterdir()) if p.name.startswith(case))
    arr = np.asarray(Image.open(path).convert("L"), np.float32).T
    return ants.from_numpy(np.ascontiguousarray(arr), spacing=(pixel, pixel))


def measure(root: Path, n: int, degrees: float) -> list[dict]:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    ants.config._random_seed = 1
    split = json.loads((root / "splits.json").read_text())
    t = split["template"]
    px = read_pixel_sizes(root / "pixel_size.csv", [t, *split["unlabeled"][:n]])
    t_img, t_lab = _load(root, "images", t, px[t]), _load(root, "labels", t, px[t])
    rows = []
    for case in split["unlabeled"][:n]:
        img, lab = _load(root, "images", case, px[case]), _load(root, "labels", case, px[case])
        row = {"case": case}
        for mode in ("centre_of_mass", "rotation_search"):
            t0 = time.perf_counter()
            kw = {}
            if mode == "rotation_search":
                kw["initial_transform"] = ants.affine_initializer(img, t_img, search_factor=degrees, radian_fraction=1.0,
                                                                  local_search_iterations=10)
            reg = ants.registration(img, t_img, type_of_transform="SyN", **kw)
            warped = ants.apply_transforms(img, t_lab, reg["fwdtransforms"], interpolator="genericLabel").numpy()
            row[mode] = {"dice": round(dice(warped > 0.5, lab.numpy() > 0.5), 4), "seconds": round(time.perf_counter() - t0, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--search-degrees", type=float, default=20.0)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = measure(args.data, args.cases, args.search_degrees)
    mean = {m: {k: round(float(np.mean([r[m][k] for r in rows])), 4) for k in ("dice", "seconds")}
            for m in ("centre_of_mass", "rotation_search")}
    better = sum(r["rotation_search"]["dice"] > r["centre_of_mass"]["dice"] for r in rows)
    entry = {"command": "python -m benchmarks.bench_rotation_search " + shlex.join(argv or sys.argv[1:]),
             "cpu": cpu_model(), "load_1min": round(os.getloadavg()[0], 2), "cases": len(rows), "mean": mean,
             "rotation_search_better_cases": better, "per_case": rows}
    print(json.dumps({"mean": mean, "better": better}))
    if args.write:
        write_json_key(args.write, args.data.name, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
