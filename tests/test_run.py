"""End to end: `semisam-o1 run --preset quick` (2 rounds, case selection, voxel refinement) on
the test cohort (a few real Hippocampus cases, or the synthetic cohort), killed after propagate
and resumed without re-encoding; and every way a run must refuse to start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "semisam_o1", *args]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def _one_line(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode().strip().splitlines()
    assert out.returncode == 2, out.stderr.decode()
    assert len(err) == 1, err
    return err[0]


def _planar(lab: np.ndarray, axis: int) -> bool:
    """At most one foreground class in every slice across ``axis``."""
    return all(len(set(np.unique(np.take(lab, j, axis=axis))) - {0}) <= 1 for j in range(lab.shape[axis]))


def _finished(folder: Path) -> bool:
    rec = folder / "stage.json"
    try:
        return rec.is_file() and json.loads(rec.read_text()).get("finished", False)
    except ValueError:  # being written
        return False


def test_run_quick_killed_after_propagate_resumes(tmp_path, cohort):
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = _cli("run", "-i", str(cohort.root), "--split", str(cohort.split_file), "-o", str(work),
               "--preset", "quick", "--rounds", "2", "--select", "0.5", "--refine-mode", "voxel", "--threads", "2",
               "--referee", "none", "--quiet")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 900
    while not _finished(work / "round0" / "pseudo"):
        assert proc.poll() is None, "run ended before propagate finished:\n" + proc.stdout.read().decode()
        assert time.monotonic() < deadline, "propagate did not finish in 15 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed halfway: during round 1's training
    proc.wait()
    assert not (work / "report.json").exists()

    store_files = sorted(p for p in (work / "features").rglob("*") if p.is_file() and p.name != "stage.json")
    assert store_files
    mtimes = {p: p.stat().st_mtime_ns for p in store_files}

    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=1800)
    log = out.stdout.decode()
    assert out.returncode == 0, log
    assert "encode: done earlier" in log and "propagate: done earlier" in log
    assert {p: p.stat().st_mtime_ns for p in store_files} == mtimes  # nothing re-encoded

    pool = cohort.unlabeled[:3]  # the quick preset's pool
    report = json.loads((work / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    r0 = report["rounds"][0]["pseudo_label_dice_unlabeled"]
    assert r0["cases"] == 3
    assert all(0.0 <= d <= 1.0 for d in r0["dice"].values())
    # round-0 pseudo-labels from one template carry real signal
    assert r0["mean_foreground_dice"] > (0.3 if cohort.real else 0.5)
    assert report["final_test_metrics"] is not None
    pred1 = report["rounds"][1]["prediction_dice_unlabeled"]  # the UNet's pool predictions, before refinement
    assert pred1["cases"] == 3 and all(0.0 <= d <= 1.0 for d in pred1["dice"].values())
    # case selection after round 1: ceil(0.5 * 3) = 2 pool cases, ranked by the agreement of
    # their round-0 label with round 1's prediction; round 2 trains on the template + them
    sel = json.loads((work / "round1" / "selection.json").read_text())
    assert sel["n_selected"] == 2 and set(sel["selected"]) <= set(pool)
    ag = sel["agreement"]
    assert min(ag[c] for c in sel["selected"]) >= max(ag[c] for c in pool if c not in sel["selected"])
    cfg2 = json.loads((work / "round2" / "model" / "config.json").read_text())
    assert sorted(cfg2["training_cases"]) == sorted([cohort.template] + sel["selected"])
    assert cfg2["template_share"] is None  # run's default: the template is one volume among the others
    assert cfg2["spatial_aug"] == 0.0  # run's default: no random affine of the training volumes
    assert report["selection"]["n_selected"] == 2
    # the position term's check: the cohort's crops share a field of view (registration referee)
    pos = json.loads((work / "referee" / "position.json").read_text())
    assert pos["applies"] and set(pos["offsets"]) == set(pool) and pos["median_offset"] < pos["limit"]
    _check_stage_records(work)
    _check_class_planes(work, cohort, pool)
    for png in ("report_dice_by_round.png", "report_montage.png"):
        data = (work / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    _check_outputs_keep_grid(work, cohort)
    _check_referee_keeps_round0(cmd, env, work, cohort, pool)


def _check_referee_keeps_round0(cmd, env, work: Path, cohort, pool: list[str]) -> None:
    """The same run again with the registration referee (a neutral setting: every stage is done
    earlier): the quick preset's 4-iteration UNets label far worse than the propagated labels, so
    the label-free rule keeps round 0's labels, stops after round 1, and hands back the better of
    the networks by the referee; final/ and the report follow the choice."""
    cmd = [c for c in cmd if c not in ("--referee", "none")]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=1800)
    log = out.stdout.decode()
    assert out.returncode == 0, log
    assert "round1/train: done earlier" in log and "no further rounds" in log
    report = json.loads((work / "report.json").read_text())
    assert report["chosen"]["labels_round"] == 0 and report["chosen"]["model_round"] == 1
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["final_test_metrics"] == report["rounds"][1]["test_metrics"]
    for r in (0, 1):
        ev = json.loads((work / f"round{r}" / "round.json").read_text())
        assert sorted(ev["referee"]) == sorted(pool) and all(0.0 <= v <= 1.0 for v in ev["referee"].values())
    e0, e1 = (json.loads((work / f"round{r}" / "round.json").read_text())["referee"] for r in (0, 1))
    assert np.mean(list(e0.values())) > np.mean(list(e1.values()))
    for case in pool:  # WORK/final's labels are round 0's
        kept = nib.load(str(work / "final" / "labels" / f"{case}.nii.gz"))
        r0 = nib.load(str(work / "round0" / "pseudo" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(kept.dataobj), np.asarray(r0.dataobj))
    assert json.loads((work / "final" / "report.json").read_text())["final"]["model_round"] == 1


def _check_stage_records(work: Path) -> None:
    """Every stage folder has a finished record whose command reproduces that stage alone; round 1
    refines (voxel, asked for), the last round does not (its pseudo-labels are its predictions);
    round r trains on its own random stream (--round r)."""
    for folder, stage in [("features", "encode"), ("round0/pseudo", "propagate"), ("round1/model", "train"),
                          ("round1/pred", "predict"), ("round1/pseudo", "refine"), ("round2/model", "train"),
                          ("round2/test", "predict")]:
        rec = json.loads((work / folder / "stage.json").read_text())
        assert rec["finished"] and rec["stage"] == stage, folder
        assert rec["command"].startswith(f"semisam-o1 {stage} ") and " run " not in rec["command"]
    assert "--round 2" in json.loads((work / "round2" / "model" / "stage.json").read_text())["command"]
    assert not (work / "round2" / "pseudo" / "stage.json").exists()


def _check_class_planes(work: Path, cohort, pool: list[str]) -> None:
    """The rule learned from the template's label (classes across axis 1, the RAS files' coronal
    axis) is in the report and holds in the refined labels of round 1."""
    rule = json.loads((work / "round0" / "pseudo" / "class_planes.json").read_text())
    assert rule["axis"] == 1
    assert report_rule(work) == rule["order"]
    for case in pool:
        lab = np.asarray(nib.load(str(work / "round1" / "pseudo" / f"{case}.nii.gz")).dataobj)
        assert _planar(lab, 1)
        assert (work / "round2" / "pseudo" / f"{case}.nii.gz").read_bytes() == \
            (work / "round2" / "pred" / f"{case}.nii.gz").read_bytes()


def report_rule(work: Path) -> list[int]:
    return json.loads((work / "report.json").read_text())["config"]["class_planes_rule"]["order"]


def _check_outputs_keep_grid(work: Path, cohort) -> None:
    """Every test prediction keeps its input's grid, is an integer label volume, and has the class planes."""
    for case in cohort.test:
        pred = nib.load(str(work / "round1" / "test" / f"{case}.nii.gz"))
        img = nib.load(str(cohort.root / "imagesTr" / f"{case}.nii.gz"))
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine)
        assert np.issubdtype(pred.get_data_dtype(), np.integer)
        assert _planar(np.asarray(pred.dataobj), 1)


