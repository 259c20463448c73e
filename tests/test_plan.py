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


def test_patch_covers_the_structure_and_divides_by_the_strides(tmp_path):
    small = tmp_path / "small"
    helpers.make_cohort(small, n_unlabeled=2, n_test=0, shape=(24, 24, 24))
    big = tmp_path / "big"
    helpers.make_cohort(big, n_unlabeled=2, n_test=0, shape=(64, 64, 40))
    p_small, p_big = _plan(small, tmp_path), _plan(big, tmp_path)
    for p in (p_small, p_big):
        d = p["decisions"]
        extent = p["fingerprint"]["template"]["foreground"]["extent_vox"]
        step = np.prod(d["strides"]["value"], axis=0)
        assert all(e % st == 0 for e, st in zip(d["patch"]["value"], step))
        assert all(pp >= min(e, m) for pp, e, m in
                   zip(d["patch"]["value"], extent, p["fingerprint"]["cohort"]["shape"]["median"]))
        assert all(r for r in (v["reason"] for v in d.values()))  # every decision says why
    # the same structure in a bigger box: the patch follows the structure, not the box
    assert p_big["decisions"]["patch"]["value"] == p_small["decisions"]["patch"]["value"] or \
        np.prod(p_big["decisions"]["patch"]["value"]) <= 2 * np.prod(p_small["decisions"]["patch"]["value"])


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


def test_timing_plans_iterations_from_the_budget(tmp_path):
    root = tmp_path / "t"
    helpers.make_cohort(root, n_unlabeled=1, n_test=0)
    p = _plan(root, tmp_path, budget_minutes=0.05)
    p = make_plan(PlanSettings(input=root, split=root / "splits.json", output=tmp_path / "p2.json",
                               budget_minutes=0.05, quiet=True))
    it = p["decisions"]["iterations"]
    assert "measured" in it["reason"] and 200 <= it["value"] <= 20000


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


def _geometry_fingerprint(spacing, shape, classes, spacing_max=None):
    """The parts of a fingerprint the spacing rule reads: the cohort's median shape and spacing
    (and their range), the template's classes' extents in mm and their union's."""
    fg = [max(c[a] for c in classes) * 1.5 for a in range(3)]
    return {"cohort": {"shape": {"median": shape},
                       "spacing_mm": {"median": spacing, "min": spacing, "max": spacing_max or spacing}},
            "template": {"foreground": {"extent_mm": fg},
                         "classes": {str(i + 1): {"extent_mm": c} for i, c in enumerate(classes)}}}


def _voxel_cost(unet):
    """A stand-in for the measured seconds per iteration: 1 s per 10,000 patch voxels."""
    return float(np.prod(unet["patch"])) / 1e4


def test_working_spacing_follows_the_budget(tmp_path):
    """A budget that affords MIN_AFFORDED_ITERATIONS at the data's spacing keeps it (no resampling);
    a smaller one coarsens the spacing until the network affords them; the patch still covers the
    structure at the working spacing; a class is never planned below MIN_CLASS_EDGE voxels across."""
    from semisam_o1.stages import plan

    fp = _geometry_fingerprint(spacing=[0.8] * 3, shape=[96, 96, 80], classes=[[40.0, 32.0, 28.0], [24.0, 28.0, 20.0]])
    native = plan.plan_network(fp, [0.8, 0.8, 0.8], 64 ** 3)[0]
    need = plan.MIN_AFFORDED_ITERATIONS * _voxel_cost(native)
    keep = plan.plan_spacing(fp, need * 1.01, _voxel_cost, 64 ** 3)
    assert keep["native"] and keep["spacing"] == [0.8, 0.8, 0.8] and len(keep["tried"]) == 1
    coarse = plan.plan_spacing(fp, need / 3, _voxel_cost, 64 ** 3)
    assert not coarse["native"] and coarse["spacing"][0] > 0.8
    assert coarse["tried"][-1]["affords"] >= plan.MIN_AFFORDED_ITERATIONS
    assert all(t["affords"] < plan.MIN_AFFORDED_ITERATIONS for t in coarse["tried"][:-1])
    extent = [e / w for e, w in zip(fp["template"]["foreground"]["extent_mm"], coarse["spacing"])]
    assert all(p >= e for p, e in zip(coarse["unet"]["patch"], extent))
    hopeless = plan.plan_spacing(fp, 1e-6, _voxel_cost, 64 ** 3)
    assert "coarsest allowed" in hopeless["reason"]
    assert plan.smallest_class_edge(fp, hopeless["spacing"]) >= plan.MIN_CLASS_EDGE
    nxt = plan.working_spacings([0.8] * 3)[len(hopeless["tried"])]
    assert plan.smallest_class_edge(fp, nxt) < plan.MIN_CLASS_EDGE  # it stopped at the floor, not before


def test_anisotropic_data_coarsens_the_fine_axes_first(tmp_path):
    from semisam_o1.stages import plan

    cands = plan.working_spacings([0.7, 0.7, 3.0])
    assert cands[0] == [0.7, 0.7, 3.0]
    assert all(c[2] == 3.0 for c in cands if max(c[:2]) <= 3.0)  # the coarse axis is never refined
    assert all(a[0] < b[0] for a, b in zip(cands, cands[1:]))


def test_cohort_of_mixed_spacings_is_resampled_to_the_median(tmp_path):
    """Volumes at different spacings: the plan resamples every one to the working spacing even when
    the budget affords the finest (nnU-Net's target spacing), so the network sees one voxel size."""
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
    out = plan.plan_spacing(fp, 1e9, _voxel_cost, 64 ** 3)
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
