"""The specialist network shared by ``train`` and ``predict``: presets, the
MONAI 3D UNet, per-volume intensity normalisation and the model directory.

A model directory (written by :func:`semisam_o1.stages.train.train`) holds

* ``model.pt`` -- the network's ``state_dict`` (the student; the last
  checkpoint of training, see :mod:`semisam_o1.stages.train`),
* ``config.json`` -- preset, network parameters, normalisation, label map,
  training cases, seed, round, times,
* ``train_log.csv`` -- loss per logged iteration,
* ``stage.json`` -- the stage record (:mod:`semisam_o1.core.resume`): the signature of
  the settings and inputs, the command that reproduces the model, and whether
  training finished.

``config.json`` and ``model.pt`` of a finished record are what ``predict`` reads. Heavy imports
(torch, monai) happen inside functions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.resume import RECORD
from semisam_o1.data.images import Volume, colour_channels

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
LOG_NAME = "train_log.csv"
CHECKPOINT_NAME = "checkpoint.pt"

# Per-volume intensity normalisation: clip to the [lower, upper] percentiles of
# the volume, then z-score with the clipped volume's mean and standard
# deviation (nnU-Net-style for MRI, where raw intensities have no fixed scale:
# docs/experiments.md, "Raw intensity scale").
NORMALISATION = {"method": "percentile_clip_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5}

# Presets. ``patch`` is in canonical (X, Y, Z) voxels; every entry must be
# divisible by prod(strides). ``iterations`` are optimiser steps of
# ``batch_size`` patches. ``flip_axes`` are canonical axes flipped at random:
# only the left-right axis (0) by default, because anterior/posterior classes
# are defined by position along the A-P axis and a flip along it would swap them.
# Settings every preset shares; each preset below lists what it changes.
_COMMON: dict = {
    "weight_decay": 1e-05,
    "pos_neg": [2.0, 1.0],
    "flip_axes": [0],
    "flip_prob": 0.5,
    "intensity_scale": 0.1,
    "intensity_shift": 0.1,
    "intensity_prob": 0.5,
    "ema_decay": 0.99,
    "consistency": 0.1,
    "consistency_rampup": 0.4,
}

PRESETS: dict[str, dict] = {
    # seconds on 2 CPU cores; for tests only
    "quick": {
        **_COMMON,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 0,
        "patch": [16, 16, 16],
        "batch_size": 2,
        "iterations": 4,
        "lr": 0.003,
        "sw_overlap": 0.25,
        "sw_batch_size": 4,
        "log_every": 1,
        "checkpoint_every": 0,
    },
    # sized for one round on ~200 small MRI crops (train + predict) on 2 CPU
    # cores: docs/experiments.md, "How each addition contributes to the whole loop"
    "cpu": {
        **_COMMON,
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 1,
        "patch": [32, 48, 32],
        "batch_size": 2,
        "iterations": 1200,
        "lr": 0.003,
        "sw_overlap": 0.25,
        "sw_batch_size": 4,
        "log_every": 10,
        "checkpoint_every": 250,
    },
    # GPU-sized, as the paper's backbones train (UA-MT / nnU-Net-like budgets)
    "paper": {
        **_COMMON,
        "channels": [32, 64, 128, 256],
        "strides": [2, 2, 2],
        "num_res_units": 2,
        "patch": [40, 56, 40],
        "batch_size": 4,
        "iterations": 6000,
        "lr": 0.001,
        "sw_overlap": 0.5,
        "sw_batch_size": 8,
        "log_every": 20,
        "checkpoint_every": 500,
    },
}


def preset(name: str) -> dict:
    """A copy of preset ``name``. Raises InputError for an unknown name."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])


def for_2d(cfg: dict) -> dict:
    """A preset (or planned) network for 2D images, volumes of one slice (X, Y, 1): the patch is one
    slice thick, no level downsamples the third axis, no flip along it, and the UNet is MONAI's 2D
    one (``spatial_dims`` 2, :func:`build_net`); patches, sliding windows and flips stay the 3D ones
    on (X, Y, 1), so training and prediction run the same code for both."""
    out = copy.deepcopy(cfg)
    out["spatial_dims"] = 2
    out["patch"] = [int(out["patch"][0]), int(out["patch"][1]), 1]
    out["strides"] = [[s[0], s[1], 1] if isinstance(s, (list, tuple)) else [s, s, 1] for s in out["strides"]]
    out["flip_axes"] = [int(a) for a in out["flip_axes"] if int(a) != 2]
    return out