def test_run_bad_split_is_one_line(tmp_path, cohort):
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"template": cohort.template, "unlabeled": ["no_such_case"], "test": []}))
    line = _one_line(_run("run", "-i", str(cohort.root), "--split", str(bad), "-o", str(tmp_path / "w")))
    assert "no_such_case" in line
    assert not (tmp_path / "w").exists()


def test_run_refuses_to_resume_with_other_settings(tmp_path, cohort):
    work = tmp_path / "w"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"settings": {"preset": "quick", "refine_mode": "voxel", "seed": 0}}))
    line = _one_line(_run("run", "-i", str(cohort.root), "--split", str(cohort.split_file), "-o", str(work),
                          "--preset", "quick", "--refine-mode", "none"))
    assert "refine_mode='voxel'" in line and "run.json" in line
    assert sorted(p.name for p in work.iterdir()) == ["run.json"]  # nothing started


@pytest.mark.parametrize("fault", ["output is a file", "read-only parent", "cuda without a GPU"])
def test_run_refuses_an_unusable_output_or_device_before_writing(tmp_path, cohort, fault):
    args = ["run", "-i", str(cohort.root), "--split", str(cohort.split_file), "--preset", "quick", "--quiet"]
    if fault == "output is a file":
        out = tmp_path / "work"
        out.write_text("not a folder")
        line = _one_line(_run(*args, "-o", str(out)))
        assert "existing file" in line and out.read_text() == "not a folder"
        return
    if fault == "read-only parent":
        if os.geteuid() == 0:  # root writes anywhere: use a path under a regular file instead
            parent = tmp_path / "file"
            parent.write_text("x")
        else:
            parent = tmp_path / "ro"
            parent.mkdir(mode=0o555)
        line = _one_line(_run(*args, "-o", str(parent / "work")))
        assert str(parent) in line
        return
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = _one_line(_run(*args, "-o", str(tmp_path / "w"), "--device", "cuda"))
    assert "--device cuda" in line
    assert not (tmp_path / "w").exists()


