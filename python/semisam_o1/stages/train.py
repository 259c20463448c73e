"""Train a MONAI 3D UNet from scratch on pseudo-labels (the template keeps its real label).

``semisam-o1 train -i DATASET -l LABELS [--template ID] [--cases ID ... | --split FILE]
-o MODEL [--ssl none|mt|w2s] [--confidence PRED] [--preset quick|cpu|paper] [--iterations N] [--template-share F]
[--spatial-aug P] [--device auto|cpu|cuda] [--seed S] [--round R] [--threads N] [--overwrite]``

What is read (the honest one-label protocol)
    The template's label comes from the dataset (``labelsTr``); every other
    training case's label comes from the LABELS folder (pseudo-labels, one
    NIfTI per case, ``<case>.nii.gz`` or ``<case>.nii``). No other label is
    read. With ``--split`` the training cases are the split's ``--subset``
    (default ``template,unlabeled``), never a ``test`` case. Without
    ``--cases``/``--split`` they are the template and every dataset case with
    a file in LABELS.

Training
    ``monai.networks.nets.UNet`` (3D, instance norm) from scratch; loss
    ``monai.losses.DiceCELoss`` (soft Dice + cross-entropy, softmax);
    AdamW with polynomial learning-rate decay (power 0.9); patches drawn by
    ``RandCropByPosNegLabeld`` (foreground-centred with probability
    pos/(pos+neg), default 2/3) after padding each volume to the patch size;
    augmentations ``RandFlipd`` (left-right axis only, since anterior /
    posterior classes are positional), ``RandScaleIntensityd`` and
    ``RandShiftIntensityd``; with ``--spatial-aug P``, before the crop and
    with probability P per drawn volume, ``RandAffined`` (rotation up to
    +-15 degrees and scaling up to +-15% about each axis, image trilinear,
    label nearest, border padding). Intensities are normalised per volume by
    :func:`semisam_o1.stages.nets.normalise` (0.5/99.5 percentile clip + z-score),
    the same function ``predict`` uses. A cohort of colour 2D images (every image of the dataset
    RGB) trains on the three channels, each normalised on its own (``in_channels`` 3 in
    config.json; :func:`semisam_o1.stages.nets.cohort_channels`). The prepared volumes are spilled
    to disk (:func:`spill_volume`) and memory-mapped one patch at a time, so memory does not grow with
    the cohort (benchmarks/results/scale.json).
    Each patch comes from a training volume drawn uniformly, or, with
    ``--template-share F``, from the template (the one real label) with
    probability F and uniformly from the pseudo-labelled volumes otherwise.

Randomness
    Every random draw comes from the streams of :mod:`semisam_o1.core.seeds` keyed by
    (``--seed``, ``--round``, purpose): the initial weights (:data:`STREAM_INIT`),
    and, re-seeded at every checkpoint block, the volume draws (:data:`STREAM_DRAWS`),
    MONAI's transforms (:data:`STREAM_TRANSFORMS`) and torch's noise
    (:data:`STREAM_TORCH`). Different (seed, round) pairs never share a stream, and a
    resumed CPU run gives the same model as an uninterrupted one.

Spatial augmentation and pseudo-labels
    A single UNet trained on pseudo-labels gains a little from ``--spatial-aug``,
    one trained on the real labels does not (the "noisy student" effect, Xie et
    al., CVPR 2020); but ``run``'s whole loop with it in every round ends no
    better, since the later rounds learn from the augmented models' predictions,
    so ``run`` leaves it off (docs/experiments.md, "Spatial augmentation").

Semi-supervised consistency (``--ssl mt``)
    Mean teacher (Tarvainen & Valpola, NeurIPS 2017): the teacher is an
    exponential moving average of the student (decay ``ema_decay``), sees the
    batch with Gaussian noise (sigma 0.1, clipped to +-0.2, as Yu et al., MICCAI
    2019), and the student is pulled to the teacher's softmax by a mean squared
    error weighted by ``consistency * exp(-5 (1 - t/T)^2)`` (sigmoid ramp-up over
    ``consistency_rampup`` of the iterations). A round-1 UNet with it scores no
    better than without (docs/experiments.md, "Mean teacher").

Weak-to-strong consistency (``--ssl w2s``)
    UniMatch-style (Yang et al., CVPR 2023) in 3D, :mod:`semisam_o1.stages.semi`: the
    supervised DiceCE is weighted per voxel by the target's confidence (``--confidence
    PRED``: a previous round's prediction folder, whose ``<case>_entropy.nii.gz`` gives
    ``1 - H / ln K``; the template's real label and cases without a map weigh 1), and the
    network's confident predictions on each patch teach a strongly perturbed copy
    (intensity jitter, blur, CutMix within the batch) and a pass with dropped bottleneck
    channels. One iteration costs 3 forward / backward passes of the batch against 1
    (docs/experiments.md, "Weak-to-strong consistency").

Model selection
    The **last checkpoint** is kept: ``model.pt`` holds the student's weights
    after the final iteration. No validation Dice on labelled volumes (as the
    paper's code does) and no label outside the training labels is read.

Output (MODEL folder, every file written atomically)
    ``model.pt`` (state_dict), ``config.json`` (preset, network parameters,
    normalisation, label map, training cases, seed, round, times: what
    ``predict`` needs), ``train_log.csv`` and ``stage.json`` (the stage record of
    :mod:`semisam_o1.core.resume`: the signature of the settings and of the inputs --
    training cases, template, SHA-256 of every image and label trained on -- and
    the command that reproduces the stage). A finished MODEL folder with the same
    signature is skipped; one made from other settings or inputs is refused unless
    ``--overwrite``. An interrupted run resumes from ``checkpoint.pt`` (written every
    ``checkpoint_every`` iterations, carrying the record's signature) when the
    signature matches. While it trains, the prepared volumes lie in a hidden
    ``.semisam-volumes-<hash>`` folder in MODEL (or, when MODEL did not exist yet, in its
    parent; :func:`spill_folder`), removed when training ends or fails and rebuilt by a
    resumed run.

Errors (InputError, one line naming the case or file, nothing written): a
training case without a label in LABELS, a label whose shape or affine differs
from its image, label values outside the dataset's classes, a test case of the
split among the training cases, an output that is a file or not writable --
all found before training starts.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io as _io
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from semisam_o1.core import seeds
from semisam_o1.core.device import torch_device
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import WRITE_ERRNOS, atomic_path, file_sha256, write_json
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import StageRecord, digest, open_stage
from semisam_o1.core.settings import CaseOptions, ComputeOptions, check_range, option, redo_changed_option, select_cases
from semisam_o1.core.version import __version__
from semisam_o1.data.cases import case_id_from_path, find_case_file
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import canonical_shape, check_same_grid, read_image, read_label
from semisam_o1.stages import nets, semi
from semisam_o1.stages.plan import read_plan, unet_overrides
from semisam_o1.stages.predict import entropy_file

SSL_MODES = ("none", "mt", "w2s")

#: ``confident_share`` (``--ssl w2s`` only): share of the batch's voxels whose weak prediction is
#: confident enough to teach the perturbed views (:data:`semisam_o1.stages.semi.CONFIDENCE`)
LOG_FIELDS = ["iteration", "loss", "supervised", "consistency", "consistency_weight", "lr", "seconds",
              "confident_share"]

#: purposes of the random streams (:func:`semisam_o1.core.seeds.int_seed` keys after seed and round)
STREAM_INIT = 1  # initial weights
STREAM_DRAWS = 2  # which volume each patch comes from (per checkpoint block)
STREAM_TRANSFORMS = 3  # MONAI's random transforms (per checkpoint block)
STREAM_TORCH = 4  # torch's global generator during training: the teacher's noise (per checkpoint block)


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(kw_only=True)
class TrainSettings(CaseOptions, ComputeOptions):
    """Settings of ``semisam-o1 train`` (see the module docstring)."""

    labels: Path = option(help="folder of (pseudo-)labels, one NIfTI per training case (the template's is "
                          "taken from the dataset)", flags=("-l", "--labels"), type=Path, metavar="LABELS")
    template: str | None = option(None, "the annotated template case id (default: the split's 'template')",
                                  metavar="ID")
    output: Path = option(help="model folder to write", flags=("-o", "--output"), type=Path, metavar="MODEL",
                          neutral=True)
    ssl: str = option("none", "semi-supervised consistency: none; mt (mean teacher, Tarvainen & Valpola "
                      "2017; no better than none: docs/experiments.md, \"Mean teacher\"); w2s (UniMatch-style "
                      "weak-to-strong and feature-perturbation consistency with confidence-weighted pseudo-labels, "
                      "3 passes per iteration: docs/experiments.md, \"Weak-to-strong consistency\")",
                      choices=SSL_MODES)
    confidence: Path | None = option(None, "with --ssl w2s: a prediction folder of the previous round (predict's "
                                     "<case>_entropy.nii.gz); each pseudo-label voxel weighs 1 - entropy / ln K "
                                     "(unset, and for cases without a map: 1)", type=Path, metavar="PRED")
    preset: str = option("cpu", "network / schedule size (semisam_o1.stages.nets.PRESETS)", choices=tuple(nets.PRESETS))
    iterations: int | None = option(None, "optimiser steps of the preset's batch (default: the preset's)",
                                    type=int, metavar="N")
    template_share: float | None = option(None, "probability in [0, 1) that a training patch comes from the "
                                          "template's real label (unset or negative: every training volume "
                                          "equally likely)", type=float, metavar="F")
    spatial_aug: float = option(0.0, "probability of a random rotation (+-15 deg) and scaling (+-15%%) of each "
                                "drawn volume (MONAI RandAffined; 0: off, as in run)", metavar="P")
    plan: Path | None = option(None, "plan file written by `semisam-o1 plan`: its UNet decisions (patch, strides, "
                               "channels, batch, iterations, flip axes, normalisation) replace the preset's "
                               "(--iterations still wins)", type=Path, metavar="PLAN.json")
    seed: int = option(0, "seed of the initial weights, sampling and augmentation")
    round: int = option(0, "round of the loop this model belongs to: with --seed, it keys every random stream "
                        "(semisam_o1.core.seeds), so no two (seed, round) pairs share one")
    overwrite: bool = option(False, "retrain even if MODEL holds a model (finished, or from other settings)",
                             neutral=True)
    redo_changed: bool = redo_changed_option()

    def __post_init__(self):
        super().__post_init__()
        self.labels, self.output = Path(self.labels), Path(self.output)
        if self.ssl not in SSL_MODES:
            raise InputError(f"--ssl {self.ssl}: choose one of {', '.join(SSL_MODES)}")
        if self.confidence is not None:
            self.confidence = Path(self.confidence)
            if self.ssl != "w2s":
                raise InputError(f"--confidence {self.confidence}: only with --ssl w2s")
        if self.preset not in nets.PRESETS:
            raise InputError(f"--preset {self.preset}: choose one of {', '.join(nets.PRESETS)}")
        if self.template_share is not None and self.template_share < 0:
            self.template_share = None
        check_range("template_share", self.template_share, 0.0, 1.0, hi_open=True)
        check_range("spatial_aug", self.spatial_aug, 0.0, 1.0)
        check_range("iterations", self.iterations, 1)
        check_range("round", self.round, 0)


# --------------------------------------------------------------------------- data


def training_cases(ds: Dataset, settings: TrainSettings) -> tuple[str, list[str]]:
    """The template and the training case ids (template first).

    Args:
        ds: the dataset.
        settings: ``cases`` (the template is added), else the ``subset`` of ``split``, else
            the template and every dataset case with a file in ``labels``.

    Returns:
        (template id, [template, other training cases ...]).

    Raises:
        InputError: no template, an unknown case, or a case of the split's ``test`` subset
            among the training cases.
    """
    sp = load_split(settings.split) if settings.split is not None else None
    template = settings.template
    if template is None and sp is not None:
        template = sp.get("template")
        if not isinstance(template, str):
            raise InputError(f"{settings.split}: the split has no single 'template' case; give --template")
    if template is None:
        raise InputError("no template: give --template ID (or a --split with a 'template')")
    ds.image_path(template)  # unknown template -> InputError
    if settings.cases or sp is not None:
        chosen = select_cases(ds, settings)
    else:
        found = sorted({case_id_from_path(p, strip_channel=False) for p in settings.labels.iterdir()} - {None})
        chosen = [c for c in found if c in ds.images]
    if sp is not None:
        test = set(sp.get("test", []) or [])
        leaked = [c for c in chosen if c in test]
        if leaked:
            raise InputError(f"{settings.split}: training case {leaked[0]} is in the split's 'test' subset")
    return template, [template] + [c for c in chosen if c != template]


def label_paths(ds: Dataset, labels: Path, template: str, cases: list[str]) -> dict[str, Path]:
    """{case: label file}: the dataset's for the template, the LABELS folder's for the others.

    Raises:
        InputError: a case without a label file (one line naming it).
    """
    out = {}
    for case in cases:
        if case == template:
            if case not in ds.labels:
                raise InputError(f"template {case}: no real label in {ds.root / 'labelsTr'}")
            out[case] = ds.labels[case]
        else:
            out[case] = find_case_file(labels, case, what="label")
    return out


def confidence_paths(folder: Path | None, template: str, cases: list[str]) -> dict[str, Path] | None:
    """{case: entropy map} of the pseudo-labelled cases with a ``<case>_entropy.nii.gz`` in ``folder``
    (``--confidence``); None without a folder.

    Raises:
        InputError: ``folder`` is not a folder.
    """
    if folder is None:
        return None
    if not folder.is_dir():
        raise InputError(f"{folder}: confidence folder (--confidence) not found")
    return {c: entropy_file(folder, c) for c in cases if c != template and entropy_file(folder, c).is_file()}


def stage_inputs(ds: Dataset, template: str, cases: list[str], labels: dict[str, Path],
                 confidence: dict[str, Path] | None = None) -> dict:
    """What the model is computed from, for the stage record: the training cases, the template and
    the SHA-256 of every image and label file trained on, and of every entropy map weighting them
    (JSON-ready)."""
    out = {"template": template, "training_cases": list(cases),
           "images": {c: file_sha256(ds.image_path(c)) for c in cases},
           "labels": {c: file_sha256(labels[c]) for c in cases}}
    if confidence is not None:
        out["confidence"] = {c: file_sha256(p) for c, p in sorted(confidence.items())}
    return out


def confidence_weight(entropy: np.ndarray, num_classes: int) -> np.ndarray:
    """A pseudo-label's voxel weights from its round's softmax entropy: ``clip(1 - H / ln K, 0, 1)``.

    Args:
        entropy: (X, Y, Z) entropy in nats (predict's ``<case>_entropy.nii.gz``).
        num_classes: K (background included); K = 1 gives weight 1.

    Returns:
        (X, Y, Z) float32 in [0, 1].
    """
    if num_classes < 2:
        return np.ones(entropy.shape, np.float32)
    return np.clip(1.0 - np.asarray(entropy, np.float64) / math.log(num_classes), 0.0, 1.0).astype(np.float32)


def read_volume(ds: Dataset, case: str, label_file: Path, norm: dict, working_spacing=None,
                confidence: dict[str, Path] | None = None, in_channels: int = 1) -> dict:
    """Read, check and normalise one training volume (and its label, and its entropy map's weights).

    Args:
        ds: the dataset (images, label map).
        case: the case id; label_file: its label (:func:`label_paths`).
        norm: normalisation parameters (:data:`semisam_o1.stages.nets.NORMALISATION`).
        working_spacing: (3,) mm, or None: the network's grid (a plan's ``spacing``); the image is
            resampled to it after normalisation (:func:`semisam_o1.stages.nets.resample`) and the label
            with :func:`semisam_o1.stages.nets.resample_label`.
        confidence: None, or {case: entropy map} (:func:`confidence_paths`): the volume then also
            gets ``"weight"`` (1, X, Y, Z) float32, :func:`confidence_weight` of its map (resampled
            trilinearly), 1 everywhere for a case without one.
        in_channels: the network's input channels: 1 (the intensities; a colour image's luma) or
            3 (the RGB channels of colour 2D images, :func:`semisam_o1.stages.nets.image_channels`),
            each channel normalised on its own (:func:`semisam_o1.stages.nets.normalise_channels`).

    Returns:
        ``{"case", "image": (C, X, Y, Z) float32, "label": (1, X, Y, Z) uint8}`` (C = ``in_channels``;
        on the working grid), plus ``"weight"`` (1, X, Y, Z) float32 with ``confidence``.

    Raises:
        InputError: naming the case for a label or an entropy map on another grid or undeclared
            label values, or a greyscale image for a three-channel network.
    """
    img = ds.read_image(case)
    lab = read_label(label_file, ds.label_map, reference=img)
    image = nets.normalise_channels(nets.image_channels(img, in_channels), norm)
    label = np.ascontiguousarray(lab.array)
    if working_spacing is not None:
        shape = nets.working_shape(img.shape, img.spacing, working_spacing)
        image = nets.resample(image, shape, "trilinear")
        label = nets.resample_label(label, shape, ds.label_map.num_classes)
    entry = {"case": case, "image": image, "label": label[None]}
    if confidence is not None:
        if case in confidence:
            ent = read_image(confidence[case])
            check_same_grid(ent, img, what="image")
            weight = confidence_weight(ent.array, ds.label_map.num_classes)[None]
            if working_spacing is not None:
                weight = np.clip(nets.resample(weight, image.shape[1:], "trilinear"), 0.0, 1.0)
        else:
            weight = np.ones((1, *image.shape[1:]), np.float32)
        entry["weight"] = np.ascontiguousarray(weight, dtype=np.float32)
    return entry


def pad_to_patch(entry: dict, patch) -> None:
    """Zero-pad (symmetrically; weights with 1) a volume smaller than ``patch`` in place."""
    shape = entry["image"].shape[1:]
    pads = [max(0, int(p) - int(s)) for s, p in zip(shape, patch)]
    if any(pads):
        width = [(0, 0)] + [(q // 2, q - q // 2) for q in pads]
        entry["image"] = np.pad(entry["image"], width, mode="constant", constant_values=0.0)
        entry["label"] = np.pad(entry["label"], width, mode="constant", constant_values=0)
        if "weight" in entry:
            entry["weight"] = np.pad(entry["weight"], width, mode="constant", constant_values=1.0)


def add_indices(entry: dict) -> None:
    """Foreground / background voxel indices of a volume (``"fg"``, ``"bg"``; int32 below 2^31 voxels),
    for MONAI's ``RandCropByPosNegLabeld``; without foreground every centre is background."""
    flat = entry["label"].reshape(-1)
    dtype = np.int32 if flat.size < 2**31 else np.int64
    entry["fg"] = np.flatnonzero(flat > 0).astype(dtype)
    entry["bg"] = np.flatnonzero(flat == 0).astype(dtype)
    if entry["fg"].size == 0:
        entry["fg"] = entry["bg"]


