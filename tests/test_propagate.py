"""propagate: round-0 pseudo-labels from the template (issue 6).

Real Hippocampus cases with a synthetic feature store (features built from the real
labels, so the right answer is known), the prototype step against a NumPy reference,
the position fold against the direct formula, output grid / affine / dtype, resume, and
bad input (exit 2, nothing written). The real encoder's features are exercised by
benchmarks/bench_propagate.py.
"""

from __future__ import annotations

import argparse
import types

import nibabel as nib
import numpy as np
import pytest

from semisam_o1 import propagate as P
from semisam_o1.errors import InputError
from semisam_o1.io import Dataset, read_label

TEMPLATE = "hippocampus_001"
CASES = ["hippocampus_003", "hippocampus_006"]


# --------------------------------------------------------------------------- kernels


def _np_prototype_similarity(features, prototypes, *, threads=None):
    f = np.asarray(features, np.float32)
    p = np.asarray(prototypes, np.float32)
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    pn = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    s = fn @ pn.T
    return s.astype(np.float32), np.argmax(s, 1).astype(np.int32)


def _np_knn_vote(queries, bank, bank_labels, k, *, threads=None, return_topk=False):
    b = np.asarray(bank, np.float32)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    nl = int(np.max(bank_labels)) + 1
    outs = []
    for start in range(0, len(queries), 4096):
        q = np.asarray(queries[start:start + 4096], np.float32)
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        s = qn @ bn.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1, kind="stable")
        outs.append((np.take_along_axis(part, order, 1), np.take_along_axis(ps, order, 1)))
    idx = np.concatenate([o[0] for o in outs])
    sim = np.concatenate([o[1] for o in outs])
    lab = np.asarray(bank_labels)[idx]
    votes = np.stack([(np.maximum(sim, 0) * (lab == c)).sum(1) for c in range(nl)], 1)
    win = np.argmax(votes, 1).astype(np.int32)
    share = (votes.max(1) / np.maximum(votes.sum(1), 1e-30)).astype(np.float32)
    if return_topk:
        return win, share, idx.astype(np.int64), sim.astype(np.float32)
    return win, share


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    """The C++ kernels when built; otherwise a NumPy reference (tests only)."""
    try:
        from semisam_o1 import kernels as k  # noqa: F401

        k.prototype_similarity, k.knn_vote  # noqa: B018
    except Exception:
        fake = types.SimpleNamespace(prototype_similarity=_np_prototype_similarity, knn_vote=_np_knn_vote)
        monkeypatch.setattr(P, "_kernels", lambda: fake)


# --------------------------------------------------------------------------- a synthetic store


class _Case:
    """A store entry with the FeatureStore interface, features given on the voxel grid
    (cell grid = voxel grid, or a coarser grid with ``step``)."""

    def __init__(self, feats_per_axis, step=1):
        self._f = feats_per_axis
        self.voxel_shape = tuple(feats_per_axis[0].shape[1:]) if step == 1 else None
        self._step = step

    def grid(self, axis):
        return self._f[axis]

    def cell_to_voxel(self, axis):
        return np.zeros(3), np.full(3, float(self._step))

    def on_voxel_grid(self, axes=None):
        axes = list(axes if axes is not None else range(len(self._f)))
        out = []
        for a in axes:
            f = self._f[a].astype(np.float32)
            out.append(f / np.maximum(np.linalg.norm(f, axis=0, keepdims=True), 1e-12))
        return np.concatenate(out, 0) / np.sqrt(len(axes))


class _Store:
    def __init__(self, entries, axes=(0, 1, 2)):
        self.entries = entries
        self.axes = tuple(axes)

    def cases(self):
        return sorted(self.entries)

    def has(self, case):
        return case in self.entries

    def load(self, case):
        if case not in self.entries:
            raise InputError(f"store: no features for case {case}")
        return self.entries[case]


def _onehot_features(label, num_classes, noise, rng, extra=5):
    C = num_classes + extra
    f = rng.normal(0, noise, size=(C, *label.shape)).astype(np.float32)
    for c in range(num_classes):
        f[c] += (label == c)
    return f.astype(np.float16)


