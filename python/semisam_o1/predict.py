"""Sliding-window prediction with voxel-wise softmax entropy.

``semisam-o1 predict -i DATASET -m MODEL -o PRED [--cases ID ... | --split FILE
[--subset NAMES]] [--device auto|cpu|cuda] [--threads N] [--probabilities]
[--class-planes RULE] [--overwrite]``

For each case: the image is normalised with the model's own normalisation
(:func:`semisam_o1.nets.normalise`), run through
``monai.inferers.sliding_window_inference`` (window = the training patch,
Gaussian blending, zero padding for volumes smaller than the window), and the
softmax probabilities p (K classes) give

* ``PRED/<case>.nii.gz`` -- argmax label, integer NIfTI with the dataset's label
  values, in the input's voxel order with its affine and header
  (:func:`semisam_o1.io.write_label`); with ``--class-planes RULE`` (the
  ``class_planes.json`` that ``propagate`` learned from the template), its
  foreground is re-split into the rule's classes by slices
  (:func:`semisam_o1.class_planes.apply`; entropy and probabilities stay the
  network's);
* ``PRED/<case>_entropy.nii.gz`` -- voxel-wise entropy -sum_k p_k ln p_k in nats,
  float32, within [0, ln K] (:func:`semisam_o1.io.write_map`);
* ``PRED/<case>_probs.nii.gz`` -- with ``--probabilities``: float32
  (X, Y, Z, K) softmax probabilities;
* ``PRED/entropy.json`` -- ``{case: mean voxel entropy (nats)}`` over every
  case in PRED (mean over all voxels of the volume);
* ``PRED/stage.json`` -- the stage record (:mod:`semisam_o1.resume`): the
  signature of the settings and inputs (the model's weights SHA-256, the
  class-planes rule, every image's SHA-256) and the command that reproduces it.

Re-running with the same signature skips a finished folder and resumes an
unfinished one case by case; a PRED folder made from another model, rule or
images is refused unless ``--overwrite``. Every input is checked before the
folder is created; every file is written atomically. No label is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import nets
from .device import torch_device
from .errors import InputError
from .io import Dataset, canonical_shape, file_sha256, write_json, write_label, write_map
from .resume import StageRecord, open_stage
from .settings import CaseOptions, ComputeOptions, option, select_cases

ENTROPY_JSON = "entropy.json"


@dataclasses.dataclass(kw_only=True)
class PredictSettings(CaseOptions, ComputeOptions):
    """Settings of ``semisam-o1 predict`` (see the module docstring)."""

    model: Path = option(help="model folder written by `semisam-o1 train`", flags=("-m", "--model"), type=Path,
                         metavar="MODEL")
    output: Path = option(help="prediction folder to write", flags=("-o", "--output"), type=Path, metavar="PRED",
                          neutral=True)
    probabilities: bool = option(False, "also write <case>_probs.nii.gz (X, Y, Z, K)")
    class_planes: Path | None = option(None, "class_planes.json written by `semisam-o1 propagate`: re-split each "
                                       "label's foreground into the template's classes by slices along the "
                                       "rule's axis", type=Path, metavar="RULE")
    overwrite: bool = option(False, "re-predict every case, even in a folder made from another model or rule",
                             neutral=True)

    def __post_init__(self):
        super().__post_init__()
        self.model, self.output = Path(self.model), Path(self.output)
        if self.class_planes is not None:
            self.class_planes = Path(self.class_planes)


def label_file(output, case: str) -> Path:
    """``PRED/<case>.nii.gz``."""
    return Path(output) / f"{case}.nii.gz"


def entropy_file(output, case: str) -> Path:
    """``PRED/<case>_entropy.nii.gz``."""
    return Path(output) / f"{case}_entropy.nii.gz"


def probs_file(output, case: str) -> Path:
    """``PRED/<case>_probs.nii.gz``."""
    return Path(output) / f"{case}_probs.nii.gz"


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Voxel-wise Shannon entropy in nats of softmax probabilities.

    Args:
        probs: (K, X, Y, Z) float, summing to 1 over axis 0.

    Returns:
        (X, Y, Z) float32 within [0, ln K] (0 ln 0 taken as 0).
    """
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=0)
    return np.clip(h, 0.0, math.log(p.shape[0])).astype(np.float32)


def predict_volume(net, image: np.ndarray, config: dict, device) -> np.ndarray:
    """Softmax probabilities of one image (MONAI ``sliding_window_inference``, Gaussian blending).

    Args:
        net: the UNet in eval mode on ``device``.
        image: (X, Y, Z) canonical image array, raw intensities.
        config: the model's config.json (normalisation, patch, preset parameters).
        device: the torch.device of ``net``.

    Returns:
        (K, X, Y, Z) float32 probabilities.
    """
    import torch
    from monai.inferers import sliding_window_inference

    cfg = config["preset_params"]
    x = torch.as_tensor(nets.normalise(image, config["normalisation"])[None, None]).to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=list(config["patch"]), sw_batch_size=int(cfg["sw_batch_size"]),
                                          predictor=net, overlap=float(cfg["sw_overlap"]), mode="gaussian",
                                          padding_mode="constant", cval=0.0)
        probs = torch.softmax(logits.float(), dim=1)[0]
    return probs.cpu().numpy().astype(np.float32)


