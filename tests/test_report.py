"""report: report.json and the two pictures from a work folder laid out as `run` leaves it,
on the cohort (real or synthetic)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import write_nifti

from semisam_o1.data.dataset import Dataset
from semisam_o1.pipeline.report import write_report
from semisam_o1.stages.evaluate import EvaluateSettings, evaluate


def _copy_labels(ds: Dataset, cases, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for c in cases:
        shutil.copy(ds.labels[c], folder / ds.labels[c].name)


def _work(tmp_path, cohort):
    """round0/pseudo: the pool's real labels; round1/pred: the same with the last class erased
    in the first pool case; round1/pseudo: real labels for all but the last pool case;
    round1/test: the test labels, scored by evaluate into round1/test_metrics.json."""
    ds = Dataset(cohort.root)
    work = tmp_path / "work"
    pool = cohort.unlabeled
    _copy_labels(ds, pool, work / "round0" / "pseudo")
    _copy_labels(ds, pool, work / "round1" / "pred")
    last = ds.label_map.values[ds.label_map.foreground[-1]]
    img = nib.load(str(ds.labels[pool[0]]))
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[data == last] = 0
    write_nifti(work / "round1" / "pred" / ds.labels[pool[0]].name, data, img.affine, dtype=np.uint8)
    _copy_labels(ds, pool[:-1], work / "round1" / "pseudo")
    (work / "round1" / "pseudo" / "refine.json").write_text(json.dumps({"voxels_changed_total": 7, "cases": {}}))
    _copy_labels(ds, cohort.test, work / "round1" / "test")
    evaluate(EvaluateSettings(input=work / "round1" / "test", gt=cohort.root, cases=tuple(cohort.test),
                              output=work / "round1" / "test_metrics.json", quiet=True))
    return ds, work


def test_report_from_a_work_folder(tmp_path, cohort):
    ds, work = _work(tmp_path, cohort)
    pool = cohort.unlabeled
    times = {"encode": 1.0, "propagate": 2.0, "round1/train": 3.0, "round1/predict": 4.0}
    report = write_report(work, ds, template=cohort.template, unlabeled=pool, test=cohort.test, rounds=1,
                          times=times, config={"rounds": 1}, selected=pool[:2])
    assert json.loads((work / "report.json").read_text()) == report
    names = [ds.label_map.names[c] for c in ds.label_map.foreground]
    r0, r1 = report["rounds"]
    assert r0["pseudo_label_dice_unlabeled"] == {"cases": 4, "dice": {n: 1.0 for n in names},
                                                 "mean_foreground_dice": 1.0}
    # the UNet's pool predictions: the last class missed in one of four cases -> 0.75
    pred = r1["prediction_dice_unlabeled"]
    assert pred["cases"] == 4 and pred["dice"][names[-1]] == pytest.approx(0.75)
    assert all(pred["dice"][n] == 1.0 for n in names[:-1])
    assert r1["pseudo_label_dice_unlabeled"]["cases"] == 3  # a case without a file is left out
    assert r1["test_metrics"]["dice"] == {n: 1.0 for n in names}
    assert r1["test_metrics"]["mean_foreground"]["hd95"] == 0.0
    assert report["final_test_metrics"] == r1["test_metrics"]
    assert r1["refinement"] == {"voxels_changed_total": 7}
    assert r0["seconds"] == {"encode": 1.0, "propagate": 2.0}
    assert r1["seconds"] == {"round1/train": 3.0, "round1/predict": 4.0} and report["seconds_total"] == 10.0
    assert report["selection"]["n_selected"] == 2
    assert report["selection"]["pseudo_label_dice_selected_round0"]["cases"] == 2
    for name in ("report_dice_by_round.png", "report_montage.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_pool_dice_is_semisam_metrics_dice(tmp_path, cohort):
    """The report's pool Dice per class is the mean over cases of semisam_o1.methods.metrics.dice_per_class."""
    from semisam_o1.data.images import read_label
    from semisam_o1.methods.metrics import dice_per_class

    ds, work = _work(tmp_path, cohort)
    report = write_report(work, ds, template=cohort.template, unlabeled=cohort.unlabeled, test=cohort.test,
                          rounds=1, times={}, config={})
    lm = ds.label_map
    rows = []
    for c in cohort.unlabeled:
        gt = ds.read_label(c)
        pred = read_label(work / "round1" / "pred" / ds.labels[c].name, lm, reference=gt)
        rows.append(dice_per_class(pred.array, gt.array, lm.foreground))
    expected = dict(zip([lm.names[c] for c in lm.foreground], np.mean(rows, axis=0)))
    assert report["rounds"][1]["prediction_dice_unlabeled"]["dice"] == pytest.approx(expected)
    assert report["selection"] is None


