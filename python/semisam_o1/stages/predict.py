"""Sliding-window prediction with voxel-wise softmax entropy.

``semisam-o1 predict -i DATASET -m MODEL -o PRED [--cases ID ... | --split FILE
[--subset NAMES]] [--device auto|cpu|cuda] [--threads N] [--probabilities]
[--class-planes RULE] [--overwrite]``

For each case: the image (its RGB for a model of 3 input channels, trained on a colour 2D cohort;
a greyscale image is then refused before anything is written) is normalised with the model's own
normalisation (:func:`semisam_o1.stages.nets.normalise_channels`), run through
``monai.inferers.sliding_window_inference`` (window = the training patch,
Gaussian blending, zero padding for volumes smaller than the window), and the
softmax probabilities p (K classes) give

* ``PRED/<case>.nii.gz`` -- argmax label, integer NIfTI with the dataset's label
  values, in the input's voxel order with its affine and header
  (:func:`semisam_o1.data.images.write_label`); each class the model's plan lists under
  ``largest_component`` keeps only its largest 26-connected component; with
  ``--class-planes RULE`` (the ``class_planes.json`` that ``propagate`` learned from the template), its
  foreground is re-split into the rule's classes by slices
  (:func:`semisam_o1.methods.class_planes.apply`; entropy and probabilities stay the
  network's);
* ``PRED/<case>_entropy.nii.gz`` -- voxel-wise entropy -sum_k p_k ln p_k in nats,
  float32, within [0, ln K] (:func:`semisam_o1.data.images.write_map`);
* ``PRED/<case>_probs.nii.gz`` -- with ``--probabilities``: float32
  (X, Y, Z, K) softmax probabilities;
* ``PRED/entropy.json`` -- ``{case: mean voxel entropy (nats)}`` over every
  case in PRED (mean over all voxels of the volume);
* ``PRED/stage.json`` -- the stage record (:mod:`semisam_o1.core.resume`): the
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
from typing import Callable

import numpy as np

from semisam_o1.core.device import torch_device
from semisam_o1.core.engine import EngineOptions, run_cases
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import file_sha256, write_json
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import StageRecord, open_stage
from semisam_o1.core.settings import CaseOptions, ComputeOptions, option, redo_changed_option, select_cases
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.folder_input import case_id, list_images, place_file, write_label_like
from semisam_o1.data.images import (
    ENDINGS,
    affine_spacing,
    canonical_shape,
    ending,
    geometry,
    is_nifti,
    read_image,
    write_label,
    write_map,
)
from semisam_o1.data.labels import LabelMap
from semisam_o1.methods import class_planes as planes
from semisam_o1.methods.components import largest_component
from semisam_o1.stages import nets
from semisam_o1.stages.bundle import bundle_rule, read_bundle

ENTROPY_JSON = "entropy.json"
# A scan whose voxel size differs from the bundle's spacing_mm by more than this factor on an axis
# gets one warning line (the network saw structures at another scale in voxels).
SPACING_WARN_RATIO = 2.0


@dataclasses.dataclass(kw_only=True)
class PredictSettings(CaseOptions, ComputeOptions, EngineOptions):
    """Settings of ``semisam-o1 predict`` (see the module docstring)."""

    input: Path = option(help="an MSD / nnU-Net dataset folder, a plain folder of scans (.nii.gz, .nii, .nrrd, "
                         ".mha) or one scan", flags=("-i", "--input"), type=Path, metavar="DATASET|DIR|FILE")
    model: Path = option(help="model folder written by `semisam-o1 train`, or a run's bundle (WORK/final/model)",
                         flags=("-m", "--model"), type=Path, metavar="MODEL")
    output: Path = option(help="prediction folder to write", flags=("-o", "--output"), type=Path, metavar="PRED",
                          neutral=True)
    mirror: bool = option(False, "average the softmax over mirrored copies of the image along the axes the model "
                          "was trained to flip (config flip_axes; 2 passes for the default [0])")
    probabilities: bool = option(False, "also write <case>_probs.nii.gz (X, Y, Z, K)")
    class_planes: Path | None = option(None, "class_planes.json written by `semisam-o1 propagate`: re-split each "
                                       "label's foreground into the template's classes by slices along the "
                                       "rule's axis", type=Path, metavar="RULE")
    overwrite: bool = option(False, "re-predict every case, even in a folder made from another model or rule",
                             neutral=True)
    redo_changed: bool = redo_changed_option()

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


def mirror_sets(config: dict) -> list[tuple[int, ...]]:
    """The flips of test-time mirroring: every subset of the model's training ``flip_axes``
    (canonical axes), the empty one first (nnU-Net's test-time mirroring, Isensee et al.,
    Nat. Methods 2021, restricted to the flips the model saw)."""
    from itertools import combinations

    axes = [int(a) for a in config["preset_params"].get("flip_axes", [])]
    return [c for n in range(len(axes) + 1) for c in combinations(axes, n)]


def predict_volume(net, image: np.ndarray, config: dict, device, mirror: bool = False,
                   spacing=None) -> np.ndarray:
    """Softmax probabilities of one image (MONAI ``sliding_window_inference``, Gaussian blending).

    Args:
        net: the UNet in eval mode on ``device``.
        image: (X, Y, Z) canonical image array, raw intensities, or (C, X, Y, Z) the network's input
            channels (:func:`semisam_o1.stages.nets.image_channels`; each normalised on its own).
        config: the model's config.json (normalisation, patch, preset parameters, and ``spacing``:
            the working spacing in mm the network was trained at, or None for the image's own).
        device: the torch.device of ``net``.
        mirror: average the softmax over the flips of :func:`mirror_sets` (each flipped back).
        spacing: (3,) mm of ``image``; needed when the model has a working spacing: the image is
            resampled to it and the probabilities back to the image's grid
            (:func:`semisam_o1.stages.nets.resample`, trilinear).

    Returns:
        (K, X, Y, Z) float32 probabilities on the image's own grid.

    Raises:
        ValueError: a model with a working spacing and no ``spacing`` given.
    """
    import torch
    from monai.inferers import sliding_window_inference

    cfg = config["preset_params"]
    image = np.asarray(image)
    norm = nets.normalise_channels(image if image.ndim == 4 else image[None], config["normalisation"])
    grid = norm.shape[1:]
    working = config.get("spacing")
    if working is not None:
        if spacing is None:
            raise ValueError("the model works at a resampled spacing: give the image's spacing")
        norm = nets.resample(norm, nets.working_shape(grid, spacing, working), "trilinear")
    x = torch.as_tensor(norm[None]).to(device)
    flips = mirror_sets(config) if mirror else [()]
    total = None
    with torch.inference_mode():
        for axes in flips:
            dims = [2 + a for a in axes]
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(xi, roi_size=list(config["patch"]),
                                              sw_batch_size=int(cfg["sw_batch_size"]), predictor=net,
                                              overlap=float(cfg["sw_overlap"]), mode="gaussian",
                                              padding_mode="constant", cval=0.0)
            probs = torch.softmax(logits.float(), dim=1)[0]
            probs = torch.flip(probs, [a + 1 for a in axes]) if axes else probs
            total = probs if total is None else total + probs
    probs = (total / len(flips)).cpu().numpy().astype(np.float32)
    if working is not None:
        probs = nets.resample(probs, grid, "trilinear")
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
    return probs


def in_channels(config: dict) -> int:
    """The model's input channels (``config.json`` ``net.in_channels``; 1 for a model without it)."""
    return int(config["net"].get("in_channels", 1))


