"""refine: voxel mode on a synthetic cohort with a known answer, volume mode against a
NumPy reference, resume, and bad inputs (InputError, exit code 2, nothing written).

The cohort is synthetic and tiny (8^3 voxels): each voxel's feature vector is its
true class's centre plus noise, so the right answer of the kNN vote is known.
The feature store is a small stand-in with the FeatureStore reading interface
(``has``, ``load(case).voxel_shape``, ``on_voxel_grid()``), so these tests do not
depend on the encoder.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semisam_o1 import cli
from semisam_o1 import refine as refine_mod
from semisam_o1.errors import InputError

NAMES = ("background", "anterior", "posterior")


# --------------------------------------------------------------------------- references


def knn_vote_reference(queries, bank, bank_labels, k, *, threads=None, return_topk=False, device=None,
                       label_weights=None):
    """NumPy reference of kernels.knn_vote: cosine similarity, top-k (ties: lower bank
    index first), weights max(sim, 0) (times label_weights[label] when given) summed per
    label, highest total wins (ties: lowest label); all weights 0 -> the nearest
    neighbour's label with share 0."""
    q = np.asarray(queries, np.float64)
    b = np.asarray(bank, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = q @ b.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sim, idx, axis=1)
    lab = np.asarray(bank_labels)[idx]
    n_lab = int(np.max(bank_labels)) + 1
    w = np.maximum(top, 0)
    if label_weights is not None:
        n_lab = max(n_lab, len(label_weights))
        w = w * np.asarray(label_weights, np.float64)[lab]
    tot = np.zeros((len(q), n_lab))
    for j in range(k):
        np.add.at(tot, (np.arange(len(q)), lab[:, j]), w[:, j])
    labels = tot.argmax(axis=1).astype(np.int32)
    s = w.sum(axis=1)
    share = np.where(s > 0, tot.max(axis=1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    labels = np.where(s > 0, labels, lab[:, 0]).astype(np.int32)
    if return_topk:
        return labels, share, idx.astype(np.int64), top.astype(np.float32)
    return labels, share


class _CaseFeatures:
    def __init__(self, path: Path):
        self._path = path
        self._arr = np.load(path, mmap_mode="r")

    @property
    def voxel_shape(self):
        return tuple(self._arr.shape[1:])

    def on_voxel_grid(self, axes=None):
        return np.asarray(self._arr, dtype=np.float32)


class TinyStore:
    """Stand-in for semisam_o1.store.FeatureStore: ``<case>.npy`` (C, X, Y, Z) float32."""

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{root}: feature store not found")
        self.axes = (0,)

    def cases(self):
        return sorted(p.stem for p in self.root.glob("*.npy"))

    def has(self, case):
        return (self.root / f"{case}.npy").is_file()

    def load(self, case):
        if not self.has(case):
            raise InputError(f"{self.root}: no features for case {case}")
        return _CaseFeatures(self.root / f"{case}.npy")


@pytest.fixture(autouse=True)
def tiny_store(monkeypatch):
    """Route refine's FeatureStore to TinyStore; use the C++ kernel when it is built,
    the NumPy reference otherwise."""
    try:
        store_mod = importlib.import_module("semisam_o1.store")
    except ModuleNotFoundError:
        store_mod = types.ModuleType("semisam_o1.store")
        monkeypatch.setitem(sys.modules, "semisam_o1.store", store_mod)
    real_store = getattr(store_mod, "FeatureStore", None)

    def open_store(root):  # a real store folder (store.json) is opened by the real class
        if real_store is not None and (Path(root) / "store.json").is_file():
            return real_store(root)
        return TinyStore(root)

    monkeypatch.setattr(store_mod, "FeatureStore", open_store, raising=False)
    try:
        kernels = importlib.import_module("semisam_o1.kernels")
        kernels.knn_vote(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32), np.zeros(1, np.int32), 1)
    except (ImportError, AttributeError):
        kernels = types.ModuleType("semisam_o1.kernels")
        kernels.knn_vote = knn_vote_reference
        kernels.cuda_available = lambda: False
        monkeypatch.setitem(sys.modules, "semisam_o1.kernels", kernels)
        import semisam_o1

        monkeypatch.setattr(semisam_o1, "kernels", kernels, raising=False)


# --------------------------------------------------------------------------- synthetic cohort


def _save(path: Path, arr, dtype):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), np.eye(4)), str(path))


