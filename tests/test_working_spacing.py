"""A working spacing (a plan's ``spacing``): the network trains and predicts on a resampled grid,
and every output is written back on the input's own grid and affine."""

from __future__ import annotations

import json
import shutil

import helpers
import nibabel as nib
import numpy as np
import pytest
import torch

from semisam_o1.stages import nets
from semisam_o1.stages.predict import PredictSettings, predict, predict_volume
from semisam_o1.stages.train import TrainSettings, train


def _ball(shape, centre, radius, spacing):
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"))
    return (sum((grid[d] - centre[d]) ** 2 for d in range(3)) <= radius ** 2).astype(np.uint8)


def test_resample_label_matches_the_structure_drawn_on_the_coarse_grid():
    """A ball of radius 8 mm at 1 mm, resampled to 2 mm, against the same ball drawn directly on
    the 2 mm grid (voxel centres of both grids aligned, as MONAI's Resize with align_corners=False):
    Dice above 0.93, while nearest-neighbour subsampling of every 2nd voxel is shifted by half a
    coarse voxel and scores lower."""
    fine = _ball((40, 40, 40), (20.0, 21.0, 19.0), 8.0, (1, 1, 1))
    shape = nets.working_shape(fine.shape, (1, 1, 1), (2, 2, 2))
    assert shape == (20, 20, 20)
    coarse = nets.resample_label(fine, shape, 2)
    direct = _ball(shape, (20.0, 21.0, 19.0), 8.0, (2, 2, 2))
    ours = helpers.dice_reference(coarse == 1, direct == 1)
    assert ours > 0.93
    assert ours > helpers.dice_reference(fine[::2, ::2, ::2] == 1, direct == 1)
    # a constant image stays constant, shapes follow the physical extent
    img = np.full((1, 30, 20, 10), 3.5, np.float32)
    out = nets.resample(img, nets.working_shape((30, 20, 10), (1.0, 1.5, 3.0), (2.0, 2.0, 2.0)), "trilinear")
    assert out.shape == (1, 15, 15, 15) and np.allclose(out, 3.5, atol=1e-5)


def test_predict_volume_resamples_in_and_out():
    """predict_volume with a model spacing equals: resample the normalised image to the working
    grid, run the network there, resample the probabilities back to the image's grid."""
    torch.manual_seed(0)
    cfg = nets.preset("quick")
    net = nets.build_net(nets.net_params(cfg, 3)).eval()
    config = {"preset_params": cfg, "normalisation": dict(nets.NORMALISATION), "patch": cfg["patch"],
              "spacing": [2.0, 2.0, 2.0]}
    image, _ = helpers.synthetic_case(np.random.default_rng(1), shape=(30, 26, 22))
    probs = predict_volume(net, image, config, torch.device("cpu"), spacing=(1.0, 1.0, 1.0))
    assert probs.shape == (3, 30, 26, 22)
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="spacing"):
        predict_volume(net, image, config, torch.device("cpu"))
    # the reference, by hand: the same steps with a model on the working grid
    norm = nets.normalise(image, config["normalisation"])[None]
    small = nets.resample(norm, (15, 13, 11), "trilinear")[0]
    plain = dict(config, spacing=None, normalisation={"method": "fixed_clip_zscore", "lower": -1e9, "upper": 1e9,
                                                       "mean": 0.0, "sd": 1.0})
    ref = nets.resample(predict_volume(net, small, plain, torch.device("cpu")), (30, 26, 22), "trilinear")
    ref /= ref.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(probs, ref, atol=1e-5)


def test_train_and_predict_at_a_working_spacing_keep_the_input_grid(tmp_path):
    """train --plan with a spacing: the model records it and trains on the coarse grid; predict
    writes labels and entropy maps on each image's own grid with its affine."""
    root = tmp_path / "ds"
    split = helpers.make_cohort(root, n_unlabeled=2, n_test=1, shape=(28, 28, 28), spacing=(1.0, 1.0, 1.5))
    cfg = nets.preset("quick")
    plan = {"decisions": {k: {"value": cfg[k], "reason": "test"} for k in
                          ("patch", "strides", "channels", "batch_size", "iterations", "flip_axes")}}
    plan["decisions"]["normalisation"] = {"value": dict(nets.NORMALISATION), "reason": "test"}
    plan["decisions"]["spacing"] = {"value": [2.0, 2.0, 2.0], "reason": "test"}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    labels = tmp_path / "labels"
    labels.mkdir()
    for case in split["unlabeled"]:
        shutil.copy(root / "labelsTr" / f"{case}.nii.gz", labels)
    model = tmp_path / "model"
    train(TrainSettings(input=root, labels=labels, template=split["template"], cases=tuple(split["unlabeled"]),
                        output=model, preset="quick", plan=tmp_path / "plan.json", iterations=2, quiet=True,
                        threads=1, device="cpu"))
    config = json.loads((model / nets.CONFIG_NAME).read_text())
    assert config["spacing"] == [2.0, 2.0, 2.0]
    out = tmp_path / "pred"
    predict(PredictSettings(input=root, model=model, output=out, cases=tuple(split["test"]), quiet=True,
                            threads=1, device="cpu"))
    case = split["test"][0]
    src = nib.load(str(root / "imagesTr" / f"{case}.nii.gz"))
    for name in (f"{case}.nii.gz", f"{case}_entropy.nii.gz"):
        written = nib.load(str(out / name))
        assert written.shape == src.shape
        np.testing.assert_allclose(written.affine, src.affine)