def test_label_free_evidence_is_reported_and_drawn_without_real_labels(tmp_path, cohort, monkeypatch):
    """Each round's label-free evidence (round.json: referee agreement over the cases the referee
    can judge, the held-out template's Dice) is in report.json, and the chart draws it: the only
    lines of a run whose cohort has no real labels."""
    from semisam_o1.pipeline import report as report_module
    from semisam_o1.pipeline import rounds

    ds, work = _work(tmp_path, cohort)
    pool = cohort.unlabeled
    for r, (ref, tpl) in enumerate([(0.70, None), (0.74, 0.81)]):
        (work / f"round{r}" / rounds.ROUND_JSON).write_text(json.dumps(
            {"round": r, "referee": {c: ref + 0.1 * (i == 0) for i, c in enumerate(pool)}, "template_dice": tpl}))
    (work / "referee").mkdir()
    (work / "referee" / "reliability.json").write_text(json.dumps(
        {"cases": {c: {"reliable": i > 0} for i, c in enumerate(pool)}, "reliable": True,
         "reliable_cases": len(pool) - 1, "pool_cases": len(pool), "rule": "r"}))
    monkeypatch.setattr(ds, "labels", {cohort.template: ds.labels[cohort.template]})  # only the template labelled
    drawn = []
    real_plot = report_module._plot_label_free
    monkeypatch.setattr(report_module, "_plot_label_free",
                        lambda ax, entries, rs: (drawn.append([e["label_free"] for e in entries]),
                                                 real_plot(ax, entries, rs)))
    report = write_report(work, ds, template=cohort.template, unlabeled=pool, test=[], rounds=1, times={},
                          config={})
    lf = [e["label_free"] for e in report["rounds"]]
    assert lf[0]["referee_agreement"] == pytest.approx(0.70) and lf[0]["referee_cases"] == len(pool) - 1
    assert lf[1]["referee_agreement"] == pytest.approx(0.74) and lf[1]["template_dice"] == 0.81
    assert report["rounds"][0]["pseudo_label_dice_unlabeled"] is None
    assert report["chosen"]["referee_reliability"]["reliable_cases"] == len(pool) - 1
    assert drawn == [lf]
    assert (work / "report_dice_by_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_montage_shows_a_2d_image_as_its_file_shows_it(tmp_path):
    """A 2D PNG read by the product's reader and drawn by the montage's orientation rule is the
    file's own pixel array (rows down, columns across; the rule for volumes rotates axial slices)."""
    from PIL import Image

    from semisam_o1.data.images import read_image
    from semisam_o1.pipeline.report import displayed

    pixels = (np.arange(30 * 50).reshape(30, 50) % 251).astype(np.uint8)  # 30 rows, 50 columns, no symmetry
    Image.fromarray(pixels).save(tmp_path / "a.png")
    vol = read_image(tmp_path / "a.png")
    assert vol.array.shape == (30, 50, 1)
    np.testing.assert_array_equal(displayed(vol.array[:, :, 0], flat=True), pixels)
    np.testing.assert_array_equal(displayed(vol.array[:, :, 0], flat=False), np.rot90(vol.array[:, :, 0]))
