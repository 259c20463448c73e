"""`semisam-o1 predict -m BUNDLE -i DIR_OR_FILE -o OUT [--mirror]` on plain scans.

A quick model trained on the cohort is bundled (semisam_o1.stages.bundle.write_bundle); predict writes
one label per scan named like it, in its format and grid (.nii.gz, .nrrd, .mha), on a folder and
on one file; the bundle predicts identically once the work folder it came from is deleted;
--mirror averages the softmax over the training flips; the Python API returns the paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import semisam_o1
from semisam_o1 import cli
from semisam_o1.core.errors import InputError
from semisam_o1.stages import nets
from semisam_o1.stages.bundle import BUNDLE_JSON, read_bundle, write_bundle
from semisam_o1.stages.predict import PredictSettings, mirror_sets, predict, predict_volume
from semisam_o1.stages.train import TrainSettings, train

THREADS = 2


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, cohort):
    """A work folder with a quick model (trained on the real labels of two pool cases), its bundle,
    and a plain folder of three scans (.nii.gz, .nrrd, .mha)."""
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("bundle")
    work = root / "work"
    labels = work / "labels"
    labels.mkdir(parents=True)
    for c in cohort.unlabeled[:2]:
        shutil.copy(cohort.root / "labelsTr" / f"{c}.nii.gz", labels)
    model = work / "model"
    train(TrainSettings(input=cohort.root, labels=labels, template=cohort.template, output=model,
                        cases=(cohort.template, *cohort.unlabeled[:2]), preset="quick", iterations=4, device="cpu",
                        threads=THREADS, quiet=True))
    out = write_bundle(model, work / "final" / "model", rule=None, spacing=[1.0, 1.0, 1.0], round_=1,
                       template=cohort.template)
    scans = root / "scans"
    scans.mkdir()
    a, b, c = cohort.test[0], cohort.test[1], cohort.unlabeled[3]
    src = cohort.root / "imagesTr"
    shutil.copy(src / f"{a}.nii.gz", scans)
    sitk.WriteImage(sitk.ReadImage(str(src / f"{b}.nii.gz")), str(scans / f"{b}.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(src / f"{c}.nii.gz")), str(scans / f"{c}.mha"))
    return {"root": root, "work": work, "bundle": out, "scans": scans, "model": model}


def _predict(model, inp, out, **kw) -> dict:
    kw = {"device": "cpu", "threads": THREADS, "quiet": True, **kw}
    return predict(PredictSettings(model=model, input=inp, output=out, **kw))


def test_bundle_is_described(bundle):
    info = read_bundle(bundle["bundle"])
    config = json.loads((bundle["model"] / nets.CONFIG_NAME).read_text())
    assert info["labels"] == dict(zip(config["label_map"]["names"], config["label_map"]["values"]))
    assert info["normalisation"] == config["normalisation"] and info["version"] == semisam_o1.__version__
    assert info["flip_axes"] == config["preset_params"]["flip_axes"]
    assert nets.is_finished(bundle["bundle"])


def test_predict_folder_writes_labels_in_each_scans_format(bundle):
    out = bundle["root"] / "pred_folder"
    summary = _predict(bundle["bundle"], bundle["scans"], out)
    assert summary["predicted"] == 3 and set(summary["seconds_per_case"]) == set(summary["labels"])
    for scan in bundle["scans"].iterdir():
        lab = out / scan.name
        assert lab.is_file()
        ref, got = sitk.ReadImage(str(scan)), sitk.ReadImage(str(lab))
        assert got.GetSize() == ref.GetSize() and np.allclose(got.GetSpacing(), ref.GetSpacing())
        assert np.allclose(got.GetOrigin(), ref.GetOrigin()) and np.allclose(got.GetDirection(), ref.GetDirection())
        assert set(np.unique(_arr(lab)).tolist()) <= set(read_bundle(bundle["bundle"])["labels"].values())
    nii = next(p for p in bundle["scans"].iterdir() if p.name.endswith(".nii.gz"))
    assert np.allclose(nib.load(str(out / nii.name)).affine, nib.load(str(nii)).affine)
    again = _predict(bundle["bundle"], bundle["scans"], out)  # finished: nothing predicted again
    assert again["predicted"] == 0 and again["skipped"] == 3


def test_predict_one_file_equals_the_folders_label(bundle):
    folder = bundle["root"] / "pred_folder"
    if not folder.is_dir():
        _predict(bundle["bundle"], bundle["scans"], folder)
    scan = next(p for p in bundle["scans"].iterdir() if p.name.endswith(".nrrd"))
    out = bundle["root"] / "pred_file"
    rc = cli.main(["predict", "-m", str(bundle["bundle"]), "-i", str(scan), "-o", str(out), "--device", "cpu",
                   "--threads", str(THREADS), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".json")) == [scan.name]
    assert np.array_equal(_arr(out / scan.name), _arr(folder / scan.name))


def test_bundle_predicts_identically_after_the_work_folder_is_deleted(bundle, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(bundle["work"], work)
    before = _predict(work / "final" / "model", bundle["scans"], tmp_path / "a")
    kept = shutil.copytree(work / "final" / "model", tmp_path / "kept_model")
    shutil.rmtree(work)
    after = _predict(kept, bundle["scans"], tmp_path / "b")
    for name in (Path(p).name for p in before["labels"].values()):
        assert np.array_equal(_arr(tmp_path / "a" / name), _arr(tmp_path / "b" / name))
    assert after["entropy"] == pytest.approx(before["entropy"])


def test_mirror_averages_the_training_flips(bundle, cohort):
    net, config = nets.load_model(bundle["bundle"], "cpu")
    image = nib.load(str(cohort.root / "imagesTr" / f"{cohort.test[0]}.nii.gz")).get_fdata().astype(np.float32)
    assert mirror_sets(config) == [(), (0,)]
    plain = predict_volume(net, image, config, torch.device("cpu"))
    flipped = predict_volume(net, np.flip(image, 0).copy(), config, torch.device("cpu"))
    mirrored = predict_volume(net, image, config, torch.device("cpu"), mirror=True)
    assert np.allclose(mirrored, (plain + np.flip(flipped, 1)) / 2, atol=1e-5)
    assert np.allclose(mirrored.sum(axis=0), 1.0, atol=1e-4)


def test_python_api_returns_the_paths(bundle, tmp_path):
    paths = semisam_o1.predict(model=bundle["bundle"], input=bundle["scans"], output=tmp_path / "api",
                               device="cpu", mirror=True, quiet=True, threads=THREADS)
    assert sorted(p.name for p in paths) == sorted(p.name for p in bundle["scans"].iterdir())
    assert all(p.is_file() for p in paths)


def test_bad_inputs_are_one_line(bundle, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for inp, what in ((empty, "no image"), (tmp_path / "missing", "not found"),
                      (bundle["model"] / nets.CONFIG_NAME, "not a scan")):
        rc = cli.main(["predict", "-m", str(bundle["bundle"]), "-i", str(inp), "-o", str(tmp_path / "o"),
                       "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and what in err[0], err
        assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="overwrite the scans"):
        _predict(bundle["bundle"], bundle["scans"], bundle["scans"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / BUNDLE_JSON).write_text("{}")
    with pytest.raises(InputError, match="not a semisam-o1 bundle"):
        read_bundle(tmp_path / "bad")


def test_corrupt_gzip_scan_is_one_line(bundle, tmp_path, capsys):
    """A scan whose gzip stream fails its CRC check (it decompresses, one byte changed) is refused
    with one line naming it, exit 2, and no label written from its wrong voxels."""
    scan = next(bundle["scans"].glob("*.nii.gz"))
    bad = helpers.corrupt_gzip_stream(Path(shutil.copy(scan, tmp_path / scan.name)))
    rc = cli.main(["predict", "-m", str(bundle["bundle"]), "-i", str(bad), "-o", str(tmp_path / "o"),
                   "--device", "cpu", "--quiet", "--threads", str(THREADS)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"semisam-o1 predict: error: {bad}: the file is corrupt (gzip CRC check failed)"], err
    assert not list((tmp_path / "o").rglob("*.nii.gz"))


def test_scan_at_another_spacing_gets_one_warning(bundle, tmp_path, capsys):
    """A scan whose voxels are 3 mm on one axis against the bundle's spacing_mm of 1 mm: predicted,
    with one warning line naming it and both spacings; a scan at the bundle's spacing gets none."""
    scan = next(bundle["scans"].glob("*.nii.gz"))
    img = nib.load(str(scan))
    coarse = tmp_path / "in" / "coarse.nii.gz"
    coarse.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([3.0, 1.0, 1.0, 1.0])), str(coarse))
    rc = cli.main(["predict", "-m", str(bundle["bundle"]), "-i", str(coarse), "-o", str(tmp_path / "o"),
                   "--device", "cpu", "--quiet", "--threads", str(THREADS)])
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert rc == 0 and err == [f"semisam-o1 predict: warning: {coarse}: voxel spacing 3 x 1 x 1 mm differs from the "
                               "model's 1 x 1 x 1 mm by more than 2x on an axis; check its labels (resample the scan "
                               "to match)"], err
    assert (tmp_path / "o" / "coarse.nii.gz").is_file()
    rc = cli.main(["predict", "-m", str(bundle["bundle"]), "-i", str(scan), "-o", str(tmp_path / "o2"),
                   "--device", "cpu", "--quiet", "--threads", str(THREADS)])
    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_bundle_from_mixed_models_is_one_line(bundle, tmp_path, capsys):
    """A bundle whose config.json describes another network than model.pt holds (channels doubled),
    or whose bundle.json names other labels or another patch than its config.json: one line naming
    the file and the mismatch, exit 2, not torch's state_dict dump."""
    cases = {}
    for name, change in (("net", lambda c, b: c["net"].update(channels=[8, 16, 32])),
                         ("labels", lambda c, b: b["labels"].update(Anterior=7)),
                         ("patch", lambda c, b: b.update(patch=[32, 32, 32]))):
        mixed = Path(shutil.copytree(bundle["bundle"], tmp_path / name))
        config, info = (json.loads((mixed / f).read_text()) for f in (nets.CONFIG_NAME, BUNDLE_JSON))
        change(config, info)
        (mixed / nets.CONFIG_NAME).write_text(json.dumps(config))
        (mixed / BUNDLE_JSON).write_text(json.dumps(info))
        rc = cli.main(["predict", "-m", str(mixed), "-i", str(bundle["scans"]), "-o", str(tmp_path / f"o_{name}"),
                       "--device", "cpu", "--quiet", "--threads", str(THREADS)])
        cases[name] = (rc, capsys.readouterr().err.strip().splitlines())
    rc, err = cases["net"]
    assert rc == 2 and len(err) == 1 and err[0].startswith(
        f"semisam-o1 predict: error: {tmp_path / 'net' / nets.WEIGHTS_NAME}: model.pt does not match config.json ("), err
    assert " tensors of another shape, e.g. model." in err[0] and err[0].endswith("the two files come from different models")
    assert len(err[0]) < 400, err[0]
    for name in ("labels", "patch"):
        rc, err = cases[name]
        assert rc == 2 and len(err) == 1 and err[0].startswith(
            f"semisam-o1 predict: error: {tmp_path / name / BUNDLE_JSON}: {name} "), err
        assert "!= config.json's " in err[0], err
        assert err[0].endswith("bundle.json and config.json come from different models"), err
