"""A 2D dataset of ../shared/data (images/, labels/, splits.json) end to end, with its baselines.

1. The split as two folders of links (``ROOT/<dataset>/pool``: template + unlabeled; ``test``), as a
   user's folders would be.
2. ``semisam-o1 run --images pool --template-image ... --template-label ... --test-images test
   --test-labels labels -o ROOT/work_<dataset> --preset cpu`` (``--pixel-size`` when the dataset
   has ``pixel_size.csv``): the user's command, no dataset flag. A finished run is resumed (nothing
   redone).
3. Full supervision: the same planned 2D network and budget (``--plan WORK/plan.json``) trained on the
   REAL masks of template + pool (``benchmarks.bench_full_supervision``), scored on the test images.
4. Two one-template baselines on the same test images: the template mask pasted at the image centre
   (in mm when pixel sizes are known; :func:`semisam_o1.methods.paste.paste_at_centre`) and the
   template registered to each image (ANTs affine then SyN, :func:`semisam_o1.methods.registration.
   registration_labels`, the referee's registration).
5. The pool Dice of the round-0 and of the handed-back labels against the real masks (read by this
   benchmark only).

    python -m benchmarks.bench_2d --dataset ../shared/data/ph2 --name "PH2 (2D)" --root /work/bench2d

Writes the key ``--name`` of benchmarks/results/datasets.json, with the keys of the 3D entries
(benchmarks/record_datasets.py) plus ``paste_test_dice`` and ``per_image_seconds``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import bench_full_supervision as FS
from benchmarks.machine import cpu_model
from benchmarks.record_2d import pool_dice
from benchmarks.record_datasets import finished_run
from semisam_o1.core.files import write_json_key
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.folder_input import place_file, read_pixel_sizes
from semisam_o1.data.images import read_label_values
from semisam_o1.methods.metrics import mean_dice
from semisam_o1.methods.paste import paste_at_centre
from semisam_o1.methods.registration import registration_labels
from semisam_o1.stages.plan import read_plan

REPO = Path(__file__).resolve().parents[1]


def link_split(data: Path, root: Path) -> tuple[Path, Path, dict]:
    """``root/pool`` (template + unlabeled) and ``root/test``: links to ``data/images``."""
    split = json.loads((data / "splits.json").read_text())
    files = {p.name.split(".")[0]: p for p in (data / "images").iterdir()}
    folders = {"pool": [split["template"], *split["unlabeled"]], "test": split["test"]}
    for part, cases in folders.items():
        (root / part).mkdir(parents=True, exist_ok=True)
        for case in cases:
            link = root / part / files[case].name
            if not link.is_symlink():
                link.symlink_to(files[case].resolve())
    return root / "pool", root / "test", split


def run_args(data: Path, root: Path, work: Path, split: dict, preset: str, rounds: int | None = None) -> list[str]:
    """The user's ``semisam-o1 run`` arguments for the linked folders."""
    pool, test = root / "pool", root / "test"
    template = next(p for p in pool.iterdir() if p.name.split(".")[0] == split["template"])
    args = ["run", "--images", str(pool), "--template-image", str(template),
            "--template-label", str(data / "labels" / template.name), "--test-images", str(test),
            "--test-labels", str(data / "labels"), "-o", str(work), "--preset", preset]
    if (data / "pixel_size.csv").is_file():
        args += ["--pixel-size", str(data / "pixel_size.csv")]
    if rounds is not None:
        args += ["--rounds", str(rounds)]
    return args


def run_pipeline(args: list[str]) -> float:
    """Run (or resume) the pipeline in a child process; its wall seconds now."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "semisam_o1", *args], check=True)
    return time.time() - t0


def full_supervision_dataset(work: Path, data: Path, pool: list[str], out: Path) -> Path:
    """``out``: WORK/dataset's images, its template and test labels, and the pool's REAL masks (converted
    as the run converts the template's: :func:`semisam_o1.data.folder_input.place_file`)."""
    ds = work / "dataset"
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "splits.json", "imagesTr"):
        if not (out / name).exists():
            (out / name).symlink_to((ds / name).resolve())
    for lab in (ds / "labelsTr").iterdir():
        if not (out / "labelsTr" / lab.name).exists():
            (out / "labelsTr" / lab.name).symlink_to(lab.resolve())
    masks = {p.name.split(".")[0]: p for p in (data / "labels").iterdir()}
    sizes = read_pixel_sizes(data / "pixel_size.csv", pool) if (data / "pixel_size.csv").is_file() else {}
    for case in pool:
        if not (out / "labelsTr" / f"{case}.nii.gz").exists():
            place_file(masks[case], out / "labelsTr", case, label=True, pixel_size=sizes.get(case))
    return out


def full_supervision(work: Path, data: Path, pool: list[str], root: Path, preset: str) -> dict:
    """Train the run's planned network (its plan.json; without one, ``preset``'s) on the real masks of
    template + pool; test metrics."""
    fs = full_supervision_dataset(work, data, pool, root / "full_supervision_dataset")
    plan = ["--plan", str(work / "plan.json")] if (work / "plan.json").is_file() else []
    args = FS.parse_args(["--data", str(fs), "--split", str(fs / "splits.json"), "--work",
                          str(root / "full_supervision"), "--preset", preset, *plan])
    return FS.make_entry(FS.run_stages(args))


