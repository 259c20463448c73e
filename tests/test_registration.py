"""registration: the template warped to a case by ANTs SyN (antspyx), and propagate's --prior.

A synthetic case made from the template by a known shift and scale (scipy.ndimage.affine_transform)
must get back the moved label (Dice against the known moved label, not against the registration's
own output), the template-coordinate field must invert the known map, and propagate's --prior is
recorded, checked (one line, exit 2) and resumes from its cache of warps. Tiny volumes and few SyN
iterations (the test's RegistrationParams only) keep it to seconds.
"""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
from scipy import ndimage

from semisam_o1.core.errors import InputError
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label
from semisam_o1.methods import registration as R
from semisam_o1.stages import propagate as P

FAST = R.RegistrationParams(reg_iterations=(20, 10, 0))
SHIFT = np.array([3.0, -2.0, 2.0])  # voxels
SCALE = 1.15


class _Vol:
    """The two fields of a :class:`semisam_o1.data.images.Volume` that registration reads."""

    def __init__(self, array, spacing=(1.0, 1.0, 1.0)):
        self.array, self.spacing = array, spacing


def _moved(array, order):
    """``array`` scaled by SCALE about the box centre and shifted by SHIFT: output voxel x samples the
    input at centre + (x - SHIFT - centre) / SCALE."""
    centre = (np.array(array.shape) - 1) / 2
    offset = centre - (centre + SHIFT) / SCALE
    return ndimage.affine_transform(array, np.eye(3) / SCALE, offset=offset, order=order, mode="nearest")


@pytest.fixture(scope="module")
def pair():
    image, label = helpers.synthetic_case(np.random.default_rng(3), shape=(32, 32, 32), max_shift=0)
    case_image = _moved(image, 1)
    case_label = _moved(label, 0)
    warp = R.warp_template(_Vol(image), label, _Vol(case_image), FAST, threads=1)
    return image, label, case_image, case_label, warp


def _fg_dice(a, b):
    return float(np.mean([helpers.dice_reference(a == c, b == c) for c in (1, 2)]))


def test_syn_recovers_a_known_shift_and_scale(pair):
    _, label, _, case_label, warp = pair
    assert warp.label.shape == case_label.shape and warp.label.dtype == np.uint8
    identity = _fg_dice(label, case_label)
    registered = _fg_dice(warp.label, case_label)
    assert identity < 0.5  # measured 0.27: without registration the template's label misses
    assert registered > 0.85  # measured 0.907 (antspyx 0.6.3, 1 thread, seed 1)


def test_coords_field_inverts_the_known_map(pair):
    _, _, _, case_label, warp = pair
    centre = (np.array(case_label.shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in case_label.shape], indexing="ij"), -1)
    expected = centre + (grid - SHIFT - centre) / SCALE  # the template voxel each case voxel came from
    err = np.linalg.norm(warp.coords - expected, axis=-1)[case_label > 0]
    assert np.median(err) < 0.5  # voxels; measured 0.195 (the inverse map's direction would give 9.8)


def test_soft_prior_is_a_distribution_whose_argmax_is_the_nearest_label(pair):
    _, label, _, _, warp = pair
    prior = R.soft_prior(label, warp.coords, 3)
    assert prior.shape == (3, *warp.label.shape) and np.allclose(prior.sum(0), 1, atol=1e-5)
    near = ndimage.map_coordinates(label, np.moveaxis(warp.coords, -1, 0), order=0, mode="constant")
    assert (np.argmax(prior, 0) == near).mean() > 0.97  # measured 0.998


def test_same_seed_one_thread_same_warp(pair):
    image, label, case_image, _, warp = pair
    again = R.warp_template(_Vol(image), label, _Vol(case_image), FAST, threads=1)
    assert np.array_equal(again.label, warp.label) and np.array_equal(again.coords, warp.coords)


