"""The plan: decisions derived from the dataset's fingerprint (synthetic datasets of different
shapes, spacings, classes and modalities; and the real data when present)."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest

from semisam_o1.core.errors import InputError
from semisam_o1.stages.plan import PlanSettings, make_plan, unet_overrides


def _plan(root, tmp_path, **kw):
    return make_plan(PlanSettings(input=root, split=root / "splits.json", output=tmp_path / "plan.json",
                                  timing=False, quiet=True, **kw))


def _set_modality(root, modality):
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": modality}
    (root / "dataset.json").write_text(json.dumps(meta))


def test_patch_from_the_median_shape_divides_by_the_strides(tmp_path):
    """nnU-Net's patch: the median image shape at the working spacing, rounded up to the network's
    divisibility (never beyond it by a step), the same rule in a small box and in a big one."""
    small = tmp_path / "small"
    helpers.make_cohort(small, n_unlabeled=2, n_test=0, shape=(24, 24, 24))
    big = tmp_path / "big"
    helpers.make_cohort(big, n_unlabeled=2, n_test=0, shape=(64, 64, 40))
    p_small, p_big = _plan(small, tmp_path), _plan(big, tmp_path)
    for p in (p_small, p_big):
        d = p["decisions"]
        step = np.prod(d["strides"]["value"], axis=0)
        median = p["fingerprint"]["cohort"]["shape"]["median"]
        assert all(e % st == 0 for e, st in zip(d["patch"]["value"], step))
        assert all(m <= pp < m + st for pp, m, st in zip(d["patch"]["value"], median, step))
        assert all(r for r in (v["reason"] for v in d.values()))  # every decision says why
        assert "median image shape" in d["patch"]["reason"]
    assert p_big["decisions"]["patch"]["value"] == [64, 64, 40]
    assert p_small["decisions"]["patch"]["value"] == [24, 24, 24]


def test_patch_budget_and_anisotropic_spacing(tmp_path):
    root = tmp_path / "aniso"
    helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(48, 48, 24), spacing=(0.8, 0.8, 2.5))
    p = _plan(root, tmp_path, max_patch_voxels=10 ** 3)
    fp = p["fingerprint"]
    assert fp["cohort"]["spacing_mm"]["median"] == [0.8, 0.8, 2.5]
    assert fp["template"]["foreground"]["extent_mm"][0] == pytest.approx(0.8 * fp["template"]["foreground"]["extent_vox"][0])
    assert np.prod(p["decisions"]["patch"]["value"]) <= 10 ** 3
    assert "shrunk" in p["decisions"]["patch"]["reason"]
    # the coarse axis (2.5 mm) is not downsampled where the fine ones are (nnU-Net's anisotropy rule)
    strides = p["decisions"]["strides"]["value"]
    assert strides and strides[0] == [2, 2, 1]
    iso = _plan(root, tmp_path)  # same data: the budget only shrinks the patch
    assert np.all(np.asarray(iso["decisions"]["patch"]["value"]) >= np.asarray(p["decisions"]["patch"]["value"]))


def test_flip_axes_keep_ordered_classes_and_ct_normalisation(tmp_path):
    root = tmp_path / "ct"
    helpers.make_cohort(root, n_unlabeled=2, n_test=0)
    p = _plan(root, tmp_path)
    # the synthetic classes follow each other along axis 1: no flip there
    assert p["decisions"]["flip_axes"]["value"] == [0, 2]
    assert p["decisions"]["normalisation"]["value"]["method"] == "percentile_clip_zscore"
    _set_modality(root, "CT")
    p = _plan(root, tmp_path)
    norm = p["decisions"]["normalisation"]["value"]
    fg = p["fingerprint"]["template"]["intensity"]["foreground"]
    assert norm["method"] == "fixed_clip_zscore" and norm["lower"] == fg["p0_5"] and norm["upper"] == fg["p99_5"]
    assert unet_overrides(p)["normalisation"] == norm
    assert json.loads((tmp_path / "plan.json").read_text())["decisions"]["normalisation"]["value"] == norm


def test_one_class_flips_every_axis_and_empty_template_is_refused(tmp_path):
    root = tmp_path / "one"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=0)
    import nibabel as nib

    path = root / "labelsTr" / f"{split['template']}.nii.gz"
    img = nib.load(str(path))
    lab = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    helpers.write_nifti(path, lab, img.affine)
    assert _plan(root, tmp_path)["decisions"]["flip_axes"]["value"] == [0, 1, 2]
    helpers.write_nifti(path, np.zeros_like(lab), img.affine)
    with pytest.raises(InputError, match="no foreground"):
        _plan(root, tmp_path)


def test_largest_component_only_for_classes_the_template_shows_in_one_piece(tmp_path):
    """The synthetic template's two classes are one piece each: both keep their largest
    component; a second blob of class 1 in the template takes class 1 off the list."""
    import nibabel as nib

    root = tmp_path / "lcc"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=0)
    d = _plan(root, tmp_path)["decisions"]["largest_component"]
    assert d["value"] == [1, 2] and "one-piece" in d["reason"]
    path = root / "labelsTr" / f"{split['template']}.nii.gz"
    img = nib.load(str(path))
    lab = np.asarray(img.dataobj).astype(np.uint8)
    assert not lab[:2, :2, :2].any()
    lab[:2, :2, :2] = 1
    helpers.write_nifti(path, lab, img.affine)
    p = _plan(root, tmp_path)
    assert p["fingerprint"]["template"]["classes"]["1"]["components"] == 2
    assert p["decisions"]["largest_component"]["value"] == [2]
    assert unet_overrides(p)["largest_component"] == [2]


def test_same_data_same_plan_whatever_this_machines_timing(tmp_path, monkeypatch):
    """Two different timings of this machine (a fast one and one 40 times slower, as beside other
    jobs) give byte-identical decisions; the timing only changes the recorded estimate."""
    from semisam_o1.stages import plan

    root = tmp_path / "t"
    helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(32, 40, 28))
    out = {}
    for name, sec in (("fast", 0.05), ("slow", 2.0)):
        monkeypatch.setattr(plan, "seconds_per_iteration", lambda unet, n, threads=None, s=sec: s)
        out[name] = make_plan(PlanSettings(input=root, split=root / "splits.json", output=tmp_path / f"{name}.json",
                                           budget_minutes=4, quiet=True))
    decisions = [json.dumps(json.loads((tmp_path / f"{n}.json").read_text())["decisions"], sort_keys=True)
                 for n in ("fast", "slow")]
    assert decisions[0] == decisions[1]
    d, est = out["fast"]["decisions"], out["fast"]["estimate"]
    voxels = int(np.prod(d["patch"]["value"])) * d["batch_size"]["value"]
    assert d["iterations"]["value"] == int(np.clip(int(4 * 60 * plan.REFERENCE_VOXELS_PER_SECOND / voxels),
                                                   plan.MIN_ITERATIONS, plan.MAX_ITERATIONS))
    assert "reference" in d["iterations"]["reason"] and "measured" not in d["iterations"]["reason"]
    assert est["measured"] and est["seconds_per_iteration"] == 0.05
    assert out["slow"]["estimate"]["minutes_per_round"] == pytest.approx(d["iterations"]["value"] * 2.0 / 60, abs=0.01)
    # --no-timing: the same decisions again, nothing measured
    none = _plan(root, tmp_path, budget_minutes=4)
    assert json.dumps(none["decisions"], sort_keys=True) == decisions[0] and not none["estimate"]["measured"]


def test_timing_probe_runs_and_decides_nothing(tmp_path):
    root = tmp_path / "t"
    helpers.make_cohort(root, n_unlabeled=1, n_test=0)
    p = make_plan(PlanSettings(input=root, split=root / "splits.json", output=tmp_path / "p2.json",
                               budget_minutes=0.05, quiet=True))
    assert p["estimate"]["measured"] and p["estimate"]["seconds_per_iteration"] > 0
    assert p["decisions"] == _plan(root, tmp_path, budget_minutes=0.05)["decisions"]
    # 3 s of budget: the patch shrinks to a few edges of 8 voxels, not the spacing
    assert np.prod(p["decisions"]["patch"]["value"]) <= 3 * 1.9e6 / (2 * 2400)
    assert p["decisions"]["spacing"]["value"] is None


def test_real_datasets_when_present(cohort, tmp_path):
    p = make_plan(PlanSettings(input=cohort.root, split=cohort.split_file, output=tmp_path / "r.json",
                               timing=False, quiet=True))
    fp = p["fingerprint"]["template"]
    assert p["decisions"]["flip_axes"]["value"] == [0, 2]  # real Hippocampus and the synthetic cohort: axis 1
    assert all(pp >= min(e, 16) for pp, e in zip(p["decisions"]["patch"]["value"], fp["foreground"]["extent_vox"]))


def test_train_takes_the_plans_network_and_normalisation(tmp_path):
    """train --plan: the model's config carries the plan's patch, strides, channels and CT
    normalisation; --iterations still wins over the plan's."""
    from semisam_o1.stages import nets, train

    root = tmp_path / "ct"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=0)
    _set_modality(root, "CT")
    plan = _plan(root, tmp_path, max_patch_voxels=16 ** 3)
    labels = tmp_path / "labels"
    labels.mkdir()
    import shutil

    for case in split["unlabeled"]:
        shutil.copy(root / "labelsTr" / f"{case}.nii.gz", labels)
    train.train(train.TrainSettings(input=root, labels=labels, template=split["template"],
                                    cases=tuple(split["unlabeled"]), output=tmp_path / "model", preset="quick",
                                    plan=tmp_path / "plan.json", iterations=2, quiet=True, threads=1))
    cfg = json.loads((tmp_path / "model" / nets.CONFIG_NAME).read_text())
    d = plan["decisions"]
    assert cfg["patch"] == d["patch"]["value"] and cfg["iterations"] == 2
    assert cfg["net"]["channels"] == d["channels"]["value"]
    assert [list(s) for s in cfg["net"]["strides"]] == d["strides"]["value"]
    assert cfg["normalisation"] == d["normalisation"]["value"]
    assert cfg["largest_component"] == d["largest_component"]["value"] == [1, 2]
    x = np.array([-5000.0, d["normalisation"]["value"]["mean"], 1e9])
    y = nets.normalise(x, cfg["normalisation"])
    assert y[1] == pytest.approx(0.0, abs=1e-5) and y[0] == pytest.approx(
        (d["normalisation"]["value"]["lower"] - d["normalisation"]["value"]["mean"]) / d["normalisation"]["value"]["sd"], rel=1e-5)


