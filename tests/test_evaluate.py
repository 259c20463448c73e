"""evaluate: Dice / Jaccard / HD95 / ASD against hand-computed values and a brute-force
NumPy / SciPy reference; the empty-mask convention; the CLI's outputs and errors."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import small_filesystem, write_nifti
from scipy import ndimage
from scipy.spatial import cKDTree

from semisam_o1.cli import main as cli_main
from semisam_o1.core.errors import InputError
from semisam_o1.stages import evaluate as evaluate_module
from semisam_o1.stages.evaluate import EvaluateSettings, evaluate

SHAPE = (16, 16, 16)
SPACING = (1.0, 2.0, 3.0)
AFFINE = np.diag([*SPACING, 1.0])
DIAGONAL = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))  # 16 * sqrt(14) mm
LABELS = {"0": "background", "1": "a", "2": "b"}


def _score(pred, gt, **kwargs) -> dict:
    return evaluate(EvaluateSettings(input=pred, gt=gt, quiet=True, **kwargs))


def _label(path: Path, data, affine=AFFINE) -> Path:
    return write_nifti(path, data, affine, dtype=np.uint8)


def _cube(lo=(4, 4, 4), side=6, value=1, shape=SHAPE):
    a = np.zeros(shape, np.uint8)
    a[lo[0]:lo[0] + side, lo[1]:lo[1] + side, lo[2]:lo[2] + side] = value
    return a


def _dataset(root: Path, gts: dict[str, np.ndarray], labels=LABELS, affine=AFFINE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "t", "labels": labels}))
    for case, lab in gts.items():
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", np.full(lab.shape, 10.0), affine, dtype=np.float32)
        _label(root / "labelsTr" / f"{case}.nii.gz", lab, affine)
    return root


def _reference(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """Brute-force HD95 and ASD (mm): edge voxels = mask minus its erosion (6-connected,
    outside = background); exact Euclidean distance of each edge voxel centre to the
    nearest edge voxel of the other mask; HD95 = max of the two directed 95th
    percentiles (linear interpolation); ASD = mean of all distances of both directions."""
    def edges(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.asarray(spacing, float)

    ep, eg = edges(pred.astype(bool)), edges(gt.astype(bool))
    d_pg = cKDTree(eg).query(ep)[0]
    d_gp = cKDTree(ep).query(eg)[0]
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    asd = np.concatenate([d_pg, d_gp]).mean()
    return float(hd95), float(asd)


# ------------------------------------------------------------------ overlap metrics


def test_dice_1_for_identical_0_for_disjoint_and_known_jaccard(tmp_path):
    gt = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(9, 9, 9), side=4, value=2)
    # class 1: identical. class 2: pred cube shifted by 2 voxels along axis 0 -> 32 of 64 voxels overlap
    pred = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(11, 9, 9), side=4, value=2)
    disjoint = _cube(lo=(9, 2, 2), side=4) + _cube(lo=(2, 9, 9), side=4, value=2)
    root = _dataset(tmp_path / "ds", {"c1": gt, "c2": gt})
    _label(tmp_path / "pred" / "c1.nii.gz", pred)
    _label(tmp_path / "pred" / "c2.nii.gz", disjoint)
    res = _score(tmp_path / "pred", root)
    c1, c2 = res["cases"]["c1"], res["cases"]["c2"]
    assert c1["a"]["dice"] == pytest.approx(1.0) and c1["a"]["jaccard"] == pytest.approx(1.0)
    assert c1["a"]["hd95"] == 0.0 and c1["a"]["asd"] == 0.0
    assert c1["b"]["dice"] == pytest.approx(2 * 32 / (64 + 64))  # 0.5
    assert c1["b"]["jaccard"] == pytest.approx(32 / (64 + 64 - 32))  # 1/3
    assert c2["a"]["dice"] == 0.0 and c2["b"]["dice"] == 0.0
    assert c2["a"]["jaccard"] == 0.0 and c2["b"]["jaccard"] == 0.0
    assert res["per_class"]["b"]["dice"]["mean"] == pytest.approx(0.25)
    assert res["per_class"]["b"]["dice"]["std"] == pytest.approx(0.25)
    assert res["summary"]["dice"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}
    assert res["mean_foreground"]["dice"] == pytest.approx(0.375)


def test_dice_is_semisam_metrics_dice_and_monai_dice(tmp_path):
    """One Dice: evaluate's equals semisam_o1.methods.metrics.dice and MONAI's DiceMetric(ignore_empty=False)."""
    import torch
    from monai.metrics import DiceMetric

    from semisam_o1.methods.metrics import dice

    rng = np.random.default_rng(1)
    gt = (ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0) > 0.05).astype(np.uint8)
    pred = (ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0) > 0.05).astype(np.uint8)
    root = _dataset(tmp_path / "ds", {"c": gt}, labels={"0": "background", "1": "blob"})
    _label(tmp_path / "pred" / "c.nii.gz", pred)
    got = _score(tmp_path / "pred", root)["cases"]["c"]["blob"]["dice"]
    monai_dice = float(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        y_pred=torch.from_numpy(pred)[None, None].float(), y=torch.from_numpy(gt)[None, None].float())[0, 0])
    assert 0.05 < got < 0.95
    assert got == pytest.approx(dice(pred == 1, gt == 1), abs=1e-12) == pytest.approx(monai_dice, rel=1e-6)


# ------------------------------------------------------------------ distances


def test_hd95_and_asd_of_a_cube_shifted_with_anisotropic_spacing(tmp_path):
    """A 6x6x6 cube and the same cube shifted by 2 voxels along axis 2, spacing (1, 2, 3) mm.

    By hand, distances from the 152 edge voxels of one cube to the other's surface:
    80 side-face voxels lying on the other's side faces: 0; the 20 side-face voxels
    one slice outside the overlap: 1 slice = 3 mm; the 36 voxels of the outermost
    slice (20 side + 16 inner): 2 slices = 6 mm; the 16 inner voxels of the inner cap,
    now inside the other cube, reach its side faces: 8 at 1 voxel along axis 0 = 1 mm,
    8 at 2 voxels along axis 0 (or 1 along axis 1) = 2 mm. Sorted, the 95th percentile
    (position 0.95 * 151 = 143.45) falls among the 36 sixes: HD95 = 6 mm in each
    direction. ASD = (2 * (36*6 + 20*3 + 8*2 + 8*1)) / (2 * 152) = 600 / 304 mm.
    """
    gt = _cube(lo=(4, 4, 4))
    pred = _cube(lo=(4, 4, 6))
    root = _dataset(tmp_path / "ds", {"c": gt}, labels={"0": "background", "1": "cube"})
    _label(tmp_path / "pred" / "c.nii.gz", pred)
    res = _score(tmp_path / "pred", root)["cases"]["c"]["cube"]
    assert res["hd95"] == pytest.approx(6.0, rel=1e-6)
    assert res["asd"] == pytest.approx(600 / 304, rel=1e-6)
    ref_hd95, ref_asd = _reference(pred, gt, SPACING)
    assert ref_hd95 == pytest.approx(6.0) and ref_asd == pytest.approx(600 / 304)
    assert res["dice"] == pytest.approx(2 * 144 / (216 + 216))  # 4 of 6 slices overlap
    # the same shift along axis 0 (1 mm voxels) is 2 mm: spacing is taken per axis
    _label(tmp_path / "pred0" / "c.nii.gz", _cube(lo=(6, 4, 4)))
    res0 = _score(tmp_path / "pred0", root)["cases"]["c"]["cube"]
    assert res0["hd95"] == pytest.approx(2.0, rel=1e-6)


def test_distances_match_the_brute_force_reference_on_irregular_shapes(tmp_path):
    rng = np.random.default_rng(0)
    blobs = []
    for seed in range(2):
        noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
        m = noise > np.quantile(noise, 0.8)
        m[:1] = m[-1:] = False  # keep one empty slice at the borders of axis 0
        blobs.append(m.astype(np.uint8))
    gt, pred = blobs
    root = _dataset(tmp_path / "ds", {"c": gt}, labels={"0": "background", "1": "blob"})
    _label(tmp_path / "pred" / "c.nii.gz", pred)
    res = _score(tmp_path / "pred", root)["cases"]["c"]["blob"]
    ref_hd95, ref_asd = _reference(pred, gt, SPACING)
    assert res["hd95"] == pytest.approx(ref_hd95, rel=1e-5)
    assert res["asd"] == pytest.approx(ref_asd, rel=1e-5)
    inter = np.logical_and(gt, pred).sum()
    assert res["dice"] == pytest.approx(2 * inter / (gt.sum() + pred.sum()), rel=1e-6)
    assert res["jaccard"] == pytest.approx(inter / np.logical_or(gt, pred).sum(), rel=1e-6)


def test_prediction_stored_flipped_gives_the_same_metrics(tmp_path):
    gt = _cube(lo=(4, 4, 4))
    pred = _cube(lo=(4, 4, 6))
    root = _dataset(tmp_path / "ds", {"c": gt}, labels={"0": "background", "1": "cube"})
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1
    _label(tmp_path / "pred" / "c.nii.gz", pred[::-1, ::-1, :], AFFINE @ flip)
    res = _score(tmp_path / "pred", root)["cases"]["c"]["cube"]
    assert res["hd95"] == pytest.approx(6.0, rel=1e-6) and res["asd"] == pytest.approx(600 / 304, rel=1e-6)


# ------------------------------------------------------------------ empty masks


@pytest.mark.parametrize("situation", ["both empty", "prediction empty", "ground truth empty"])
def test_empty_mask_convention(tmp_path, situation):
    """Both empty: a perfect score. Exactly one empty (a missed structure, or a false positive
    on an empty ground truth): Dice 0 and the image diagonal in mm as HD95 and ASD."""
    cube = _cube(lo=(2, 2, 2), side=4)
    gt = np.zeros(SHAPE, np.uint8) if situation != "prediction empty" else cube
    pred = np.zeros(SHAPE, np.uint8) if situation != "ground truth empty" else cube
    root = _dataset(tmp_path / "ds", {"c": gt}, labels={"0": "background", "1": "x"})
    _label(tmp_path / "pred" / "c.nii.gz", pred)
    r = _score(tmp_path / "pred", root)["cases"]["c"]["x"]
    if situation == "both empty":
        assert (r["dice"], r["jaccard"], r["hd95"], r["asd"]) == (1.0, 1.0, 0.0, 0.0)
    else:
        assert (r["dice"], r["jaccard"]) == (0.0, 0.0)
        assert r["hd95"] == pytest.approx(DIAGONAL) and r["asd"] == pytest.approx(DIAGONAL)
    assert (r["empty_gt"], r["empty_pred"]) == (situation != "prediction empty", situation != "ground truth empty")


def test_every_case_counts_in_every_mean_and_the_convention_is_stated(tmp_path, capsys):
    gt_full = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(9, 9, 9), side=4, value=2)
    gt_no_b = _cube(lo=(2, 2, 2), side=4)
    root = _dataset(tmp_path / "ds", {"p_empty": gt_full, "g_empty": gt_no_b, "both": gt_no_b})
    _label(tmp_path / "pred" / "p_empty.nii.gz", gt_no_b)  # class b predicted empty
    _label(tmp_path / "pred" / "g_empty.nii.gz", gt_full)  # class b predicted, GT empty
    _label(tmp_path / "pred" / "both.nii.gz", gt_no_b)  # class b empty in both
    out = tmp_path / "m" / "metrics.json"
    res = evaluate(EvaluateSettings(input=tmp_path / "pred", gt=root, output=out))
    b = {c: res["cases"][c]["b"] for c in ("p_empty", "g_empty", "both")}
    assert (b["p_empty"]["empty_pred"], b["p_empty"]["empty_gt"]) == (True, False)
    assert (b["g_empty"]["empty_pred"], b["g_empty"]["empty_gt"]) == (False, True)
    pc = res["per_class"]["b"]
    assert (pc["n_cases"], pc["n_empty_gt"], pc["n_empty_pred"], pc["n_both_empty"]) == (3, 2, 2, 1)
    # every case in every mean: Dice (0 + 0 + 1) / 3, HD95 (D + D + 0) / 3
    for m in ("dice", "jaccard", "hd95", "asd"):
        assert pc[m]["n"] == 3
    assert pc["dice"]["mean"] == pytest.approx(1 / 3) and pc["dice"]["std"] == pytest.approx(math.sqrt(2) / 3)
    assert pc["hd95"]["mean"] == pytest.approx(2 * DIAGONAL / 3) and pc["asd"]["mean"] == pytest.approx(2 * DIAGONAL / 3)
    assert res["summary"]["dice"]["b"] == pytest.approx(1 / 3)
    assert res["per_class"]["a"]["dice"]["mean"] == pytest.approx(1.0)  # class a is perfect everywhere
    # strict JSON, every value a number; the convention is in the file and under the table
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["cases"]["both"]["b"]["dice"] == 1.0 and data["cases"]["p_empty"]["b"]["asd"] == pytest.approx(DIAGONAL)
    assert "both masks empty: Dice 1" in data["convention"] and "image diagonal" in data["convention"]
    printed = capsys.readouterr().out
    assert "empty masks: both masks empty: Dice 1" in printed and "every case counts" in printed


# ------------------------------------------------------------------ CLI


def _two_case_setup(tmp_path: Path):
    gt = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(9, 9, 9), side=4, value=2)
    pred = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(11, 9, 9), side=4, value=2)
    root = _dataset(tmp_path / "ds", {"c1": gt, "c2": gt})
    _label(tmp_path / "pred" / "c1.nii.gz", gt)
    _label(tmp_path / "pred" / "c2.nii.gz", pred)
    return root


def test_cli_writes_json_and_csv(tmp_path, capsys):
    root = _two_case_setup(tmp_path)
    out = tmp_path / "res" / "metrics.json"
    rc = cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(root), "-o", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("semisam-o1 evaluate --input ")
    assert data["n_cases"] == 2 and set(data["cases"]) == {"c1", "c2"}
    assert data["classes"] == {"background": 0, "a": 1, "b": 2}
    assert data["cases"]["c2"]["b"]["dice"] == pytest.approx(0.5)
    assert data["per_class"]["b"]["dice"]["mean"] == pytest.approx(0.75)
    # HD95 of class b in c2: shift of 2 voxels along axis 0 (1 mm) -> 2 mm
    assert data["cases"]["c2"]["b"]["hd95"] == pytest.approx(2.0, rel=1e-6)
    rows = list(csv.DictReader((tmp_path / "res" / "metrics.csv").open()))
    assert len(rows) == 2 * 2 + 2 * 2
    row = next(r for r in rows if r["case"] == "c2" and r["class"] == "b")
    assert float(row["dice"]) == pytest.approx(0.5) and float(row["jaccard"]) == pytest.approx(1 / 3)
    mean_b = next(r for r in rows if r["case"] == "mean" and r["class"] == "b")
    assert float(mean_b["dice"]) == pytest.approx(0.75)
    printed = capsys.readouterr().out
    assert "Dice" in printed and "0.750" in printed
    # the recorded command reproduces the result
    import shlex

    argv = shlex.split(data["command"])[1:]
    out.unlink()
    assert cli_main(argv + ["--quiet"]) == 0 and json.loads(out.read_text())["per_class"] == data["per_class"]
    # without -o: PRED/metrics.json and PRED/metrics.csv; --quiet prints nothing
    capsys.readouterr()
    assert cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(root), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    default = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert default["per_class"] == data["per_class"] and (tmp_path / "pred" / "metrics.csv").is_file()


def test_cli_missing_prediction_is_exit_2_and_writes_nothing(tmp_path, capsys):
    root = _two_case_setup(tmp_path)
    (tmp_path / "pred" / "c2.nii.gz").unlink()
    out = tmp_path / "res" / "metrics.json"
    rc = cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(root), "--cases", "c1", "c2",
                   "-o", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing prediction" in err and "c2" in err
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert not (tmp_path / "res").exists() or list((tmp_path / "res").iterdir()) == []


@pytest.mark.parametrize("fault", ["output is a folder", "csv is a folder", "parent is a file", "read-only folder"])
def test_unusable_output_is_one_line_exit_2_before_computing(tmp_path, capsys, monkeypatch, fault):
    root = _two_case_setup(tmp_path)
    out = tmp_path / "res" / "metrics.json"
    named = out
    if fault == "output is a folder":
        out.mkdir(parents=True)
    elif fault == "csv is a folder":
        named = out.with_suffix(".csv")
        named.mkdir(parents=True)
    elif fault == "parent is a file":
        (tmp_path / "res").write_text("x")
        named = tmp_path / "res"
    scored = []
    monkeypatch.setattr(evaluate_module, "score_case", lambda *a, **k: scored.append(a) or {})

    def call() -> str:
        rc = cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(root), "-o", str(out)])
        assert rc == 2
        return capsys.readouterr().err.strip()

    if fault == "read-only folder":
        if os.geteuid() == 0:  # root writes anywhere but on a read-only mount
            with small_filesystem(tmp_path / "res", 64):
                subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "res")], check=True)
                err = call()
        else:
            (tmp_path / "res").mkdir(mode=0o555)
            err = call()
        named = tmp_path / "res"
    else:
        err = call()
    assert len(err.splitlines()) == 1 and str(named) in err and "Traceback" not in err
    assert scored == []


def test_grid_mismatch_is_one_error_naming_the_case(tmp_path, capsys):
    root = _two_case_setup(tmp_path)
    _label(tmp_path / "pred" / "c2.nii.gz", np.zeros((16, 16, 15), np.uint8))
    out = tmp_path / "res" / "metrics.json"
    rc = cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(root), "-o", str(out)])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("semisam-o1 evaluate: error: case c2: ") and "shape" in err[0]
    assert not out.exists()


def test_plain_gt_folder_with_and_without_dataset_json(tmp_path):
    gt = _cube(lo=(2, 2, 2), side=4) + _cube(lo=(9, 9, 9), side=4, value=4)  # values 0, 1, 4
    _label(tmp_path / "gt" / "c.nii.gz", gt)
    _label(tmp_path / "pred" / "c.nii.gz", gt)
    res = _score(tmp_path / "pred", tmp_path / "gt")
    assert res["classes"] == {"background": 0, "1": 1, "4": 4}
    assert res["summary"]["dice"] == {"1": pytest.approx(1.0), "4": pytest.approx(1.0)}
    meta = tmp_path / "meta" / "dataset.json"
    meta.parent.mkdir()
    meta.write_text(json.dumps({"labels": {"0": "background", "1": "x", "2": "y", "4": "z"}}))
    res = _score(tmp_path / "pred", tmp_path / "gt", dataset=meta)
    assert list(res["per_class"]) == ["x", "y", "z"]
    assert res["per_class"]["y"]["n_empty_gt"] == 1 and res["per_class"]["z"]["dice"]["mean"] == pytest.approx(1.0)
    # an undeclared value in a prediction is an error naming the case
    _label(tmp_path / "pred" / "c.nii.gz", gt + (gt == 1) * 2)  # value 3
    with pytest.raises(InputError, match="case c: .*label value 3"):
        _score(tmp_path / "pred", tmp_path / "gt", dataset=meta)


def test_cohort_labels_against_themselves(cohort, tmp_path):
    """The cohort's (real or synthetic) test labels scored against themselves: a perfect score."""
    from semisam_o1.data.dataset import Dataset

    ds = Dataset(cohort.root)
    cases = cohort.test
    (tmp_path / "pred").mkdir()
    for c in cases:
        shutil.copy(ds.labels[c], tmp_path / "pred" / ds.labels[c].name)
    res = _score(tmp_path / "pred", cohort.root, cases=cases)
    names = [ds.label_map.names[c] for c in ds.label_map.foreground]
    assert list(res["per_class"]) == names and len(names) >= 2
    for name in names:
        pc = res["per_class"][name]
        assert pc["dice"]["mean"] == pytest.approx(1.0) and pc["hd95"]["mean"] == 0.0 and pc["n_cases"] == 2
        assert pc["n_empty_gt"] == 0