def _truth(shape, shift=0):
    """Three classes: background, a block of class 1, a block of class 2 beside it."""
    t = np.zeros(shape, np.uint8)
    t[2:5, 1 + shift:4 + shift, 2:6] = 1
    t[2:5, 4 + shift:7 + shift, 2:6] = 2
    return t


def _write_dataset(root: Path, shapes: dict[str, tuple]):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"labels": {str(i): n for i, n in enumerate(NAMES)},
                                                   "file_ending": ".nii.gz"}))
    rng = np.random.default_rng(1)
    for case, shape in shapes.items():
        _save(root / "imagesTr" / f"{case}.nii.gz", rng.random(shape), np.float32)


def _features(truth, rng, c=8, noise=0.05):
    centres = np.eye(c, dtype=np.float32)[:3] + 0.2  # three well-separated directions
    f = centres[truth] + noise * rng.standard_normal(truth.shape + (c,)).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(f, -1, 0))


@pytest.fixture()
def voxel_cohort(tmp_path):
    """Template 'tpl' (real label saved), cases c0..c2 with predictions: correct except
    that every class-2 voxel is predicted as class 1 with high entropy (so only the
    template's real label carries class 2 into the bank), plus a few wrong class-1
    voxels predicted as background with high entropy."""
    rng = np.random.default_rng(0)
    shape = (8, 8, 8)
    cases = ["c0", "c1", "c2"]
    ds, feats, pred = tmp_path / "ds", tmp_path / "feats", tmp_path / "pred"
    _write_dataset(ds, {c: shape for c in ["tpl"] + cases})
    feats.mkdir()
    truth = {}
    for i, case in enumerate(["tpl"] + cases):
        t = _truth(shape, shift=i % 2)
        truth[case] = t
        np.save(feats / f"{case}.npy", _features(t, rng))
    _save(ds / "labelsTr" / "tpl.nii.gz", truth["tpl"], np.uint8)
    expected_changes = {}
    for case in cases:
        t = truth[case]
        p = t.copy()
        ent = rng.uniform(0.0, 0.1, size=shape)
        wrong2 = t == 2
        p[wrong2] = 1
        ent[wrong2] = rng.uniform(0.8, 1.0, size=int(wrong2.sum()))
        fg1 = np.argwhere(t == 1)[:3]
        for x, y, z in fg1:
            p[x, y, z] = 0
            ent[x, y, z] = 0.9
        # some correct but uncertain voxels: must keep their (right) label
        bg = np.argwhere(t == 0)[::40]
        for x, y, z in bg:
            ent[x, y, z] = 0.95
        _save(pred / f"{case}.nii.gz", p, np.uint8)
        _save(pred / f"{case}_entropy.nii.gz", ent, np.float32)
        expected_changes[case] = int((p != t).sum())
    return dict(ds=ds, feats=feats, pred=pred, cases=cases, truth=truth, out=tmp_path / "out",
                expected_changes=expected_changes)


def _read(path):
    return np.asarray(nib.load(str(path)).dataobj)


# --------------------------------------------------------------------------- voxel mode


