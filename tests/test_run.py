"""End to end: `semisam-o1 run --preset quick` (2 rounds, case selection) on a few real
Hippocampus cases, killed after propagate and resumed without re-encoding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "semisam_o1", *args]


@pytest.fixture(scope="module")
def quick_split(tmp_path_factory, data_root, split) -> Path:
    sp = {"template": split["template"], "unlabeled": split["unlabeled"][:3], "test": split["test"][:2]}
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_text(json.dumps(sp))
    return path


def _one_class_per_coronal_slice(lab) -> bool:
    """At most one foreground class in every coronal slice (RAS files: axis 1): the template's class planes."""
    return all(len(set(np.unique(lab[:, j])) - {0}) <= 1 for j in range(lab.shape[1]))


def test_run_quick_killed_after_propagate_resumes(tmp_path, data_root, quick_split):
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = _cli("run", "-i", str(data_root), "--split", str(quick_split), "-o", str(work),
               "--preset", "quick", "--rounds", "2", "--select", "0.5", "--refine-mode", "voxel", "--threads", "2", "--quiet")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    marker = work / ".done" / "propagate.json"
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert proc.poll() is None, "run ended before propagate finished:\n" + proc.stdout.read().decode()
        assert time.monotonic() < deadline, "propagate did not finish in 15 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed halfway: during round 1's training
    proc.wait()
    assert not (work / "report.json").exists()

    store_files = sorted(p for p in (work / "features").rglob("*") if p.is_file())
    assert store_files
    mtimes = {p: p.stat().st_mtime_ns for p in store_files}

    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=1800)
    log = out.stdout.decode()
    assert out.returncode == 0, log
    assert "encode: done earlier" in log and "propagate: done earlier" in log
    assert {p: p.stat().st_mtime_ns for p in store_files} == mtimes  # nothing re-encoded

    report = json.loads((work / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    r0 = report["rounds"][0]["pseudo_label_dice_unlabeled"]
    assert r0["cases"] == 3
    assert all(0.0 <= d <= 1.0 for d in r0["dice"].values())
    # round-0 pseudo-labels from one template must carry real signal on real data
    assert r0["mean_foreground_dice"] > 0.3
    assert report["final_test_metrics"] is not None
    pred1 = report["rounds"][1]["prediction_dice_unlabeled"]  # the UNet's pool predictions, before refinement
    assert pred1["cases"] == 3 and all(0.0 <= d <= 1.0 for d in pred1["dice"].values())
    # case selection after round 1: ceil(0.5 * 3) = 2 pool cases, ranked by the agreement of
    # their round-0 label with round 1's prediction; round 2 trains on the template + them
    sel = json.loads((work / "round1" / "selection.json").read_text())
    pool = json.loads(quick_split.read_text())["unlabeled"]
    assert sel["n_selected"] == 2 and set(sel["selected"]) <= set(pool)
    ag = sel["agreement"]
    assert min(ag[c] for c in sel["selected"]) >= max(ag[c] for c in pool if c not in sel["selected"])
    cfg2 = json.loads((work / "round2" / "model" / "config.json").read_text())
    template = json.loads(quick_split.read_text())["template"]
    assert sorted(cfg2["training_cases"]) == sorted([template] + sel["selected"])
    assert cfg2["template_share"] == 0.1  # the preset's share of patches from the template's real label
    assert cfg2["spatial_aug"] == 0.0  # the preset's: no random affine of the training volumes
    assert report["selection"]["n_selected"] == 2
    # round 1 refines (voxel, asked for); the last round does not: its pseudo-labels are its predictions
    assert (work / ".done" / "round1" / "refine.json").is_file()
    assert not (work / ".done" / "round2" / "refine.json").exists()
    # the refined labels keep the class planes learned from the template (at most one foreground class per
    # coronal slice, RAS files: axis 1)
    assert json.loads((work / "round1" / "pseudo" / "refine.json").read_text())["params"]["class_planes"]["order"] \
        == [2, 1]
    import nibabel as nib

    for case in pool:
        assert _one_class_per_coronal_slice(np.asarray(nib.load(str(work / "round1" / "pseudo" /
                                                                    f"{case}.nii.gz")).dataobj))
    for case in pool:
        assert (work / "round2" / "pseudo" / f"{case}.nii.gz").read_bytes() == \
            (work / "round2" / "pred" / f"{case}.nii.gz").read_bytes()
    for png in ("report_dice_by_round.png", "report_montage.png"):
        data = (work / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # every output keeps its input's grid and is an integer label volume
    for case in json.loads(quick_split.read_text())["test"]:
        pred = nib.load(str(work / "round1" / "test" / f"{case}.nii.gz"))
        img = nib.load(str(data_root / "imagesTr" / f"{case}.nii.gz"))
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine)
        assert np.issubdtype(pred.get_data_dtype(), np.integer)
        # class planes learned from the template (Posterior | Anterior across coronal slices): every
        # prediction has at most one foreground class per coronal slice (RAS files: axis 1)
        assert _one_class_per_coronal_slice(np.asarray(pred.dataobj))
    assert report["config"]["class_planes_rule"]["order"] == [2, 1]
    assert (work / "round0" / "pseudo" / "class_planes.json").is_file()


def test_run_bad_split_is_one_line(tmp_path, data_root):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"template": "hippocampus_001", "unlabeled": ["no_such_case"], "test": []}))
    out = subprocess.run(_cli("run", "-i", str(data_root), "--split", str(bad), "-o", str(tmp_path / "w")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 2
    err = out.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "no_such_case" in err[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("fault", ["corrupt image", "label off its image"])
def test_run_checks_inputs_before_writing(tmp_path, data_root, quick_split, fault):
    """A corrupt pool image or a template label whose grid differs from its image: one line
    naming the file, exit 2, and no work folder (nothing encoded first)."""
    import shutil

    import nibabel as nib

    sp = json.loads(quick_split.read_text())
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(data_root / "dataset.json", root)
    for case in [sp["template"], *sp["unlabeled"], *sp["test"]]:
        shutil.copy(data_root / "imagesTr" / f"{case}.nii.gz", root / "imagesTr")
        shutil.copy(data_root / "labelsTr" / f"{case}.nii.gz", root / "labelsTr")
    if fault == "corrupt image":
        bad = root / "imagesTr" / f"{sp['unlabeled'][1]}.nii.gz"
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad = root / "labelsTr" / f"{sp['template']}.nii.gz"
        img = nib.load(str(bad))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(bad))
    out = subprocess.run(_cli("run", "-i", str(root), "--split", str(quick_split), "-o", str(tmp_path / "w"),
                              "--preset", "quick", "--quiet"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 2
    err = out.stderr.decode().strip().splitlines()
    assert len(err) == 1 and bad.name in err[0]
    assert not (tmp_path / "w").exists()


def test_run_refuses_to_resume_with_other_settings(tmp_path, data_root, quick_split):
    work = tmp_path / "w"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"preset": "quick", "refine_mode": "voxel", "seed": 0}))
    out = subprocess.run(_cli("run", "-i", str(data_root), "--split", str(quick_split), "-o", str(work),
                              "--preset", "quick", "--refine-mode", "none"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 2
    err = out.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "refine_mode='voxel'" in err[0] and "run.json" in err[0]
    assert sorted(p.name for p in work.iterdir()) == ["run.json"]  # nothing started


def test_run_stage_that_reports_its_own_error_gives_one_line(tmp_path, data_root, quick_split, monkeypatch, capsys):
    """A stage that prints its own error and returns 2 (encode does, per unreadable case):
    run exits 2 without adding a second line, and no later stage starts."""
    from semisam_o1 import cli, encode

    def failing_encode(args):
        print("semisam-o1 encode: error: imagesTr/x.nii.gz: cannot read the voxel data", file=sys.stderr)
        return 2

    monkeypatch.setattr(encode, "main", failing_encode)
    rc = cli.main(["run", "-i", str(data_root), "--split", str(quick_split), "-o", str(tmp_path / "w"),
                   "--preset", "quick", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["semisam-o1 encode: error: imagesTr/x.nii.gz: cannot read the voxel data"]
    assert not (tmp_path / "w" / ".done").exists() and not (tmp_path / "w" / "round0").exists()