def test_distances_of_2d_images_are_in_pixels_unless_a_pixel_size_is_known(tmp_path, capsys):
    """PNG masks (no size) score HD95 / ASD in pixels and say so (JSON ``distance_unit``, CSV
    columns, table header); the same masks as 2D NIfTI with a pixel size of 0.5 mm, in mm (half);
    a 3D NIfTI stays mm."""
    from PIL import Image

    from semisam_o1.data.folder_input import nifti_2d

    gt = np.zeros((30, 40), np.uint8)
    gt[10:20, 10:20] = 1
    pred = np.roll(gt, 3, axis=0)  # a square shifted by 3 pixels: HD95 3 pixels
    for folder, mask in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        Image.fromarray(mask).save(tmp_path / folder / "c.png")
    assert cli_main(["evaluate", "-i", str(tmp_path / "pred"), "-g", str(tmp_path / "gt"),
                     "-o", str(tmp_path / "px.json")]) == 0
    px = json.loads((tmp_path / "px.json").read_text())
    assert px["distance_unit"] == "pixels"
    assert px["cases"]["c"]["1"]["hd95"] == pytest.approx(3.0)
    assert "HD95 px" in capsys.readouterr().out
    assert "hd95_px" in (tmp_path / "px.csv").read_text().splitlines()[0]
    import nibabel as nib

    for folder, mask in (("gt_mm", gt), ("pred_mm", pred)):
        (tmp_path / folder).mkdir()
        nib.save(nifti_2d(mask, 0.5), str(tmp_path / folder / "c.nii.gz"))
    mm = _score(tmp_path / "pred_mm", tmp_path / "gt_mm")
    assert mm["distance_unit"] == "mm" and mm["cases"]["c"]["1"]["hd95"] == pytest.approx(1.5)
    _label(tmp_path / "gt3" / "c.nii.gz", _cube())
    _label(tmp_path / "pred3" / "c.nii.gz", _cube())
    assert _score(tmp_path / "pred3", tmp_path / "gt3")["distance_unit"] == "mm"