def model_input(volume, config: dict) -> np.ndarray:
    """The (C, X, Y, Z) raw input of the model ``config`` for an image (its intensities, or its RGB
    channels for a three-channel model: :func:`semisam_o1.stages.nets.image_channels`).

    Raises:
        InputError: a greyscale image for a three-channel model (one line naming the file).
    """
    return nets.image_channels(volume, in_channels(config))


def labels_from_probs(probs: np.ndarray, config: dict, rule=None) -> np.ndarray:
    """A prediction's label: argmax over classes, the largest 26-connected component of each class
    in the model's ``largest_component`` (the plan's decision, :mod:`semisam_o1.methods.components`; none
    for a model without it), then the class-planes re-split when ``rule`` is given -- round 0's
    order (:func:`semisam_o1.methods.template_vote.pseudo_label`).

    Args:
        probs: (K, X, Y, Z) float softmax probabilities.
        config: the model's config.json.
        rule: a :class:`semisam_o1.methods.class_planes.ClassPlanes`, or None.

    Returns:
        (X, Y, Z) uint8 class indices.
    """

    lab = largest_component(np.argmax(probs, axis=0).astype(np.uint8), config.get("largest_component", []))
    return lab if rule is None else planes.apply(lab, rule)


def _mean_entropy_from_file(path: Path) -> float:
    return float(read_image(path).array.mean(dtype=np.float64))