def baselines(work: Path, split: dict, root: Path) -> dict:
    """Mean foreground Dice on the test images of the template mask pasted at the centre and registered."""
    ds = Dataset(work / "dataset")
    template = split["template"]
    t_label = ds.read_label(template)
    test = list(split["test"])
    warped = registration_labels(ds, template, test, root / "registration", threads=1, quiet=False)
    paste, reg = [], []
    for case in test:
        img = ds.read_image(case)
        gt = ds.read_label(case, reference=img).array
        classes = [int(v) for v in np.unique(gt) if v] or [1]
        pasted = paste_at_centre(t_label.array, gt.shape, t_label.spacing, img.spacing)
        paste.append(mean_dice(pasted, gt, classes))
        reg.append(mean_dice(read_label_values(warped[case]).array, gt, classes))
    return {"paste": float(np.mean(paste)), "registration": float(np.mean(reg)), "n_test": len(test)}


def predict_seconds_per_image(stage_seconds: dict, n_pool: int, n_test: int) -> dict:
    """``{"predict": s}``: every round's pool and test predictions over the images they predicted
    (the stages ``roundN/predict`` and ``roundN/predict_test``); empty when the run predicted nothing."""
    seconds = images = 0.0
    for stage, sec in stage_seconds.items():
        if isinstance(sec, (int, float)) and stage.startswith("round"):
            if stage.endswith("/predict"):
                seconds, images = seconds + sec, images + n_pool
            elif stage.endswith("/predict_test"):
                seconds, images = seconds + sec, images + n_test
    return {"predict": round(seconds / images, 2)} if images else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True, help="images/, labels/, splits.json[, pixel_size.csv]")
    ap.add_argument("--name", required=True, help="the datasets.json key")
    ap.add_argument("--root", type=Path, required=True, help="links, the run's WORK and the baselines' folders")
    ap.add_argument("--work", type=Path, default=None, help="the run's WORK (default: ROOT/<dataset>/work)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--rounds", type=int, default=None, help="run's --rounds (default: the preset's)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "datasets.json")
    a = ap.parse_args(argv)
    data, root = a.dataset.resolve(), a.root.resolve() / a.dataset.name
    _, _, split = link_split(data, root)
    work = (a.work or root / "work").resolve()
    args = run_args(data, root, work, split, a.preset, a.rounds)
    seconds_now = run_pipeline(args)
    r = finished_run(work)
    report = r["report"]
    pool = [c for c in split["unlabeled"] if c != split["template"]]
    round0, final_pool = pool_dice(work, data / "labels", pool)
    final_test = float(report["final_test_metrics"]["mean_foreground"]["dice"])
    fs = full_supervision(work, data, [split["template"], *pool], root, a.preset)
    fs_dice = float(fs["test"]["mean_foreground"]["dice"])
    base = baselines(work, split, root)
    stage_seconds = r["run"].get("seconds") or {}
    n_images = len(pool) + 1 + len(split["test"])
    out = {
        "command": "semisam-o1 " + shlex.join(args),
        "benchmark_command": "python -m benchmarks.bench_2d " + shlex.join(sys.argv[1:] if argv is None else argv),
        "final_test_dice": round(final_test, 4),
        "round0_pool_dice": round(round0, 4),
        "final_pool_dice": round(final_pool, 4),
        "full_supervision_test_dice": round(fs_dice, 4),
        "atlas_syn_test_dice": round(base["registration"], 4),
        "paste_test_dice": round(base["paste"], 4),
        "seconds": round(sum(v for v in stage_seconds.values() if isinstance(v, (int, float))), 1),
        "seconds_this_call": round(seconds_now, 1),
        "per_image_seconds": {k: round(stage_seconds[k] / n_images, 2) for k in ("encode",) if k in stage_seconds}
        | {k: round(stage_seconds[k] / len(pool), 2) for k in ("propagate",) if k in stage_seconds}
        | predict_seconds_per_image(stage_seconds, len(pool), len(split["test"])),
        "plan": read_plan(work / "plan.json")["decisions"] if (work / "plan.json").is_file() else None,
        "n_unlabeled": report["n_unlabeled"],
        "n_test": report["n_test"],
        "whole_split": report["n_unlabeled"] == len(pool) and report["n_test"] == len(split["test"]),
        "chosen": report.get("chosen"),
        "rounds_run": len(report["rounds"]) - 1,
        "stage_seconds": stage_seconds,
        "full_supervision": {k: fs[k] for k in ("stage_commands", "iterations", "train_seconds", "n_training_cases")},
        "targets_met": {"final_test >= 0.90 x full_supervision": final_test >= 0.9 * fs_dice,
                        "final_pool >= round0_pool": final_pool >= round0,
                        "final_test > atlas_syn": final_test > base["registration"],
                        "final_test > paste": final_test > base["paste"]},
        "cpu": cpu_model(),
        "note": "2D (issue #33): pool Dice from masks no stage reads (benchmark only); full supervision = the "
                "run's plan.json network and iterations on the real masks of template + pool",
    }
    write_json_key(a.results, a.name, out)
    print(json.dumps({a.name: {k: v for k, v in out.items() if k not in ("plan", "chosen")}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