# --------------------------------------------------------------------------- propagate --prior


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic cohort (template + 2 pool cases) and a one-hot feature store of its labels."""
    root = tmp_path_factory.mktemp("reg") / "ds"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(28, 28, 28), seed=1)
    ds = Dataset(root)
    rng = np.random.default_rng(0)
    feats = {c: helpers.onehot_features(ds.read_label(c, reference=ds.read_image(c)).array, 3, 0.3, rng)
             for c in [split["template"], *split["unlabeled"]]}
    return root, split, helpers.write_feature_store(root.parent / "features", feats)


def _settings(synthetic, out, **kw):
    root, split, store = synthetic
    return P.PropagateSettings(input=root, features=store, template=split["template"], output=out,
                               cases=tuple(split["unlabeled"]), quiet=True, threads=2, **kw)


def test_prior_checked_one_line_exit_2(tmp_path, synthetic, capsys, monkeypatch):
    from semisam_o1 import cli

    monkeypatch.setattr(cli, "COMMANDS", {"propagate": cli.COMMANDS["propagate"]})  # this stage's parser only
    root, split, store = synthetic
    with pytest.raises(InputError, match="--prior bogus"):
        _settings(synthetic, tmp_path / "a", prior="bogus")
    with pytest.raises(InputError, match="--prior position: needs --method knn"):
        _settings(synthetic, tmp_path / "a", prior="position", method="prototype")
    rc = cli.main(["propagate", "-i", str(root), "-f", str(store), "--template", split["template"], "-o",
                   str(tmp_path / "b"), "--prior", "choose", "--method", "prototype", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--prior choose" in err[0]
    with pytest.raises(SystemExit) as exc:
        cli.main(["propagate", "-i", str(root), "-f", str(store), "--template", split["template"], "-o",
                  str(tmp_path / "c"), "--prior", "bogus"])
    assert exc.value.code == 2 and "--prior" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_prior_recorded_and_warps_cached_and_reused(tmp_path, synthetic, monkeypatch):
    monkeypatch.setattr(R, "RegistrationParams", lambda: FAST)  # propagate's registrations: few iterations
    root, split, _ = synthetic
    out = tmp_path / "pseudo"
    summary = P.propagate(_settings(synthetic, out, prior="choose"))
    record = json.loads((out / "stage.json").read_text())
    assert record["signed"]["settings"]["prior"] == "choose" and "--prior choose" in record["command"]
    assert set(summary["chosen"]) == set(split["unlabeled"])
    assert {c["source"] for c in summary["chosen"].values()} <= {"knn", "registration"}
    cached = sorted(p.name for p in (out / "registration").rglob("*.nii.gz"))
    assert cached == sorted(f"{c}.nii.gz" for c in split["unlabeled"])
    ds = Dataset(root)
    for case in split["unlabeled"]:
        real = ds.read_label(case, reference=ds.read_image(case)).array
        lab = read_label(out / f"{case}.nii.gz", ds.label_map).array
        assert _fg_dice(lab, real) > 0.8  # one-hot features and a near-identity warp: close to the truth

    # a second run (other prior, so every case is redone) reads every warp from the cache
    def fail(*a, **k):
        raise AssertionError("registered again instead of reading the cache")

    monkeypatch.setattr(R, "warp_template", fail)
    P.propagate(_settings(synthetic, out, prior="registration", overwrite=True))
    paths = R.registration_labels(root, split["template"], split["unlabeled"], out / "registration")
    for case, path in paths.items():
        warped = read_label(path, ds.label_map).array
        assert np.array_equal(read_label(out / f"{case}.nii.gz", ds.label_map).array, warped)


# --------------------------------------------------------------------------- does the position term apply?


def test_position_offset_of_a_known_translation(pair):
    """A case that is the template translated by t voxels in a box of the same shape: every voxel's
    normalised gap is 2 t / n, so the offset is the median over the template's classes of the max
    over axes of 2 t_a / extent_c,a, exactly; the
    identity map gives 0; the offset read from the SyN warp of a known shift and scale is the one of
    the true map."""
    _, label, _, case_label, warp = pair
    n = np.array(label.shape, float)
    extents = np.array([[int(i.max() - i.min() + 1) for i in np.nonzero(label == c)]
                        for c in np.unique(label[label > 0])], float)  # (classes, 3)
    grid = np.stack(np.meshgrid(*[np.arange(k, dtype=float) for k in label.shape], indexing="ij"), -1)
    assert R.position_offset(label, grid, label) == 0.0
    t = np.array([2.0, -1.0, 3.0])
    moved = ndimage.shift(label, t, order=0)
    got = R.position_offset(moved, grid - t, label)
    assert got == pytest.approx(float(np.median(np.max(2 * np.abs(t) / extents, axis=1))), rel=1e-9)
    centre = (n - 1) / 2
    true_map = centre + (grid - SHIFT - centre) / SCALE
    assert R.position_offset(case_label, warp.coords, label) == pytest.approx(
        R.position_offset(case_label, true_map, label), abs=0.1)
    assert np.isinf(R.position_offset(np.zeros_like(label), grid, label))


def test_position_offset_is_measured_per_class():
    """Three small classes far apart, all translated by t: over their union (extent ~40 voxels) the
    shift looks small (0.15), but each class (4 voxels across) is off by 2 t / 4 of its half-extent: the
    offset is the median over classes of max_a 2 |t_a| / extent_c,a (here 2 x 3 / 4 = 1.5 for
    every class), and a class the warp lost counts as inf."""
    label = np.zeros((48, 20, 20), np.uint8)
    for c, x0 in ((1, 2), (2, 20), (3, 38)):
        label[x0:x0 + 4, 8:12, 8:12] = c
    grid = np.stack(np.meshgrid(*[np.arange(k, dtype=float) for k in label.shape], indexing="ij"), -1)
    t = np.array([3.0, 0.0, 0.0])
    moved = ndimage.shift(label, t, order=0)
    assert R.position_offset(moved, grid - t, label) == pytest.approx(1.5, rel=1e-9)
    union = 2 * 3 / 40  # what the former rule, over the union's extent (axis 0: 40 voxels), said
    assert R.position_offset(moved, grid - t, label) == pytest.approx(10 * union, rel=1e-9)
    lost = np.where(moved == 3, 0, moved)
    assert R.position_offset(lost, grid - t, label) == pytest.approx(1.5, rel=1e-9)  # median of 1.5, 1.5, inf
    assert np.isinf(R.position_offset(np.where(moved == 1, 1, 0), grid - t, label))


def _pad_case(root, case, width):
    """Put a case's image and label at the start of a box ``width`` voxels longer along axis 0."""
    import nibabel as nib

    for sub in ("imagesTr", "labelsTr"):
        path = root / sub / f"{case}.nii.gz"
        img = nib.load(str(path))
        a = np.asarray(img.dataobj)
        big = np.zeros((a.shape[0] + width, *a.shape[1:]), a.dtype)
        big[:a.shape[0]] = a
        nib.save(nib.Nifti1Image(big, img.affine), str(path))


