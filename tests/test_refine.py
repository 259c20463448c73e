"""refine: voxel mode with a known answer, volume mode against a NumPy reference, resume through
the stage record, the position weight's one default, and bad inputs (one line, exit 2, nothing
written).

Every test runs on the ``cohort`` fixture (real MSD Hippocampus cases when present, else the
synthetic cohort): its images and real labels, with predictions, entropy maps and a real-format
feature store (``helpers.write_feature_store``) made here. Each voxel's features are its true
class's one-hot vector plus noise (``helpers.onehot_features``), so the right answer of the kNN
vote is known.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import helpers
import numpy as np
import pytest

from semisam_o1 import cli
from semisam_o1.core import resume
from semisam_o1.core.errors import InputError
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_image, read_label, write_label, write_map
from semisam_o1.data.store import FeatureStore
from semisam_o1.methods import knn
from semisam_o1.methods import template_vote as TV
from semisam_o1.stages import refine as refine_mod


def _run(v, output=None, **kw):
    """refine on the fixture ``v`` (quiet, one thread) with settings ``kw``."""
    base = dict(input=v["ds"].root, features=v["feats"], pred=v["pred"], output=output or v["out"],
                template=v["tpl"], cases=tuple(v["cases"]), threads=1, quiet=True)
    return refine_mod.refine(refine_mod.RefineSettings(**{**base, **kw}))


def _label(v, folder, case) -> np.ndarray:
    """Class indices of ``folder/<case>.nii.gz`` on the case's canonical grid."""
    return read_label(Path(folder) / f"{case}.nii.gz", v["ds"].label_map, reference=v["images"][case]).array


def _entropy(v, case) -> np.ndarray:
    return read_image(v["pred"] / f"{case}_entropy.nii.gz").array


def _query_quantile(v, high=0.8) -> float:
    """The entropy quantile that makes exactly the voxels at or above ``high`` queries."""
    ents = np.concatenate([_entropy(v, c).ravel() for c in v["cases"]])
    return 1.0 - (ents >= high).mean() + 1e-9


@pytest.fixture()
def voxel_cohort(cohort, tmp_path):
    """The cohort's template and 3 pool cases with predictions: right except that every class-2
    voxel is predicted as class 1 with high entropy (so only the template's real label carries
    class 2 into the bank), and 3 class-1 voxels per case predicted as background with high
    entropy; some right background voxels are uncertain too (they must keep their label)."""
    rng = np.random.default_rng(0)
    ds = Dataset(cohort.root)
    tpl, cases = cohort.template, cohort.unlabeled[:3]
    images = {c: ds.read_image(c) for c in [tpl, *cases]}
    truth = {c: ds.read_label(c, reference=images[c]).array for c in [tpl, *cases]}
    feats = helpers.write_feature_store(tmp_path / "feats", {c: helpers.onehot_features(truth[c], 3, 0.05, rng)
                                                             for c in [tpl, *cases]})
    pred = tmp_path / "pred"
    pred.mkdir()
    expected_changes = {}
    for case in cases:
        t = truth[case]
        p = t.copy()
        ent = rng.uniform(0.0, 0.1, size=t.shape)
        wrong2 = t == 2
        p[wrong2] = 1
        ent[wrong2] = rng.uniform(0.8, 1.0, size=int(wrong2.sum()))
        for x, y, z in np.argwhere(t == 1)[:3]:
            p[x, y, z] = 0
            ent[x, y, z] = 0.9
        for x, y, z in np.argwhere(t == 0)[::40]:  # right but uncertain
            ent[x, y, z] = 0.95
        write_label(pred / f"{case}.nii.gz", p, images[case], ds.label_map)
        write_map(pred / f"{case}_entropy.nii.gz", ent, images[case])
        expected_changes[case] = int((p != t).sum())
    return dict(ds=ds, feats=feats, pred=pred, tpl=tpl, cases=cases, truth=truth, images=images,
                out=tmp_path / "out", expected_changes=expected_changes)


# --------------------------------------------------------------------------- voxel mode