@pytest.fixture(scope="module")
def real(data_root):
    ds = Dataset(data_root)
    labels = {c: ds.read_label(c, reference=ds.read_image(c)).array for c in [TEMPLATE, *CASES]}
    return ds, labels


@pytest.fixture(scope="module")
def onehot_store(real):
    ds, labels = real
    rng = np.random.default_rng(0)
    K = ds.label_map.num_classes
    entries = {c: _Case([_onehot_features(lab, K, 0.15, rng) for _ in range(3)]) for c, lab in labels.items()}
    return _Store(entries)


# --------------------------------------------------------------------------- tests


def _dice(a, b, c):
    x, y = a == c, b == c
    return 2 * (x & y).sum() / max(x.sum() + y.sum(), 1)


@pytest.mark.parametrize("method,extra", [
    ("knn", dict(position_weight=0.0, query_stride=1)),
    ("knn", dict(position_weight=2.0, query_stride=1)),
    ("prototype", dict(prototypes_per_class=1, background_prototypes=1)),
    ("prototype", dict(prototypes_per_class=2, background_prototypes=4)),
])
def test_synthetic_onehot_features_reproduce_labels(tmp_path, data_root, real, onehot_store, method, extra):
    ds, labels = real
    out = tmp_path / "pseudo"
    summary = P.propagate(data_root, onehot_store, TEMPLATE, out, cases=CASES, method=method,
                          largest_component=False, smooth=0.0, bank_background=2000, class_planes="off",
                          quiet=True, threads=2, **extra)
    assert summary["written"] == 2
    for case in CASES:
        pred = read_label(out / f"{case}.nii.gz", ds.label_map, reference=ds.read_image(case)).array
        np.testing.assert_array_equal(pred, labels[case])


def test_recentre_undoes_a_shifted_field_of_view(tmp_path, data_root, real):
    """The position term assumes the anatomy sits at the same place in every volume's box;
    recentring removes that assumption for translations. The case is the template shifted by
    6 voxels along the posterior-anterior axis, with features that tell foreground from
    background but not Anterior from Posterior (so only the position term places the boundary
    between them). Without recentring the boundary stays where it is in the template's box;
    one recentring pass moves the case's coordinates by the foreground centroid offset and
    recovers the shifted label almost exactly."""
    import shutil

    ds, labels = real
    tpl = labels[TEMPLATE]
    shift = 6
    pad = np.zeros((tpl.shape[0], tpl.shape[1] + 2 * shift, tpl.shape[2]), np.uint8)
    pad[:, shift:shift + tpl.shape[1]] = tpl  # the template's label in a longer box
    moved = np.roll(pad, shift, axis=1)       # the same anatomy 6 voxels further along the axis
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(data_root / "dataset.json", root / "dataset.json")
    img = nib.load(str(data_root / "imagesTr" / f"{TEMPLATE}.nii.gz"))
    ras = nib.as_closest_canonical(img)
    for case in ("tpl", "moved"):
        data = np.zeros(pad.shape, np.float32)
        nib.save(nib.Nifti1Image(data, ras.affine), str(root / "imagesTr" / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(pad, ras.affine), str(root / "labelsTr" / "tpl.nii.gz"))
    rng = np.random.default_rng(4)
    store = _Store({c: _Case([_onehot_features((lab > 0).astype(np.uint8), 2, 0.05, rng)])
                    for c, lab in (("tpl", pad), ("moved", moved))}, axes=(0,))
    kw = dict(cases=["moved"], method="knn", position_weight=2.0, query_stride=1, k=10, largest_component=False,
              smooth=0.0, bank_background=2000, class_planes="off", quiet=True, threads=2)
    dice = {}
    for rc in (0, 1):
        out = tmp_path / f"rc{rc}"
        P.propagate(root, store, "tpl", out, recentre=rc, **kw)
        pred = np.asarray(nib.load(str(out / "moved.nii.gz")).dataobj)
        np.testing.assert_array_equal(pred > 0, moved > 0)  # the features alone decide the foreground
        dice[rc] = [_dice(pred, moved, c) for c in (1, 2)]
    assert min(dice[1]) > 0.98, dice
    assert max(dice[0]) < 0.9, dice  # the boundary left where it is in the template's box


def test_outputs_keep_input_grid_affine_header_and_integer_type(tmp_path, data_root, real, onehot_store):
    ds, labels = real
    out = tmp_path / "pseudo"
    P.propagate(data_root, onehot_store, TEMPLATE, out, cases=CASES, quiet=True, save_scores=True)
    for case in CASES:
        src = nib.load(str(ds.image_path(case)))
        got = nib.load(str(out / f"{case}.nii.gz"))
        assert got.shape == src.shape
        np.testing.assert_allclose(got.affine, src.affine)
        assert np.issubdtype(got.get_data_dtype(), np.integer)
        assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1, 2}
        sc = nib.load(str(out / "scores" / f"{case}.nii.gz"))
        assert sc.shape == (*src.shape, 3) and sc.get_data_dtype() == np.float32
        # with the defaults (query stride 2, smoothing, largest component) thin parts blur a little,
        # but with one-hot features Dice against the real label stays high
        pred = read_label(out / f"{case}.nii.gz", ds.label_map).array
        for c in (1, 2):
            assert _dice(pred, labels[case], c) > 0.85