def _fingerprint(root):
    from semisam_o1.data.dataset import Dataset, load_split
    from semisam_o1.stages.plan import fingerprint

    sp = load_split(root / "splits.json")
    return fingerprint(Dataset(root), sp["template"], [sp["template"], *sp["unlabeled"]])


def _geometry_fingerprint(spacing, shape, classes, spacing_min=None, spacing_max=None, thickness=None):
    """The parts of a fingerprint the spacing and patch rules read: the cohort's median shape and
    spacing (and their range), the template's classes' extents and thicknesses in mm."""
    fg = [max(c[a] for c in classes) * 1.5 for a in range(3)]
    thickness = thickness or [min(c) for c in classes]
    return {"cohort": {"shape": {"median": shape},
                       "spacing_mm": {"median": spacing, "min": spacing_min or spacing,
                                      "max": spacing_max or spacing}},
            "template": {"foreground": {"extent_mm": fg},
                         "classes": {str(i + 1): {"name": f"c{i + 1}", "extent_mm": c, "thickness_mm": t}
                                     for i, (c, t) in enumerate(zip(classes, thickness))}}}


def test_budget_shrinks_the_patch_never_the_spacing():
    """A small budget keeps the data's spacing and shrinks the patch until MIN_AFFORDED_ITERATIONS fit
    at the reference rate; a large one stops at --max-patch-voxels (memory)."""
    from semisam_o1.stages import plan

    fp = _geometry_fingerprint(spacing=[0.8] * 3, shape=[96, 96, 80], classes=[[40.0, 32.0, 28.0], [24.0, 28.0, 20.0]])
    sp = plan.plan_spacing(fp)
    assert sp["native"] and sp["spacing"] == [0.8, 0.8, 0.8]
    sizes = []
    for minutes in (1, 4, 8, 60):
        vox, why = plan.patch_voxel_budget(minutes * 60, 64 ** 3)
        unet, reason = plan.plan_network(fp, sp["spacing"], vox)
        n = int(np.prod(unet["patch"]))
        assert n <= vox and "shrunk" in reason
        if vox < 64 ** 3:
            assert minutes * 60 * plan.REFERENCE_VOXELS_PER_SECOND / (2 * n) >= plan.MIN_AFFORDED_ITERATIONS
        step = np.prod(unet["strides"], axis=0)
        assert all(p % st == 0 for p, st in zip(unet["patch"], step))
        sizes.append(n)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert plan.patch_voxel_budget(3600, 64 ** 3)[0] == 64 ** 3


