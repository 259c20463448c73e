"""The registration referee's reliability and the fallback criterion (semisam_o1.pipeline.referee,
semisam_o1.pipeline.rounds): the pasted-template baseline against a plain NumPy reference, the
per-case rule on labels built to pass and to fail it, the round rule's choices under each
criterion, and a whole quick run whose registration fails by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_image, read_label, write_label
from semisam_o1.methods.paste import paste_at_centre
from semisam_o1.pipeline import referee as R
from semisam_o1.pipeline import rounds


def _crop_pad(label, shape):
    """Plain reference: centre crop / zero pad (even size differences)."""
    out = np.zeros(shape, label.dtype)
    src, dst = [], []
    for n_t, n_c in zip(label.shape, shape):
        shift = (n_c - n_t) // 2
        lo, hi = max(0, -shift), min(n_t, n_c - shift)
        src.append(slice(lo, hi))
        dst.append(slice(lo + shift, hi + shift))
    out[tuple(dst)] = label[tuple(src)]
    return out


def test_paste_at_centre_equals_crop_or_pad_and_scales_by_spacing():
    rng = np.random.default_rng(1)
    for _ in range(20):
        ts = tuple(int(x) for x in rng.integers(3, 10, 3))
        cs = tuple(t + 2 * int(d) for t, d in zip(ts, rng.integers(-1, 3, 3)))
        lab = rng.integers(0, 3, ts).astype(np.uint8)
        np.testing.assert_array_equal(paste_at_centre(lab, cs), _crop_pad(lab, cs))
    # a 2 mm template on a 1 mm case: each template voxel covers two case voxels per axis
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    out = paste_at_centre(lab, (8, 8, 8), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0))
    assert out.sum() == 64 and out[2:6, 2:6, 2:6].all()
    with pytest.raises(ValueError):
        paste_at_centre(lab, (8, 8))


def _referee_folders(tmp_path, cohort, warped_of):
    """round0/ holds each pool case's real label (the witness); referee/ holds warped_of(label)."""
    ds = Dataset(cohort.root)
    r0, ref = tmp_path / "round0", tmp_path / "referee"
    r0.mkdir(exist_ok=True)
    ref.mkdir(exist_ok=True)
    for case in cohort.unlabeled:
        img = ds.read_image(case)
        lab = ds.read_label(case).array
        write_label(r0 / f"{case}.nii.gz", lab, img, ds.label_map)
        write_label(ref / f"{case}.nii.gz", warped_of(lab), img, ds.label_map)
    return ds, r0, ref


def test_a_registration_that_finds_the_structure_is_reliable(tmp_path, cohort):
    ds, r0, ref = _referee_folders(tmp_path, cohort, lambda lab: lab)
    info = R.reliability(ds, cohort.template, cohort.unlabeled, ref, r0)
    assert info["reliable"] and info["reliable_cases"] == len(cohort.unlabeled)
    for v in info["cases"].values():
        assert v["registered"] == pytest.approx(1.0) and v["pasted"] < 1.0 and v["reliable"]


