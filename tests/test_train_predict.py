"""train / predict on the cohort (real Hippocampus cases or the synthetic cohort) with the ``quick`` preset.

Asserts: a loadable model with its config, log and stage record; predictions with the input's
affine, shape and integer dtype; entropy maps equal to a NumPy entropy of the saved
probabilities and within [0, ln K]; resume / skip / refusal behaviour from the stage records
(other training cases, settings or label files; another model or rule); independent random
streams per (seed, round); bad input (missing label, wrong grid, undeclared value, an output
that is a file, an unreadable image) as one line naming the case or file with nothing written.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest
import torch

from semisam_o1 import cli
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import file_sha256
from semisam_o1.core.resume import read_record
from semisam_o1.stages import nets
from semisam_o1.stages import train as T
from semisam_o1.stages.predict import PredictSettings, entropy_map, predict
from semisam_o1.stages.train import TrainSettings, train

THREADS = 2
ITERS = 4


def _train(data_root, labels, template, output, **kw):
    kw = {"preset": "quick", "iterations": ITERS, "device": "cpu", "threads": THREADS, "quiet": True, **kw}
    return train(TrainSettings(input=data_root, labels=labels, template=template, output=output, **kw))


def _predict(data_root, model, output, cases, **kw):
    kw = {"device": "cpu", "threads": THREADS, "quiet": True, **kw}
    return predict(PredictSettings(input=data_root, model=model, output=output, cases=tuple(cases), **kw))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_root, split):
    """Pseudo-label folder with the real labels of two pool cases, and a quick model."""
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("tp")
    template = split["template"]
    others = list(split["unlabeled"][:2])
    labels = root / "labels"
    labels.mkdir()
    for c in others:
        shutil.copy(data_root / "labelsTr" / f"{c}.nii.gz", labels / f"{c}.nii.gz")
    model = root / "model"
    summary = _train(data_root, labels, template, model, cases=tuple(others), seed=0)
    return {"root": root, "labels": labels, "model": model, "template": template, "others": others,
            "unseen": split["unlabeled"][2], "summary": summary}


def test_train_writes_loadable_model(setup):
    model, summary = setup["model"], setup["summary"]
    assert summary["skipped"] is False
    for name in ("model.pt", "config.json", "train_log.csv", "stage.json"):
        assert (model / name).is_file()
    assert not (model / "checkpoint.pt").exists()
    config = json.loads((model / "config.json").read_text())
    assert config["training_cases"] == [setup["template"], *setup["others"]]
    assert config["preset"] == "quick" and config["iterations"] == ITERS
    assert config["label_map"]["values"] == [0, 1, 2]
    assert config["normalisation"] == nets.NORMALISATION
    assert "last checkpoint" in config["model_selection"]
    record = read_record(model)
    assert record["stage"] == "train" and record["finished"]
    assert record["command"].startswith("semisam-o1 train ") and "--cases" in record["command"]
    assert record["signed"]["inputs"]["training_cases"] == config["training_cases"]
    assert record["signed"]["inputs"]["labels"][setup["others"][0]] == \
        file_sha256(setup["labels"] / f"{setup['others'][0]}.nii.gz")
    rows = (model / "train_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iteration,loss")
    assert len(rows) == 1 + ITERS and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
    net, cfg = nets.load_model(model, "cpu")
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *cfg["patch"]))
    assert tuple(out.shape) == (1, 3, *cfg["patch"])


def test_train_skips_finished_model(setup, data_root):
    model = setup["model"]
    before = (model / "model.pt").stat().st_mtime_ns
    again = _train(data_root, setup["labels"], setup["template"], model, cases=tuple(setup["others"]), seed=0)
    assert again["skipped"] is True
    assert again["training_cases"] == setup["summary"]["training_cases"]
    assert (model / "model.pt").stat().st_mtime_ns == before


def test_train_refuses_a_model_of_other_cases_settings_or_labels(setup, data_root, tmp_path):
    """A finished model trained on other cases, with other settings or from other label files is
    refused with one line naming what differs (it used to be skipped, or kept with a warning)."""
    model = setup["model"]
    before = (model / "model.pt").stat().st_mtime_ns
    with pytest.raises(InputError, match="training_cases"):
        _train(data_root, setup["labels"], setup["template"], model, cases=(setup["others"][0],), seed=0)
    with pytest.raises(InputError, match="iterations"):
        _train(data_root, setup["labels"], setup["template"], model, cases=tuple(setup["others"]), seed=0,
               iterations=ITERS + 1)
    changed = tmp_path / "labels"
    shutil.copytree(setup["labels"], changed)
    case = setup["others"][1]
    src = nib.load(str(changed / f"{case}.nii.gz"))
    arr = np.asarray(src.dataobj).copy()
    arr[arr == 1] = 2
    nib.save(nib.Nifti1Image(arr, src.affine, src.header), str(changed / f"{case}.nii.gz"))
    shutil.copy(model / "stage.json", tmp_path / "stage.json")
    # same label folder path, other contents: the label digests differ
    moved = setup["root"] / "labels_moved"
    setup["labels"].rename(moved)
    try:
        shutil.copytree(changed, setup["labels"])
        with pytest.raises(InputError, match="inputs.labels"):
            _train(data_root, setup["labels"], setup["template"], model, cases=tuple(setup["others"]), seed=0)
    finally:
        shutil.rmtree(setup["labels"])
        moved.rename(setup["labels"])
    assert (model / "model.pt").stat().st_mtime_ns == before
    assert read_record(model)["finished"]


def test_train_overwrite_retrains_other_cases(setup, data_root):
    out = setup["root"] / "model_overwrite"
    shutil.copytree(setup["model"], out)
    s = _train(data_root, setup["labels"], setup["template"], out, cases=(setup["others"][0],), iterations=1,
               overwrite=True)
    assert s["skipped"] is False
    assert json.loads((out / "config.json").read_text())["training_cases"] == [setup["template"],
                                                                               setup["others"][0]]


def _first_draws(monkeypatch, data_root, setup, out: Path, seed: int, round_: int):
    """(initial weights, first batch) of a one-iteration training of (seed, round)."""
    real_build = nets.build_net
    seen: dict = {}

    def capturing(params):
        net = real_build(params)
        if "weights" not in seen:
            seen["weights"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
            forward = net.forward

            def recording(x):
                seen.setdefault("batch", x.detach().clone())
                return forward(x)

            net.forward = recording
        return net

    monkeypatch.setattr(nets, "build_net", capturing)
    _train(data_root, setup["labels"], setup["template"], out, cases=tuple(setup["others"]), iterations=1,
           seed=seed, round=round_)
    monkeypatch.setattr(nets, "build_net", real_build)
    return seen["weights"], seen["batch"]


def test_seed_and_round_streams_are_independent(setup, data_root, monkeypatch):
    """Round 2 of seed 0 and round 1 of seed 1 (seed + round equal) start from other weights and draw
    other patches; the same (seed, round) draws the same."""
    root = setup["root"]
    w02, b02 = _first_draws(monkeypatch, data_root, setup, root / "streams_0_2", 0, 2)
    w11, b11 = _first_draws(monkeypatch, data_root, setup, root / "streams_1_1", 1, 1)
    again, b_again = _first_draws(monkeypatch, data_root, setup, root / "streams_0_2_again", 0, 2)
    key = next(k for k in w02 if k.endswith("weight") and w02[k].numel() > 10)
    assert not torch.allclose(w02[key], w11[key])
    assert not torch.equal(b02, b11)
    for k in w02:
        torch.testing.assert_close(w02[k], again[k], rtol=0, atol=0)
    torch.testing.assert_close(b02, b_again, rtol=0, atol=0)
    assert json.loads((root / "streams_0_2" / "config.json").read_text())["round"] == 2


def test_predict_outputs(setup, data_root):
    out = setup["root"] / "pred"
    cases = [setup["template"], setup["unseen"]]
    res = _predict(data_root, setup["model"], out, cases, probabilities=True)
    assert res["predicted"] == 2 and res["skipped"] == 0
    ent_json = json.loads((out / "entropy.json").read_text())
    log_k = math.log(3)
    for case in cases:
        image = nib.load(str(data_root / "imagesTr" / f"{case}.nii.gz"))
        lab = nib.load(str(out / f"{case}.nii.gz"))
        ent = nib.load(str(out / f"{case}_entropy.nii.gz"))
        probs = nib.load(str(out / f"{case}_probs.nii.gz"))
        for img in (lab, ent, probs):
            np.testing.assert_allclose(img.affine, image.affine, atol=1e-5)
            assert img.shape[:3] == image.shape[:3]
        assert np.issubdtype(lab.get_data_dtype(), np.integer)
        lab_a = np.asarray(lab.dataobj)
        assert set(np.unique(lab_a)) <= {0, 1, 2}
        e = np.asarray(ent.dataobj, dtype=np.float64)
        assert ent.get_data_dtype() == np.float32
        assert e.min() >= 0.0 and e.max() <= log_k + 1e-6
        p = np.asarray(probs.dataobj, dtype=np.float64)  # (X, Y, Z, K)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        # NumPy reference: entropy in nats and argmax of the saved probabilities
        ref = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)
        np.testing.assert_allclose(e, ref, atol=1e-4)
        margin = np.sort(p, -1)[..., -1] - np.sort(p, -1)[..., -2]
        clear = margin > 1e-4
        np.testing.assert_array_equal(lab_a[clear], np.argmax(p, -1)[clear])
        assert ent_json[case] == pytest.approx(e.mean(), rel=1e-5)
        assert res["entropy"][case] == pytest.approx(e.mean(), rel=1e-5)
    record = read_record(out)
    assert record["finished"] and record["command"].startswith("semisam-o1 predict ")
    assert record["signed"]["inputs"]["model_sha256"] == file_sha256(setup["model"] / "model.pt")
    assert not (out / "predict.json").exists()

    # resume: nothing is predicted again, files untouched
    stamp = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    again = _predict(data_root, setup["model"], out, cases, probabilities=True)
    assert again["predicted"] == 0 and again["skipped"] == 2
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == stamp
    assert again["entropy"] == pytest.approx(res["entropy"])


def test_predict_resumes_an_unfinished_folder(setup, data_root):
    """An interrupted folder (record not finished) keeps the cases already written."""
    out = setup["root"] / "pred_resume"
    cases = [setup["template"], setup["unseen"]]
    _predict(data_root, setup["model"], out, cases)
    record = read_record(out)
    record["finished"] = False
    (out / "stage.json").write_text(json.dumps(record))
    (out / f"{cases[1]}.nii.gz").unlink()
    stamp = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns
    again = _predict(data_root, setup["model"], out, cases)
    assert again["predicted"] == 1 and again["skipped"] == 1
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == stamp
    assert (out / f"{cases[1]}.nii.gz").is_file() and read_record(out)["finished"]


def test_predict_refuses_another_model(setup, data_root):
    out = setup["root"] / "pred_other_model"
    _predict(data_root, setup["model"], out, [setup["template"]])
    other = setup["root"] / "model_other_seed"
    _train(data_root, setup["labels"], setup["template"], other, cases=tuple(setup["others"]), iterations=1, seed=5)
    with pytest.raises(InputError, match="model"):
        _predict(data_root, other, out, [setup["template"]])


def test_predict_with_class_planes(setup, data_root, capsys):
    from semisam_o1.data.dataset import Dataset
    from semisam_o1.data.images import read_label
    from semisam_o1.methods import class_planes as CP

    rule = CP.ClassPlanes(1, (2, 1), 0.0, 0.01)
    rule_file = setup["root"] / CP.CLASS_PLANES_JSON
    CP.write(rule_file, rule)
    out = setup["root"] / "pred_planes"
    case = setup["unseen"]
    _predict(data_root, setup["model"], out, [case], probabilities=True, class_planes=rule_file)
    ds = Dataset(data_root)
    got = read_label(out / f"{case}.nii.gz", ds.label_map).array
    p = np.asarray(nib.as_closest_canonical(nib.load(str(out / f"{case}_probs.nii.gz"))).dataobj)
    expected = CP.apply(np.argmax(p, -1).astype(np.uint8), rule)
    margin = np.sort(p, -1)[..., -1] - np.sort(p, -1)[..., -2]
    clear = margin > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert read_record(out)["signed"]["inputs"]["class_planes"]["order"] == [2, 1]
    # the same folder without the rule (or with another) is refused: its labels were made with it
    rc = cli.main(["predict", "-i", str(data_root), "-m", str(setup["model"]), "-o", str(out), "--cases", case,
                   "--device", "cpu", "--probabilities", "--quiet"])
    assert rc == 2
    assert "class_planes" in capsys.readouterr().err


def test_entropy_map_reference():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([0.3, 0.3, 0.3], size=(4, 5, 6)).transpose(3, 0, 1, 2)  # (K, X, Y, Z)
    p[:, 0, 0, 0] = [1.0, 0.0, 0.0]  # certain voxel: entropy 0
    p[:, 1, 0, 0] = 1.0 / 3.0  # uniform voxel: entropy ln 3
    h = entropy_map(p)
    assert h.dtype == np.float32 and h.shape == (4, 5, 6)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = -np.nansum(p * np.log(p), axis=0)
    np.testing.assert_allclose(h, ref, atol=1e-6)
    assert h[0, 0, 0] == 0.0
    assert h[1, 0, 0] == pytest.approx(math.log(3), abs=1e-6)


def test_labels_from_probs_keeps_the_planned_classes_largest_component():
    """Argmax, then the classes of config["largest_component"] lose their smaller pieces (to
    background); a model without the key (trained without a plan) keeps its argmax."""
    from semisam_o1.stages.predict import labels_from_probs

    p = np.zeros((3, 8, 8, 8), np.float32)
    p[0] = 1.0
    p[:, 1:4, 1:4, 1:4] = np.array([0.1, 0.8, 0.1])[:, None, None, None]  # class 1, 27 voxels
    p[:, 6, 6, 6] = [0.2, 0.7, 0.1]  # class 1, a stray voxel
    p[:, 6, 0, 0] = [0.2, 0.1, 0.7]  # class 2, a stray voxel
    argmax = np.argmax(p, 0)
    np.testing.assert_array_equal(labels_from_probs(p, {}), argmax)
    got = labels_from_probs(p, {"largest_component": [1]})
    want = argmax.copy()
    want[6, 6, 6] = 0
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and got[6, 0, 0] == 2


def test_normalise_reference():
    rng = np.random.default_rng(1)
    a = rng.gamma(2.0, 1000.0, size=(10, 12, 14)).astype(np.float32)
    a[0, 0, 0] = 1e7  # outlier, clipped
    out = nets.normalise(a)
    lo, hi = np.percentile(a.astype(np.float64), [0.5, 99.5])
    c = np.clip(a.astype(np.float64), lo, hi)
    np.testing.assert_allclose(out, (c - c.mean()) / c.std(), rtol=1e-5, atol=1e-5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(nets.normalise(np.full((3, 3, 3), 7.0)), 0.0)


def _cli_train(data_root, labels, template, cases, out):
    return cli.main(["train", "-i", str(data_root), "-l", str(labels), "--template", template,
                     "--cases", *cases, "-o", str(out), "--preset", "quick", "--iterations", "1",
                     "--device", "cpu", "--threads", str(THREADS), "--quiet"])


def _assert_one_line_error(rc, capsys, name, out: Path):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and name in err and "error" in err
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())) or out.is_file()


def test_missing_label_is_clear_error(setup, data_root, capsys):
    out = setup["root"] / "model_missing"
    case = setup["unseen"]  # no file in the labels folder
    rc = _cli_train(data_root, setup["labels"], setup["template"], [setup["others"][0], case], out)
    _assert_one_line_error(rc, capsys, case, out)


def test_label_on_other_grid_is_clear_error(setup, data_root, capsys):
    case = setup["others"][0]
    labels = setup["root"] / "labels_bad_shape"
    labels.mkdir()
    src = nib.load(str(data_root / "labelsTr" / f"{case}.nii.gz"))
    arr = np.asarray(src.dataobj)[:-2]
    nib.save(nib.Nifti1Image(arr, src.affine), str(labels / f"{case}.nii.gz"))
    out = setup["root"] / "model_bad_shape"
    rc = _cli_train(data_root, labels, setup["template"], [case], out)
    _assert_one_line_error(rc, capsys, case, out)

    labels2 = setup["root"] / "labels_bad_affine"
    labels2.mkdir()
    aff = src.affine.copy()
    aff[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), aff), str(labels2 / f"{case}.nii.gz"))
    with pytest.raises(InputError, match=case):
        _train(data_root, labels2, setup["template"], out, cases=(case,), iterations=1)
    assert not out.exists() or not any(out.iterdir())


def test_undeclared_label_value_is_clear_error(setup, data_root, capsys):
    case = setup["others"][1]
    labels = setup["root"] / "labels_bad_value"
    labels.mkdir()
    src = nib.load(str(data_root / "labelsTr" / f"{case}.nii.gz"))
    arr = np.asarray(src.dataobj).astype(np.uint8)
    arr[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(arr, src.affine), str(labels / f"{case}.nii.gz"))
    out = setup["root"] / "model_bad_value"
    rc = _cli_train(data_root, labels, setup["template"], [case], out)
    _assert_one_line_error(rc, capsys, case, out)


def test_test_case_in_training_is_refused(setup, data_root, split, cohort, tmp_path):
    """--split trains on its template + unlabeled cases; a test case among them is refused."""
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({**split, "unlabeled": [split["unlabeled"][0], split["test"][0]]}))
    with pytest.raises(InputError, match=split["test"][0]):
        _train(data_root, setup["labels"], None, tmp_path / "m", split=bad, iterations=1)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("where", ["file", "inside_file"])
def test_unwritable_output_is_refused_before_training(setup, data_root, capsys, monkeypatch, where):
    """-o an existing file (or a path under one): one line, exit 2, before any training or prediction."""
    def never(*a, **k):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(T, "fit", never)
    blocker = setup["root"] / f"blocker_{where}"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "model"
    rc = _cli_train(data_root, setup["labels"], setup["template"], [setup["others"][0]], out)
    _assert_one_line_error(rc, capsys, str(blocker), out)
    rc = cli.main(["predict", "-i", str(data_root), "-m", str(setup["model"]), "-o", str(out), "--cases",
                   setup["template"], "--device", "cpu", "--quiet"])
    _assert_one_line_error(rc, capsys, str(blocker), out)
    assert blocker.read_text() == "x"


def test_predict_unreadable_image_leaves_no_folder(setup, data_root, tmp_path, capsys):
    """An image that cannot be read stops predict before its folder is created."""
    ds = tmp_path / "dataset"
    (ds / "imagesTr").mkdir(parents=True)
    shutil.copy(data_root / "dataset.json", ds / "dataset.json")
    good, broken = setup["template"], setup["unseen"]
    shutil.copy(data_root / "imagesTr" / f"{good}.nii.gz", ds / "imagesTr" / f"{good}.nii.gz")
    (ds / "imagesTr" / f"{broken}.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "pred"
    rc = cli.main(["predict", "-i", str(ds), "-m", str(setup["model"]), "-o", str(out), "--cases", good, broken,
                   "--device", "cpu", "--quiet"])
    _assert_one_line_error(rc, capsys, broken, out)
    assert not out.exists()


def test_predict_rejects_unfinished_model(setup, data_root, tmp_path):
    with pytest.raises(InputError, match="not a finished model"):
        _predict(data_root, tmp_path, tmp_path / "pred", [setup["template"]])
    assert not (tmp_path / "pred").exists()


def test_mean_teacher_trains(setup, data_root):
    out = setup["root"] / "model_mt"
    s = _train(data_root, setup["labels"], setup["template"], out, cases=tuple(setup["others"][:1]), iterations=2,
               ssl="mt")
    assert s["ssl"] == "mt" and nets.is_finished(out)
    rows = [r.split(",") for r in (out / "train_log.csv").read_text().strip().splitlines()[1:]]
    assert len(rows) == 2
    assert all(float(r[3]) >= 0.0 and float(r[4]) > 0.0 for r in rows)  # consistency term and its weight


def test_ssl_without_measurement_is_not_offered():
    with pytest.raises(InputError, match="--ssl uamt"):
        TrainSettings(input="d", labels="l", output="o", ssl="uamt")
    assert "uamt_passes" not in nets.PRESETS["cpu"]


@pytest.mark.parametrize("spatial_aug", [0.0, 0.5])
def test_interrupted_training_resumes_to_the_same_model(setup, data_root, monkeypatch, spatial_aug):
    """A run killed after a checkpoint resumes from it and ends with the weights of an uninterrupted run
    (with and without the random affine augmentation)."""
    quick = dict(nets.PRESETS["quick"], checkpoint_every=2)
    monkeypatch.setitem(nets.PRESETS, "quick", quick)
    kw = dict(cases=tuple(setup["others"][:1]), iterations=4, seed=3, round=1, spatial_aug=spatial_aug)
    full = setup["root"] / f"model_full_{spatial_aug}"
    _train(data_root, setup["labels"], setup["template"], full, **kw)

    part = setup["root"] / f"model_resumed_{spatial_aug}"
    # iteration 4, after the checkpoint of iteration 2
    helpers.interrupt_training(monkeypatch, nets, 4,
                               lambda: _train(data_root, setup["labels"], setup["template"], part, **kw))
    assert (part / "checkpoint.pt").is_file() and not nets.is_finished(part)
    ck = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ck["signature"] == read_record(part)["signature"]
    train_ck = dict(ck)
    _train(data_root, setup["labels"], setup["template"], part, **kw)
    assert nets.is_finished(part) and not (part / "checkpoint.pt").exists()
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    log_a = (full / "train_log.csv").read_text().splitlines()
    log_b = (part / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in log_a] == [r.split(",")[:2] for r in log_b]

    # a checkpoint of another signature is not resumed: training starts over
    other = setup["root"] / f"model_other_ck_{spatial_aug}"
    other.mkdir()
    torch.save({**train_ck, "signature": "another", "iteration": 3}, other / "checkpoint.pt")
    _train(data_root, setup["labels"], setup["template"], other, **kw)
    c = torch.load(other / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share", [None, 0.0, 0.1, 0.5])
def test_draw_volumes_template_share(share):
    from semisam_o1.stages.train import draw_volumes

    rng = np.random.default_rng(0)
    n, draws = 11, 200_000
    picks = draw_volumes(rng, n, draws, share)
    counts = np.bincount(picks, minlength=n) / draws
    expected_template = 1 / n if share is None else share
    assert counts[0] == pytest.approx(expected_template, abs=0.005)
    # the pseudo-labelled volumes share the rest equally
    np.testing.assert_allclose(counts[1:], (1 - expected_template) / (n - 1), atol=0.005)
    assert set(draw_volumes(rng, 1, 10, share).tolist()) == {0}


@pytest.mark.parametrize("option, bad", [("template_share", 1.0), ("spatial_aug", 1.5)])
def test_training_option_is_recorded_and_checked(setup, data_root, option, bad):
    model = setup["root"] / f"model_{option}"
    cfg = _train(data_root, setup["labels"], setup["template"], model, cases=tuple(setup["others"]), iterations=2,
                 seed=0, **{option: 0.5})
    assert cfg[option] == 0.5
    assert json.loads((model / "config.json").read_text())[option] == 0.5
    assert read_record(model)["signed"]["settings"][option] == 0.5
    # the training volumes spilled while it trained are gone (from the model folder and its parent)
    assert not list(model.glob(".semisam-volumes-*")) and not list(model.parent.glob(".semisam-volumes-*"))
    with pytest.raises(InputError, match=option.replace("_", "-")):
        _train(data_root, setup["labels"], setup["template"], setup["root"] / f"model_bad_{option}",
               cases=tuple(setup["others"]), iterations=2, **{option: bad})
    assert not (setup["root"] / f"model_bad_{option}").exists()
    assert not list(setup["root"].glob(".semisam-volumes-*"))


def _is_crop_of(patch: np.ndarray, volume: np.ndarray) -> bool:
    """Whether ``patch`` equals some axis-aligned sub-block of ``volume`` (no rotation or scaling)."""
    windows = np.lib.stride_tricks.sliding_window_view(volume, patch.shape)
    candidates = np.ones(windows.shape[:3], bool)
    for idx in np.ndindex(patch.shape):
        candidates &= windows[(Ellipsis, *idx)] == patch[idx]
        if not candidates.any():
            return False
    return True


def test_spatial_aug_moves_image_and_label_together(data_root, split, tmp_path):
    """--spatial-aug: RandAffined before the crop warps image and label by the same transform, and the
    foreground-centred crop finds the warped label's foreground (not the stale pre-computed indices)."""
    case = split["unlabeled"][0]
    lab = nib.load(str(data_root / "labelsTr" / f"{case}.nii.gz"))
    label = np.asarray(lab.dataobj).astype(np.uint8)[None]
    cfg = nets.preset("quick")
    cfg.update(patch=[9, 9, 9], pos_neg=[1.0, 0.0], flip_axes=[], intensity_prob=0.0)
    entry = {"case": case, "image": label.astype(np.float32), "label": label.copy()}
    T.add_indices(entry)
    data = [T.open_volume(T.spill_volume(entry, tmp_path / "volume"))]  # memory maps, as train reads them
    ts = T._transforms(cfg, 1.0)
    ts.set_random_state(seed=0)
    changed, centre_fg, agree = 0, 0, []
    plain = T._transforms(cfg, 0.0)
    plain.set_random_state(seed=0)
    for i in range(40):
        s = ts(dict(data[0]))[0]
        img, lb = np.asarray(s["image"])[0], np.asarray(s["label"])[0]
        assert lb.shape == (9, 9, 9) and set(np.unique(lb)) <= {0, 1, 2}
        # the image is the label warped bilinearly: rounding it gives the nearest-neighbour label
        # everywhere except at class boundaries
        agree.append(np.mean(np.rint(img) == lb))
        centre_fg += lb[4, 4, 4] > 0
        # without augmentation a patch is a block of the label; with it, a warped one is not
        assert _is_crop_of(np.asarray(plain(dict(data[0]))[0]["label"])[0], label[0])
        changed += not _is_crop_of(lb, label[0])
    assert np.mean(agree) > 0.9
    assert centre_fg >= 36  # crops centred on the warped foreground (a border crop may move the centre)
    assert changed >= 36  # the volumes are warped