def test_class_planes_learned_from_template_and_applied(tmp_path, data_root, real, onehot_store):
    from semisam_o1 import class_planes as CP

    ds, labels = real
    out = tmp_path / "pseudo"
    summary = P.propagate(data_root, onehot_store, TEMPLATE, out, cases=CASES, quiet=True)
    rule = CP.read(out / CP.CLASS_PLANES_JSON)
    assert (rule.axis, rule.order) == (1, (2, 1)) and summary["class_planes"]["order_names"] == ["Posterior", "Anterior"]
    off = tmp_path / "off"
    P.propagate(data_root, onehot_store, TEMPLATE, off, cases=CASES, class_planes="off", quiet=True)
    assert not (off / CP.CLASS_PLANES_JSON).exists()
    for case in CASES:
        with_rule = read_label(out / f"{case}.nii.gz", ds.label_map).array
        without = read_label(off / f"{case}.nii.gz", ds.label_map).array
        # same foreground; its classes re-split by coronal slices (Posterior below Anterior)
        np.testing.assert_array_equal(with_rule > 0, without > 0)
        np.testing.assert_array_equal(with_rule, CP.apply(without, rule))
        for j in range(with_rule.shape[1]):
            assert len(set(np.unique(with_rule[:, j])) - {0}) <= 1
        for c in (1, 2):
            assert _dice(with_rule, labels[case], c) > 0.85


def test_resume_skips_finished_cases(tmp_path, data_root, onehot_store):
    out = tmp_path / "pseudo"
    s1 = P.propagate(data_root, onehot_store, TEMPLATE, out, cases=CASES[:1], quiet=True)
    mtime = (out / f"{CASES[0]}.nii.gz").stat().st_mtime_ns
    s2 = P.propagate(data_root, onehot_store, TEMPLATE, out, cases=CASES, quiet=True)
    assert (s1["written"], s2["written"], s2["skipped"]) == (1, 1, 1)
    assert (out / f"{CASES[0]}.nii.gz").stat().st_mtime_ns == mtime