@pytest.mark.parametrize("project_dim,class_weights", [(0, "prior"), (4, "prior"), (0, "balanced")])
def test_voxel_mode_known_answer(voxel_cohort, project_dim, class_weights):
    v = voxel_cohort
    # entropy quantile such that all high-entropy voxels (>= 0.8) are queries and no low ones
    ents = np.concatenate([_read(v["pred"] / f"{c}_entropy.nii.gz").ravel() for c in v["cases"]])
    q = 1.0 - (ents >= 0.8).mean() + 1e-9
    info = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], template="tpl", cases=v["cases"],
                             k=5, quantile=q, bank_size=300, project_dim=project_dim, class_weights=class_weights,
                             threads=1, quiet=True)
    if class_weights == "prior":  # n_c / m_c, scaled so the smallest is 1
        ratio = {c: info["bank"]["candidates"][c] / info["bank"]["per_class"][c] for c in NAMES}
        expect = {c: r / min(ratio.values()) for c, r in ratio.items()}
        assert info["bank"]["vote_weight_per_class"] == pytest.approx(expect, rel=1e-6)
        assert expect["background"] > 1.5  # the sample really was re-weighted
    else:
        assert "vote_weight_per_class" not in info["bank"]
    assert info["threshold"] == pytest.approx(float(np.quantile(ents, q)))
    assert info["threshold"] < 0.8 and info["queries_total"] == int((ents >= 0.8).sum())
    for case in v["cases"]:
        out = _read(v["out"] / f"{case}.nii.gz")
        pred = _read(v["pred"] / f"{case}.nii.gz")
        ent = _read(v["pred"] / f"{case}_entropy.nii.gz")
        confident = ent < info["threshold"]
        np.testing.assert_array_equal(out[confident], pred[confident])  # confident voxels never change
        np.testing.assert_array_equal(out, v["truth"][case])  # every query took its true label
        assert info["cases"][case]["changed"] == v["expected_changes"][case]
        assert info["cases"][case]["queries"] == int((~confident).sum())
    # class 2 comes only from the template's real label (all class-2 predictions were uncertain)
    assert info["bank"]["per_class"]["posterior"] == int((v["truth"]["tpl"] == 2).sum())
    assert info["bank"]["from_template"]["posterior"] == info["bank"]["per_class"]["posterior"]
    assert info["bank"]["size"] == 300
    assert sum(info["bank"]["per_class"].values()) == 300
    total_changed = sum(v["expected_changes"].values())
    assert info["voxels_changed_total"] == total_changed
    assert info["voxels_changed_per_class"]["to"]["posterior"] == sum(int((v["truth"][c] == 2).sum())
                                                                      for c in v["cases"])
    assert info["bank"]["projection"]["dim"] == (4 if project_dim else 8)
    # the output keeps the input affine
    np.testing.assert_allclose(nib.load(str(v["out"] / "c0.nii.gz")).affine, np.eye(4))
    saved = json.loads((v["out"] / "refine.json").read_text())
    assert saved["complete"] and saved["voxels_changed_total"] == total_changed


def test_voxel_mode_on_a_real_format_store(voxel_cohort, tmp_path):
    """The same known answer through the real FeatureStore (float16 grids, memory-mapped,
    on_voxel_grid's per-axis normalisation), written in encode's layout."""
    encode = pytest.importorskip("semisam_o1.encode")
    from semisam_o1.store import config_signature

    v = voxel_cohort
    root = tmp_path / "store"
    root.mkdir()
    config = {"format": 1, "axes": [0], "channels": 8}
    config["signature"] = config_signature(config)
    (root / "store.json").write_text(json.dumps(config))
    for case in ["tpl"] + v["cases"]:
        f = np.load(v["feats"] / f"{case}.npy").astype(np.float16)
        meta = {"case": case, "voxel_shape": list(f.shape[1:]), "affine": np.eye(4).tolist(), "axes": [0],
                "store_signature": config["signature"], "input_sha256": "x"}
        encode._write_case(root, case, {0: f}, {0: ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])}, meta)
    ents = np.concatenate([_read(v["pred"] / f"{c}_entropy.nii.gz").ravel() for c in v["cases"]])
    q = 1.0 - (ents >= 0.8).mean() + 1e-9
    info = refine_mod.refine(v["ds"], root, v["pred"], v["out"], template="tpl", cases=v["cases"], k=5,
                             quantile=q, bank_size=300, project_dim=0, threads=2, quiet=True)
    for case in v["cases"]:
        np.testing.assert_array_equal(_read(v["out"] / f"{case}.nii.gz"), v["truth"][case])
    assert info["voxels_changed_total"] == sum(v["expected_changes"].values())
    # a changed store entry (re-encoded case) changes the signature: nothing is skipped
    meta_path = root / "cases" / "c0" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["input_sha256"] = "y"
    meta_path.write_text(json.dumps(meta))
    again = refine_mod.refine(v["ds"], root, v["pred"], v["out"], template="tpl", cases=v["cases"], k=5,
                              quantile=q, bank_size=300, project_dim=0, threads=2, quiet=True)
    assert again["resumed_cases"] == 0 and again["signature"] != info["signature"]