#: the arrays of a prepared training volume, each spilled to ``<key>.npy``
VOLUME_ARRAYS = ("image", "label", "weight", "fg", "bg")


def spill_volume(entry: dict, folder: Path) -> dict:
    """Write a prepared volume's arrays (:data:`VOLUME_ARRAYS`) to ``folder/<key>.npy``.

    Returns:
        ``{"case", "files": {key: path}}``: what :func:`open_volume` reads back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key in VOLUME_ARRAYS:
        if key in entry:
            files[key] = folder / f"{key}.npy"
            np.save(files[key], np.ascontiguousarray(entry[key]))
    return {"case": entry["case"], "files": files}


def open_volume(record: dict) -> dict:
    """A spilled volume's arrays as read-only memory maps: a patch reads only its own pages from
    disk (or the page cache), and the maps close when the returned dict is dropped."""
    return {"case": record["case"], **{k: np.load(f, mmap_mode="r") for k, f in record["files"].items()}}


def spill_folder(output: Path) -> Path:
    """Where the training volumes are spilled while a model trains: a hidden folder in the output
    folder (or, before it exists, in its nearest existing parent), named after the output, removed
    when training ends, on an error, and by the next run after a kill."""
    output = Path(output).resolve()
    base = output if output.is_dir() else next((p for p in output.parents if p.is_dir()), Path("."))
    return base / f".semisam-volumes-{hashlib.sha1(str(output).encode()).hexdigest()[:10]}"


def load_training_data(ds: Dataset, labels: dict[str, Path], cases: list[str], norm: dict, folder: Path,
                       patch, quiet: bool = True, working_spacing=None, confidence: dict[str, Path] | None = None,
                       in_channels: int = 1) -> list[dict]:
    """Read, check and normalise every training volume (:func:`read_volume`), pad it to ``patch``,
    index its foreground and background (:func:`add_indices`) and spill it to ``folder/<n>/``
    (:func:`spill_volume`): one volume is in memory at a time. ``folder`` is emptied first and removed
    when a volume fails.

    Returns:
        one :func:`spill_volume` record per case, in the order of ``cases`` (:func:`open_volume` reads one).

    Raises:
        InputError: as :func:`read_volume` (nothing left in ``folder``).
    """
    shutil.rmtree(folder, ignore_errors=True)
    data = []
    try:
        for n, case in enumerate(progress(cases, desc="load", quiet=quiet)):
            entry = read_volume(ds, case, labels[case], norm, working_spacing, confidence, in_channels)
            pad_to_patch(entry, patch)
            add_indices(entry)
            data.append(spill_volume(entry, folder / f"{n:06d}"))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return data


#: ``--spatial-aug``'s random affine: rotation range (radians, each axis) and scale range (each axis)
SPATIAL_AUG_ROTATE = 0.26  # ~15 degrees
SPATIAL_AUG_SCALE = 0.15


def _transforms(cfg: dict, spatial_aug: float = 0.0, weighted: bool = False):
    """The MONAI training transforms of a preset ``cfg`` (module docstring), as one ``Compose``;
    ``weighted``: the volumes' ``"weight"`` maps move with their labels (trilinear under the affine)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    pos, neg = cfg["pos_neg"]
    ts = []
    index_keys = dict(fg_indices_key="fg", bg_indices_key="bg")
    keys, modes = (["image", "label", "weight"], ("bilinear", "nearest", "bilinear")) if weighted else \
        (["image", "label"], ("bilinear", "nearest"))
    if spatial_aug > 0:
        ts.append(RandAffined(keys=keys, prob=float(spatial_aug),
                              rotate_range=(SPATIAL_AUG_ROTATE,) * 3, scale_range=(SPATIAL_AUG_SCALE,) * 3,
                              mode=modes, padding_mode="border"))
        index_keys = {}  # the label moves: the crop finds its foreground again
    ts.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=list(cfg["patch"]),
                                     pos=pos, neg=neg, num_samples=1, **index_keys))
    for axis in cfg["flip_axes"]:
        ts.append(RandFlipd(keys=keys, prob=cfg["flip_prob"], spatial_axis=int(axis)))
    ts.append(RandScaleIntensityd(keys="image", factors=cfg["intensity_scale"], prob=cfg["intensity_prob"]))
    ts.append(RandShiftIntensityd(keys="image", offsets=cfg["intensity_shift"], prob=cfg["intensity_prob"]))
    return Compose(ts)


