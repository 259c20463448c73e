"""nnU-Net v2 2D datasets as `run -i DATASET --split FILE` (issue #33): ``imagesTr/<case>_0000.png``
(one RGB or greyscale PNG, or nnU-Net's three per-channel files), ``labelsTr/<case>.png``,
``dataset.json`` with ``file_ending`` ``.png``. The folder is converted into ``WORK/dataset`` as
``--images`` is (one reader, :mod:`semisam_o1.data.folder_input`), the RGB cohort trains an RGB
UNet, and ``WORK/final/labels`` holds ``<case>.png`` in each image's size; bad inputs stop with
one line naming the user's file, exit 2, and no ``WORK/dataset`` left behind. A 3D nnU-Net v2
dataset (``_0000.nii.gz``) is still read as it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import helpers
import numpy as np
import pytest
from PIL import Image

from semisam_o1.data.dataset import Dataset
from semisam_o1.data.folder_input import NnUNet2DInput, materialise
from semisam_o1.data.images import read_image, read_label_values
from semisam_o1.pipeline.run import RunSettings


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisam_o1", *map(str, args)], capture_output=True, timeout=600,
                          check=False)


def _one_line(out: subprocess.CompletedProcess) -> str:
    err = [ln for ln in out.stderr.decode().strip().splitlines() if "note:" not in ln]
    assert out.returncode == 2, out.stderr.decode()[-2000:]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet2d")
    ds = helpers.make_nnunet_2d(root / "Dataset001_Lesion", "rgb")
    work = root / "work"
    out = _run("run", "-i", ds["root"], "--split", ds["split"], "--preset", "quick", "-o", work, "--quiet")
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return ds, work


def test_nnunet_2d_dataset_runs_end_to_end(finished):
    ds, work = finished
    final = work / "final" / "labels"
    assert sorted(p.name for p in final.iterdir()) == ["a.png", "b.png", "c.png", "t.png"]  # nnU-Net's label names
    for p in final.iterdir():
        img = Image.open(p)
        assert img.mode == "L" and np.asarray(img).shape == tuple(ds["sizes"][p.stem])
        assert set(np.unique(np.asarray(img))) <= {0, 1}
    # the template's label is handed back as it was given
    np.testing.assert_array_equal(np.asarray(Image.open(final / "t.png")),
                                  np.asarray(Image.open(ds["root"] / "labelsTr" / "t.png")))
    # the stages read the conversion; the run's record names the user's folder
    cases = json.loads((work / "dataset" / "cases.json").read_text())["cases"]
    assert cases["t"]["source"] == str((ds["root"] / "imagesTr" / "t_0000.png").resolve())
    assert {c: e["role"] for c, e in cases.items()} == {"t": "template", "a": "unlabeled", "b": "unlabeled",
                                                       "c": "unlabeled", "s1": "test", "s2": "test"}
    settings = json.loads((work / "run.json").read_text())["settings"]
    assert settings["input"] == str(ds["root"].resolve())
    config = json.loads((work / "round1" / "model" / "config.json").read_text())
    assert config["net"]["in_channels"] == 3 and config["dataset"] == str((work / "dataset").resolve())
    report = json.loads((work / "report.json").read_text())
    assert report["n_test"] == 2 and 0.0 <= report["final_test_metrics"]["mean_foreground"]["dice"] <= 1.0


def test_a_second_run_reuses_the_conversion(finished):
    ds, work = finished
    before = (work / "dataset" / "cases.json").stat().st_mtime_ns
    out = _run("run", "-i", ds["root"], "--split", ds["split"], "--preset", "quick", "-o", work, "--quiet")
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert (work / "dataset" / "cases.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("channels", ["split", "rgb", "grey"])
def test_channel_files_become_one_image(tmp_path, channels):
    ds = helpers.make_nnunet_2d(tmp_path / "ds", channels)
    root, _ = materialise(NnUNet2DInput(root=ds["root"], split=ds["split"]), tmp_path / "work")
    vol = read_image(root / "imagesTr" / "a.nii.gz")
    assert vol.shape == (*ds["sizes"]["a"], 1)
    if channels == "grey":
        assert vol.channels is None
        np.testing.assert_array_equal(vol.array[..., 0], ds["pixels"]["a"])
    else:  # nnU-Net's _0000 / _0001 / _0002 are red, green, blue
        np.testing.assert_array_equal(vol.channels[:, :, 0], ds["pixels"]["a"])
    lab = read_label_values(root / "labelsTr" / "a.nii.gz").array[..., 0]
    np.testing.assert_array_equal(lab, np.asarray(Image.open(ds["root"] / "labelsTr" / "a.png")))
    assert Dataset(root).cases == ["a", "b", "c", "s1", "s2", "t"]


def _break(ds: dict, how: str) -> str:
    """Spoil the dataset one way; returns a piece of the expected message."""
    root = ds["root"]
    if how == "no_suffix":
        (root / "imagesTr" / "b_0000.png").rename(root / "imagesTr" / "b.png")
        return "b.png"
    if how == "label_size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "labelsTr" / "a.png")
        return "a.png"
    if how == "unknown_case":
        ds["split"].write_text(json.dumps({"template": "t", "unlabeled": ["a", "zz"], "test": []}))
        return "zz"
    if how == "channel_names":
        meta = json.loads((root / "dataset.json").read_text())
        meta["channel_names"] = {"0": "R", "1": "G"}
        (root / "dataset.json").write_text(json.dumps(meta))
        return "channel_names"
    if how == "channel_gap":
        shutil.copy(root / "imagesTr" / "c_0000.png", root / "imagesTr" / "c_0002.png")
        return "c"
    if how == "undeclared_value":
        lab = np.asarray(Image.open(root / "labelsTr" / "s1.png")).copy()
        lab[0, 0] = 2
        Image.fromarray(lab).save(root / "labelsTr" / "s1.png")
        return "labelsTr/s1.png"
    if how == "template_unlabelled":
        (root / "labelsTr" / "t.png").unlink()
        return "template"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["no_suffix", "label_size", "unknown_case", "channel_names", "channel_gap",
                                 "undeclared_value", "template_unlabelled"])
def test_bad_nnunet_2d_input_is_one_line(tmp_path, how):
    ds = helpers.make_nnunet_2d(tmp_path / "ds", "rgb")
    expected = _break(ds, how)
    work = tmp_path / "work"
    line = _one_line(_run("run", "-i", ds["root"], "--split", ds["split"], "--preset", "quick", "-o", work,
                          "--quiet"))
    assert expected in line, line
    assert "work/dataset" not in line  # the user's file, not its conversion
    assert not work.exists()


def test_3d_nnunet_v2_dataset_is_read_as_it_is(tmp_path):
    split = helpers.make_cohort(tmp_path / "ds", n_unlabeled=1, n_test=1)
    root = tmp_path / "ds"
    for p in (root / "imagesTr").iterdir():  # nnU-Net v2 names: CASE_0000.nii.gz
        p.rename(p.with_name(p.name.replace(".nii.gz", "_0000.nii.gz")))
    ds = Dataset(root)
    assert ds.cases == sorted([split["template"], *split["unlabeled"], *split["test"]])
    assert ds.image_path(split["template"]).name.endswith("_0000.nii.gz")
    s = RunSettings(input=root, split=root / "splits.json", output=tmp_path / "work", preset="quick")
    assert s.folder_input is None and s.dataset == root  # no conversion