def test_voxel_mode_with_position_term(voxel_cohort):
    """A small position weight keeps the known answer (features dominate) and is recorded;
    0 switches it off and gives another signature."""
    v = voxel_cohort
    ents = np.concatenate([_read(v["pred"] / f"{c}_entropy.nii.gz").ravel() for c in v["cases"]])
    q = 1.0 - (ents >= 0.8).mean() + 1e-9
    kw = dict(template="tpl", cases=v["cases"], k=5, quantile=q, bank_size=300, project_dim=0, threads=1, quiet=True)
    info = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], position_weight=0.3, **kw)
    assert info["bank"]["position_weight"] == 0.3 and info["params"]["position_weight"] == 0.3
    for case in v["cases"]:
        np.testing.assert_array_equal(_read(v["out"] / f"{case}.nii.gz"), v["truth"][case])
    off = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], position_weight=0.0, **kw)
    assert "position_weight" not in off["bank"] and off["signature"] != info["signature"]
    with pytest.raises(InputError, match="position-weight"):
        refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], position_weight=-1.0, **kw)


def test_voxel_mode_zero_threshold_keeps_zero_entropy_voxels_confident(voxel_cohort):
    """Most voxels at exactly zero entropy: the quantile is 0, the queries are the voxels
    above 0 and the zero-entropy voxels of the cohort still fill the bank."""
    v = voxel_cohort
    for case in v["cases"]:
        path = v["pred"] / f"{case}_entropy.nii.gz"
        ent = _read(path)
        ent[ent < 0.8] = 0.0
        _save(path, ent, np.float32)
    info = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], template="tpl", cases=v["cases"], k=5,
                             quantile=0.5, bank_size=300, project_dim=0, threads=1, quiet=True)
    assert info["threshold"] == 0.0
    n_zero = sum(int((_read(v["pred"] / f"{c}_entropy.nii.gz") == 0).sum()) for c in v["cases"])
    assert info["queries_total"] == 3 * 512 - n_zero
    assert info["bank"]["candidates"]["background"] > int((v["truth"]["tpl"] == 0).sum())  # cohort voxels too
    for case in v["cases"]:
        np.testing.assert_array_equal(_read(v["out"] / f"{case}.nii.gz"), v["truth"][case])


def test_voxel_mode_resume_and_signature(voxel_cohort):
    v = voxel_cohort
    kw = dict(template="tpl", cases=v["cases"], k=3, quantile=0.9, bank_size=200, project_dim=0, threads=1,
              quiet=True)
    first = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], **kw)
    assert first["resumed_cases"] == 0
    mtime = (v["out"] / "c1.nii.gz").stat().st_mtime_ns
    again = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], **kw)
    assert again["resumed_cases"] == 3 and again["signature"] == first["signature"]
    assert again["cases"] == first["cases"]
    assert (v["out"] / "c1.nii.gz").stat().st_mtime_ns == mtime
    # a killed run: one case missing -> only that one is redone
    (v["out"] / "c1.nii.gz").unlink()
    part = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], **kw)
    assert part["resumed_cases"] == 2 and (v["out"] / "c1.nii.gz").is_file()
    drop = lambda d: {k: x for k, x in d.items() if k != "seconds"}  # noqa: E731
    assert drop(part["cases"]["c1"]) == drop(first["cases"]["c1"])
    # a changed parameter (or seed) changes the signature: everything is redone
    other = refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], **dict(kw, seed=1))
    assert other["signature"] != first["signature"] and other["resumed_cases"] == 0


def test_class_quotas():
    assert refine_mod.class_quotas([1000, 1000, 1000], 300) == [100, 100, 100]
    assert refine_mod.class_quotas([1000, 20, 1000], 300) == [140, 20, 140]
    assert refine_mod.class_quotas([5, 3, 0], 300) == [5, 3, 0]
    assert sum(refine_mod.class_quotas([1000, 1000, 1000], 301)) == 301
    assert refine_mod.class_quotas([0, 0], 10) == [0, 0]


def test_fit_projection_matches_numpy_svd():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 12)) * np.linspace(3, 0.1, 12) + 0.5).astype(np.float32)
    # default: uncentred (top right singular vectors of x itself)
    mean, comps, kept = refine_mod.fit_projection(x, 3)
    np.testing.assert_array_equal(mean, 0)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(comps.T @ vt[:3].T), np.eye(3), atol=1e-4)
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    # centred: ordinary PCA
    mean, comps, kept = refine_mod.fit_projection(x, 3, centred=True)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(comps.T @ vt[:3].T), np.eye(3), atol=1e-4)
    assert kept == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


# --------------------------------------------------------------------------- volume mode