def draw_volumes(rng: np.random.Generator, n_volumes: int, size: int, template_share: float | None) -> np.ndarray:
    """Indices of the training volumes the next ``size`` patches come from (index 0 is the template).

    Args:
        rng: the stream to draw from.
        n_volumes: training volumes (the template first).
        size: patches to draw.
        template_share: None: uniform over the ``n_volumes``; else index 0 with probability
            ``template_share`` and uniform over 1 .. n_volumes - 1 otherwise (all 0 when the
            template is alone).

    Returns:
        (size,) int64.
    """
    if template_share is None or n_volumes == 1:
        return rng.integers(n_volumes, size=size)
    return np.where(rng.random(size) < template_share, 0, 1 + rng.integers(n_volumes - 1, size=size))


def _sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = current / length clipped to [0, 1] (Laine & Aila, ICLR 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class _TrainSetup:
    """Everything checked before training: the preset, the data, the record."""

    cfg: dict
    config: dict
    data: list
    record: StageRecord
    load_seconds: float
    spill: Path  # where ``data`` lies (:func:`spill_folder`), removed when training ends


def model_config(settings: TrainSettings, cfg: dict, ds: Dataset, template: str, cases: list[str]) -> dict:
    """The model's ``config.json`` content before training (what ``predict`` needs and how it was made)."""
    return {
        "format": "semisam-o1 model 1",
        "preset": settings.preset,
        "preset_params": cfg,
        "iterations": int(cfg["iterations"]),
        "ssl": settings.ssl,
        **({"w2s": dict(semi.PARAMETERS), "confidence": None if settings.confidence is None
            else str(settings.confidence.resolve())} if settings.ssl == "w2s" else {}),
        "net_class": "monai.networks.nets.UNet",
        "net": nets.net_params(cfg, ds.label_map.num_classes),
        "normalisation": dict(cfg["normalisation"]),
        "patch": list(cfg["patch"]),
        "spacing": None if cfg.get("spacing") is None else [float(x) for x in cfg["spacing"]],
        "largest_component": [int(c) for c in cfg.get("largest_component", [])],
        "label_map": {"values": list(ds.label_map.values), "names": list(ds.label_map.names)},
        "dataset": str(ds.root.resolve()),
        "labels": str(settings.labels.resolve()),
        "template": template,
        "training_cases": list(cases),
        "num_training_cases": len(cases),
        "seed": int(settings.seed),
        "round": int(settings.round),
        "template_share": settings.template_share,
        "spatial_aug": float(settings.spatial_aug),
        "loss": "monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)",
        "optimizer": f"AdamW(lr={cfg['lr']}, weight_decay={cfg['weight_decay']}), poly decay power 0.9",
        "model_selection": "last checkpoint: student weights after the final iteration (no label outside the "
                           "training labels is read)",
    }


def preset_config(settings: TrainSettings) -> dict:
    """The UNet preset, with a plan's decisions laid over it and ``--iterations`` over both.

    Raises:
        InputError: the plan file cannot be read or is not a plan.
    """
    cfg = nets.preset(settings.preset)
    cfg.setdefault("normalisation", dict(nets.NORMALISATION))
    if settings.plan is not None:
        try:
            cfg.update(unet_overrides(read_plan(settings.plan)))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{settings.plan}: not a readable plan file ({type(exc).__name__}: {exc})") from None
    if settings.iterations is not None:
        cfg["iterations"] = int(settings.iterations)
    return cfg


def prepare(settings: TrainSettings) -> _TrainSetup | dict:
    """Check every input and the output folder, and read the training data; nothing is written.

    Returns:
        the recorded summary (plus ``"skipped": True``) when the output folder already holds this
        finished model, else the :class:`_TrainSetup` to train.

    Raises:
        InputError: bad input (module docstring) or an output folder that is a file, is not
            writable, or holds a model from other settings or inputs (without ``overwrite``).
    """
    cfg = preset_config(settings)
    ds = Dataset(settings.input)
    if not settings.labels.is_dir():
        raise InputError(f"{settings.labels}: labels folder not found")
    template, cases = training_cases(ds, settings)
    if canonical_shape(ds.image_path(template))[2] == 1:  # 2D images: a 2D network
        cfg = nets.for_2d(cfg)
        channels = nets.cohort_channels(ds.image_path(c) for c in ds.cases)  # every image it will predict
        if channels != 1:  # an RGB cohort: the network sees the three colours
            cfg["in_channels"] = channels
    labels = label_paths(ds, settings.labels, template, cases)
    confidence = confidence_paths(settings.confidence, template, cases)
    record = open_stage(settings.output, "train", settings,
                        inputs={**stage_inputs(ds, template, cases, labels, confidence), "unet": digest(cfg)},
                        overwrite=settings.overwrite, redo_changed=settings.redo_changed)
    if record.finished:
        if not settings.quiet:
            print(f"train: {settings.output} is a finished model of these settings and inputs, skipped",
                  file=sys.stderr)
        return {**(record.summary() or {}), "skipped": True}
    t0 = time.time()
    spill = spill_folder(settings.output)
    try:
        data = load_training_data(ds, labels, cases, dict(cfg["normalisation"]), spill, cfg["patch"],
                                  quiet=settings.quiet, working_spacing=cfg.get("spacing"), confidence=confidence,
                                  in_channels=int(cfg.get("in_channels", 1)))
    except OSError as exc:  # a full disk or a read-only folder: name the user's output, not the hidden folder
        if exc.errno is not None and exc.errno not in WRITE_ERRNOS:
            raise
        code = exc.errno or errno.ENOSPC  # numpy's short write ("N requested and M written") has no errno
        raise OSError(code, os.strerror(code), f"{settings.output} (the training volumes it keeps while it "
                      f"trains, in {spill})") from None
    return _TrainSetup(cfg=cfg, config=model_config(settings, cfg, ds, template, cases), data=data, record=record,
                       load_seconds=time.time() - t0, spill=spill)


def build_networks(config: dict, settings: TrainSettings, dev):
    """The student (initial weights from the stream (seed, round, :data:`STREAM_INIT`)), its AdamW
    optimiser and, with ``--ssl mt``, the teacher (a frozen copy of the student).

    Returns:
        (net, optim, teacher or None), on ``dev``.
    """
    import torch

    cfg = config["preset_params"]
    torch.manual_seed(seeds.int_seed(settings.seed, settings.round, STREAM_INIT))
    net = nets.build_net(config["net"]).to(dev)
    optim = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    teacher = None
    if settings.ssl == "mt":
        teacher = nets.build_net(config["net"]).to(dev)
        teacher.load_state_dict(net.state_dict())
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.train()
    return net, optim, teacher


def load_checkpoint(path: Path, signature: str, net, optim, teacher, quiet: bool) -> tuple[int, list, float]:
    """Resume from ``path`` when it carries ``signature`` (the stage record's).

    Returns:
        (iterations done, log rows, training seconds so far); (0, [], 0.0) when there is no
        checkpoint of this signature.
    """
    import torch

    if not path.is_file():
        return 0, [], 0.0
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged checkpoint: start over
        if not quiet:
            print(f"train: ignoring unreadable {path} ({type(exc).__name__})", file=sys.stderr)
        return 0, [], 0.0
    if not isinstance(ck, dict) or ck.get("signature") != signature:
        return 0, [], 0.0
    net.load_state_dict(ck["net"])
    optim.load_state_dict(ck["optim"])
    if teacher is not None and ck.get("teacher") is not None:
        teacher.load_state_dict(ck["teacher"])
    if not quiet:
        print(f"train: resuming {path.parent} from iteration {int(ck['iteration'])}", file=sys.stderr)
    return int(ck["iteration"]), list(ck["log"]), float(ck["seconds"])


def seed_block(settings: TrainSettings, block: int, transforms) -> np.random.Generator:
    """Re-seed MONAI's transforms and torch for checkpoint block ``block`` and return the block's
    volume-draw stream: a resumed run draws exactly what an uninterrupted one would."""
    import torch

    s, r = settings.seed, settings.round
    transforms.set_random_state(seed=seeds.int_seed(s, r, STREAM_TRANSFORMS, block) % (2**32))
    torch.manual_seed(seeds.int_seed(s, r, STREAM_TORCH, block))
    return seeds.generator(s, r, STREAM_DRAWS, block)


def training_step(net, teacher, optim, loss_fn, x, y, it: int, n_iter: int, cfg: dict) -> tuple:
    """One optimiser step on the batch ``x`` (B, C, X, Y, Z) float32 / ``y`` (B, 1, X, Y, Z) int64.

    The loss is DiceCE plus, with a teacher, the mean teacher's consistency (mean squared
    difference of the softmaxes, weight ramped up as in the module docstring); the teacher is
    then moved towards the student (EMA, Tarvainen & Valpola 2017).

    Returns:
        (total loss, supervised loss, consistency) as floats, and the consistency weight.
    """
    import torch

    logits = net(x)
    sup = loss_fn(logits, y)
    cons = torch.zeros((), device=x.device)
    w = 0.0
    if teacher is not None:
        w = cfg["consistency"] * _sigmoid_rampup(it, cfg["consistency_rampup"] * n_iter)
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)
            prob_t = torch.softmax(teacher(x + noise), dim=1)
        cons = ((torch.softmax(logits, dim=1) - prob_t) ** 2).mean()
    loss = sup + w * cons
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    if teacher is not None:
        alpha = min(1.0 - 1.0 / (it + 1), cfg["ema_decay"])
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), net.parameters()):
                pt.mul_(alpha).add_(ps.detach(), alpha=1.0 - alpha)
            for bt, bs in zip(teacher.buffers(), net.buffers()):
                bt.copy_(bs)
    return float(loss.detach()), float(sup.detach()), float(cons.detach()), w


