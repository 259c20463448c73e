"""Seconds of ``run``'s input validation (:func:`semisam_o1.pipeline.validate.validate_run`) on a dataset's
template + unlabeled split, and the feature-store size estimate against real stores.

    python -m benchmarks.bench_validate --data ../shared/data/hippocampus [--store FEATURES ...]
        [--write benchmarks/results/validate.json]

``--store``: a feature store written by ``encode`` with the default settings (``run``'s); its cases'
shapes are read from their images' headers (``meta.json`` names the image; relative paths from the
current folder, else the shape ``meta.json`` recorded) and the estimate is compared with the bytes
of its files. The result JSON records the command and the CPU (lscpu model name).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import cpu_model


def time_validation(data: Path) -> dict:
    """Seconds of validate_run over the split's template + unlabeled cases (3 rounds, no test)."""
    from semisam_o1.data.dataset import Dataset
    from semisam_o1.pipeline.validate import validate_run

    split = json.loads((data / "splits.json").read_text())
    ds = Dataset(data)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = validate_run(ds, split["template"], split["unlabeled"], [], Path(tmp) / "work", rounds=3, quiet=True)
        seconds = time.perf_counter() - t0
    return {"data": str(data), "volumes": out["cases"], "seconds": round(seconds, 2),
            "store_bytes_estimated": out["store_bytes"], "needed_bytes": out["needed_bytes"]}


def check_store(root: Path) -> dict:
    """The estimate of ``root``'s cases (shapes from the images' headers) against its files' bytes."""
    from semisam_o1.data.images import canonical_shape
    from semisam_o1.data.store import FeatureStore, estimate_store_bytes
    from semisam_o1.pipeline.validate import run_store_geometry

    config = json.loads((root / "store.json").read_text())
    store = FeatureStore(root)
    shapes, from_header = {}, 0
    for case in store.cases():
        meta = json.loads((root / "cases" / case / "meta.json").read_text())
        image = Path(meta.get("image", ""))
        if image.is_file():
            shapes[case], from_header = canonical_shape(image), from_header + 1
        else:
            shapes[case] = tuple(meta["voxel_shape"])
    template = config["reduction"]["case"]
    est = estimate_store_bytes(shapes, shapes[template], run_store_geometry())
    real = store.size_bytes()
    return {"store": str(root), "cases": len(shapes), "shapes_from_headers": from_header, "estimated_bytes": est,
            "real_bytes": real, "error_percent": round(100.0 * (est - real) / real, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, action="append", default=[], help="dataset with splits.json (repeatable)")
    p.add_argument("--store", type=Path, action="append", default=[], help="a feature store to check (repeatable)")
    p.add_argument("--write", type=Path, help="write the result JSON here")
    args = p.parse_args(argv)
    result = {"command": "python -m benchmarks.bench_validate " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_model(), "validation": [time_validation(d) for d in args.data],
              "store_estimate": [check_store(s) for s in args.store]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