def test_resize_nearest_matches_torch_nearest_exact():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    lab = rng.integers(0, 3, size=(7, 9, 5)).astype(np.uint8)
    for shape in [(7, 9, 5), (10, 6, 8), (3, 13, 5)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(lab.astype(np.float32))[None, None], size=shape,
                                              mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(refine_mod.resize_nearest(lab, shape), ref)


def test_volume_mode_against_numpy_reference(tmp_path):
    rng = np.random.default_rng(5)
    shapes = {"tpl": (8, 8, 8), "v0": (8, 8, 8), "v1": (7, 9, 6), "v2": (9, 7, 8), "v3": (6, 8, 7),
              "v4": (8, 6, 9), "v5": (7, 7, 7)}
    cases = [c for c in shapes if c != "tpl"]
    ds, feats, pred, out = tmp_path / "ds", tmp_path / "feats", tmp_path / "pred", tmp_path / "out"
    _write_dataset(ds, shapes)
    feats.mkdir()
    labels, f, mean_ent = {}, {}, {}
    for i, (case, shape) in enumerate(shapes.items()):
        lab = rng.integers(0, 3, size=shape).astype(np.uint8)
        labels[case] = lab
        f[case] = (rng.standard_normal((6,) + shape) + rng.standard_normal((6, 1, 1, 1))).astype(np.float32)
        np.save(feats / f"{case}.npy", f[case])
        if case == "tpl":
            _save(ds / "labelsTr" / "tpl.nii.gz", lab, np.uint8)
            continue
        ent = rng.uniform(0, 0.2 * i, size=shape).astype(np.float32)  # distinct means
        mean_ent[case] = float(ent.astype(np.float64).mean())
        _save(pred / f"{case}.nii.gz", lab, np.uint8)
        _save(pred / f"{case}_entropy.nii.gz", ent, np.float32)

    quantile, k = 0.6, 3
    info = refine_mod.refine(ds, feats, pred, out, template="tpl", cases=cases, k=k, quantile=quantile,
                             mode="volume", threads=1, quiet=True)

    # NumPy reference of the official whole-volume rule
    thr = float(np.quantile([mean_ent[c] for c in cases], quantile))
    uncertain = [c for c in cases if mean_ent[c] >= thr]
    confident = ["tpl"] + [c for c in cases if mean_ent[c] < thr]
    assert info["threshold"] == pytest.approx(thr)
    assert info["uncertain_cases"] == uncertain and info["confident_cases"] == confident
    assert len(uncertain) == 3

    def desc(c):
        d = f[c].reshape(6, -1).astype(np.float64).mean(axis=1)
        return d / np.linalg.norm(d)

    for case in cases:
        got = _read(out / f"{case}.nii.gz")
        if case not in uncertain:
            np.testing.assert_array_equal(got, labels[case])
            continue
        sims = np.array([desc(case) @ desc(c) for c in confident])
        order = np.argsort(-sims, kind="stable")[:k]
        assert [n["case"] for n in info["neighbours"][case]] == [confident[j] for j in order]
        votes = np.zeros((3,) + labels[case].shape)
        for j in order:
            src = labels[confident[j]]
            idx = [np.minimum(((np.arange(nd) + 0.5) * ns / nd).astype(int), ns - 1)
                   for ns, nd in zip(src.shape, labels[case].shape)]
            r = src[np.ix_(*idx)]
            for c in range(3):
                votes[c] += max(sims[j], 0.0) * (r == c)
        expected = votes.argmax(axis=0) if max(sims[order].max(), 0) > 0 else labels[case]
        np.testing.assert_array_equal(got, expected)
        assert info["cases"][case]["changed"] == int((expected != labels[case]).sum())


@pytest.mark.parametrize("mode", ["voxel", "volume"])
def test_class_planes_resplit_the_refined_labels(voxel_cohort, mode):
    """With a class-planes rule the written labels are class_planes.apply of the labels
    refine writes without it (foreground kept, classes re-split along the axis), counted
    in the changed voxels and recorded in refine.json and its signature. The rule (axis 0)
    cuts across the synthetic classes (side by side along axis 1), so it must move voxels."""
    from semisam_o1 import class_planes as planes

    v = voxel_cohort
    for case in v["cases"]:  # predictions with both classes, so that the rule has something to re-split
        _save(v["pred"] / f"{case}.nii.gz", v["truth"][case], np.uint8)
    rule = planes.ClassPlanes(axis=0, order=(2, 1), template_error=0.0, tolerance=0.01)
    rule_file = v["out"].parent / planes.CLASS_PLANES_JSON
    planes.write(rule_file, rule, NAMES)
    plain_out, rule_out = v["out"].parent / "plain", v["out"].parent / "planar"
    kw = dict(template="tpl", cases=v["cases"], k=5, quantile=0.9, mode=mode, bank_size=300, project_dim=0,
              threads=1, quiet=True)
    plain = refine_mod.refine(v["ds"], v["feats"], v["pred"], plain_out, **kw)
    if mode == "voxel":  # through the CLI with the rule file
        assert cli.main(["refine", "-i", str(v["ds"]), "-f", str(v["feats"]), "-p", str(v["pred"]),
                         "-o", str(rule_out), "--template", "tpl", "--cases", *v["cases"], "--k", "5",
                         "--quantile", "0.9", "--bank-size", "300", "--project-dim", "0", "--threads", "1",
                         "--class-planes", str(rule_file), "--quiet"]) == 0
        info = json.loads((rule_out / "refine.json").read_text())
    else:
        info = refine_mod.refine(v["ds"], v["feats"], v["pred"], rule_out, class_planes=rule, **kw)
    moved = 0
    for case in v["cases"]:
        before = _read(v["pred"] / f"{case}.nii.gz")
        base = _read(plain_out / f"{case}.nii.gz")
        got = _read(rule_out / f"{case}.nii.gz")
        np.testing.assert_array_equal(got, planes.apply(base, rule))
        np.testing.assert_array_equal(got > 0, base > 0)
        assert info["cases"][case]["changed"] == int((got != before).sum())
        moved += int((got != base).sum())
    assert moved > 0
    assert info["params"]["class_planes"]["axis"] == 0 and info["params"]["class_planes"]["order"] == [2, 1]
    assert info["signature"] != plain["signature"] and "class_planes" not in plain["params"]


# --------------------------------------------------------------------------- bad inputs


def _cli(v, *extra):
    return cli.main(["refine", "-i", str(v["ds"]), "-f", str(v["feats"]), "-p", str(v["pred"]),
                     "-o", str(v["out"]), "--template", "tpl", "--cases", *v["cases"], "--quiet",
                     "--bank-size", "100", *extra])


@pytest.mark.parametrize("mode", ["voxel", "volume"])
def test_missing_entropy_map(voxel_cohort, capsys, mode):
    v = voxel_cohort
    (v["pred"] / "c2_entropy.nii.gz").unlink()
    with pytest.raises(InputError, match="c2"):
        refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], template="tpl", cases=v["cases"], mode=mode,
                          quiet=True)
    assert _cli(v, "--mode", mode) == 2
    err = capsys.readouterr().err
    assert "entropy" in err and "c2" in err and len(err.strip().splitlines()) == 1
    assert not v["out"].exists()