def _mean_entropy_from_file(path: Path) -> float:
    from .io import read_image

    return float(read_image(path).array.mean(dtype=np.float64))


@dataclasses.dataclass
class _Plan:
    """What :func:`prepare` checked: the dataset, cases, model, rule and the stage record."""

    ds: Dataset
    cases: list
    net: object
    config: dict
    rule: object
    record: StageRecord


def prepare(settings: PredictSettings, dev) -> _Plan:
    """Check the dataset, the cases, the model, the rule and the output folder; nothing is written.

    Returns:
        the :class:`_Plan` (its record says whether the folder is finished or reusable).

    Raises:
        InputError: an unknown case or an unreadable image header, a model that is not a finished model folder or was trained on
            other label values than the dataset's, an unreadable rule file, or an output folder
            that is a file, is not writable or holds predictions from another model, rule or
            images (without ``overwrite``).
    """
    from . import class_planes as planes

    ds = Dataset(settings.input)
    cases = select_cases(ds, settings)
    net, config = nets.load_model(settings.model, dev)
    if list(config["label_map"]["values"]) != list(ds.label_map.values):
        raise InputError(f"{settings.model}: trained on label values {config['label_map']['values']}, "
                         f"the dataset declares {list(ds.label_map.values)}")
    rule = planes.read(settings.class_planes) if settings.class_planes is not None else None
    for case in cases:  # a header that cannot be read stops here, before the folder exists
        canonical_shape(ds.image_path(case))
    inputs = {"model_sha256": file_sha256(settings.model / nets.WEIGHTS_NAME),
              "class_planes": None if rule is None else rule.to_json(),
              "images": {c: file_sha256(ds.image_path(c)) for c in cases}}
    record = open_stage(settings.output, "predict", settings, inputs=inputs, overwrite=settings.overwrite)
    return _Plan(ds=ds, cases=cases, net=net, config=config, rule=rule, record=record)


def predict_case(plan: _Plan, settings: PredictSettings, case: str, dev) -> float:
    """Predict one case and write its label, entropy map (and probabilities), each atomically.

    Returns:
        the case's mean voxel entropy (nats).
    """
    from . import class_planes as planes

    out = settings.output
    img = plan.ds.read_image(case)
    probs = predict_volume(plan.net, img.array, plan.config, dev)
    ent = entropy_map(probs)
    if settings.probabilities:
        write_map(probs_file(out, case), np.moveaxis(probs, 0, -1), img)
    write_map(entropy_file(out, case), ent, img)
    lab = np.argmax(probs, axis=0).astype(np.uint8)
    write_label(label_file(out, case), lab if plan.rule is None else planes.apply(lab, plan.rule), img,
                plan.ds.label_map)
    return float(ent.astype(np.float64).mean())


def _done(settings: PredictSettings, case: str) -> bool:
    out = settings.output
    return (label_file(out, case).is_file() and entropy_file(out, case).is_file()
            and (probs_file(out, case).is_file() or not settings.probabilities))


def _read_entropies(path: Path) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def predict(settings: PredictSettings) -> dict:
    """Predict labels and entropy maps; see the module docstring for the files.

    Args:
        settings: the stage's settings.

    Returns:
        ``"output"`` (str), ``"entropy"`` ({case: mean entropy, nats}), ``"predicted"`` /
        ``"skipped"`` (case counts of this call), ``"seconds"``, ``"device"``, ``"entropy_unit"``
        and ``"entropy_max"`` (ln K).

    Raises:
        InputError: see :func:`prepare`; found before the output folder is created.
    """
    from .progress import progress

    nets.set_threads(settings.threads)
    dev = torch_device(settings.device)
    plan = prepare(settings, dev)
    if plan.record.finished:
        summary = plan.record.summary() or {}
        return {**summary, "predicted": 0, "skipped": len(plan.cases)}
    plan.record.start()
    ent_path = settings.output / ENTROPY_JSON
    entropies = _read_entropies(ent_path) if plan.record.reuse and ent_path.is_file() else {}
    t0 = time.time()
    n_pred = n_skip = 0
    for case in progress(plan.cases, desc="predict", quiet=settings.quiet):
        if plan.record.reuse and not settings.overwrite and _done(settings, case):
            entropies.setdefault(case, _mean_entropy_from_file(entropy_file(settings.output, case)))
            n_skip += 1
            continue
        entropies[case] = predict_case(plan, settings, case, dev)
        n_pred += 1
        if n_pred % 25 == 0:
            write_json(ent_path, entropies)
    write_json(ent_path, entropies)
    seconds = time.time() - t0
    summary = {"output": str(settings.output), "entropy": {c: entropies[c] for c in plan.cases},
               "predicted": n_pred, "skipped": n_skip, "seconds": round(seconds, 3), "device": str(dev),
               "entropy_unit": "nats", "entropy_max": math.log(plan.ds.label_map.num_classes)}
    plan.record.finish(summary)
    if not settings.quiet:
        print(f"predict: {n_pred} cases predicted, {n_skip} already done, {seconds:.0f} s -> {settings.output}",
              file=sys.stderr)
    return summary


SETTINGS = PredictSettings
STAGE = predict