def test_area_fractions_against_numpy_reference():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(9, 8, 7)).astype(np.uint8)
    # cells of 2 x 3 x 1 voxels whose centres sit on voxel centres + (0.5, 1, 0): blocks tile the volume
    offset, step = np.array([0.5, 1.0, 0.0]), np.array([2.0, 3.0, 1.0])
    cells = (4, 2, 7)  # the last (partial) block along x and y is left out
    frac = P.area_fractions(label, 3, cells, offset, step)
    ref = np.zeros((3, *cells))
    for i in range(cells[0]):
        for j in range(cells[1]):
            for k in range(cells[2]):
                block = label[2 * i:2 * i + 2, 3 * j:3 * j + 3, k]
                for c in range(3):
                    ref[c, i, j, k] = (block == c).mean()
    np.testing.assert_allclose(frac, ref, atol=1e-6)
    # a half-voxel shift: each cell covers half of two voxels
    f2 = P.area_fractions(label, 3, (8, 8, 7), [0.5, 0, 0], [1, 1, 1])
    ref2 = np.stack([0.5 * ((label[:-1] == c).astype(float) + (label[1:] == c)) for c in range(3)])
    np.testing.assert_allclose(f2, ref2, atol=1e-6)


def test_class_prototypes_against_numpy_reference():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(6, 5, 4, 3)).astype(np.float16)
    frac = rng.dirichlet(np.ones(3), size=(5, 4, 3)).transpose(3, 0, 1, 2).astype(np.float32)
    protos, owner = P.class_prototypes(feats, frac, 1)
    f = feats.astype(np.float32).reshape(6, -1).T
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    for c in range(3):
        w = frac[c].reshape(-1)
        np.testing.assert_allclose(protos[c], (w[:, None] * f).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(owner, [0, 1, 2])
    # several prototypes: unit vectors, each class gets at most N, ordered by class
    protos, owner = P.class_prototypes(feats, frac, [4, 2, 1], seed=0)
    assert list(np.bincount(owner)) == [4, 2, 1]
    np.testing.assert_allclose(np.linalg.norm(protos[:6], axis=1), 1, rtol=1e-5)
    # a class absent from the grid: a warning naming it, no prototype
    frac[2] = 0
    with pytest.warns(UserWarning, match="class 2 \\(posterior\\)"):
        protos, owner = P.class_prototypes(feats, frac, 1, class_names=["bg", "anterior", "posterior"])
    assert list(owner) == [0, 1]


def test_position_fold_equals_direct_formula():
    rng = np.random.default_rng(3)
    fq = rng.normal(size=(7, 10)).astype(np.float32)
    fb = rng.normal(size=(30, 10)).astype(np.float32)
    fq /= np.linalg.norm(fq, axis=1, keepdims=True)
    fb /= np.linalg.norm(fb, axis=1, keepdims=True)
    pq, pb = rng.uniform(-1, 1, (7, 3)), rng.uniform(-1, 1, (30, 3))
    for w in (0.0, 1.0, 3.0):
        direct = fq @ fb.T - (w * w / 2) * ((pq[:, None] - pb[None]) ** 2).sum(-1)
        qa = P.augment_with_position(fq, pq, w, "query")
        ba = P.augment_with_position(fb, pb, w, "bank")
        np.testing.assert_allclose(qa @ ba.T, direct, atol=1e-4)
        norms = np.linalg.norm(ba, axis=1)
        np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # equal bank norms: cosine keeps the ranking
        cos = (qa @ ba.T) / np.linalg.norm(qa, axis=1, keepdims=True) / norms[None]
        np.testing.assert_array_equal(np.argsort(-cos, 1)[:, :5], np.argsort(-direct, 1)[:, :5])


def test_interp_and_largest_component():
    vals = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    out = P._interp_to_grid(vals, [np.array([0, 2, 4]), np.array([0]), np.array([0])], (5, 2, 1))
    np.testing.assert_allclose(out[0, :, 0, 0], [0, 0.5, 1, 1.5, 2])
    assert out.shape == (2, 5, 2, 1)
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[0:3, 0:3, 0:3] = 1
    lab[5, 5, 5] = 1
    lab[0, 5, 0] = 2
    got = P.largest_component(lab, 3)
    assert got[5, 5, 5] == 0 and got[1, 1, 1] == 1 and got[0, 5, 0] == 2


# --------------------------------------------------------------------------- bad input


def _copy_dataset(data_root, dst, cases):
    import json
    import shutil

    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    shutil.copy(data_root / "dataset.json", dst / "dataset.json")
    for c in cases:
        shutil.copy(data_root / "imagesTr" / f"{c}.nii.gz", dst / "imagesTr")
        shutil.copy(data_root / "labelsTr" / f"{c}.nii.gz", dst / "labelsTr")
    return json.loads((dst / "dataset.json").read_text())


def _cli(monkeypatch, store, argv):
    from semisam_o1 import cli

    monkeypatch.setattr(P, "_open_store", lambda f: store)
    return cli.main(["propagate", *argv])


def test_missing_features_is_exit_2_and_nothing_written(tmp_path, data_root, onehot_store, monkeypatch, capsys):
    store = _Store({k: v for k, v in onehot_store.entries.items() if k != CASES[1]})
    out = tmp_path / "pseudo"
    rc = _cli(monkeypatch, store, ["-i", str(data_root), "-f", "x", "--template", TEMPLATE, "-o", str(out),
                                   "--cases", *CASES, "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert CASES[1] in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*"))


def test_empty_template_label_is_exit_2(tmp_path, data_root, onehot_store, monkeypatch, capsys):
    root = tmp_path / "ds"
    _copy_dataset(data_root, root, [TEMPLATE, *CASES])
    lp = root / "labelsTr" / f"{TEMPLATE}.nii.gz"
    img = nib.load(str(lp))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), str(lp))
    out = tmp_path / "pseudo"
    rc = _cli(monkeypatch, onehot_store, ["-i", str(root), "-f", "x", "--template", TEMPLATE, "-o", str(out),
                                          "--cases", *CASES, "--quiet"])
    assert rc == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*"))