def test_thin_ring_keeps_its_thickness_floor():
    """A ring-shaped class 3 voxels thick (thickness by the distance transform: 4 mm at 1 mm) in a
    cohort whose spacings run 1 to 3 mm (median 2 mm): the working spacing is refined to the fine
    end of the cohort instead of the median that would leave the ring 2 voxels thick; a thick class
    in the same cohort keeps the median."""
    from semisam_o1.stages import plan

    grid = np.stack(np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij"))
    r = np.hypot(grid[0] - 20, grid[1] - 20)
    ring = (r >= 9) & (r < 12) & (np.abs(grid[2] - 20) < 8)
    assert plan.thickness_mm(ring, [1.0, 1.0, 1.0]) == pytest.approx(4.0, abs=0.5)
    ball = np.sum((grid - 20) ** 2, axis=0) <= 12 ** 2
    assert plan.thickness_mm(ball, [1.0, 1.0, 1.0]) == pytest.approx(24.0, abs=0.5)  # its diameter
    assert plan.thickness_mm(ring, [2.0, 2.0, 2.0]) == pytest.approx(2 * plan.thickness_mm(ring, [1.0] * 3))
    geometry = dict(spacing=[2.0, 2.0, 2.0], shape=[40, 40, 40], spacing_min=[1.0, 1.0, 1.0],
                    spacing_max=[3.0, 3.0, 3.0])
    thin = _geometry_fingerprint(classes=[[24.0, 24.0, 16.0]], thickness=[plan.thickness_mm(ring, [1.0] * 3)],
                                 **geometry)
    sp = plan.plan_spacing(thin)
    assert not sp["native"] and sp["spacing"] == [1.0, 1.0, 1.0] and "refined" in sp["reason"]
    n = plan.MIN_CLASS_THICKNESS
    assert f"{n} voxels thick" in sp["reason"]
    # a class whose floor is coarser than the median (2.5 mm): the median is kept
    thick = _geometry_fingerprint(classes=[[60.0, 60.0, 60.0]], thickness=[2.5 * n], **geometry)
    assert plan.plan_spacing(thick)["spacing"] == [2.0, 2.0, 2.0]
    # a class whose floor lies between the cohort's finest and the median (1.5 mm): refined only that far
    mid = _geometry_fingerprint(classes=[[60.0, 60.0, 60.0]], thickness=[1.5 * n], **geometry)
    assert plan.plan_spacing(mid)["spacing"] == [1.5, 1.5, 1.5]
    # never finer than the cohort's 10th percentile when recorded
    thin["cohort"]["spacing_mm"]["p10"] = [1.2, 1.2, 1.2]
    assert plan.plan_spacing(thin)["spacing"] == [1.2, 1.2, 1.2]


def test_thickness_of_a_2d_structure_is_measured_in_its_plane():
    """A filled disc 41 pixels across in a 2D image (X x Y x 1): its thickness is its diameter in
    the plane (about 41 px x 0.2 mm), not the one-slice axis's single pixel (the bug gave 2 px for
    every 2D structure: 0.277 mm for an HC18 head 100 px across)."""
    from semisam_o1.stages import plan

    x, y = np.meshgrid(np.arange(80.0), np.arange(60.0), indexing="ij")
    disc = (np.hypot(x - 40, y - 30) <= 20)[:, :, None]
    t = plan.thickness_mm(disc, [0.2, 0.2, 0.2])
    assert t == pytest.approx(41 * 0.2, abs=0.5)
    # the same disc as one slice of a volume 3 slices deep, above and below empty: one slice thick
    vol = np.concatenate([np.zeros_like(disc), disc, np.zeros_like(disc)], axis=2)
    assert plan.thickness_mm(vol, [0.2, 0.2, 0.2]) == pytest.approx(0.4, abs=1e-6)


def test_cohort_of_mixed_spacings_is_resampled_to_the_median(tmp_path):
    """Volumes at different spacings: the plan resamples every one to the working spacing (nnU-Net's
    target spacing), so the network sees one voxel size."""
    from semisam_o1.stages import plan

    root = tmp_path / "mixed"
    helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    other = tmp_path / "other"
    helpers.make_cohort(other, n_unlabeled=2, n_test=0, shape=(32, 32, 32), spacing=(1.5, 1.5, 1.5), seed=1)
    import shutil

    for sub in ("imagesTr", "labelsTr"):
        shutil.copy(other / sub / "syn_002.nii.gz", root / sub / "syn_002.nii.gz")
    fp = _fingerprint(root)
    assert fp["cohort"]["spacing_mm"]["max"] == [1.5, 1.5, 1.5]
    out = plan.plan_spacing(fp)
    assert not out["native"] and out["spacing"] == fp["cohort"]["spacing_mm"]["median"]


def test_encode_axes_leave_out_strips_of_thin_slices():
    """A cine-like stack (1.56 x 1.56 x 10 mm) is encoded along its slice axis only; isotropic and
    mildly anisotropic data along every axis."""
    from semisam_o1.stages.plan import plan_encode_axes

    assert plan_encode_axes([1.56, 1.56, 10.0])[0] == [2]
    assert plan_encode_axes([1.0, 1.0, 1.0])[0] == [0, 1, 2]
    assert plan_encode_axes([0.8, 0.8, 1.5])[0] == [0, 1, 2]
    assert plan_encode_axes([0.7, 3.0, 0.7])[0] == [1]
    axes, reason = plan_encode_axes([1.0, 5.0, 12.0])  # no plane within 2x: the one with the coarsest axis normal
    assert axes == [2] and reason


def _write_template_image(root, make):
    """Replace the template's image with ``make(label)`` (same grid); returns the label."""
    import nibabel as nib

    split = json.loads((root / "splits.json").read_text())
    lab_img = nib.load(str(root / "labelsTr" / f"{split['template']}.nii.gz"))
    lab = np.asarray(lab_img.dataobj)
    image = make(lab)
    helpers.write_nifti(root / "imagesTr" / f"{split['template']}.nii.gz", image, lab_img.affine, dtype=image.dtype)
    return lab


def test_ct_recognised_from_the_intensities_when_the_modality_is_unknown(tmp_path):
    """dataset.json says "unknown" (as a plain-folder run writes without --modality): a CT-like
    template (air -1000 HU around a body of soft tissue ~40 HU, integers) gets CT's fixed clip and
    z-score and the reason names the rule; an MRI-like one (non-negative, not integers) per-volume
    normalisation; a modality named in dataset.json wins over the rule."""
    root = tmp_path / "ct"
    helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(32, 32, 24))
    _set_modality(root, "unknown")
    rng = np.random.default_rng(0)

    def ct(lab):
        body = np.zeros(lab.shape, bool)
        body[4:-4, 4:-4, :] = True
        img = np.where(body, 40 + rng.normal(0, 10, lab.shape), -1000 + rng.normal(0, 5, lab.shape))
        img = img + 30 * (lab == 1) + 60 * (lab == 2)
        return np.round(img).astype(np.int16)

    _write_template_image(root, ct)
    p = _plan(root, tmp_path)
    norm = p["decisions"]["normalisation"]
    image = p["fingerprint"]["template"]["intensity"]["image"]
    assert image["p1"] <= -900 and image["integer_fraction"] == 1.0
    assert norm["value"]["method"] == "fixed_clip_zscore" and "recognised as CT" in norm["reason"]
    assert -900 < norm["value"]["lower"] < norm["value"]["upper"] < 200  # the foreground's soft tissue
    _set_modality(root, "MRI")  # named: the rule is not asked
    p = _plan(root, tmp_path)
    assert p["decisions"]["normalisation"]["value"]["method"] == "percentile_clip_zscore"
    assert "from dataset.json" in p["decisions"]["normalisation"]["reason"]

    mri = tmp_path / "mri"
    helpers.make_cohort(mri, n_unlabeled=2, n_test=0, shape=(32, 32, 24))
    _set_modality(mri, "unknown")
    p = _plan(mri, tmp_path)
    norm = p["decisions"]["normalisation"]
    assert norm["value"]["method"] == "percentile_clip_zscore" and "not recognised as CT" in norm["reason"]
    # integer MRI values (uint16-like, non-negative) are not CT either
    _write_template_image(mri, lambda lab: (200 + 100 * lab + rng.integers(0, 20, lab.shape)).astype(np.int16))
    assert "not recognised as CT" in _plan(mri, tmp_path)["decisions"]["normalisation"]["reason"]


