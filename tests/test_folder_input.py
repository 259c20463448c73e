"""Plain folders in: `semisam-o1 run --images DIR --template-image FILE --template-label FILE`.

A plain folder of the cohort's images (one NIfTI, one .nrrd, one .mha beside the template) and a
separate template label run `run --preset quick` end to end and fill WORK/final (labels named like
their images in their format and geometry, the model bundle, cases.csv, report.json / .html and
the pictures); .nrrd / .mha conversions keep spacing and orientation; bad inputs are one line,
exit 2, nothing written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from semisam_o1 import cli
from semisam_o1.core.errors import InputError
from semisam_o1.data import folder_input as F
from semisam_o1.data import images as image_io
from semisam_o1.data.images import read_image, read_label_values
from semisam_o1.pipeline import run as run_module

OBLIQUE = np.array([[0.0, 0.0, 2.0, 4.0], [-1.5, 0.0, 0.0, 1.0], [0.0, 0.8, 0.0, 2.0], [0, 0, 0, 1]])


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semisam_o1", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)


def _one_line(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode().strip().splitlines()
    assert out.returncode == 2, out.stderr.decode()
    assert len(err) == 1, err
    return err[0]


def _to_itk(src: Path, dst: Path) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst))
    return dst


def _itk_geometry(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.fixture(scope="module")
def scans(tmp_path_factory, cohort):
    """A plain folder (template + 2 pool images: .nrrd, .mha), the template label elsewhere, and
    one test image with its label."""
    root = tmp_path_factory.mktemp("plain")
    images = root / "scans"
    images.mkdir()
    src = cohort.root / "imagesTr"
    shutil.copy(src / f"{cohort.template}.nii.gz", images)
    pool = cohort.unlabeled[:2]
    _to_itk(src / f"{pool[0]}.nii.gz", images / f"{pool[0]}.nrrd")
    _to_itk(src / f"{pool[1]}.nii.gz", images / f"{pool[1]}.mha")
    label = shutil.copy(cohort.root / "labelsTr" / f"{cohort.template}.nii.gz", root / "template_label.nii.gz")
    (root / "ti").mkdir()
    (root / "tl").mkdir()
    test = cohort.test[0]
    shutil.copy(src / f"{test}.nii.gz", root / "ti")
    shutil.copy(cohort.root / "labelsTr" / f"{test}.nii.gz", root / "tl")
    return {"root": root, "images": images, "template_image": images / f"{cohort.template}.nii.gz",
            "template_label": Path(label), "pool": pool, "test": test}


@pytest.fixture(scope="module")
def work(scans, cohort):
    """`run --preset quick` on the plain folder (the whole pipeline, once for this module)."""
    out = scans["root"] / "work"
    res = _cli("run", "--images", str(scans["images"]), "--template-image", str(scans["template_image"]),
               "--template-label", str(scans["template_label"]), "--labels", "1=first,2=second",
               "--test-images", str(scans["root"] / "ti"), "--test-labels", str(scans["root"] / "tl"),
               "-o", str(out), "--preset", "quick", "--threads", "2", "--quiet", timeout=1800)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    return out


# --------------------------------------------------------------------------- conversions


def test_itk_geometry_matches_nifti(tmp_path):
    """.nrrd / .mha written from an oblique, permuted NIfTI: same canonical shape and affine."""
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    nii = helpers.write_nifti(tmp_path / "x.nii.gz", data, OBLIQUE)
    ref = read_image(nii)
    for ext in (".nrrd", ".mha"):
        itk = _to_itk(nii, tmp_path / f"x{ext}")
        shape, affine = image_io.geometry(itk)
        assert shape == ref.shape and np.allclose(affine, ref.affine, atol=1e-6)
        conv = read_image(F.place_file(itk, tmp_path / ext[1:], "x"))
        assert np.allclose(conv.affine, ref.affine, atol=1e-6) and np.array_equal(conv.array, ref.array)


def test_label_written_back_keeps_itk_geometry(tmp_path):
    """A label on an .nrrd / .mha image's NIfTI form is written back with the image's spacing,
    origin and direction, and the same voxels."""
    lab = np.zeros((5, 6, 7), np.uint8)
    lab[1:3, 2:5, 3:6] = 2
    img = helpers.write_nifti(tmp_path / "img.nii.gz", lab.astype(np.float32), OBLIQUE)
    lab_nii = helpers.write_nifti(tmp_path / "lab.nii.gz", lab, OBLIQUE)
    for ext in (".nrrd", ".mha"):
        source = _to_itk(img, tmp_path / f"img{ext}")
        out = F.write_label_like(lab_nii, source, tmp_path / "out" / f"img{ext}")
        size, spacing, origin, direction = _itk_geometry(out)
        assert (size, spacing, origin) == _itk_geometry(source)[:3]
        assert np.allclose(direction, _itk_geometry(source)[3])
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(lab_nii))))


def test_parse_label_names():
    assert F.parse_label_names("1=left, 2=right") == {"background": 0, "left": 1, "right": 2}
    assert F.parse_label_names(None, [0, 1, 4]) == {"background": 0, "1": 1, "4": 4}
    for bad in ("1left", "0=bg", "1=a,1=b", "x=a"):
        with pytest.raises(InputError):
            F.parse_label_names(bad)


# --------------------------------------------------------------------------- the dataset


def test_materialise_writes_a_dataset_the_stages_read(scans, cohort, tmp_path):
    from semisam_o1.data.dataset import Dataset

    inp = F.FolderInput(images=scans["images"], template_image=scans["template_image"],
                        template_label=scans["template_label"], test_images=scans["root"] / "ti",
                        test_labels=scans["root"] / "tl")
    root, split_file = F.materialise(inp, tmp_path / "w")
    ds = Dataset(root)
    split = json.loads(split_file.read_text())
    template = F.case_id(scans["template_image"])
    assert split == {"template": template, "unlabeled": sorted(scans["pool"]), "test": [scans["test"]]}
    assert sorted(ds.labels) == sorted([template, scans["test"]])
    assert (root / "imagesTr" / f"{template}.nii.gz").is_symlink()
    cases = F.read_cases(root)
    assert cases[scans["pool"][0]]["source"].endswith(".nrrd")
    for case in scans["pool"]:  # the conversions keep the voxels, spacing and orientation
        original = read_image(cohort.root / "imagesTr" / f"{case}.nii.gz")
        placed = read_image(ds.image_path(case))
        assert np.allclose(placed.affine, original.affine, atol=1e-4)
        assert np.array_equal(placed.array, original.array)
    assert list(ds.label_map.names[1:]) == ["1", "2"]
    again = F.materialise(inp, tmp_path / "w")  # same sources: reused
    assert again == (root, split_file)
    test_label = (scans["root"] / "tl" / f"{scans['test']}.nii.gz").resolve()
    assert F.name_sources(f"{root / 'labelsTr' / scans['test']}.nii.gz: bad", root) == f"{test_label}: bad"
    renamed = dataclasses.replace(inp, labels="1=first,2=second")  # other sources, WORK unused: rewritten
    assert F.materialise(renamed, tmp_path / "w") == (root, split_file)
    assert json.loads((root / "dataset.json").read_text())["labels"]["first"] == 1
    (tmp_path / "w" / "features").mkdir()  # a stage wrote into WORK: its dataset stays as it was made
    with pytest.raises(InputError, match="made from other images"):
        F.materialise(inp, tmp_path / "w")
    assert json.loads((root / "dataset.json").read_text())["modality"] == {"0": "unknown"}


def test_modality_reaches_dataset_json_and_the_plan(scans, tmp_path):
    """run --images ... --modality CT: dataset.json names CT (the plan's normalisation then is CT's,
    the rule saying it came from dataset.json); without it "unknown"; a changed --modality is
    another dataset; --modality without --images is refused."""
    from semisam_o1.core.errors import InputError
    from semisam_o1.pipeline.run import RunSettings
    from semisam_o1.stages.plan import PlanSettings, make_plan

    s = RunSettings(images=scans["images"], template_image=scans["template_image"],
                    template_label=scans["template_label"], modality="CT", output=tmp_path / "w", preset="quick")
    inp = s.folder_input
    assert inp.modality == "CT"
    root, split_file = F.materialise(inp, tmp_path / "w")
    assert json.loads((root / "dataset.json").read_text())["modality"] == {"0": "CT"}
    p = make_plan(PlanSettings(input=root, split=split_file, output=tmp_path / "plan.json", timing=False, quiet=True))
    norm = p["decisions"]["normalisation"]
    assert norm["value"]["method"] == "fixed_clip_zscore" and "CT from dataset.json" in norm["reason"]
    (tmp_path / "w" / "features").mkdir()  # a stage wrote into WORK: another modality is another dataset
    with pytest.raises(InputError, match="other images"):
        F.materialise(F.FolderInput(**{**inp.__dict__, "modality": "MRI"}), tmp_path / "w")
    plain = F.FolderInput(**{**inp.__dict__, "modality": None})
    assert F.check_inputs(plain).sources_digest != F.check_inputs(inp).sources_digest
    with pytest.raises(InputError, match="--modality goes with --images"):
        RunSettings(input=tmp_path, split=tmp_path / "s.json", modality="CT", output=tmp_path / "w2")


def _bad_run(tmp_path, *args) -> tuple[str, Path]:
    out = tmp_path / "work"
    line = _one_line(_cli("run", *args, "-o", str(out), "--preset", "quick", timeout=120))
    assert not out.exists(), sorted(out.rglob("*"))
    return line, out


def test_image_folder_without_image(tmp_path, scans):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    line, _ = _bad_run(tmp_path, "--images", str(tmp_path / "empty"), "--template-image",
                       str(scans["template_image"]), "--template-label", str(scans["template_label"]))
    assert "no image" in line and "empty" in line


def test_template_image_without_label(tmp_path, scans):
    line, _ = _bad_run(tmp_path, "--images", str(scans["images"]), "--template-image", str(scans["template_image"]))
    assert "--template-label" in line


def test_label_on_another_grid(tmp_path, scans):
    vol = read_label_values(scans["template_label"])
    moved = nib.load(str(scans["template_label"]))
    affine = moved.affine.copy()
    affine[0, 3] += 5.0
    bad = helpers.write_nifti(tmp_path / "moved_label.nii.gz", np.asarray(moved.dataobj), affine, dtype=np.uint8)
    line, _ = _bad_run(tmp_path, "--images", str(scans["images"]), "--template-image", str(scans["template_image"]),
                       "--template-label", str(bad))
    assert "moved_label" in line and "grid differs" in line
    assert vol.shape  # the original is untouched and readable


def test_damaged_compressed_mha_in_the_images_folder(tmp_path, scans):
    """A compressed .mha of --images whose zlib stream holds a changed byte (SimpleITK alone returns
    the changed voxels and prints its own lines): one line naming the user's file, exit 2, no WORK."""
    images = Path(shutil.copytree(scans["images"], tmp_path / "scans"))
    bad = images / f"{scans['pool'][1]}.mha"
    sitk.WriteImage(sitk.ReadImage(str(bad)), str(bad), useCompression=True)
    helpers.damage_itk_stream(bad, "changed")
    line, _ = _bad_run(tmp_path, "--images", str(images), "--template-image", str(images / scans["template_image"].name),
                       "--template-label", str(scans["template_label"]))
    assert line.startswith("semisam-o1 run: error: ") and line.endswith(
        f"{bad.name}: the file is corrupt (zlib Adler-32 check failed)"), line
    assert str(images) in line or str(images.resolve()) in line


