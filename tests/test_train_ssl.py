"""``train --ssl w2s`` (weak-to-strong consistency, :mod:`semisam_o1.stages.semi`).

Asserts: the weighted DiceCE equals MONAI's DiceCELoss with unit weights and ignores zero-weight
voxels; the confidence weight from an entropy map; the bottleneck hook perturbs only the second half
of the batch; the strong views keep shapes and paste CutMix boxes from the next patch; the option
(and its confidence folder) recorded in config.json / stage.json; an interrupted w2s run resumes to
the weights of an uninterrupted one; and, on a synthetic cohort of clean image structure with noisy
pseudo-labels, the w2s network scores a higher Dice on held-out images than plain training with
the same seed and iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch

from semisam_o1.core.errors import InputError
from semisam_o1.core.resume import read_record
from semisam_o1.stages import nets, semi
from semisam_o1.stages import train as T
from semisam_o1.stages.predict import PredictSettings, entropy_file, predict
from semisam_o1.stages.train import TrainSettings, train

THREADS = 2

#: the network of the synthetic comparison: small enough for 2 loaded cores
SYNTH_PRESET = {**nets.PRESETS["quick"], "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
                "patch": [24, 24, 24], "batch_size": 2, "lr": 0.003, "log_every": 10, "checkpoint_every": 0}


def _train(data_root, labels, template, output, **kw):
    kw = {"preset": "quick", "device": "cpu", "threads": THREADS, "quiet": True, **kw}
    return train(TrainSettings(input=data_root, labels=labels, template=template, output=output, **kw))


# --------------------------------------------------------------------------- the pieces


def test_weighted_dice_ce_matches_monai_and_ignores_zero_weights():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    torch.testing.assert_close(semi.weighted_dice_ce(logits, target), ref)
    torch.testing.assert_close(semi.weighted_dice_ce(logits, target, torch.ones(2, 1, 6, 5, 4)), ref)
    # zero-weight voxels do not count: changing their logits or targets changes nothing
    weight = (torch.rand(2, 1, 6, 5, 4, generator=g) > 0.5).float()
    a = semi.weighted_dice_ce(logits, target, weight)
    logits2 = torch.where(weight.bool(), logits, torch.randn(logits.shape, generator=g))
    target2 = torch.where(weight.bool(), target, torch.randint(0, 3, target.shape, generator=g))
    torch.testing.assert_close(semi.weighted_dice_ce(logits2, target2, weight), a)
    # a NumPy reference of the weighted cross-entropy term (Dice part removed by a perfect prediction)
    w = torch.rand(2, 1, 6, 5, 4, generator=g)
    logp = torch.log_softmax(logits, 1).numpy()
    t = target.numpy()
    ce = -np.take_along_axis(logp, t, axis=1)
    expected_ce = float((w.numpy() * ce).sum() / w.numpy().sum())
    onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
    dice_term = float(semi.weighted_dice_ce(logits, target, w)) - expected_ce
    prob = torch.softmax(logits, 1)
    inter = (w * prob * onehot).sum((2, 3, 4))
    den = (w * prob).sum((2, 3, 4)) + (w * onehot).sum((2, 3, 4))
    assert dice_term == pytest.approx(float((1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()), abs=1e-5)


def test_confidence_weight_from_entropy():
    ent = np.array([0.0, math.log(3) / 2, math.log(3), 2.0])
    np.testing.assert_allclose(T.confidence_weight(ent, 3), [1.0, 0.5, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(T.confidence_weight(ent, 1), 1.0)


def test_bottleneck_dropout_perturbs_only_the_second_half():
    params = nets.net_params(SYNTH_PRESET, 2)
    net = nets.build_net(params)
    hook = semi.BottleneckDropout().attach(net)
    bottom = semi.BottleneckDropout.bottleneck(net)
    seen = {}
    bottom.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))  # after the dropout hook
    x = torch.randn(1, 1, 24, 24, 24)
    net.train()
    plain = net(x)
    hook.active = True
    both = net(torch.cat([x, x]))
    hook.active = False
    torch.testing.assert_close(both[:1], plain)
    assert not torch.allclose(both[1:], plain)
    dropped = seen["out"][1]
    zero_channels = (dropped.abs().flatten(1).amax(1) == 0).sum().item()
    assert 0 < zero_channels < dropped.shape[0]  # whole channels are dropped, not all
    hook.detach()
    torch.testing.assert_close(net(torch.cat([x, x]))[1:], plain)


def test_strong_views_shapes_and_cutmix_from_the_next_patch(monkeypatch):
    monkeypatch.setattr(semi, "JITTER_PROB", 0.0)
    monkeypatch.setattr(semi, "BLUR_PROB", 0.0)
    monkeypatch.setattr(semi, "CUTMIX_PROB", 1.0)
    torch.manual_seed(0)
    x = torch.stack([torch.full((1, 10, 12, 8), float(i)) for i in range(3)])
    strong, pasted = semi.strong_views(x)
    assert strong.shape == x.shape and pasted.shape == (3, 1, 10, 12, 8) and pasted.dtype == torch.bool
    for i in range(3):
        share = pasted[i].float().mean().item()
        assert 0.0 < share < 0.6
        np.testing.assert_array_equal(strong[i, 0][pasted[i, 0]].numpy(), float((i + 1) % 3))
        np.testing.assert_array_equal(strong[i, 0][~pasted[i, 0]].numpy(), float(i))
    # the blur keeps the mean of a constant patch and smooths a step
    step = torch.zeros(1, 1, 9, 9, 9)
    step[..., 4:] = 1.0
    blurred = semi._blur(step, 1.0)
    assert blurred.shape == step.shape
    assert 0.0 < blurred[0, 0, 4, 4, 3].item() < 0.5 < blurred[0, 0, 4, 4, 4].item() < 1.0


def test_w2s_trains_and_records_the_option(setup_small, tmp_path):
    d = setup_small
    out = tmp_path / "model_w2s"
    s = _train(d["root"], d["labels"], d["template"], out, iterations=3, ssl="w2s", confidence=d["pred"])
    assert s["ssl"] == "w2s" and nets.is_finished(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ssl"] == "w2s" and cfg["w2s"]["passes_per_iteration"] == 3
    assert cfg["confidence"] == str(d["pred"].resolve())
    rec = read_record(out)
    assert rec["signed"]["settings"]["ssl"] == "w2s"
    assert set(rec["signed"]["inputs"]["confidence"]) == {d["others"][0]}  # the case with an entropy map
    assert "--ssl w2s" in rec["command"] and "--confidence" in rec["command"]
    rows = [r.split(",") for r in (out / "train_log.csv").read_text().strip().splitlines()]
    assert rows[0][-1] == "confident_share" and all(0.0 <= float(r[-1]) <= 1.0 for r in rows[1:])
    # another entropy map is another input: refused without --overwrite
    import nibabel as nib

    ent = entropy_file(d["pred"], d["others"][0])
    old = nib.load(str(ent))
    nib.save(nib.Nifti1Image(np.asarray(old.dataobj, np.float32) * 0.5, old.affine, old.header), str(ent))
    with pytest.raises(InputError, match="confidence"):
        _train(d["root"], d["labels"], d["template"], out, iterations=3, ssl="w2s", confidence=d["pred"])
    with pytest.raises(InputError, match="only with --ssl w2s"):
        TrainSettings(input="d", labels="l", output="o", ssl="none", confidence="p")


def test_w2s_interrupted_resumes_to_the_same_model(setup_small, tmp_path, monkeypatch):
    d = setup_small
    quick = dict(nets.PRESETS["quick"], checkpoint_every=2)
    monkeypatch.setitem(nets.PRESETS, "quick", quick)
    kw = dict(iterations=4, seed=3, round=2, ssl="w2s", confidence=d["pred"])
    full = tmp_path / "full"
    _train(d["root"], d["labels"], d["template"], full, **kw)

    part = tmp_path / "part"
    # iteration 4's first pass (2 passes per iteration), after iteration 2's checkpoint
    helpers.interrupt_training(monkeypatch, nets, 7,
                               lambda: _train(d["root"], d["labels"], d["template"], part, **kw))
    assert (part / "checkpoint.pt").is_file() and not nets.is_finished(part)
    _train(d["root"], d["labels"], d["template"], part, **kw)
    assert nets.is_finished(part)
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def setup_small(tmp_path, data_root, split):
    """Two pool cases with their real labels as pseudo-labels, one with an entropy map."""
    import shutil

    labels = tmp_path / "labels"
    labels.mkdir()
    others = list(split["unlabeled"][:2])
    for c in others:
        shutil.copy(data_root / "labelsTr" / f"{c}.nii.gz", labels / f"{c}.nii.gz")
    pred = tmp_path / "pred"
    import nibabel as nib

    img = nib.load(str(data_root / "imagesTr" / f"{others[0]}.nii.gz"))
    ent = np.random.default_rng(0).uniform(0, math.log(3), size=img.shape[:3]).astype(np.float32)
    pred.mkdir()
    out = nib.Nifti1Image(ent, img.affine, img.header)
    out.set_data_dtype(np.float32)
    nib.save(out, str(entropy_file(pred, others[0])))
    return {"root": data_root, "labels": labels, "template": split["template"], "others": others, "pred": pred}


# --------------------------------------------------------------------------- where consistency must help


def noisy_cohort(root: Path, *, n_pool: int, n_test: int, shape=(32, 32, 32), seed: int = 0) -> dict:
    """A one-class synthetic cohort of clean image structure with noisy pseudo-labels.

    Each image holds two or three bright ellipsoids (radii 3-7 voxels) on a darker background with
    a smooth gradient; the scans differ as scanners do: contrast 40-90 over a background of 100,
    noise sd 6-20, blur sigma 0-1.2 voxels. The real labels (``labelsTr``) are the ellipsoids.
    The pseudo-labels (``ROOT/pseudo``) of the pool are wrong as round-0 labels are: each ellipsoid
    eroded or dilated by 1-2 voxels, one ellipsoid of the case missing with probability 0.4, and a
    false sphere (radius 3-4) in the background with probability 0.6.

    Returns: {"template", "pool", "test", "pseudo": folder}.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    ids = [f"blob_{i:03d}" for i in range(1 + n_pool + n_test)]
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    pseudo = root / "pseudo"
    for n, case in enumerate(ids):
        blobs = []
        for _ in range(int(rng.integers(2, 4))):
            centre = rng.uniform(8, np.array(shape) - 8)
            radii = rng.uniform(3, 7, size=3)
            blobs.append(sum(((grid[d] - centre[d]) / radii[d]) ** 2 for d in range(3)) <= 1.0)
        label = np.any(blobs, axis=0).astype(np.uint8)
        image = 100.0 + rng.uniform(40, 90) * label + 0.6 * grid[0]
        sigma = rng.uniform(0.0, 1.2)
        if sigma > 0.2:
            image = ndimage.gaussian_filter(image, sigma)
        image = image + rng.normal(0, rng.uniform(6, 20), size=shape)
        helpers.write_nifti(root / "imagesTr" / f"{case}.nii.gz", image.astype(np.float32))
        helpers.write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, dtype=np.uint8)
        if 1 <= n <= n_pool:
            noisy = np.zeros(shape, bool)
            missing = int(rng.integers(len(blobs))) if rng.random() < 0.4 else -1
            for b, blob in enumerate(blobs):
                if b == missing:
                    continue
                steps = int(rng.integers(1, 3))
                op = ndimage.binary_dilation if rng.random() < 0.5 else ndimage.binary_erosion
                noisy |= op(blob, iterations=steps)
            if rng.random() < 0.6:
                outside = np.argwhere(ndimage.distance_transform_edt(label == 0) > 6)
                c = outside[rng.integers(len(outside))]
                noisy |= sum((grid[d] - c[d]) ** 2 for d in range(3)) <= rng.uniform(3, 4) ** 2
            helpers.write_nifti(pseudo / f"{case}.nii.gz", noisy.astype(np.uint8), dtype=np.uint8)
    meta = {"name": "Blobs", "modality": {"0": "MRI"}, "labels": {"background": 0, "blob": 1},
            "numTraining": len(ids), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return {"template": ids[0], "pool": ids[1:1 + n_pool], "test": ids[1 + n_pool:], "pseudo": pseudo}


def compare_on_noisy_cohort(root: Path, *, iterations: int, n_pool: int, n_test: int, seed: int = 0,
                            modes=("none", "w2s"), threads: int = 1) -> dict:
    """Train each ``--ssl`` mode on the noisy cohort with the same seed and iterations; the mean Dice
    of its predictions against the real labels on the held-out images ("test") and on the pool."""
    import nibabel as nib

    c = noisy_cohort(root, n_pool=n_pool, n_test=n_test)
    out = {}
    for mode in modes:
        model = root / f"model_{mode}"
        s = _train(root, c["pseudo"], c["template"], model, cases=(c["template"], *c["pool"]), ssl=mode,
                   iterations=iterations, seed=seed, threads=threads)
        scores = {}
        for subset in ("test", "pool"):
            pred = root / f"pred_{mode}_{subset}"
            predict(PredictSettings(input=root, model=model, output=pred, cases=tuple(c[subset]), device="cpu",
                                    threads=threads, quiet=True))
            dice = []
            for case in c[subset]:
                p = np.asarray(nib.load(str(pred / f"{case}.nii.gz")).dataobj) > 0
                t = np.asarray(nib.load(str(root / "labelsTr" / f"{case}.nii.gz")).dataobj) > 0
                dice.append(helpers.dice_reference(p, t))
            scores[subset] = float(np.mean(dice))
        out[mode] = {**scores, "train_seconds": s["train_seconds"]}
    return out


def test_w2s_beats_plain_training_on_noisy_pseudo_labels(tmp_path, monkeypatch):
    """Clean image structure, noisy pseudo-labels: with the same seed and 300 iterations, the w2s
    network's held-out Dice beats plain training's by a margin (seeds 0 / 1 / 2 measured +0.058 /
    +0.052 / +0.023 on the held-out images, +0.051 / +0.057 / +0.022 on the pool: docs/experiments.md,
    "Weak-to-strong consistency"). About 2 minutes on 1 thread of a loaded 2-core machine."""
    monkeypatch.setitem(nets.PRESETS, "quick", dict(SYNTH_PRESET))
    r = compare_on_noisy_cohort(tmp_path, iterations=300, n_pool=6, n_test=6, seed=0)
    assert r["w2s"]["test"] > r["none"]["test"] + 0.02, r
    assert r["w2s"]["pool"] > r["none"]["pool"], r


def test_run_passes_the_previous_rounds_entropy_maps_to_w2s(tmp_path):
    """run --ssl w2s: round r >= 2 trains with --confidence WORK/round{r-1}/pred; round 1 (round 0's
    labels, no entropy) and the other modes without."""
    from types import SimpleNamespace

    from semisam_o1.pipeline import run as R

    stages = SimpleNamespace(work=tmp_path)
    s = R.RunSettings(input=tmp_path, split=tmp_path / "s.json", output=tmp_path, preset="quick", ssl="w2s")
    assert R._confidence(stages, s, 1) is None
    assert R._confidence(stages, s, 2) == tmp_path / "round1" / "pred"
    assert R._confidence(stages, s, 3) == tmp_path / "round2" / "pred"
    plain = R.RunSettings(input=tmp_path, split=tmp_path / "s.json", output=tmp_path, preset="quick")
    assert plain.ssl == "none" and R._confidence(stages, plain, 2) is None


def test_w2s_losses_on_a_2d_network():
    """A 2D cohort's network (one-slice volumes, semisam_o1.stages.nets.for_2d): the hook finds the
    wrapped UNet's bottleneck, the strong views keep the one-slice axis, and the loss trains."""
    cfg = nets.for_2d(dict(SYNTH_PRESET, patch=[16, 16, 16]))
    net = nets.build_net(nets.net_params(cfg, 3))
    hook = semi.BottleneckDropout().attach(net)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 1)
    y = torch.randint(0, 3, (2, 1, 16, 16, 1))
    strong, pasted = semi.strong_views(x)
    assert strong.shape == x.shape and pasted.shape == (2, 1, 16, 16, 1)
    loss, sup, cons, share = semi.w2s_losses(net, hook, x, y, torch.rand(2, 1, 16, 16, 1))
    assert torch.isfinite(loss) and 0.0 <= share <= 1.0
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.train()
    plain = net(x)
    hook.active = True
    both = net(torch.cat([x, x]))
    hook.active = False
    torch.testing.assert_close(both[:2], plain)
    assert not torch.allclose(both[2:], plain)


def test_report_shows_how_each_round_trained(tmp_path):
    """report.json's round entry: the round's --ssl mode, whether entropy maps weighted its
    pseudo-labels, and w2s's confident share over the last tenth of its logged iterations."""
    from semisam_o1.pipeline import report as Rp

    model = tmp_path / "model"
    model.mkdir()
    assert Rp._training(model) is None
    (model / "config.json").write_text(json.dumps({"ssl": "w2s", "confidence": "/w/round1/pred"}))
    rows = ["iteration,loss,supervised,consistency,consistency_weight,lr,seconds,confident_share"]
    rows += [f"{10 * i},1,1,0,1,0.001,1,{i / 100}" for i in range(1, 21)]
    (model / "train_log.csv").write_text("\n".join(rows) + "\n")
    assert Rp._training(model) == {"ssl": "w2s", "confidence_weighted": True,
                                   "confident_share": pytest.approx((0.19 + 0.20) / 2)}
    (model / "config.json").write_text(json.dumps({"ssl": "none"}))
    assert Rp._training(model) == {"ssl": "none", "confidence_weighted": False, "confident_share": None}
