"""Case selection (selection.py): agreement against a plain reference, ranking with a known
answer on the cohort's real labels (real or synthetic), and the errors."""

from __future__ import annotations

import json
import shutil

import helpers
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from semisam_o1.core.errors import InputError
from semisam_o1.data.dataset import Dataset
from semisam_o1.methods import metrics
from semisam_o1.pipeline import selection


def test_agreement_is_the_mean_foreground_dice():
    """The agreement selection ranks by (metrics.mean_dice) against a count-by-count reference."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (9, 8, 7))
    b = np.where(rng.random(a.shape) < 0.3, rng.integers(0, 3, a.shape), a)
    ref = []
    for c in (1, 2):
        inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x == c and y == c)
        ref.append(2 * inter / ((a == c).sum() + (b == c).sum()))
    assert metrics.mean_dice(a, b, [1, 2]) == pytest.approx(np.mean(ref), rel=1e-12)
    assert metrics.mean_dice(a, a, [1, 2]) == 1.0
    z = np.zeros_like(a)
    assert metrics.mean_dice(z, z, [1, 2]) == 1.0  # absent from both: they agree
    assert metrics.mean_dice(a, z, [1, 2]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mean_dice(a, a[:-1], [1])
    assert not hasattr(selection, "dice_per_class")


def test_select_by_agreement_known_ranking(tmp_path, cohort):
    """Predictions = real labels, eroded 0, 1, 2 and 3 times: agreement falls with the
    erosion, so the least eroded cases are kept, in that order."""
    ds = Dataset(cohort.root)
    cases = cohort.unlabeled[:4]
    labels, pred = tmp_path / "labels", tmp_path / "pred"
    labels.mkdir()
    erosions = {cases[0]: 2, cases[1]: 0, cases[2]: 3, cases[3]: 1}
    expected = {}
    for case in cases:
        src = ds.label_path(case)
        shutil.copyfile(src, labels / src.name)
        img = nib.load(str(src))
        lab = np.asarray(img.dataobj).astype(np.uint8)
        out = lab.copy()
        for c in (1, 2):
            m = lab == c
            if erosions[case]:
                m = ndimage.binary_erosion(m, iterations=erosions[case])
            out[(lab == c) & ~m] = 0
        helpers.write_nifti(pred / src.name, out, img.affine, dtype=np.uint8)
        expected[case] = np.mean([helpers.dice_reference(lab == c, out == c) for c in (1, 2)])
    info = selection.select_by_agreement(ds, labels, pred, cases, 0.5, output=tmp_path / "sel.json")
    assert info["selected"] == [cases[1], cases[3]]  # ceil(0.5 * 4) = 2, best first
    assert info["agreement"][cases[1]] == 1.0
    assert info["agreement"] == pytest.approx(expected, abs=1e-6)
    ag = [info["agreement"][c] for c in (cases[1], cases[3], cases[0], cases[2])]
    assert all(x > y for x, y in zip(ag, ag[1:]))
    assert json.loads((tmp_path / "sel.json").read_text())["selected"] == info["selected"]
    assert selection.select_by_agreement(ds, labels, pred, cases, 0.2)["selected"] == [cases[1]]  # at least one
    assert len(selection.select_by_agreement(ds, labels, pred, cases, 1.0)["selected"]) == 4
    with pytest.raises(InputError, match="must be in"):
        selection.select_by_agreement(ds, labels, pred, cases, 0.0)
    (pred / ds.label_path(cases[2]).name).unlink()
    with pytest.raises(InputError, match=f"no prediction file for case {cases[2]}"):
        selection.select_by_agreement(ds, labels, pred, cases, 0.5)