@dataclasses.dataclass
class _PredictSetup:
    """What :func:`prepare` checked: the dataset, cases, model, rule and the stage record."""

    ds: Dataset
    cases: list
    net: object
    config: dict
    rule: object
    record: StageRecord


def prepare(settings: PredictSettings, dev) -> _PredictSetup:
    """Check the dataset, the cases, the model, the rule and the output folder; nothing is written.

    Returns:
        the :class:`_PredictSetup` (its record says whether the folder is finished or reusable).

    Raises:
        InputError: an unknown case or an unreadable image header, a model that is not a finished model folder or was trained on
            other label values than the dataset's, an unreadable rule file, or an output folder
            that is a file, is not writable or holds predictions from another model, rule or
            images (without ``overwrite``).
    """

    ds = Dataset(settings.input)
    cases = select_cases(ds, settings)
    net, config = nets.load_model(settings.model, dev)
    settings = _with_bundle_rule(settings)
    if list(config["label_map"]["values"]) != list(ds.label_map.values):
        raise InputError(f"{settings.model}: trained on label values {config['label_map']['values']}, "
                         f"the dataset declares {list(ds.label_map.values)}")
    rule = planes.read(settings.class_planes) if settings.class_planes is not None else None
    for case in cases:  # a header that cannot be read, or a greyscale image for an RGB model, stops here
        canonical_shape(ds.image_path(case))
        nets.check_channels(ds.image_path(case), in_channels(config))
    inputs = {"model_sha256": file_sha256(settings.model / nets.WEIGHTS_NAME),
              "class_planes": None if rule is None else rule.to_json(),
              "images": {c: file_sha256(ds.image_path(c)) for c in cases}}
    record = open_stage(settings.output, "predict", settings, inputs=inputs, overwrite=settings.overwrite,
                        redo_changed=settings.redo_changed, per_case="images")
    return _PredictSetup(ds=ds, cases=cases, net=net, config=config, rule=rule, record=record)


def predict_case(setup: _PredictSetup, settings: PredictSettings, case: str, dev) -> float:
    """Predict one case and write its label, entropy map (and probabilities), each atomically.

    Returns:
        the case's mean voxel entropy (nats).
    """
    out = settings.output
    img = setup.ds.read_image(case)
    probs = predict_volume(setup.net, model_input(img, setup.config), setup.config, dev, mirror=settings.mirror,
                           spacing=img.spacing)
    ent = entropy_map(probs)
    if settings.probabilities:
        write_map(probs_file(out, case), np.moveaxis(probs, 0, -1), img)
    write_map(entropy_file(out, case), ent, img)
    write_label(label_file(out, case), labels_from_probs(probs, setup.config, setup.rule), img, setup.ds.label_map)
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
    from functools import partial

    nets.set_threads(settings.threads)
    dev = torch_device(settings.device)
    if input_kind(settings.input) != "dataset":
        if settings.engine != "local":
            raise InputError(f"{settings.input}: --engine {settings.engine} predicts a dataset folder (with "
                             "dataset.json); plain scans are predicted with --engine local")
        return predict_files(settings, dev)
    setup = prepare(settings, dev)
    if setup.record.finished:
        summary = setup.record.summary() or {}
        return {**summary, "predicted": 0, "skipped": len(setup.cases)}
    setup.record.drop_outputs(lambda c: (label_file(settings.output, c), entropy_file(settings.output, c),
                                         probs_file(settings.output, c)), setup.cases)
    setup.record.start()
    ent_path = settings.output / ENTROPY_JSON
    entropies = _read_entropies(ent_path) if setup.record.reuse and ent_path.is_file() else {}
    t0 = time.time()
    n_pred = n_skip = 0
    todo = []
    for case in setup.cases:
        if setup.record.reuse and not settings.overwrite and _done(settings, case):
            entropies.setdefault(case, _mean_entropy_from_file(entropy_file(settings.output, case)))
            n_skip += 1
        else:
            todo.append(case)
    # settings.engine: here, or on Ray actors that load the network once and call predict_case too
    worker = partial(predict_worker, setup=dataclasses.replace(setup, net=None, record=None))
    results = run_cases(settings, todo, lambda case: predict_case(setup, settings, case, dev), worker)
    for case, ent in progress(results, desc="predict", quiet=settings.quiet, total=len(todo)):
        if isinstance(ent, InputError):  # as the local engine always did: the first bad case stops the stage
            results.close()
            raise ent
        entropies[case] = ent
        n_pred += 1
        if n_pred % 25 == 0:
            write_json(ent_path, entropies)
    write_json(ent_path, entropies)
    seconds = time.time() - t0
    summary = {"output": str(settings.output), "entropy": {c: entropies[c] for c in setup.cases},
               "predicted": n_pred, "skipped": n_skip, "seconds": round(seconds, 3), "device": str(dev),
               "entropy_unit": "nats", "entropy_max": math.log(setup.ds.label_map.num_classes)}
    setup.record.finish(summary)
    if not settings.quiet:
        print(f"predict: {n_pred} cases predicted, {n_skip} already done, {seconds:.0f} s -> {settings.output}",
              file=sys.stderr)
    return summary


