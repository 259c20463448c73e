"""2D cohorts (issue #33): a folder of 2D images (RGB and greyscale PNG, a JPEG, a 16-bit TIFF) and
one 0 / 255 template mask run end to end with `run --preset quick` through the same stages as
volumes; outputs have each input's format and size; bad 2D inputs stop with one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import helpers
import numpy as np
import pytest
from PIL import Image

from semisam_o1.core.errors import InputError
from semisam_o1.data.images import read_image, read_label_values
from semisam_o1.stages.encode import pack_tiles


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisam_o1", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def _one_line(out: subprocess.CompletedProcess) -> str:
    err = [ln for ln in out.stderr.decode().strip().splitlines() if "note:" not in ln]
    assert out.returncode == 2, out.stderr.decode()
    assert len(err) == 1, err
    return err[0]


def _inputs(c: dict) -> list:
    return ["--images", c["images"], "--template-image", c["template_image"], "--template-label",
            c["template_label"], "--test-images", c["test_images"], "--test-labels", c["test_labels"]]


@pytest.fixture(scope="module")
def finished_2d(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort2d")
    c = helpers.make_2d_cohort(root / "in")
    work = root / "work"
    out = _run("run", *_inputs(c), "--preset", "quick", "-o", work, "--quiet")
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    return c, work, out


def test_readers_keep_rgb_16_bit_and_read_255_masks_as_binary(tmp_path):
    c = helpers.make_2d_cohort(tmp_path)
    rgb = read_image(c["images"] / "a.png")
    assert rgb.shape == (56, 72, 1) and rgb.channels.shape == (56, 72, 1, 3)
    raw = np.asarray(Image.open(c["images"] / "a.png"))
    np.testing.assert_array_equal(rgb.channels[:, :, 0], raw.astype(np.float32))
    assert np.allclose(rgb.array[:, :, 0], raw @ np.array([0.299, 0.587, 0.114]), atol=1e-3)
    tif = read_image(c["images"] / "d.tif")
    assert tif.channels is None and tif.array.max() > 255  # 16-bit values kept
    mask = read_label_values(c["template_label"]).array
    assert set(np.unique(mask)) == {0, 1}
    # the encoder's canvas holds the three colours, not a grey copy
    canvas = pack_tiles([np.stack([np.full((4, 4), v, np.float32) for v in (10, 20, 30)], -1)], 8, 8)
    assert canvas[0, :, 0, 0].tolist() == [10, 20, 30]


def test_alpha_only_image_is_refused(tmp_path):
    la = np.zeros((20, 20, 2), np.uint8)
    la[..., 1] = np.arange(400).reshape(20, 20) % 256
    Image.fromarray(la, mode="LA").save(tmp_path / "x.png")
    with pytest.raises(InputError, match="alpha channel only"):
        read_image(tmp_path / "x.png")


def test_2d_cohort_end_to_end(finished_2d):
    c, work, out = finished_2d
    final = work / "final" / "labels"
    names = sorted(p.name for p in final.iterdir())
    assert names == ["a.png", "b.png", "c.png", "d.tif", "t.png"]  # the JPEG's label is PNG (lossless)
    for p in final.iterdir():
        img = Image.open(p)
        assert img.mode == "L"
        assert np.asarray(img).shape == tuple(c["sizes"][p.stem]), p
        assert set(np.unique(np.asarray(img))) <= {0, 1}
    assert "read as binary (255 -> 1)" in out.stderr.decode()
    report = json.loads((work / "report.json").read_text())
    dice = report["final_test_metrics"]["mean_foreground"]["dice"]
    assert 0.0 <= dice <= 1.0
    config = json.loads((work / "round1" / "model" / "config.json").read_text())
    assert config["net"]["spatial_dims"] == 2 and config["patch"][2] == 1
    assert config["net"]["in_channels"] == 1  # RGB and greyscale images mixed: the network sees intensities
    store = json.loads((work / "features" / "store.json").read_text())
    assert store["axes"] == [2]
    # the round-0 pseudo-labels of the pool are on each image's grid
    from semisam_o1.data.images import read_label_values as rlv

    for case in ("a", "b", "c", "d"):
        lab = rlv(next((work / "round0" / "pseudo").glob(f"{case}.nii*"))).array
        assert lab.shape == tuple(c["sizes"][case]) + (1,)


def test_plan_for_2d_is_a_2d_network(finished_2d, tmp_path):
    _, work, _ = finished_2d
    out = _run("plan", "-i", work / "dataset", "--split", work / "dataset" / "splits.json", "-o",
               tmp_path / "plan.json", "--no-timing", "--quiet")
    assert out.returncode == 0, out.stderr.decode()
    d = json.loads((tmp_path / "plan.json").read_text())["decisions"]
    assert d["patch"]["value"][2] == 1 and all(s[2] == 1 for s in d["strides"]["value"])
    assert d["encode_axes"]["value"] == [2]
    assert 2 not in d["flip_axes"]["value"]
    assert d["batch_size"]["value"] == 4 and "2D" in d["batch_size"]["reason"]


def test_mask_of_another_size_is_one_line(tmp_path):
    c = helpers.make_2d_cohort(tmp_path / "in")
    Image.fromarray(np.zeros((10, 10), np.uint8) + 1).save(c["template_label"])
    line = _one_line(_run("run", *_inputs(c), "--preset", "quick", "-o", tmp_path / "w", "--quiet"))
    assert "shape" in line and "template_label.png" in line
    assert not (tmp_path / "w" / "features").exists()


def test_undeclared_mask_class_is_one_line(tmp_path):
    c = helpers.make_2d_cohort(tmp_path / "in")
    lab = np.asarray(Image.open(c["test_labels"] / "s1.png")).copy()
    lab[0, 0] = 2
    Image.fromarray(lab).save(c["test_labels"] / "s1.png")
    line = _one_line(_run("run", *_inputs(c), "--preset", "quick", "-o", tmp_path / "w", "--quiet"))
    assert "s1" in line and "2" in line


def test_alpha_only_image_in_a_run_is_one_line(tmp_path):
    c = helpers.make_2d_cohort(tmp_path / "in")
    la = np.zeros((56, 72, 2), np.uint8)
    la[..., 1] = 200
    la[10:30, 10:30, 1] = 0
    Image.fromarray(la, mode="LA").save(c["images"] / "e.png")
    line = _one_line(_run("run", *_inputs(c), "--preset", "quick", "-o", tmp_path / "w", "--quiet"))
    assert "e.png" in line and "alpha" in line
