"""Faults a long job meets: the disk filling up during encode, train and predict (a small tmpfs:
one line naming what could not be written, nothing half-written, the same command resumes once
space is freed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "semisam_o1", *[str(a) for a in args]]


def _one_error_line(out: subprocess.CompletedProcess, code: int = 2) -> str:
    err = [line for line in out.stderr.decode().strip().splitlines() if "warning" not in line]
    assert out.returncode == code, out.stderr.decode()
    assert len(err) == 1, err
    return err[0]


def _pool_labels(cohort, folder: Path) -> Path:
    """The pool cases' real labels as a stand-in for pseudo-labels (what train reads from -l)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cohort.unlabeled[:2]:
        shutil.copy(cohort.root / "labelsTr" / f"{case}.nii.gz", folder)
    return folder


def test_disk_full_during_encode_then_resume(tmp_path, cohort):
    cases = [cohort.template, cohort.unlabeled[0]]
    with helpers.small_filesystem(tmp_path / "fs", 300) as fs:
        cmd = _cli("encode", "-i", cohort.root, "-o", fs.path / "features", "--cases", *cases, "--quiet",
                   "--threads", "2")
        line = _one_error_line(subprocess.run(cmd, capture_output=True, timeout=900))
        assert "No space left" in line and "features" in line
        cases_dir = fs.path / "features" / "cases"
        assert not cases_dir.is_dir() or all(p.name.startswith(".") is False and (p / "meta.json").is_file()
                                             for p in cases_dir.iterdir())  # no half-written case
        fs.resize(256 * 1024)
        out = subprocess.run(cmd, capture_output=True, timeout=900)
        assert out.returncode == 0, out.stderr.decode()
        assert sorted(p.name for p in cases_dir.iterdir()) == sorted(cases)


def test_disk_full_during_train_then_resume(tmp_path, cohort):
    labels = _pool_labels(cohort, tmp_path / "labels")
    with helpers.small_filesystem(tmp_path / "fs", 16) as fs:
        model = fs.path / "model"
        cmd = _cli("train", "-i", cohort.root, "-l", labels, "--template", cohort.template, "--cases",
                   *cohort.unlabeled[:2], "-o", model, "--preset", "quick", "--quiet", "--threads", "2")
        line = _one_error_line(subprocess.run(cmd, capture_output=True, timeout=600))
        assert "No space left" in line and str(model) in line
        assert not (model / "model.pt").exists() and not list(model.glob(".*tmp*"))
        fs.resize(64 * 1024)
        out = subprocess.run(cmd, capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr.decode()
        assert (model / "model.pt").is_file() and json.loads((model / "stage.json").read_text())["finished"]


def test_disk_full_during_predict_then_resume(tmp_path, cohort):
    labels = _pool_labels(cohort, tmp_path / "labels")
    model = tmp_path / "model"
    out = subprocess.run(_cli("train", "-i", cohort.root, "-l", labels, "--template", cohort.template, "--cases",
                              *cohort.unlabeled[:2], "-o", model, "--preset", "quick", "--quiet", "--threads", "2"),
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr.decode()
    with helpers.small_filesystem(tmp_path / "fs", 12) as fs:
        pred = fs.path / "pred"
        cmd = _cli("predict", "-i", cohort.root, "-m", model, "-o", pred, "--cases", *cohort.test, "--quiet",
                   "--threads", "2")
        line = _one_error_line(subprocess.run(cmd, capture_output=True, timeout=600))
        assert "No space left" in line and str(pred) in line
        assert not list(pred.rglob(".*tmp*"))
        fs.resize(64 * 1024)
        out = subprocess.run(cmd, capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr.decode()
        assert all((pred / f"{c}.nii.gz").is_file() for c in cohort.test)