def test_broken_link_in_the_images_folder(tmp_path, scans):
    """A scan of --images that is a symbolic link to a file that is gone: one line naming the link
    (it is not dropped from the cohort silently); a hidden or unsupported broken link is ignored."""
    images = Path(shutil.copytree(scans["images"], tmp_path / "scans"))
    link = images / "moved.nii.gz"
    link.symlink_to(tmp_path / "elsewhere" / "moved.nii.gz")
    (images / ".hidden.nii.gz").symlink_to(tmp_path / "gone")
    (images / "notes.txt").symlink_to(tmp_path / "gone")
    line, _ = _bad_run(tmp_path, "--images", str(images), "--template-image", str(images / scans["template_image"].name),
                       "--template-label", str(scans["template_label"]))
    assert line == (f"semisam-o1 run: error: {link}: a broken symbolic link (its target "
                    f"{tmp_path / 'elsewhere' / 'moved.nii.gz'} does not exist)")


def test_unnamed_label_value_and_lonely_test_images(tmp_path, scans):
    """--labels missing a value of the template's label, or naming one it lacks (refused before
    anything runs, not a warning in propagate), and test images without labels."""
    line, _ = _bad_run(tmp_path, "--images", str(scans["images"]), "--template-image", str(scans["template_image"]),
                       "--template-label", str(scans["template_label"]), "--labels", "1=only")
    assert "label value 2" in line
    line, _ = _bad_run(tmp_path, "--images", str(scans["images"]), "--template-image", str(scans["template_image"]),
                       "--template-label", str(scans["template_label"]), "--labels", "1=first,2=second,3=third")
    assert line == (f"semisam-o1 run: error: {scans['template_label']}: --labels 1=first,2=second,3=third names "
                    "3=third, a value the template's label does not hold (each class is learnt from its template "
                    "voxels); drop it or label it")
    line, _ = _bad_run(tmp_path, "--images", str(scans["images"]), "--template-image", str(scans["template_image"]),
                       "--template-label", str(scans["template_label"]), "--test-images", str(scans["root"] / "ti"))
    assert "--test-labels" in line