@pytest.mark.parametrize("project_dim", [0, 4])
def test_voxel_mode_known_answer(voxel_cohort, project_dim):
    v = voxel_cohort
    names = v["ds"].label_map.names
    q = _query_quantile(v)
    info = _run(v, k=5, quantile=q, bank_size=300, project_dim=project_dim)
    # the vote weights n_c / m_c, scaled so the smallest is 1
    ratio = {c: info["bank"]["candidates"][c] / info["bank"]["per_class"][c] for c in names}
    expect = {c: r / min(ratio.values()) for c, r in ratio.items()}
    assert info["bank"]["vote_weight_per_class"] == pytest.approx(expect, rel=1e-6)
    assert expect[names[0]] > 1.5  # the sample really was re-weighted
    ents = np.concatenate([_entropy(v, c).ravel() for c in v["cases"]])
    assert info["threshold"] == pytest.approx(float(np.quantile(ents, q)))
    assert info["threshold"] < 0.8 and info["queries_total"] == int((ents >= 0.8).sum())
    for case in v["cases"]:
        out, pred, ent = _label(v, v["out"], case), _label(v, v["pred"], case), _entropy(v, case)
        confident = ent < info["threshold"]
        np.testing.assert_array_equal(out[confident], pred[confident])  # confident voxels never change
        np.testing.assert_array_equal(out, v["truth"][case])  # every query took its true label
        assert info["cases"][case]["changed"] == v["expected_changes"][case]
        assert info["cases"][case]["queries"] == int((~confident).sum())
    # class 2 comes only from the template's real label (all class-2 predictions were uncertain)
    assert info["bank"]["candidates"][names[2]] == int((v["truth"][v["tpl"]] == 2).sum())
    assert info["bank"]["from_template"][names[2]] == info["bank"]["per_class"][names[2]] > 0
    assert info["bank"]["size"] == 300 and sum(info["bank"]["per_class"].values()) == 300
    total_changed = sum(v["expected_changes"].values())
    assert info["voxels_changed_total"] == total_changed
    assert info["voxels_changed_per_class"]["to"][names[2]] == sum(int((v["truth"][c] == 2).sum())
                                                                   for c in v["cases"])
    assert info["bank"]["projection"]["dim"] == (4 if project_dim else 8)
    assert info["bank"]["position_weight"] == TV.MethodOptions.__dataclass_fields__["position_weight"].default
    # the output keeps the input's affine; the summary is in refine.json and the stage record
    img = v["images"][v["cases"][0]]
    np.testing.assert_allclose(read_image(v["out"] / f"{v['cases'][0]}.nii.gz").native_affine, img.native_affine)
    assert json.loads((v["out"] / "refine.json").read_text())["voxels_changed_total"] == total_changed
    record = resume.read_record(v["out"])
    assert record["finished"] and record["summary"]["voxels_changed_total"] == total_changed
    assert record["command"].startswith("semisam-o1 refine ")


def test_position_weight_default_is_propagates():
    """The position term is the same in propagate and refine: one default (refine's was 1.5, a
    value propagate no longer used, and run never set it)."""
    import argparse

    from semisam_o1.core.settings import add_options
    from semisam_o1.stages import propagate

    def default(cls, name):
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    assert default(refine_mod.RefineSettings, "position_weight") == default(propagate.PropagateSettings,
                                                                            "position_weight")
    parser = argparse.ArgumentParser()
    add_options(parser, refine_mod.RefineSettings)
    args = parser.parse_args(["-i", "d", "-f", "s", "-p", "p", "-o", "o"])
    assert args.position_weight == default(propagate.PropagateSettings, "position_weight")


def test_class_weights_option_is_gone():
    """Only the measured vote weights remain (the 'balanced' alternative had no recorded gain)."""
    assert "class_weights" not in {f.name for f in dataclasses.fields(refine_mod.RefineSettings)}
    with pytest.raises(SystemExit):
        cli.main(["refine", "-i", "d", "-f", "s", "-p", "p", "-o", "o", "--class-weights", "balanced"])


def test_voxel_mode_with_position_term(voxel_cohort):
    """A small position weight keeps the known answer (features dominate) and is recorded;
    0 switches it off and gives another signature."""
    v = voxel_cohort
    kw = dict(k=5, quantile=_query_quantile(v), bank_size=300, project_dim=0)
    info = _run(v, position_weight=0.3, **kw)
    assert info["bank"]["position_weight"] == 0.3
    assert resume.read_record(v["out"])["signed"]["settings"]["position_weight"] == 0.3
    for case in v["cases"]:
        np.testing.assert_array_equal(_label(v, v["out"], case), v["truth"][case])
    off = _run(v, output=v["out"].parent / "off", position_weight=0.0, **kw)
    assert "position_weight" not in off["bank"]
    assert resume.read_record(v["out"].parent / "off")["signature"] != resume.read_record(v["out"])["signature"]
    with pytest.raises(InputError, match="position-weight"):
        _run(v, position_weight=-1.0, **kw)


