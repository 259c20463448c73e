"""Case selection (selection.py): agreement against a plain reference, ranking with a known
answer on real Hippocampus labels, and the errors."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from semisam_o1 import selection
from semisam_o1.errors import InputError
from semisam_o1.io import Dataset


def test_label_agreement_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, (9, 8, 7))
    b = np.where(rng.random(a.shape) < 0.3, rng.integers(0, 3, a.shape), a)
    ref = []
    for c in (1, 2):
        inter = sum(1 for x, y in zip(a.ravel(), b.ravel()) if x == c and y == c)
        ref.append(2 * inter / ((a == c).sum() + (b == c).sum()))
    assert selection.label_agreement(a, b, [1, 2]) == pytest.approx(np.mean(ref), rel=1e-12)
    assert selection.label_agreement(a, a, [1, 2]) == 1.0
    z = np.zeros_like(a)
    assert selection.label_agreement(z, z, [1, 2]) == 1.0  # absent from both: they agree
    assert selection.label_agreement(a, z, [1, 2]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        selection.label_agreement(a, a[:-1], [1])


def _write_like(src, array, dst):
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image(array.astype(np.uint8), img.affine, img.header), str(dst))


def test_select_cases_known_ranking(tmp_path, data_root, split):
    """Predictions = real labels, eroded 0, 1, 2 and 3 times: agreement falls with the
    erosion, so the least eroded cases are kept, in that order."""
    ds = Dataset(data_root)
    cases = split["unlabeled"][:4]
    labels, pred = tmp_path / "labels", tmp_path / "pred"
    labels.mkdir()
    pred.mkdir()
    erosions = {cases[0]: 2, cases[1]: 0, cases[2]: 3, cases[3]: 1}
    for case in cases:
        src = data_root / "labelsTr" / f"{case}.nii.gz"
        shutil.copyfile(src, labels / f"{case}.nii.gz")
        lab = np.asarray(nib.load(str(src)).dataobj).astype(np.uint8)
        out = lab.copy()
        for c in (1, 2):
            m = lab == c
            if erosions[case]:
                m = ndimage.binary_erosion(m, iterations=erosions[case])
            out[(lab == c) & ~m] = 0
        _write_like(src, out, pred / f"{case}.nii.gz")
    info = selection.select_cases(ds, labels, pred, cases, 0.5, output=tmp_path / "sel.json")
    assert info["selected"] == [cases[1], cases[3]]  # ceil(0.5 * 4) = 2, best first
    assert info["agreement"][cases[1]] == 1.0
    ag = [info["agreement"][c] for c in (cases[1], cases[3], cases[0], cases[2])]
    assert all(x > y for x, y in zip(ag, ag[1:]))
    assert json.loads((tmp_path / "sel.json").read_text())["selected"] == info["selected"]
    assert selection.select_cases(ds, labels, pred, cases, 0.2)["selected"] == [cases[1]]  # at least one
    assert len(selection.select_cases(ds, labels, pred, cases, 1.0)["selected"]) == 4
    with pytest.raises(InputError, match="must be in"):
        selection.select_cases(ds, labels, pred, cases, 0.0)
    (pred / f"{cases[2]}.nii.gz").unlink()
    with pytest.raises(InputError, match=f"no prediction file for case {cases[2]}"):
        selection.select_cases(ds, labels, pred, cases, 0.5)