def w2s_step(net, hook, optim, x, y, weight) -> tuple:
    """One optimiser step of ``--ssl w2s`` (:func:`semisam_o1.stages.semi.w2s_losses`) on the batch
    ``x`` / ``y`` (as :func:`training_step`) with voxel weights ``weight`` (B, 1, X, Y, Z) or None.

    Returns:
        (total loss, supervised loss, consistency, confident share) as floats.
    """
    loss, sup, cons, share = semi.w2s_losses(net, hook, x, y, weight)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return float(loss.detach()), float(sup.detach()), float(cons.detach()), share


def fit(setup: _TrainSetup, settings: TrainSettings, dev) -> tuple:
    """Train from scratch (or from this signature's checkpoint) for the preset's iterations.

    Returns:
        (net, log rows, training seconds in all, wall seconds of this call, iterations done in this
        call, CPU seconds of this call).

    Raises:
        RuntimeError: the loss became NaN or infinite.
    """
    import torch
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    cfg, data, n_iter = setup.cfg, setup.data, int(setup.cfg["iterations"])
    weighted = bool(data) and "weight" in data[0]["files"]
    transforms = _transforms(cfg, settings.spatial_aug, weighted)
    set_track_meta(False)
    net, optim, teacher = build_networks(setup.config, settings, dev)
    hook = semi.BottleneckDropout().attach(net) if settings.ssl == "w2s" else None
    ckpt_path = settings.output / nets.CHECKPOINT_NAME
    start, log_rows, before = load_checkpoint(ckpt_path, setup.record.signature, net, optim, teacher, settings.quiet)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    ckpt_every = int(cfg.get("checkpoint_every") or 0)
    block = ckpt_every if ckpt_every > 0 else n_iter
    log_every = max(1, int(cfg.get("log_every", 1)))
    bar = tqdm(total=n_iter, initial=start, desc="train", unit="it", disable=settings.quiet, dynamic_ncols=True)
    t0, c0 = time.time(), time.process_time()
    rng = None
    net.train()
    for it in range(start, n_iter):
        if it == start or it % block == 0:
            rng = seed_block(settings, it // block, transforms)
        lr = cfg["lr"] * (1.0 - it / n_iter) ** 0.9
        for group in optim.param_groups:
            group["lr"] = lr
        with warnings.catch_warnings():  # torch wraps the read-only maps without writing to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            samples = [transforms(open_volume(data[i]))[0]
                       for i in draw_volumes(rng, len(data), cfg["batch_size"], settings.template_share)]
        x = torch.stack([torch.as_tensor(np.asarray(s["image"]), dtype=torch.float32) for s in samples]).to(dev)
        y = torch.stack([torch.as_tensor(np.asarray(s["label"])).long() for s in samples]).to(dev)
        share = ""
        if hook is not None:
            wt = None if not weighted else torch.stack(
                [torch.as_tensor(np.asarray(s["weight"]), dtype=torch.float32) for s in samples]).to(dev)
            lv, sup, cons, share = w2s_step(net, hook, optim, x, y, wt)
            w, share = 1.0, round(share, 6)
        else:
            lv, sup, cons, w = training_step(net, teacher, optim, loss_fn, x, y, it, n_iter, cfg)
        if not np.isfinite(lv):
            raise RuntimeError(f"training diverged at iteration {it + 1} (loss {lv})")
        if (it + 1) % log_every == 0 or it + 1 == n_iter:
            log_rows.append([it + 1, round(lv, 6), round(sup, 6), round(cons, 6), round(w, 6), lr,
                             round(before + time.time() - t0, 3), share])
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.4f}")
        if ckpt_every and (it + 1) % ckpt_every == 0 and it + 1 < n_iter:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"signature": setup.record.signature, "net": net.state_dict(),
                            "optim": optim.state_dict(), "teacher": None if teacher is None else teacher.state_dict(),
                            "iteration": it + 1, "log": log_rows, "seconds": before + time.time() - t0}, tmp)
    bar.close()
    if hook is not None:
        hook.detach()
    wall = time.time() - t0
    return net, log_rows, before + wall, wall, max(0, n_iter - start), time.process_time() - c0