def test_voxel_mode_zero_threshold_keeps_zero_entropy_voxels_confident(voxel_cohort):
    """Most voxels at exactly zero entropy: the quantile is 0, the queries are the voxels
    above 0 and the zero-entropy voxels of the cohort still fill the bank."""
    v = voxel_cohort
    for case in v["cases"]:
        ent = _entropy(v, case)
        ent[ent < 0.8] = 0.0
        write_map(v["pred"] / f"{case}_entropy.nii.gz", ent, v["images"][case])
    info = _run(v, k=5, quantile=0.5, bank_size=300, project_dim=0)
    assert info["threshold"] == 0.0
    n_voxels = sum(v["truth"][c].size for c in v["cases"])
    n_zero = sum(int((_entropy(v, c) == 0).sum()) for c in v["cases"])
    assert info["queries_total"] == n_voxels - n_zero
    assert info["bank"]["candidates"]["background"] > int((v["truth"][v["tpl"]] == 0).sum())  # cohort voxels too
    for case in v["cases"]:
        np.testing.assert_array_equal(_label(v, v["out"], case), v["truth"][case])


def test_voxel_mode_resume_and_signature(voxel_cohort, monkeypatch):
    v = voxel_cohort
    kw = dict(k=3, quantile=0.9, bank_size=200, project_dim=0)
    first = _run(v, **kw)
    assert first["resumed_cases"] == 0
    c1 = v["out"] / f"{v['cases'][1]}.nii.gz"
    mtime = c1.stat().st_mtime_ns
    assert _run(v, **kw) == first  # finished: the recorded summary, nothing redone
    assert c1.stat().st_mtime_ns == mtime
    # a killed run: interrupted at the second case; the same command keeps the first and redoes the rest
    part = v["out"].parent / "part"
    real_vote = refine_mod._vote_queries
    calls = []

    def vote_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_vote(*args, **kwargs)

    monkeypatch.setattr(refine_mod, "_vote_queries", vote_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(v, output=part, **kw)
    monkeypatch.setattr(refine_mod, "_vote_queries", real_vote)
    assert not resume.read_record(part)["finished"]
    resumed = _run(v, output=part, **kw)
    assert resumed["resumed_cases"] == 1
    drop = lambda d: {k: x for k, x in d.items() if k not in ("seconds", "queries", "reused")}  # noqa: E731
    for case in v["cases"]:
        np.testing.assert_array_equal(_label(v, part, case), _label(v, v["out"], case))
        assert drop(resumed["cases"][case]) == drop(first["cases"][case])
    # another seed: refused without --overwrite (one line naming it), redone with it
    with pytest.raises(InputError, match="seed"):
        _run(v, seed=1, **kw)
    other = _run(v, seed=1, overwrite=True, **kw)
    assert other["resumed_cases"] == 0 and c1.stat().st_mtime_ns != mtime


def test_changed_store_entry_is_another_input(voxel_cohort):
    """A re-encoded case (its store entry's meta.json changed) is another input: refused without
    --overwrite, every case redone with it."""
    v = voxel_cohort
    kw = dict(k=5, quantile=_query_quantile(v), bank_size=300, project_dim=0)
    _run(v, **kw)
    meta_path = v["feats"] / "cases" / v["cases"][0] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["input_sha256"] = "another image"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="features"):
        _run(v, **kw)
    again = _run(v, overwrite=True, **kw)
    assert again["resumed_cases"] == 0


def test_class_quotas():
    assert knn.class_quotas([1000, 1000, 1000], 300) == [100, 100, 100]
    assert knn.class_quotas([1000, 20, 1000], 300) == [140, 20, 140]
    assert knn.class_quotas([5, 3, 0], 300) == [5, 3, 0]
    assert sum(knn.class_quotas([1000, 1000, 1000], 301)) == 301
    assert knn.class_quotas([0, 0], 10) == [0, 0]