def test_spilled_volume_gives_the_patches_of_the_volume_in_memory(data_root, split, tmp_path):
    """A training volume spilled to disk and memory-mapped (how train reads its data) yields exactly the
    patches the same volume held in memory yields, draw for draw, with the same seeds; the spill keeps
    no array in the record, and load_training_data empties its folder when a case fails."""
    from semisam_o1.data.dataset import Dataset

    ds = Dataset(data_root)
    cases = [split["template"], *split["unlabeled"][:2]]
    labels = T.label_paths(ds, data_root / "labelsTr", split["template"], cases)
    cfg = nets.preset("quick")
    cfg.update(patch=[12, 12, 12], normalisation=dict(nets.NORMALISATION))
    records = T.load_training_data(ds, labels, cases, dict(cfg["normalisation"]), tmp_path / "spill", cfg["patch"])
    assert [r["case"] for r in records] == cases
    assert all(isinstance(f, Path) for r in records for f in r["files"].values())
    for case, rec in zip(cases, records):
        entry = T.read_volume(ds, case, labels[case], dict(cfg["normalisation"]))
        T.pad_to_patch(entry, cfg["patch"])
        T.add_indices(entry)
        a, b = T._transforms(cfg), T._transforms(cfg)
        a.set_random_state(seed=3)
        b.set_random_state(seed=3)
        for _ in range(5):
            pa, pb = a(dict(entry))[0], b(T.open_volume(rec))[0]
            assert np.array_equal(np.asarray(pa["image"]), np.asarray(pb["image"]))
            assert np.array_equal(np.asarray(pa["label"]), np.asarray(pb["label"]))
    bad = dict(labels, **{cases[-1]: tmp_path / "missing.nii.gz"})
    with pytest.raises(InputError):
        T.load_training_data(ds, bad, cases, dict(cfg["normalisation"]), tmp_path / "spill", cfg["patch"])
    assert not (tmp_path / "spill").exists()