def test_a_left_right_pair_is_not_flipped_across_and_a_midline_class_is(tmp_path):
    """Two classes that mirror each other across axis 0 (a right and a left parotid) and one class on
    the midline (a brainstem): a flip along axis 0 would swap the pair, so the plan keeps axes 1 and 2
    only; relabelled as one class, the pair flips freely (a class is never swapped with itself)."""
    from semisam_o1.methods.mirror import swapped_classes

    lab = np.zeros((40, 30, 20), np.uint8)
    lab[6:12, 10:20, 5:15] = 1      # right: x 6..11
    lab[28:34, 10:20, 5:15] = 2     # left: its mirror about x = 19.5
    lab[17:23, 4:26, 8:12] = 3      # midline, long along y
    spacing = (1.0, 1.0, 2.5)
    assert swapped_classes(lab, 0, spacing) == [(1, 2), (2, 1)]
    assert swapped_classes(lab, 1, spacing) == [] and swapped_classes(lab, 2, spacing) == []
    # off-centre by a third of the gap: still nearer the other class than itself
    shifted = np.zeros_like(lab)
    shifted[6:12, 10:20, 5:15] = 1
    shifted[22:28, 10:20, 5:15] = 2
    assert swapped_classes(shifted, 0, spacing) == [(1, 2), (2, 1)]
    assert swapped_classes(np.where(lab > 0, 1, 0), 0, spacing) == []

    root = tmp_path / "pair"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=0, shape=(40, 30, 20))
    import nibabel as nib

    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "right": 1, "left": 2, "midline": 3}
    (root / "dataset.json").write_text(json.dumps(meta))

    path = root / "labelsTr" / f"{split['template']}.nii.gz"
    helpers.write_nifti(path, lab, nib.load(str(path)).affine)
    d = _plan(root, tmp_path)["decisions"]["flip_axes"]
    assert d["value"] == [1, 2] and "axis 0" in d["reason"]


def test_cohort_spacing_comes_from_the_affine_not_the_header_zooms(tmp_path):
    """A file whose header zooms (pixdim) disagree with its affine: the plan's cohort spacing is the
    affine's, the voxel size every stage reads (Volume.spacing), in canonical axis order."""
    import nibabel as nib

    from semisam_o1.data.dataset import Dataset
    from semisam_o1.stages import plan

    root = tmp_path / "zooms"
    helpers.make_cohort(root, n_unlabeled=1, n_test=0, shape=(16, 16, 8), spacing=(1.0, 1.0, 1.0))
    ds = Dataset(root)
    case = ds.cases[0]
    path = ds.image_path(case)
    img = nib.load(str(path))
    affine = np.diag([0.8, 1.2, 3.0, 1.0])[[1, 0, 2, 3]]  # array axes 0 / 1 swapped against RAS
    out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
    out.header.set_zooms((5.0, 5.0, 5.0))  # pixdim inconsistent with the affine
    nib.save(out, str(path))
    geometry = plan.cohort_geometry(ds, [case])
    assert geometry["spacing_mm"]["median"] == pytest.approx([1.2, 0.8, 3.0])
    assert geometry["spacing_mm"]["median"] == pytest.approx(list(ds.read_image(case).spacing))