@pytest.mark.parametrize("missing", ["c1", "tpl"])
def test_missing_features(voxel_cohort, capsys, missing):
    v = voxel_cohort
    (v["feats"] / f"{missing}.npy").unlink()
    with pytest.raises(InputError, match=f"features for case {missing}"):
        refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], template="tpl", cases=v["cases"], quiet=True)
    assert _cli(v) == 2
    assert missing in capsys.readouterr().err
    assert not v["out"].exists()


def test_bad_grid_and_parameters(voxel_cohort, capsys):
    v = voxel_cohort
    np.save(v["feats"] / "c0.npy", np.zeros((8, 8, 8, 7), np.float32))  # wrong voxel grid
    with pytest.raises(InputError, match="c0"):
        refine_mod.refine(v["ds"], v["feats"], v["pred"], v["out"], template="tpl", cases=v["cases"], quiet=True)
    assert not v["out"].exists()
    assert _cli(v, "--k", "0") == 2
    assert _cli(v, "--quantile", "1.5") == 2
    from semisam_o1 import kernels

    if not kernels.cuda_available():
        assert _cli(v, "--device", "cuda") == 2
        assert "cuda" in capsys.readouterr().err.lower()
    assert cli.main(["refine", "-i", str(v["ds"]), "-f", str(v["feats"]), "-p", str(v["pred"]),
                     "-o", str(v["out"]), "--cases", "c0", "--quiet"]) == 2  # no template
    assert not v["out"].exists()