def test_position_check_follows_the_field_of_view(tmp_path):
    """Crops around the same anatomy: the position term applies; the same cases at one end of boxes
    twice as long (another field of view): it does not."""
    same = tmp_path / "same"
    split = helpers.make_cohort(same, n_unlabeled=2, n_test=0, shape=(28, 28, 28), seed=1)
    check = R.position_check(same, split["template"], split["unlabeled"], tmp_path / "reg_same")
    assert check["applies"] and check["median_offset"] < R.POSITION_OFFSET_LIMIT
    assert set(check["offsets"]) == set(split["unlabeled"])
    moved = tmp_path / "moved"
    split = helpers.make_cohort(moved, n_unlabeled=2, n_test=0, shape=(28, 28, 28), seed=1)
    for case in split["unlabeled"]:
        _pad_case(moved, case, 28)
    check = R.position_check(moved, split["template"], split["unlabeled"], tmp_path / "reg_moved")
    assert not check["applies"] and "switched off" in check["reason"]


def test_cases_in_parallel_give_the_serial_warps(tmp_path):
    """warp_cases with 2 worker processes writes, for 3 synthetic cases, the same warped labels and
    template-coordinate fields as one process registering them one after the other (1 ITK thread,
    seed 1: bit for bit); a second call finds every case in the cache and registers none."""
    import nibabel as nib

    root = tmp_path / "ds"
    split = helpers.make_cohort(root, n_unlabeled=3, n_test=0, shape=(28, 28, 28), seed=2)
    cases = split["unlabeled"]
    serial = R.warp_cases(root, split["template"], cases, tmp_path / "serial", params=FAST, workers=1)
    parallel = R.warp_cases(root, split["template"], cases, tmp_path / "parallel", params=FAST, workers=2)
    assert set(serial["seconds"]) == set(parallel["seconds"]) == set(cases)
    for case in cases:
        a = np.asarray(nib.load(serial["warp_dir"] / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(parallel["warp_dir"] / f"{case}.nii.gz").dataobj)
        assert (a > 0).sum() > 100 and np.array_equal(a, b)
        with np.load(serial["warp_dir"] / f"{case}_coords.npz") as za, \
                np.load(parallel["warp_dir"] / f"{case}_coords.npz") as zb:
            assert np.array_equal(za["coords"], zb["coords"])
    again = R.registration_labels(root, split["template"], cases, tmp_path / "parallel", params=FAST, workers=2)
    assert again == {c: parallel["warp_dir"] / f"{c}.nii.gz" for c in cases}
    assert R.warp_cases(root, split["template"], cases, tmp_path / "parallel", params=FAST)["seconds"] == {}