def normalise(array: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Intensity normalisation, the same in ``train`` and ``predict``.

    ``method`` ``fixed_clip_zscore`` (CT, from a plan): clip to ``[lower, upper]`` and z-score
    with the fixed ``mean`` and ``sd``. Default ``percentile_clip_zscore``, per volume:

    Clip to the ``lower_percentile`` / ``upper_percentile`` (default 0.5 / 99.5)
    percentiles of the volume, then subtract the clipped volume's mean and
    divide by its standard deviation (1 if the volume is constant).

    Parameters
    ----------
    array : np.ndarray, shape (X, Y, Z), any real dtype
    params : dict, optional
        ``NORMALISATION``-shaped dict (as stored in a model's config.json).

    Returns
    -------
    np.ndarray, same shape, float32, zero mean and unit variance (unless constant).
    """
    params = params or NORMALISATION
    method = params.get("method", "percentile_clip_zscore")
    if method == "fixed_clip_zscore":  # CT (semisam_o1.stages.plan): one clip and z-score for every volume
        a = np.clip(np.asarray(array, dtype=np.float64), params["lower"], params["upper"])
        return ((a - params["mean"]) / max(float(params["sd"]), 1e-8)).astype(np.float32)
    if method != "percentile_clip_zscore":
        raise InputError(f"unknown normalisation method {method!r} in the model config")
    a = np.asarray(array, dtype=np.float64)
    lo, hi = np.percentile(a, [params["lower_percentile"], params["upper_percentile"]])
    a = np.clip(a, lo, hi)
    mean = a.mean()
    std = a.std()
    if not np.isfinite(std) or std < 1e-8:
        std = 1.0
    return ((a - mean) / std).astype(np.float32)


def normalise_channels(channels: np.ndarray, params: dict | None = None) -> np.ndarray:
    """:func:`normalise` applied to each channel of ``channels`` on its own (an RGB image: each
    colour clipped and z-scored with its own percentiles, mean and standard deviation).

    Args:
        channels: (C, X, Y, Z) any real dtype.
        params: as for :func:`normalise`.

    Returns:
        (C, X, Y, Z) float32.
    """
    return np.stack([normalise(c, params) for c in np.asarray(channels)])


def image_channels(volume: Volume, in_channels: int) -> np.ndarray:
    """A network's raw input from an image: ``(1, X, Y, Z)`` its intensities (a colour image's
    luma) for a one-channel network, ``(3, X, Y, Z)`` its RGB for a three-channel one.

    Args:
        volume: the image (:func:`semisam_o1.data.images.read_image`).
        in_channels: the network's input channels (``config.json`` ``net.in_channels``).

    Returns:
        float32 (in_channels, X, Y, Z).

    Raises:
        InputError: a three-channel network and an image without colour channels.
    """
    if int(in_channels) == 1:
        return np.asarray(volume.array, np.float32)[None]
    if volume.channels is None:
        raise InputError(_not_colour(volume.path, in_channels))
    return np.ascontiguousarray(np.moveaxis(volume.channels, -1, 0), dtype=np.float32)


def check_channels(path, in_channels: int) -> None:
    """Raise InputError (one line naming ``path``) when a network of ``in_channels`` input channels
    cannot take the image ``path`` (a greyscale image for an RGB network); header only."""
    if int(in_channels) != 1 and colour_channels(path) != int(in_channels):
        raise InputError(_not_colour(path, in_channels))


def _not_colour(path, in_channels: int) -> str:
    return (f"{path}: a greyscale image, but the model takes RGB images ({int(in_channels)} input channels: it was "
            "trained on a colour cohort); give the image in colour or use a model trained on greyscale images")


def cohort_channels(paths) -> int:
    """The UNet's input channels for a cohort of images: 3 when every image is colour (RGB 2D
    images: the network sees the three channels), else 1 (the intensities; a colour image among
    greyscale ones gives its luma, so that the model takes every image of the cohort). Headers only."""
    paths = list(paths)
    return 3 if paths and all(colour_channels(p) == 3 for p in paths) else 1


def working_shape(shape, spacing, working_spacing) -> tuple[int, int, int]:
    """The voxel shape of a volume of ``shape`` voxels at ``spacing`` mm resampled to
    ``working_spacing`` mm (the same physical extent; at least 1 voxel per axis)."""
    return tuple(max(1, int(round(n * s / w))) for n, s, w in zip(shape, spacing, working_spacing))


def resample(array: np.ndarray, shape, mode: str) -> np.ndarray:
    """Resample (C, X, Y, Z) channels to (C, *shape) with MONAI's ``Resize`` (voxel centres of
    the two grids aligned, ``align_corners=False``; shrinking by 2 with ``trilinear`` averages each
    pair of voxels per axis; no Gaussian anti-aliasing, whose zero padding darkens the borders).

    Args:
        array: (C, X, Y, Z) float array (images, one-hot labels or probabilities).
        shape: the (X, Y, Z) output shape.
        mode: ``trilinear`` (images, probabilities) or ``nearest-exact``.

    Returns:
        (C, *shape) float32.
    """
    from monai.transforms import Resize

    if tuple(array.shape[1:]) == tuple(shape):
        return np.asarray(array, np.float32)
    out = Resize(spatial_size=tuple(int(n) for n in shape), mode=mode)(np.asarray(array, np.float32))
    return np.asarray(out, np.float32)


def resample_label(label: np.ndarray, shape, num_classes: int) -> np.ndarray:
    """A (X, Y, Z) label map of class indices resampled to ``shape``: each class's one-hot mask
    is resampled trilinearly and every voxel takes the class of the largest share (less aliasing
    than nearest-neighbour when shrinking). Returns (X', Y', Z') uint8."""
    if tuple(label.shape) == tuple(shape):
        return np.asarray(label, np.uint8)
    onehot = np.stack([label == c for c in range(num_classes)]).astype(np.float32)
    return np.argmax(resample(onehot, shape, "trilinear"), axis=0).astype(np.uint8)


def net_params(cfg: dict, num_classes: int) -> dict:
    """Keyword arguments of ``monai.networks.nets.UNet`` for a preset dict (``spatial_dims`` 2 for
    a 2D one, :func:`for_2d`: each level's stride of the two image axes; ``in_channels`` the
    preset's, 1 unless set: 3 for an RGB cohort, :func:`cohort_channels`)."""
    dims = int(cfg.get("spatial_dims", 3))
    strides = list(cfg["strides"])
    if dims == 2:
        strides = [list(s[:2]) if isinstance(s, (list, tuple)) else s for s in strides]
    return {
        "spatial_dims": dims,
        "in_channels": int(cfg.get("in_channels", 1)),
        "out_channels": int(num_classes),
        "channels": list(cfg["channels"]),
        "strides": strides,
        "num_res_units": int(cfg["num_res_units"]),
        "norm": "INSTANCE",
        "dropout": float(cfg.get("dropout", 0.0)),
    }


def build_net(params: dict):
    """A MONAI UNet (``monai.networks.nets.UNet``) from :func:`net_params` output. A 2D one
    (``spatial_dims`` 2) takes and returns (B, C, X, Y, 1) tensors: the one-slice third axis is
    dropped before the network and put back after it, so callers handle 2D images as volumes."""
    import torch
    from monai.networks.nets import UNet

    p = dict(params)
    p["channels"] = tuple(p["channels"])
    p["strides"] = tuple(tuple(s) if isinstance(s, list) else s for s in p["strides"])
    net = UNet(**p)
    if int(p.get("spatial_dims", 3)) != 2:
        return net

    class OneSlice(torch.nn.Module):
        """A 2D network over (B, C, X, Y, 1) tensors."""

        def __init__(self, inner):
            super().__init__()
            self.net = inner

        def forward(self, x):
            return self.net(x[..., 0])[..., None]

    return OneSlice(net)


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (``None``: leave torch's default; values are checked by
    :class:`semisam_o1.core.settings.ComputeOptions`)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def is_finished(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a finished model: config.json, model.pt and a stage record of
    ``train`` marked finished."""

    d = Path(model_dir)
    if not ((d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file() and (d / RECORD).is_file()):
        return False
    try:
        record = json.loads((d / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("stage") == "train" and bool(record.get("finished"))


def weights_mismatch(expected: dict, state) -> str | None:
    """How the tensors ``state`` (a loaded ``model.pt``) differ from ``expected`` (the state dict of
    the network ``config.json`` describes), in a few words with one example; None when they match."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a state dict"
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if not (missing or extra or shapes):
        return None
    parts = [f"{len(v)} tensors {what}" for v, what in ((missing, "missing"), (extra, "not in the network"),
                                                          (shapes, "of another shape")) if v]
    example = (f"{shapes[0]}: {list(state[shapes[0]].shape)} in the weights, {list(expected[shapes[0]].shape)} "
               "in the config" if shapes else f"{(missing or extra)[0]}")
    return f"{', '.join(parts)}, e.g. {example}"


def load_model(model_dir: str | Path, device=None):
    """Load a finished model directory.

    Args:
        model_dir: a model folder written by :func:`semisam_o1.stages.train.train`.
        device: torch.device or str to put the network on (None: leave it on the CPU).

    Returns:
        (net, config): the UNet in eval mode and the parsed config.json dict.

    Raises:
        InputError: the folder is not a finished model directory, its files cannot be read, or the
            weights do not fit the network its config describes (one line, not torch's key dump).
    """
    import torch

    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"{d}: model folder not found")
    if not is_finished(d):
        raise InputError(f"{d}: not a finished model (needs {CONFIG_NAME} and {WEIGHTS_NAME}; train it first)")
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
        params = config["net"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{d / CONFIG_NAME}: cannot read the model config ({exc})") from None
    net = build_net(params)
    try:
        state = torch.load(d / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{d / WEIGHTS_NAME}: cannot load the weights ({type(exc).__name__}: {exc})") from None
    mismatch = weights_mismatch(net.state_dict(), state)
    if mismatch:
        raise InputError(f"{d / WEIGHTS_NAME}: {WEIGHTS_NAME} does not match {CONFIG_NAME} ({mismatch}); the two "
                         "files come from different models")
    net.load_state_dict(state)
    if device is not None:
        net = net.to(device)
    net.eval()
    return net, config