def test_a_registration_that_loses_the_structure_is_unreliable(tmp_path, cohort):
    ds, r0, ref = _referee_folders(tmp_path, cohort, lambda lab: np.roll(lab, lab.shape[0] // 2, axis=0))
    info = R.reliability(ds, cohort.template, cohort.unlabeled, ref, r0)
    assert not info["reliable"] and info["reliable_cases"] < len(cohort.unlabeled) / 2
    # the pasted baseline itself, recomputed with NumPy for one case
    case = cohort.unlabeled[0]
    own = read_label(r0 / f"{case}.nii.gz", ds.label_map)
    t = ds.read_label(cohort.template)
    pasted = paste_at_centre(t.array, own.shape, t.spacing, own.spacing)
    fg = ds.label_map.foreground
    ref_dice = np.mean([2 * ((pasted == c) & (own.array == c)).sum() / ((pasted == c).sum() + (own.array == c).sum())
                        for c in fg])
    assert info["cases"][case]["pasted"] == pytest.approx(ref_dice, abs=1e-6)
    assert R.reliable_cases(None) is None


def _evidence(work, r, referee=None, referee_pred=None, template_dice=None):
    (work / f"round{r}").mkdir(parents=True, exist_ok=True)
    (work / f"round{r}" / rounds.ROUND_JSON).write_text(json.dumps(
        {"round": r, "referee": referee, "referee_pred": referee_pred, "template_dice": template_dice}))


def _reliability(work, cases_ok: dict):
    (work / "referee").mkdir(parents=True, exist_ok=True)
    n = sum(cases_ok.values())
    (work / "referee" / R.RELIABILITY_JSON).write_text(json.dumps({
        "cases": {c: {"reliable": ok} for c, ok in cases_ok.items()}, "reliable_cases": n,
        "pool_cases": len(cases_ok), "reliable": n >= 2 and 2 * n >= len(cases_ok)}))


def test_the_round_rule_uses_only_the_cases_the_referee_can_judge(tmp_path):
    cases = [f"c{i}" for i in range(8)]
    base = dict(zip(cases, np.linspace(0.7, 0.8, 8)))
    # round 1 is much better on the 5 judged cases and much worse on the 3 unjudged ones
    r1 = {c: v + (0.05 if i < 5 else -0.3) for i, (c, v) in enumerate(base.items())}
    _evidence(tmp_path, 0, base)
    _evidence(tmp_path, 1, r1, r1)
    assert rounds.choose_round(tmp_path, 1)[0] == 0  # every case counts: round 1 looks worse
    _reliability(tmp_path, {c: i < 5 for i, c in enumerate(cases)})
    assert rounds.criterion(tmp_path) == "referee"
    assert rounds.choose_round(tmp_path, 1)[0] == 1


def test_unreliable_referee_falls_back_on_the_held_out_template(tmp_path):
    cases = [f"c{i}" for i in range(6)]
    _reliability(tmp_path, {c: i == 0 for i, c in enumerate(cases)})
    assert rounds.criterion(tmp_path) == "template"
    base = dict(zip(cases, [0.5] * 6))
    _evidence(tmp_path, 0, base)
    _evidence(tmp_path, 1, base, base, template_dice=0.61)
    _evidence(tmp_path, 2, base, base, template_dice=0.74)
    _evidence(tmp_path, 3, base, base, template_dice=0.70)
    assert rounds.keep_going(tmp_path, 1) and rounds.keep_going(tmp_path, 2) and not rounds.keep_going(tmp_path, 3)
    labels, model, reason = rounds.choose_round(tmp_path, 3)
    assert (labels, model) == (2, 2)
    assert "weak evidence" in reason and "0.7400" in reason


def test_a_model_weaker_than_the_kept_labels_is_said(tmp_path):
    base = dict(zip([f"c{i}" for i in range(8)], np.linspace(0.7, 0.8, 8)))
    _evidence(tmp_path, 0, base)
    _evidence(tmp_path, 1, {c: v - 0.1 for c, v in base.items()}, {c: v - 0.05 for c, v in base.items()})
    labels, model, reason = rounds.choose_round(tmp_path, 1)
    assert (labels, model) == (0, 1)
    assert "WEAKER than the labels" in reason and "0.0500" in reason


def test_run_whose_registration_fails_trains_without_the_template_and_says_so(tmp_path, cohort, monkeypatch,
                                                                               capsys):
    """Registration fails by construction (every warped label empty): the run finds the referee
    unreliable before round 1, trains each round without the template's label, scores it on the
    template, and says so on the terminal and in report.json."""
    from semisam_o1.pipeline import run as run_module

    def empty_registration(dataset, template, cases, out_dir, threads=1, **_):
        warp_dir = out_dir / "0123456789abcdef"  # as registration_labels: a folder named by its settings
        warp_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for case in cases:
            img = dataset.read_image(case)
            paths[case] = write_label(warp_dir / f"{case}.nii.gz", np.zeros(img.shape, np.uint8), img,
                                      dataset.label_map)
        return paths

    monkeypatch.setattr(run_module, "registration_labels", empty_registration)
    work = tmp_path / "work"
    run_module.run(run_module.RunSettings(input=cohort.root, split=cohort.split_file, output=work, preset="quick",
                                          rounds=2, position="on", threads=2, quiet=True))
    out = capsys.readouterr().out
    assert "cannot judge the rounds" in out
    report = json.loads((work / "report.json").read_text())
    assert report["chosen"]["criterion"] == "template"
    assert report["chosen"]["referee_reliability"]["reliable"] is False
    assert report["chosen"]["referee_reliability"]["position_decided_on_unreliable_registration"] is False
    assert "weak evidence" in report["chosen"]["reason"]
    cmd = json.loads((work / "round1" / "model" / "stage.json").read_text())["command"]
    assert "--template-share 0.0" in cmd
    dice = json.loads((work / "round1" / "round.json").read_text())["template_dice"]
    pred = read_label(work / "round1" / "template" / f"{cohort.template}.nii.gz", Dataset(cohort.root).label_map)
    assert 0.0 <= dice <= 1.0 and pred.shape == read_image(cohort.root / "imagesTr" /
                                                           f"{cohort.template}.nii.gz").shape


def test_a_position_decision_of_an_earlier_rule_is_taken_again(tmp_path, monkeypatch):
    """run's --position auto reuses WORK/referee/position.json only when it names today's rule
    (registration.POSITION_RULE); one written by the earlier rule (over the union of the classes,
    no "rule" key) is decided again from the cached warps, and the new decision replaces it."""
    from types import SimpleNamespace

    from semisam_o1.pipeline import run as run_module

    calls = []

    def fake_check(dataset, template, cases, out_dir, **kw):
        calls.append(list(cases))
        return {"applies": False, "rule": run_module.POSITION_RULE, "reason": "per class: off"}

    monkeypatch.setattr(run_module, "position_check", fake_check)
    work = tmp_path / "work"
    (work / "referee").mkdir(parents=True)
    path = work / "referee" / "position.json"
    path.write_text(json.dumps({"applies": True, "reason": "over the union: on"}))
    stages = SimpleNamespace(work=work, times={})
    s = SimpleNamespace(position="auto", threads=1, quiet=True)
    cohort = SimpleNamespace(template="t", unlabeled=["a", "b"])
    assert run_module._position(stages, s, "DATA", cohort) is False
    assert calls == [["a", "b"]] and json.loads(path.read_text())["reason"] == "per class: off"
    assert run_module._position(stages, s, "DATA", cohort) is False and len(calls) == 1  # today's rule: reused