def write_model(output: Path, net, config: dict, log_rows: list) -> None:
    """``model.pt`` (CPU state_dict), ``train_log.csv`` and ``config.json``, each atomically; then
    the checkpoint goes."""
    import torch

    with atomic_path(output / nets.WEIGHTS_NAME) as tmp:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(LOG_FIELDS)
    writer.writerows(log_rows)
    with atomic_path(output / nets.LOG_NAME) as tmp:
        tmp.write_text(buf.getvalue())
    write_json(output / nets.CONFIG_NAME, config)
    (output / nets.CHECKPOINT_NAME).unlink(missing_ok=True)


def train(settings: TrainSettings) -> dict:
    """Train a 3D UNet; see the module docstring for the method and the files.

    Args:
        settings: the stage's settings.

    Returns:
        the model's config (as in config.json, plus device, threads, times, final loss) and
        ``"skipped"`` (True when the folder already held this finished model).

    Raises:
        InputError: bad input (module docstring), found before anything is written.
        RuntimeError: the training diverged.
    """
    import torch

    nets.set_threads(settings.threads)
    dev = torch_device(settings.device)
    setup = prepare(settings)
    if isinstance(setup, dict):
        return setup
    if settings.overwrite or setup.record.redoing:  # (redoing: run, the training data changed)
        for name in (nets.CONFIG_NAME, nets.WEIGHTS_NAME, nets.LOG_NAME, nets.CHECKPOINT_NAME):
            (settings.output / name).unlink(missing_ok=True)
    setup.record.start()
    try:
        net, log_rows, seconds, wall, done, cpu_seconds = fit(setup, settings, dev)
    finally:
        shutil.rmtree(setup.spill, ignore_errors=True)
    log_every = max(1, int(setup.cfg.get("log_every", 1)))
    last = [r[1] for r in log_rows[-max(1, 50 // log_every):]]
    config = {**setup.config,
              "device": str(dev),
              "threads": int(torch.get_num_threads()),
              "load_seconds": round(setup.load_seconds, 3),
              "train_seconds": round(seconds, 3),
              "train_cpu_seconds_this_run": round(cpu_seconds, 3),
              "iterations_this_run": done,
              "iterations_per_second": round(done / max(wall, 1e-9), 4) if done else None,
              "final_loss": float(np.mean(last)) if last else None,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": {"semisam_o1": __version__, "torch": torch.__version__, "monai": _monai_version(),
                           "python": sys.version.split()[0]}}
    write_model(settings.output, net, config, log_rows)
    setup.record.finish(config)
    if not settings.quiet:
        print(f"train: {len(setup.data)} cases, {config['iterations']} iterations in {seconds:.0f} s -> "
              f"{settings.output}", file=sys.stderr)
    return {**config, "skipped": False}


def _monai_version() -> str:
    import monai

    return monai.__version__


SETTINGS = TrainSettings
STAGE = train