def test_template_label_shape_mismatch_is_exit_2(tmp_path, data_root, onehot_store, monkeypatch, capsys):
    root = tmp_path / "ds"
    _copy_dataset(data_root, root, [TEMPLATE, *CASES])
    lp = root / "labelsTr" / f"{TEMPLATE}.nii.gz"
    img = nib.load(str(lp))
    data = np.asarray(img.dataobj)[:-1]
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(lp))
    out = tmp_path / "pseudo"
    rc = _cli(monkeypatch, onehot_store, ["-i", str(root), "-f", "x", "--template", TEMPLATE, "-o", str(out),
                                          "--cases", *CASES, "--quiet"])
    assert rc == 2
    assert "shape" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*"))


def test_feature_grid_mismatch_is_exit_2(tmp_path, data_root, onehot_store, monkeypatch, capsys):
    entries = dict(onehot_store.entries)
    f = entries[CASES[0]]
    entries[CASES[0]] = _Case([g[:, :-1] for g in f._f])
    out = tmp_path / "pseudo"
    rc = _cli(monkeypatch, _Store(entries), ["-i", str(data_root), "-f", "x", "--template", TEMPLATE,
                                             "-o", str(out), "--cases", *CASES, "--quiet"])
    assert rc == 2
    assert CASES[0] in capsys.readouterr().err


@pytest.mark.parametrize("option,value,word", [("--recentre", "-1", "recentre"), ("--k", "0", "k")])
def test_bad_knn_parameter_is_exit_2_and_nothing_written(tmp_path, data_root, onehot_store, monkeypatch, capsys,
                                                         option, value, word):
    out = tmp_path / "pseudo"
    rc = _cli(monkeypatch, onehot_store, ["-i", str(data_root), "-f", "x", "--template", TEMPLATE, "-o", str(out),
                                          "--cases", *CASES, option, value, "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--{word}" in err[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_cli_arguments_parse():
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    args = parser.parse_args(["-i", "d", "-f", "f", "--template", "t", "-o", "o", "--split", "s.json",
                              "--prototypes-per-class", "3", "--device", "cpu", "--no-largest-component"])
    assert args.subset == "unlabeled" and args.prototypes_per_class == 3 and args.largest_component is False
    assert args.method == P.DEFAULTS["method"] and args.position_weight == P.DEFAULTS["position_weight"]
