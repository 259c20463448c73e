"""propagate: round-0 pseudo-labels from the template.

The cohort's cases (real Hippocampus or the synthetic cohort, see conftest.py) with a real-format
feature store whose features encode the cases' real labels (so the right answer is known), the
prototype step against a NumPy reference, the position fold against the direct formula, output
grid / affine / dtype, resume from the stage record, and bad input (exit 2, one line, nothing
written). The real encoder's features are exercised by benchmarks/bench_propagate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import helpers
import nibabel as nib
import numpy as np
import pytest

from semisam_o1.core.errors import InputError
from semisam_o1.core.settings import add_options, from_namespace
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label
from semisam_o1.methods import template_vote as TV
from semisam_o1.methods.components import largest_component
from semisam_o1.stages import propagate as P


@pytest.fixture(scope="module")
def real(cohort):
    """(dataset, {case: real label}, template, [two pool cases])."""
    ds = Dataset(cohort.root)
    cases = cohort.unlabeled[:2]
    labels = {c: ds.read_label(c, reference=ds.read_image(c)).array for c in [cohort.template, *cases]}
    return ds, labels, cohort.template, cases


def _store(root, labels, *, noise=0.15, seed=0, drop=(), crop=()):
    """A feature store of one-hot features of ``labels`` on 3 axes (without the cases in ``drop``;
    the cases in ``crop`` on a grid one voxel short along axis 0)."""
    rng = np.random.default_rng(seed)
    feats = {}
    for c, lab in labels.items():
        if c in drop:
            continue
        f = {a: helpers.onehot_features(lab, 3, noise, rng) for a in (0, 1, 2)}
        feats[c] = {a: g[:, :-1] for a, g in f.items()} if c in crop else f
    return helpers.write_feature_store(root, feats)


@pytest.fixture(scope="module")
def onehot_store(tmp_path_factory, real):
    return _store(tmp_path_factory.mktemp("store") / "features", real[1])


def _settings(cohort, store, out, cases, **kw):
    return P.PropagateSettings(input=cohort.root, features=store, template=cohort.template, output=out,
                               cases=tuple(cases), **{"quiet": True, "threads": 2, **kw})


def _dice(a, b, c):
    return helpers.dice_reference(a == c, b == c)


def _min_dice(cohort) -> float:
    """Dice that default settings (query stride 2, smoothing, largest component) keep on one-hot
    features: thin parts blur a little; the synthetic cohort's classes (about 260 voxels each) blur
    more (stride 1 without smoothing gives Dice 1 there, see the first test)."""
    return 0.85 if cohort.real else 0.65


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("method,extra", [
    ("knn", dict(position_weight=0.0, query_stride=1)),
    ("knn", dict(position_weight=2.0, query_stride=1)),
    ("prototype", dict(prototypes_per_class=1, background_prototypes=1)),
    ("prototype", dict(prototypes_per_class=2, background_prototypes=4)),
])
def test_synthetic_onehot_features_reproduce_labels(tmp_path, cohort, real, onehot_store, method, extra):
    ds, labels, _, cases = real
    out = tmp_path / "pseudo"
    summary = P.propagate(_settings(cohort, onehot_store, out, cases, method=method, largest_component=False,
                                    smooth=0.0, bank_background=2000, class_planes="off", **extra))
    assert summary["written"] == 2
    for case in cases:
        pred = read_label(out / f"{case}.nii.gz", ds.label_map, reference=ds.read_image(case)).array
        np.testing.assert_array_equal(pred, labels[case])


def test_recentre_undoes_a_shifted_field_of_view(tmp_path, cohort, real):
    """The position term assumes the anatomy sits at the same place in every volume's box;
    recentring removes that assumption for translations. The case is the template shifted by
    6 voxels along axis 1 (along which the two classes follow each other), with features that tell
    foreground from background but not one class from the other (so only the position term places
    the boundary between them). Without recentring the boundary stays where it is in the template's
    box; one recentring pass moves the case's coordinates by the foreground centroid offset and
    recovers the shifted label almost exactly."""
    ds, labels, template, _ = real
    tpl = labels[template]
    shift = 6
    pad = np.zeros((tpl.shape[0], tpl.shape[1] + 2 * shift, tpl.shape[2]), np.uint8)
    pad[:, shift:shift + tpl.shape[1]] = tpl  # the template's label in a longer box
    moved = np.roll(pad, shift, axis=1)       # the same anatomy 6 voxels further along the axis
    root = tmp_path / "ds"
    affine = np.diag([*ds.read_image(template).spacing, 1.0])
    for case in ("tpl", "moved"):
        helpers.write_nifti(root / "imagesTr" / f"{case}.nii.gz", np.zeros(pad.shape, np.float32), affine)
    helpers.write_nifti(root / "labelsTr" / "tpl.nii.gz", pad, affine, dtype=np.uint8)
    shutil.copy(cohort.root / "dataset.json", root / "dataset.json")
    rng = np.random.default_rng(4)
    store = helpers.write_feature_store(tmp_path / "features", {
        c: helpers.onehot_features((lab > 0).astype(np.uint8), 2, 0.05, rng) for c, lab in (("tpl", pad), ("moved", moved))})
    dice = {}
    for rc in (0, 1):
        out = tmp_path / f"rc{rc}"
        P.propagate(P.PropagateSettings(input=root, features=store, template="tpl", output=out, cases=("moved",),
                                        method="knn", position_weight=2.0, query_stride=1, k=10,
                                        largest_component=False, smooth=0.0, bank_background=2000,
                                        class_planes="off", recentre=rc, quiet=True, threads=2))
        pred = np.asarray(nib.load(str(out / "moved.nii.gz")).dataobj)
        np.testing.assert_array_equal(pred > 0, moved > 0)  # the features alone decide the foreground
        dice[rc] = [_dice(pred, moved, c) for c in (1, 2)]
    assert min(dice[1]) > 0.98, dice
    assert max(dice[0]) < 0.9, dice  # the boundary left where it is in the template's box


def test_outputs_keep_input_grid_affine_header_and_integer_type(tmp_path, cohort, real, onehot_store):
    ds, labels, _, cases = real
    out = tmp_path / "pseudo"
    P.propagate(_settings(cohort, onehot_store, out, cases, save_scores=True))
    for case in cases:
        src = nib.load(str(ds.image_path(case)))
        got = nib.load(str(out / f"{case}.nii.gz"))
        assert got.shape == src.shape
        np.testing.assert_allclose(got.affine, src.affine)
        assert np.issubdtype(got.get_data_dtype(), np.integer)
        assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2}
        sc = nib.load(str(out / "scores" / f"{case}.nii.gz"))
        assert sc.shape == (*src.shape, 3) and sc.get_data_dtype() == np.float32
        pred = read_label(out / f"{case}.nii.gz", ds.label_map).array
        for c in (1, 2):
            assert _dice(pred, labels[case], c) > _min_dice(cohort)


def test_class_planes_learned_from_template_and_applied(tmp_path, cohort, real, onehot_store):
    from semisam_o1.methods import class_planes as CP

    ds, labels, _, cases = real
    out = tmp_path / "pseudo"
    summary = P.propagate(_settings(cohort, onehot_store, out, cases))
    rule = CP.read(out / CP.CLASS_PLANES_JSON)
    # real Hippocampus: Posterior below Anterior along the posterior-anterior axis; the synthetic
    # cohort: class 1 below class 2 along axis 1
    order = (2, 1) if cohort.real else (1, 2)
    assert (rule.axis, rule.order) == (1, order)
    assert summary["class_planes"]["order_names"] == [ds.label_map.names[c] for c in order]
    off = tmp_path / "off"
    P.propagate(_settings(cohort, onehot_store, off, cases, class_planes="off"))
    assert not (off / CP.CLASS_PLANES_JSON).exists()
    for case in cases:
        with_rule = read_label(out / f"{case}.nii.gz", ds.label_map).array
        without = read_label(off / f"{case}.nii.gz", ds.label_map).array
        # same foreground; its classes re-split by slices along the rule's axis
        np.testing.assert_array_equal(with_rule > 0, without > 0)
        np.testing.assert_array_equal(with_rule, CP.apply(without, rule))
        for j in range(with_rule.shape[1]):
            assert len(set(np.unique(with_rule[:, j])) - {0}) <= 1
        for c in (1, 2):
            assert _dice(with_rule, labels[case], c) > _min_dice(cohort)
    # --overwrite with the rule switched off removes the earlier rule (predict would apply it)
    P.propagate(_settings(cohort, onehot_store, out, cases, class_planes="off", overwrite=True))
    assert not (out / CP.CLASS_PLANES_JSON).exists()


def test_template_is_never_propagated(tmp_path, cohort, real, onehot_store):
    _, _, template, cases = real
    out = tmp_path / "pseudo"
    summary = P.propagate(_settings(cohort, onehot_store, out, [template, cases[0]]))
    assert summary["written"] == 1 and not (out / f"{template}.nii.gz").exists()
    # with a split: its 'unlabeled' subset by default, the template left out even if listed there
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"template": template, "unlabeled": [template, *cases]}))
    out2 = tmp_path / "pseudo2"
    P.propagate(P.PropagateSettings(input=cohort.root, features=onehot_store, template=template, output=out2,
                                    split=split, quiet=True))
    assert sorted(p.name for p in out2.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in cases)


# --------------------------------------------------------------------------- resume


def test_finished_folder_returns_at_once(tmp_path, cohort, real, onehot_store, monkeypatch):
    _, _, _, cases = real
    out = tmp_path / "pseudo"
    s1 = P.propagate(_settings(cohort, onehot_store, out, cases))
    mtime = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    record = json.loads((out / "stage.json").read_text())
    assert record["finished"] and record["command"].startswith("semisam-o1 propagate")
    monkeypatch.setattr(P, "_template_model", lambda *a: pytest.fail("a finished stage did work"))
    s2 = P.propagate(_settings(cohort, onehot_store, out, cases, threads=1))  # threads: no effect on results
    assert s2 == s1
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == mtime


def test_interrupted_run_resumes_keeping_written_cases(tmp_path, cohort, real, onehot_store, monkeypatch):
    _, _, _, cases = real
    out = tmp_path / "pseudo"
    original = P._label_case
    calls = []

    def interrupted(s, inp, model, rule, case, out_, device):
        if calls:
            raise KeyboardInterrupt
        calls.append(case)
        original(s, inp, model, rule, case, out_, device)

    monkeypatch.setattr(P, "_label_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.propagate(_settings(cohort, onehot_store, out, cases))
    assert not json.loads((out / "stage.json").read_text())["finished"]
    mtime = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    monkeypatch.setattr(P, "_label_case", original)
    s2 = P.propagate(_settings(cohort, onehot_store, out, cases))
    assert (s2["written"], s2["skipped"]) == (1, 1)
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == mtime
    assert (out / f"{cases[1]}.nii.gz").is_file()


def test_other_settings_refused_unless_overwrite(tmp_path, cohort, real, onehot_store):
    _, _, _, cases = real
    out = tmp_path / "pseudo"
    P.propagate(_settings(cohort, onehot_store, out, cases))
    with pytest.raises(InputError, match="k differ"):
        P.propagate(_settings(cohort, onehot_store, out, cases, k=5))
    s = P.propagate(_settings(cohort, onehot_store, out, cases, k=5, overwrite=True))
    assert (s["written"], s["skipped"], s["params"]["k"]) == (2, 0, 5)


# --------------------------------------------------------------------------- primitives


def test_area_fractions_against_numpy_reference():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(9, 8, 7)).astype(np.uint8)
    # cells of 2 x 3 x 1 voxels whose centres sit on voxel centres + (0.5, 1, 0): blocks tile the volume
    offset, step = np.array([0.5, 1.0, 0.0]), np.array([2.0, 3.0, 1.0])
    cells = (4, 2, 7)  # the last (partial) block along x and y is left out
    frac = TV.area_fractions(label, 3, cells, offset, step)
    ref = np.zeros((3, *cells))
    for i in range(cells[0]):
        for j in range(cells[1]):
            for k in range(cells[2]):
                block = label[2 * i:2 * i + 2, 3 * j:3 * j + 3, k]
                for c in range(3):
                    ref[c, i, j, k] = (block == c).mean()
    np.testing.assert_allclose(frac, ref, atol=1e-6)
    # a half-voxel shift: each cell covers half of two voxels
    f2 = TV.area_fractions(label, 3, (8, 8, 7), [0.5, 0, 0], [1, 1, 1])
    ref2 = np.stack([0.5 * ((label[:-1] == c).astype(float) + (label[1:] == c)) for c in range(3)])
    np.testing.assert_allclose(f2, ref2, atol=1e-6)


def test_class_prototypes_against_numpy_reference():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(6, 5, 4, 3)).astype(np.float16)
    frac = rng.dirichlet(np.ones(3), size=(5, 4, 3)).transpose(3, 0, 1, 2).astype(np.float32)
    protos, owner = TV.class_prototypes(feats, frac, 1)
    f = helpers.normalise_rows(feats.astype(np.float32).reshape(6, -1).T)
    for c in range(3):
        w = frac[c].reshape(-1)
        np.testing.assert_allclose(protos[c], (w[:, None] * f).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(owner, [0, 1, 2])
    # several prototypes: unit vectors, each class gets at most N, ordered by class
    protos, owner = TV.class_prototypes(feats, frac, [4, 2, 1], seed=0)
    assert list(np.bincount(owner)) == [4, 2, 1]
    np.testing.assert_allclose(np.linalg.norm(protos[:6], axis=1), 1, rtol=1e-5)
    # a class absent from the grid: a warning naming it, no prototype
    frac[2] = 0
    with pytest.warns(UserWarning, match="class 2 \\(posterior\\)"):
        protos, owner = TV.class_prototypes(feats, frac, 1, class_names=["bg", "anterior", "posterior"])
    assert list(owner) == [0, 1]


def test_position_fold_equals_direct_formula():
    rng = np.random.default_rng(3)
    fq = helpers.normalise_rows(rng.normal(size=(7, 10))).astype(np.float32)
    fb = helpers.normalise_rows(rng.normal(size=(30, 10))).astype(np.float32)
    pq, pb = rng.uniform(-1, 1, (7, 3)), rng.uniform(-1, 1, (30, 3))
    for w in (0.0, 1.0, 3.0):
        direct = fq @ fb.T - (w * w / 2) * ((pq[:, None] - pb[None]) ** 2).sum(-1)
        qa = TV.augment_with_position(fq, pq, w, "query")
        ba = TV.augment_with_position(fb, pb, w, "bank")
        np.testing.assert_allclose(qa @ ba.T, direct, atol=1e-4)
        norms = np.linalg.norm(ba, axis=1)
        np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # equal bank norms: cosine keeps the ranking
        cos = (qa @ ba.T) / np.linalg.norm(qa, axis=1, keepdims=True) / norms[None]
        np.testing.assert_array_equal(np.argsort(-cos, 1)[:, :5], np.argsort(-direct, 1)[:, :5])
        # the kernels' vote on the folded vectors ranks the bank as the direct formula does
        labels = rng.integers(0, 3, size=30).astype(np.int32)
        _, _, idx, _ = helpers.knn_reference(qa, ba, labels, 5, return_topk=True)
        np.testing.assert_array_equal(idx, np.argsort(-direct, 1, kind="stable")[:, :5])


def test_knn_scores_match_the_numpy_reference(tmp_path, real):
    """score_case's kNN vote (C++ kernel, position-folded bank) against knn_reference on the same
    vectors: the winning class per query voxel agrees (stride 1, no recentring)."""
    ds, labels, template, cases = real
    store_root = _store(tmp_path / "features", {c: labels[c] for c in (template, cases[0])}, noise=0.6)
    from semisam_o1.data.store import FeatureStore

    store = FeatureStore(store_root)
    params = TV.MethodOptions(k=7, query_stride=1, recentre=0, bank_background=3000)
    model = TV.build_template_model(store.load(template), labels[template], 3, params)
    cf = store.load(cases[0])
    scores = TV.score_case(model, cf, threads=2)
    shape = cf.voxel_shape
    feats = cf.on_voxel_grid().reshape(-1, int(np.prod(shape))).T
    cx, cy, cz = TV.normalised_coords(shape)
    pos = np.stack([g.ravel() for g in np.meshgrid(cx, cy, cz, indexing="ij")], 1)
    qa = TV.augment_with_position(feats, pos, params.position_weight, "query")
    want, _ = helpers.knn_reference(qa, model.bank, model.bank_labels, params.k)
    got = np.argmax(scores.reshape(3, -1), 0)
    assert (got == want).mean() > 0.999  # float32 ties may differ on a handful of voxels


class _Cells:
    """A store entry stand-in with given cell sizes (voxels per cell) per encoding axis."""

    def __init__(self, steps):
        self.steps = steps

    def cell_to_voxel(self, axis):
        return np.zeros(3), np.asarray(self.steps[axis], dtype=np.float64)


@pytest.mark.parametrize("steps,axes,grid,stride,want", [
    # 3 axes of a small 3D volume: every voxel axis is a slice axis once (1 voxel per cell): stride 2 stays
    ({0: (1, 1.59, 1.59), 1: (1.09, 1, 1.09), 2: (1.59, 1.59, 1)}, (0, 1, 2), "cells", 2, (2, 2, 2)),
    # a 2D image on a 1024 canvas (about 6 pixels per cell), encoded along axis 2 only
    ({2: (5.96, 5.97, 1)}, (2,), "cells", 2, (5, 5, 2)),
    ({2: (6.0, 6.0, 1)}, (2,), "cells", 2, (6, 6, 2)),
    # a thin-slice volume encoded along its slice axis only: in-plane cells of 3.4 voxels
    ({2: (3.4, 3.4, 1)}, (2,), "cells", 1, (3, 3, 1)),
    ({2: (5.96, 5.97, 1)}, (2,), "voxels", 2, (2, 2, 2)),
])
def test_query_strides_follow_the_feature_cells(steps, axes, grid, stride, want):
    params = TV.MethodOptions(query_grid=grid, query_stride=stride)
    assert TV.query_strides(params, axes, _Cells(steps)) == want


def test_query_grid_cells_matches_voxels_where_cells_are_small(tmp_path, real):
    """On one-hot features with one voxel per cell (every store of the synthetic cohort), the default
    ``cells`` grid queries the same voxels as ``voxels`` at the same stride: identical scores."""
    _, labels, template, cases = real
    from semisam_o1.data.store import FeatureStore

    store = FeatureStore(_store(tmp_path / "features", {c: labels[c] for c in (template, cases[0])}))
    out = {}
    for grid in TV.QUERY_GRIDS:
        params = TV.MethodOptions(query_grid=grid, bank_background=3000)
        model = TV.build_template_model(store.load(template), labels[template], 3, params)
        out[grid] = TV.score_case(model, store.load(cases[0]), threads=2)
    np.testing.assert_array_equal(out["cells"], out["voxels"])


def test_interp_and_largest_component():
    vals = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    out = TV._interp_to_grid(vals, [np.array([0, 2, 4]), np.array([0]), np.array([0])], (5, 2, 1))
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0.5, 1, 1.5, 2])
    assert out.shape == (2, 5, 2, 1)
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[0:3, 0:3, 0:3] = 1
    lab[5, 5, 5] = 1
    lab[0, 5, 0] = 2
    got = largest_component(lab, range(1, 3))
    assert got[5, 5, 5] == 0 and got[1, 1, 1] == 1 and got[0, 5, 0] == 2


# --------------------------------------------------------------------------- bad input


def _copy_dataset(src, dst, cases):
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    for c in cases:
        shutil.copy(src / "imagesTr" / f"{c}.nii.gz", dst / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{c}.nii.gz", dst / "labelsTr")


def _cli(capsys, *argv):
    """(exit status, stderr lines) of ``semisam-o1 propagate ARGV --quiet``."""
    from semisam_o1 import cli

    rc = cli.main(["propagate", *map(str, argv), "--quiet"])
    return rc, capsys.readouterr().err.strip().splitlines()


def _nothing_written(out):
    return not out.exists() or not any(out.rglob("*"))


def test_missing_features_is_exit_2_and_nothing_written(tmp_path, cohort, real, capsys):
    _, labels, template, cases = real
    store = _store(tmp_path / "features", labels, drop=(cases[1],))
    out = tmp_path / "pseudo"
    rc, err = _cli(capsys, "-i", cohort.root, "-f", store, "--template", template, "-o", out, "--cases", *cases)
    assert rc == 2 and len(err) == 1 and cases[1] in err[0]
    assert _nothing_written(out)


@pytest.mark.parametrize("fault,word", [("empty", "empty"), ("short", "shape")])
def test_bad_template_label_is_exit_2(tmp_path, cohort, real, onehot_store, capsys, fault, word):
    _, _, template, cases = real
    root = tmp_path / "ds"
    _copy_dataset(cohort.root, root, [template, *cases])
    lp = root / "labelsTr" / f"{template}.nii.gz"
    img = nib.load(str(lp))
    data = np.zeros(img.shape, np.uint8) if fault == "empty" else np.asarray(img.dataobj)[:-1]
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(lp))
    out = tmp_path / "pseudo"
    rc, err = _cli(capsys, "-i", root, "-f", onehot_store, "--template", template, "-o", out, "--cases", *cases)
    assert rc == 2 and len(err) == 1 and word in err[0]
    assert _nothing_written(out)


def test_feature_grid_mismatch_is_exit_2(tmp_path, cohort, real, capsys):
    _, labels, template, cases = real
    store = _store(tmp_path / "features", labels, crop=(cases[0],))
    out = tmp_path / "pseudo"
    rc, err = _cli(capsys, "-i", cohort.root, "-f", store, "--template", template, "-o", out, "--cases", *cases)
    assert rc == 2 and len(err) == 1 and cases[0] in err[0] and "grid" in err[0]
    assert _nothing_written(out)


@pytest.mark.parametrize("option,value,word", [("--recentre", "-1", "recentre"), ("--k", "0", "k"),
                                               ("--query-stride", "0", "query-stride")])
def test_bad_knn_parameter_is_exit_2_and_nothing_written(tmp_path, cohort, real, onehot_store, capsys,
                                                         option, value, word):
    _, _, template, cases = real
    out = tmp_path / "pseudo"
    rc, err = _cli(capsys, "-i", cohort.root, "-f", onehot_store, "--template", template, "-o", out,
                   "--cases", *cases, option, value)
    assert rc == 2 and len(err) == 1 and f"--{word}" in err[0]
    assert _nothing_written(out)


@pytest.mark.parametrize("fault", ["output is a file", "parent is a file", "read-only parent"])
def test_unusable_output_is_exit_2_and_nothing_written(tmp_path, cohort, real, onehot_store, capsys, monkeypatch,
                                                       fault):
    _, _, template, cases = real
    if fault == "output is a file":
        out = tmp_path / "pseudo"
        out.write_text("not a folder")
    elif fault == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "pseudo"
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o555)
        out = parent / "pseudo"
        if os.geteuid() == 0:  # root writes anywhere: the folder's answer to os.access is what is checked
            import semisam_o1.core.resume as R

            access = os.access
            monkeypatch.setattr(R.os, "access", lambda p, m: False if str(p) == str(parent) else access(p, m))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = _cli(capsys, "-i", cohort.root, "-f", onehot_store, "--template", template, "-o", out,
                   "--cases", *cases)
    assert rc == 2 and len(err) == 1 and str(out) in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cuda_without_gpu_is_exit_2(tmp_path, cohort, real, onehot_store, capsys, monkeypatch):
    from semisam_o1.core import device

    monkeypatch.setattr(device, "_torch_cuda", lambda: False)
    _, _, template, cases = real
    out = tmp_path / "pseudo"
    rc, err = _cli(capsys, "-i", cohort.root, "-f", onehot_store, "--template", template, "-o", out,
                   "--cases", *cases, "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "--device cuda" in err[0]
    assert _nothing_written(out)


def test_cli_options_parse_into_settings():
    parser = argparse.ArgumentParser()
    add_options(parser, P.SETTINGS)
    s = from_namespace(P.SETTINGS, parser.parse_args(
        ["-i", "d", "-f", "f", "--template", "t", "-o", "o", "--split", "s.json",
         "--prototypes-per-class", "4", "--device", "cpu", "--no-largest-component", "--axes", "0", "2"]))
    assert s.subset == "unlabeled" and s.prototypes_per_class == 4 and s.largest_component is False
    assert s.axes == (0, 2) and s.method == "knn" and s.position_weight == 1.0 and s.k == 10
    assert (s.bank_background, s.recentre, s.query_stride, s.smooth, s.class_planes) == (20000, 1, 2, 1.0, "auto")
    assert s.query_grid == "cells"
    # the recorded command reproduces the settings
    from semisam_o1.core.settings import command_line

    argv = command_line("propagate", s).split()[2:]
    assert from_namespace(P.SETTINGS, parser.parse_args(argv)) == s


def test_a_changed_input_is_redone_inside_run_only(tmp_path):
    """The stage record (semisam_o1.core.resume.open_stage) of a finished folder whose per-case input
    of one case changed: refused with a request for --overwrite alone; inside run (redo_changed) that
    case alone is redone (its file removed before the record is rewritten; the others kept, the
    record says what was redone); a changed shared input (the template's features) redoes every
    case; a changed setting is refused even inside run."""
    from semisam_o1.core.errors import InputError
    from semisam_o1.core.resume import open_stage, read_record

    out = tmp_path / "pseudo"

    def settings(**kw):
        return P.SETTINGS(input=tmp_path, features=tmp_path, template="t", output=out, **kw)

    def inputs(**changed):
        return {"store": "s", "features": {"t": "a", "c1": "b", "c2": "c", **changed}}

    first = open_stage(out, "propagate", settings(), inputs=inputs(), per_case="features")
    first.start()
    for c in ("c1", "c2"):
        (out / f"{c}.nii.gz").write_text(c)
    first.finish({"written": 2})
    with pytest.raises(InputError, match="inputs.features.c1 differ.*--overwrite"):
        open_stage(out, "propagate", settings(), inputs=inputs(c1="B"), per_case="features")
    record = open_stage(out, "propagate", settings(redo_changed=True), inputs=inputs(c1="B"),
                        redo_changed=True, per_case="features")
    assert not record.finished and record.reuse and record.redo_cases(["c1", "c2"]) == ["c1"]
    assert record.drop_outputs(lambda c: [out / f"{c}.nii.gz"], ["c1", "c2"]) == ["c1"]
    assert not (out / "c1.nii.gz").exists() and (out / "c2.nii.gz").is_file()
    record.start()
    assert read_record(out)["redone"] == {"cases": ["c1"], "changed": ["inputs.features.c1"]}
    record.finish({"written": 1})
    shared = open_stage(out, "propagate", settings(), inputs=inputs(c1="B", t="A"), redo_changed=True,
                        per_case="features")
    assert shared.redo_cases(["c1", "c2"]) == ["c1", "c2"]
    with pytest.raises(InputError, match="settings.k differ"):
        open_stage(out, "propagate", settings(k=3), inputs=inputs(c1="B"), redo_changed=True, per_case="features")