class _Validated(Exception):
    """Raised where ``run`` takes its lock, i.e. once every input check passed."""


def _stop_after_checks(work):
    raise _Validated(work)


def test_failed_check_names_the_users_file_and_the_retry_runs(tmp_path, scans, cohort, capsys, monkeypatch):
    """A NaN voxel in one scan of --images: the line names the user's file (not its link under
    WORK/dataset) and no WORK is left; the file fixed, the same command gets past the checks."""
    images = Path(shutil.copytree(scans["images"], tmp_path / "scans"))
    bad = images / "extra.nii.gz"
    img = nib.load(str(cohort.root / "imagesTr" / f"{cohort.unlabeled[2]}.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    work = tmp_path / "work"
    args = ["run", "--images", str(images), "--template-image", str(images / scans["template_image"].name),
            "--template-label", str(scans["template_label"]), "-o", str(work), "--preset", "quick", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"semisam-o1 run: error: {bad.resolve()}: 1 voxels are NaN or Inf; an image must hold finite "
                   "intensities"], err
    assert not work.exists()
    data[1, 2, 3] = 0.0
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    monkeypatch.setattr(run_module, "FolderLock", _stop_after_checks)
    with pytest.raises(_Validated):
        cli.main(args)


# --------------------------------------------------------------------------- end to end


def test_run_fills_final(work, scans, cohort):
    final = work / "final"
    names = sorted(p.name for p in (final / "labels").iterdir())
    assert names == sorted(p.name for p in scans["images"].iterdir())
    for p in scans["images"].iterdir():  # each label in its image's format and geometry
        lab = final / "labels" / p.name
        if image_io.is_nifti(p):
            assert np.allclose(nib.load(str(lab)).affine, nib.load(str(p)).affine)
            assert nib.load(str(lab)).shape == nib.load(str(p)).shape
        else:
            size, spacing, origin, direction = _itk_geometry(lab)
            ref = _itk_geometry(p)
            assert (size, spacing, origin) == ref[:3] and np.allclose(direction, ref[3])
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))).tolist())
        assert values <= {0, 1, 2} and values - {0}
    bundle = json.loads((final / "model" / "bundle.json").read_text())
    assert bundle["labels"] == {"background": 0, "first": 1, "second": 2}
    assert bundle["version"] and bundle["normalisation"] and len(bundle["spacing_mm"]) == 3
    assert (final / "model" / "model.pt").is_file()
    for name in ("report.json", "report.html", "cases.csv", "report_dice_by_round.png", "report_montage.png"):
        assert (final / name).is_file(), name
    rows = list(csv.DictReader((final / "cases.csv").open()))
    assert [r["role"] for r in rows] == ["unlabeled"] * 2 + ["template"]
    agreements = [float(r["agreement"]) for r in rows[:2]]
    assert agreements == sorted(agreements) and all(0 <= a <= 1 for a in agreements)
    assert all((final / r["label"]).is_file() for r in rows)
    report = json.loads((final / "report.json").read_text())
    # the label-free round rule chose the labels' round (the quick preset's 4-iteration network
    # usually loses to round 0) and round 1's network; the test pair was evaluated
    assert report["final"]["round"] == report["chosen"]["labels_round"] in (0, 1)
    assert report["final"]["model_round"] == 1 and report["final_test_metrics"]