def test_projection_is_uncentred_pca_of_the_bank():
    """refine's projection: the top right singular vectors of the bank itself (uncentred),
    with the fraction of the energy they keep."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((500, 12)) * np.linspace(3, 0.1, 12) + 0.5).astype(np.float16)
    projected, (mean, basis), info = refine_mod._project_bank(x, 3, seed=0)
    np.testing.assert_array_equal(mean, 0)
    _, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(np.abs(basis.T @ vt[:3].T), np.eye(3), atol=1e-4)
    assert info["energy_kept"] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    np.testing.assert_allclose(projected, x.astype(np.float32) @ basis, rtol=1e-5, atol=1e-5)
    same, none, info0 = refine_mod._project_bank(x, 0, seed=0)
    assert same is x and none is None and info0["kind"] == "none"


# --------------------------------------------------------------------------- volume mode


def test_resize_nearest_matches_torch_nearest_exact():
    import torch

    rng = np.random.default_rng(4)
    lab = rng.integers(0, 3, size=(7, 9, 5)).astype(np.uint8)
    for shape in [(7, 9, 5), (10, 6, 8), (3, 13, 5)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(lab.astype(np.float32))[None, None], size=shape,
                                              mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(knn.resize_nearest(lab, shape), ref)


def test_volume_mode_against_numpy_reference(cohort, tmp_path):
    """Every non-template case of the cohort (pool and test) with random labels, features and
    entropy maps of distinct means; refine's volume rule against a NumPy reference."""
    rng = np.random.default_rng(5)
    ds = Dataset(cohort.root)
    cases = cohort.unlabeled + cohort.test
    images = {c: ds.read_image(c) for c in [cohort.template, *cases]}
    labels = {c: rng.integers(0, 3, size=images[c].shape).astype(np.uint8) for c in images}
    labels[cohort.template] = ds.read_label(cohort.template, reference=images[cohort.template]).array
    feats = helpers.write_feature_store(tmp_path / "feats", {
        c: (rng.standard_normal((6, *images[c].shape)) + rng.standard_normal((6, 1, 1, 1))).astype(np.float16)
        for c in images})
    pred, out = tmp_path / "pred", tmp_path / "out"
    mean_ent = {}
    for i, case in enumerate(cases, start=1):
        ent = rng.uniform(0, 0.2 * i, size=images[case].shape).astype(np.float32)  # distinct means
        write_label(pred / f"{case}.nii.gz", labels[case], images[case], ds.label_map)
        write_map(pred / f"{case}_entropy.nii.gz", ent, images[case])
        mean_ent[case] = float(read_image(pred / f"{case}_entropy.nii.gz").array.astype(np.float64).mean())
    quantile, k = 0.6, 3
    info = refine_mod.refine(refine_mod.RefineSettings(
        input=cohort.root, features=feats, pred=pred, output=out, template=cohort.template, cases=tuple(cases),
        k=k, quantile=quantile, mode="volume", threads=1, quiet=True))

    thr = float(np.quantile([mean_ent[c] for c in cases], quantile))
    uncertain = [c for c in cases if mean_ent[c] >= thr]
    confident = [cohort.template] + [c for c in cases if mean_ent[c] < thr]
    assert info["threshold"] == pytest.approx(thr)
    assert info["uncertain_cases"] == uncertain and info["confident_cases"] == confident
    assert len(uncertain) == 3
    store = FeatureStore(feats)

    def desc(c):
        d = store.load(c).on_voxel_grid().reshape(6, -1).astype(np.float64).mean(axis=1)
        return d / np.linalg.norm(d)

    for case in cases:
        got = read_label(out / f"{case}.nii.gz", ds.label_map, reference=images[case]).array
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
    in the changed voxels and recorded in the summary and the signature. The rule (axis 0)
    cuts across the cohort's classes (which follow each other along axis 1), so it must move voxels."""
    from semisam_o1.methods import class_planes as planes

    v = voxel_cohort
    for case in v["cases"]:  # predictions with both classes, so that the rule has something to re-split
        write_label(v["pred"] / f"{case}.nii.gz", v["truth"][case], v["images"][case], v["ds"].label_map)
    rule = planes.ClassPlanes(axis=0, order=(2, 1), template_error=0.0, tolerance=0.01)
    rule_file = v["out"].parent / planes.CLASS_PLANES_JSON
    planes.write(rule_file, rule, v["ds"].label_map.names)
    plain_out, rule_out = v["out"].parent / "plain", v["out"].parent / "planar"
    kw = dict(k=5, quantile=0.9, mode=mode, bank_size=300, project_dim=0)
    _run(v, output=plain_out, **kw)
    if mode == "voxel":  # through the CLI with the rule file
        assert cli.main(["refine", "-i", str(v["ds"].root), "-f", str(v["feats"]), "-p", str(v["pred"]),
                         "-o", str(rule_out), "--template", v["tpl"], "--cases", *v["cases"], "--k", "5",
                         "--quantile", "0.9", "--bank-size", "300", "--project-dim", "0", "--threads", "1",
                         "--class-planes", str(rule_file), "--quiet"]) == 0
        info = json.loads((rule_out / "refine.json").read_text())
    else:
        info = _run(v, output=rule_out, class_planes=rule_file, **kw)
    moved = 0
    for case in v["cases"]:
        before, base, got = (_label(v, f, case) for f in (v["pred"], plain_out, rule_out))
        np.testing.assert_array_equal(got, planes.apply(base, rule))
        np.testing.assert_array_equal(got > 0, base > 0)
        assert info["cases"][case]["changed"] == int((got != before).sum())
        moved += int((got != base).sum())
    assert moved > 0
    assert info["class_planes"]["axis"] == 0 and info["class_planes"]["order"] == [2, 1]
    signed = resume.read_record(rule_out)["signed"]
    assert signed["inputs"]["class_planes"]["order"] == [2, 1]
    assert resume.read_record(plain_out)["signed"]["inputs"]["class_planes"] is None