def test_run_stage_that_reports_its_own_error_gives_one_line(tmp_path, cohort, monkeypatch, capsys):
    """A stage that prints its own error lines and raises ReportedError (encode does, per
    unreadable case): run exits with its code without adding a line, and no later stage starts."""
    from semisam_o1 import cli
    from semisam_o1.core.errors import ReportedError
    from semisam_o1.stages import encode

    def failing_encode(settings):
        print("semisam-o1 encode: error: imagesTr/x.nii.gz: cannot read the voxel data", file=sys.stderr)
        raise ReportedError("encode failed", 2)

    monkeypatch.setattr(encode, "STAGE", failing_encode)
    rc = cli.main(["run", "-i", str(cohort.root), "--split", str(cohort.split_file), "-o", str(tmp_path / "w"),
                   "--preset", "quick", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["semisam-o1 encode: error: imagesTr/x.nii.gz: cannot read the voxel data"]
    assert not (tmp_path / "w" / "round0").exists()


def test_run_settings_generate_the_command_line():
    """Every option of run is defined once (a field); the parser is generated from the fields and
    the recorded command parses back to the same settings."""
    import shlex

    from semisam_o1.cli import build_parser
    from semisam_o1.core.settings import command_line, from_namespace
    from semisam_o1.pipeline.run import RunSettings

    s = RunSettings(input=Path("/data/my set"), split=Path("s.json"), output=Path("w"), preset="demo",
                    refine_mode="voxel", select=0.5, seed=3)
    assert s.rounds == 2 and s.iterations is None and (s.plan, s.budget_minutes) == ("auto", 4.0)  # the preset's
    argv = shlex.split(command_line("run", s))[1:]
    back = from_namespace(RunSettings, build_parser().parse_args(argv))
    assert back == s


def test_second_run_on_a_folder_in_use_is_refused(tmp_path, cohort):
    """A work folder held by another run (its lock): one line naming the holder's process id, exit 2."""
    from semisam_o1.core.resume import FolderLock

    work = tmp_path / "w"
    with FolderLock(work):
        line = _one_line(_run("run", "-i", str(cohort.root), "--split", str(cohort.split_file), "-o", str(work),
                              "--preset", "quick", "--quiet"))
    assert "already in use" in line and str(os.getpid()) in line
    with FolderLock(work):  # released: it can be taken again
        pass


def test_run_plans_the_network_and_the_encoder_from_the_data(tmp_path):
    """--plan auto (the demo / cpu / paper presets' default): WORK/plan.json is written first, encode
    slices along the plan's axes, and round 1 trains the planned network (patch, strides,
    channels, flips) at the plan's working spacing; the same command resumes with the same plan."""
    root = tmp_path / "aniso"
    helpers.make_cohort(root, n_unlabeled=2, n_test=1, shape=(24, 24, 12), spacing=(1.0, 1.0, 2.5))
    work = tmp_path / "w"
    args = ("run", "-i", str(root), "--split", str(root / "splits.json"), "-o", str(work), "--preset", "quick",
            "--plan", "auto", "--budget-minutes", "0.05", "--iterations", "3", "--threads", "2", "--quiet")
    out = _run(*args, timeout=600)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    plan = json.loads((work / "plan.json").read_text())["decisions"]
    assert plan["encode_axes"]["value"] == [2]  # 1 x 2.5 mm slice planes are strips: left out
    store = json.loads((work / "features" / "store.json").read_text())
    assert store["axes"] == plan["encode_axes"]["value"]
    cfg = json.loads((work / "round1" / "model" / "config.json").read_text())
    assert cfg["patch"] == plan["patch"]["value"] and cfg["preset_params"]["flip_axes"] == plan["flip_axes"]["value"]
    assert [list(s) for s in cfg["net"]["strides"]] == plan["strides"]["value"]
    assert cfg["net"]["channels"] == plan["channels"]["value"] and cfg["iterations"] == 3
    assert cfg["spacing"] == plan["spacing"]["value"]
    before = (work / "plan.json").read_bytes()
    again = _run(*args, timeout=600)
    assert again.returncode == 0 and (work / "plan.json").read_bytes() == before


def test_an_equivalent_path_is_the_same_run(tmp_path, monkeypatch, cohort):
    """A work folder started with relative paths (-i ../ds, -o w) is the same run when resumed with
    their absolute forms (paths compared resolved); another dataset is still refused."""
    from semisam_o1.core.errors import InputError
    from semisam_o1.pipeline.run import RunSettings, Stages, check_settings

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    rel = Path(os.path.relpath(cohort.root, here))
    first = RunSettings(input=rel, split=Path(os.path.relpath(cohort.split_file, here)), output=Path("../w"),
                        preset="quick")
    (tmp_path / "w").mkdir()
    Stages(tmp_path / "w", first).save()
    same = RunSettings(input=cohort.root.resolve(), split=cohort.split_file.resolve(), output=tmp_path / "w",
                       preset="quick")
    check_settings(tmp_path / "w", same)
    other = RunSettings(input=tmp_path, split=cohort.split_file, output=tmp_path / "w", preset="quick")
    with pytest.raises(InputError, match="started with input="):
        check_settings(tmp_path / "w", other)