# --------------------------------------------------------------------------- plain folders and files


def _plain_cases(settings: PredictSettings) -> dict[str, Path]:
    """Case id -> scan for ``-i`` a plain folder or one file (``--cases`` narrows a folder).

    Raises:
        InputError: no scan, an unsupported file, ``--split`` or ``--probabilities`` given, an
            unknown ``--cases`` id, or an output that would overwrite an input.
    """

    src = Path(settings.input)
    if settings.split is not None:
        raise InputError(f"{src}: --split applies to a dataset folder (with dataset.json), not to plain scans")
    if settings.probabilities:
        raise InputError(f"{src}: --probabilities is written for a dataset folder only")
    if src.is_file():
        if ending(src) is None:
            raise InputError(f"{src}: not a scan file ({', '.join(ENDINGS)} expected)")
        found = {case_id(src): src}
    else:
        found = list_images(src, "-i")
    if settings.cases:
        unknown = [c for c in settings.cases if c not in found]
        if unknown:
            raise InputError(f"{src}: no scan named {unknown[0]}")
        found = {c: found[c] for c in settings.cases}
    out = Path(settings.output).resolve()
    for p in found.values():
        if (out / p.name).resolve() == p.resolve():
            raise InputError(f"{settings.output}: writing the labels there would overwrite the scans; use another -o")
    return found


def _read_scan(path: Path, tmp: Path):
    """The scan as a :class:`semisam_o1.data.images.Volume` (.nrrd / .mha through a NIfTI conversion in ``tmp``)."""

    return read_image(path if is_nifti(path) else place_file(path, tmp, "scan"))