# --------------------------------------------------------------------------- bad inputs


def _cli(v, *extra, output=None):
    return cli.main(["refine", "-i", str(v["ds"].root), "-f", str(v["feats"]), "-p", str(v["pred"]),
                     "-o", str(output or v["out"]), "--template", v["tpl"], "--cases", *v["cases"], "--quiet",
                     "--bank-size", "100", *extra])


@pytest.mark.parametrize("mode", ["voxel", "volume"])
def test_missing_entropy_map(voxel_cohort, capsys, mode):
    v = voxel_cohort
    case = v["cases"][2]
    (v["pred"] / f"{case}_entropy.nii.gz").unlink()
    with pytest.raises(InputError, match=case):
        _run(v, mode=mode)
    assert _cli(v, "--mode", mode) == 2
    err = capsys.readouterr().err
    assert "entropy" in err and case in err and len(err.strip().splitlines()) == 1
    assert not v["out"].exists()


@pytest.mark.parametrize("which", [1, "template"])
def test_missing_features(voxel_cohort, capsys, which):
    import shutil

    v = voxel_cohort
    missing = v["tpl"] if which == "template" else v["cases"][which]
    shutil.rmtree(v["feats"] / "cases" / missing)
    with pytest.raises(InputError, match=f"features for case {missing}"):
        _run(v)
    assert _cli(v) == 2
    assert missing in capsys.readouterr().err
    assert not v["out"].exists()


def test_bad_grid_and_parameters(voxel_cohort, capsys):
    v = voxel_cohort
    case = v["cases"][0]
    shape = v["truth"][case].shape
    helpers.write_feature_store(v["feats"], {case: np.zeros((8, *shape[:2], shape[2] - 1), np.float16)})
    with pytest.raises(InputError, match=case):
        _run(v)
    assert not v["out"].exists()
    assert _cli(v, "--k", "0") == 2
    assert _cli(v, "--quantile", "1.5") == 2
    from semisam_o1.core import kernels

    capsys.readouterr()
    if not kernels.cuda_available():
        assert _cli(v, "--device", "cuda") == 2
        err = capsys.readouterr().err
        assert "cuda" in err.lower() and len(err.strip().splitlines()) == 1
    assert cli.main(["refine", "-i", str(v["ds"].root), "-f", str(v["feats"]), "-p", str(v["pred"]),
                     "-o", str(v["out"]), "--cases", case, "--quiet"]) == 2  # no template
    assert not v["out"].exists()


def test_output_that_cannot_be_a_folder(voxel_cohort, capsys):
    """An output path that is a file, or lies below one: one line naming it, exit 2, nothing written."""
    v = voxel_cohort
    blocker = v["out"].parent / "a_file"
    blocker.write_text("not a folder")
    for output in (blocker, blocker / "sub"):
        capsys.readouterr()
        assert _cli(v, output=output) == 2
        err = capsys.readouterr().err
        assert str(blocker) in err and len(err.strip().splitlines()) == 1
        assert blocker.read_text() == "not a folder"
    assert _cli(v, output=v["pred"]) == 2  # the predictions folder itself
    assert "differ" in capsys.readouterr().err
    assert not (v["pred"] / "stage.json").exists()