def _predict_file(setup: _PredictSetup, settings: PredictSettings, case: str, source: Path, label_map, dev) -> float:
    """Predict one scan and write ``PRED/<scan name>`` in its format and grid; returns its mean entropy."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        img = _read_scan(source, Path(tmp))
        probs = predict_volume(setup.net, model_input(img, setup.config), setup.config, dev, mirror=settings.mirror,
                               spacing=img.spacing)
        lab = labels_from_probs(probs, setup.config, setup.rule)
        target = Path(settings.output) / source.name
        if is_nifti(source):
            write_label(target, lab, img, label_map)
        else:
            write_label_like(write_label(Path(tmp) / "label.nii.gz", lab, img, label_map), source, target)
    return float(entropy_map(probs).astype(np.float64).mean())


def _warn_if_spacing_differs(path: Path, affine: np.ndarray, expected) -> None:
    """One warning line when the scan's voxel spacing (mm, canonical axes, from ``affine``) differs
    from the bundle's ``spacing_mm`` (``expected``; None: no check) by more than
    :data:`SPACING_WARN_RATIO` on any axis."""
    if not expected:
        return
    spacing = affine_spacing(affine)
    ref = np.asarray(expected, dtype=np.float64)
    if np.all(np.maximum(spacing / ref, ref / spacing) <= SPACING_WARN_RATIO):
        return
    fmt = lambda v: " x ".join(f"{x:.3g}" for x in v)  # noqa: E731
    print(f"semisam-o1 predict: warning: {path}: voxel spacing {fmt(spacing)} mm differs from the model's "
          f"{fmt(ref)} mm by more than {SPACING_WARN_RATIO:g}x on an axis; check its labels (resample the scan "
          "to match)", file=sys.stderr, flush=True)


def _prepare_files(settings: PredictSettings, dev) -> tuple[_PredictSetup, dict[str, Path], object]:
    """Check scans, model, rule and output (nothing written); returns the setup, the scans and the label map."""

    scans = _plain_cases(settings)
    net, config = nets.load_model(settings.model, dev)
    settings = _with_bundle_rule(settings)
    rule = planes.read(settings.class_planes) if settings.class_planes is not None else None
    label_map = LabelMap.from_values(config["label_map"]["values"], config["label_map"]["names"])
    expected = (read_bundle(settings.model) or {}).get("spacing_mm")
    for path in scans.values():
        nets.check_channels(path, in_channels(config))
        _warn_if_spacing_differs(path, geometry(path)[1], expected)
    inputs = {"model_sha256": file_sha256(settings.model / nets.WEIGHTS_NAME),
              "class_planes": None if rule is None else rule.to_json(),
              "images": {c: file_sha256(p) for c, p in scans.items()}}
    record = open_stage(settings.output, "predict", settings, inputs=inputs, overwrite=settings.overwrite)
    return _PredictSetup(ds=None, cases=list(scans), net=net, config=config, rule=rule, record=record), scans, label_map


def predict_files(settings: PredictSettings, dev) -> dict:
    """:func:`predict` for ``-i`` a plain folder of scans or one scan: ``PRED/<scan name>`` per scan
    (the scan's format, grid and affine), ``PRED/entropy.json`` and the stage record; no entropy maps.

    Returns:
        ``"output"``, ``"labels"`` ({case: file}), ``"entropy"`` ({case: mean nats}),
        ``"seconds_per_case"`` ({case: s}), ``"predicted"`` / ``"skipped"``, ``"seconds"``,
        ``"device"``, ``"mirror"``.
    """

    setup, scans, label_map = _prepare_files(settings, dev)
    labels = {c: str(Path(settings.output) / p.name) for c, p in scans.items()}
    if setup.record.finished:
        return {**(setup.record.summary() or {}), "predicted": 0, "skipped": len(scans)}
    setup.record.start()
    ent_path = settings.output / ENTROPY_JSON
    entropies = _read_entropies(ent_path) if setup.record.reuse and ent_path.is_file() else {}
    per_case: dict[str, float] = {}
    t0 = time.time()
    bar = progress(list(scans), desc="predict", quiet=settings.quiet)
    for case in bar:
        if setup.record.reuse and not settings.overwrite and Path(labels[case]).is_file() and case in entropies:
            continue
        t = time.perf_counter()
        entropies[case] = _predict_file(setup, settings, case, scans[case], label_map, dev)
        per_case[case] = round(time.perf_counter() - t, 3)
        write_json(ent_path, entropies)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(s_per_case=f"{per_case[case]:.1f}")
    summary = {"output": str(settings.output), "labels": labels, "entropy": {c: entropies[c] for c in scans},
               "seconds_per_case": per_case, "predicted": len(per_case), "skipped": len(scans) - len(per_case),
               "seconds": round(time.time() - t0, 3), "device": str(dev), "mirror": bool(settings.mirror)}
    setup.record.finish(summary)
    if not settings.quiet:
        mean = sum(per_case.values()) / max(len(per_case), 1)
        print(f"predict: {len(per_case)} scans in {summary['seconds']:.0f} s ({mean:.1f} s per case) -> "
              f"{settings.output}", file=sys.stderr)
    return summary


def input_kind(path: Path) -> str:
    """``"dataset"`` (a folder with dataset.json), ``"folder"`` (a plain folder) or ``"file"``.

    Raises:
        InputError: ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        return "dataset" if (path / "dataset.json").is_file() else "folder"
    if path.is_file():
        return "file"
    raise InputError(f"{path}: -i not found (a dataset folder, a folder of scans or one scan)")


def _with_bundle_rule(settings: PredictSettings) -> PredictSettings:
    """``settings`` with the bundle's class-planes rule when the model is a bundle that carries one
    and no ``--class-planes`` was given."""

    if settings.class_planes is None:
        rule = bundle_rule(settings.model)
        if rule is not None:
            return dataclasses.replace(settings, class_planes=rule)
    return settings



# --------------------------------------------------------------------------- the Ray actor


def predict_worker(settings, setup) -> Callable[[str], float]:
    """A predict actor's case function (runs once per actor): loads the network once on the
    actor's device and predicts each case with ``predict.predict_case``.

    Args:
        settings: the actor's :class:`semisam_o1.stages.predict.PredictSettings`.
        setup: the driver's ``predict._PredictSetup`` without its network and record.

    Returns:
        ``fn(case) -> mean voxel entropy (nats)``.
    """

    nets.set_threads(settings.threads)
    dev = torch_device(settings.device)
    net, _ = nets.load_model(settings.model, dev)
    setup = dataclasses.replace(setup, net=net)
    return lambda case: predict_case(setup, settings, case, dev)



SETTINGS = PredictSettings
STAGE = predict
