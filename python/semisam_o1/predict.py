"""Sliding-window prediction with voxel-wise softmax entropy.

``semisam-o1 predict -i DATASET -m MODEL -o PRED [--cases ID ... | --split FILE
[--subset NAMES]] [--device cpu|cuda|auto] [--threads N] [--probabilities]
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
* ``PRED/predict.json`` -- the model folder, its weights' SHA-256, the command.

Cases whose outputs already exist are skipped (resume); a PRED folder written
by another model (different weights hash) is an error unless ``--overwrite``.
Every file is written atomically. No label is read.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import nets
from .errors import InputError
from .io import Dataset, write_json, write_label, write_map

ENTROPY_JSON = "entropy.json"
PREDICT_JSON = "predict.json"


def label_file(output, case: str) -> Path:
    return Path(output) / f"{case}.nii.gz"


def entropy_file(output, case: str) -> Path:
    return Path(output) / f"{case}_entropy.nii.gz"


def probs_file(output, case: str) -> Path:
    return Path(output) / f"{case}_probs.nii.gz"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--dataset", required=True, default=argparse.SUPPRESS, help="MSD / nnU-Net dataset folder")
    parser.add_argument("-m", "--model", required=True, default=argparse.SUPPRESS, help="model folder written by `semisam-o1 train`")
    parser.add_argument("-o", "--output", required=True, default=argparse.SUPPRESS, help="prediction folder to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cases", nargs="+", default=argparse.SUPPRESS, metavar="ID", help="case ids (default: all, or the split's subsets)")
    group.add_argument("--split", default=argparse.SUPPRESS, help="split JSON; predicts the cases of --subset")
    parser.add_argument("--subset", default=argparse.SUPPRESS, help="comma-separated subsets of --split (default: all of them)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch CPU threads (default: torch's)")
    parser.add_argument("--probabilities", action="store_true", help="also write <case>_probs.nii.gz (X, Y, Z, K)")
    parser.add_argument("--class-planes", default=argparse.SUPPRESS, metavar="RULE",
                        help="class_planes.json written by `semisam-o1 propagate`: re-split each label's foreground "
                             "into the template's classes by slices along the rule's axis")
    parser.add_argument("--overwrite", action="store_true", help="re-predict cases already in PRED")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    opt = lambda name: getattr(args, name, None)  # noqa: E731 (argparse.SUPPRESS leaves unset options out)
    if opt("subset") and not opt("split"):
        raise InputError("--subset needs --split")
    command = "semisam-o1 " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    predict(args.dataset, args.model, args.output, cases=opt("cases"), split=opt("split"), subset=opt("subset"),
            device=args.device, threads=opt("threads"), probabilities=args.probabilities,
            class_planes=opt("class_planes"), overwrite=args.overwrite, quiet=args.quiet, command=command)
    return 0


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Voxel-wise Shannon entropy in nats of softmax probabilities.

    probs : (K, X, Y, Z) float, summing to 1 over axis 0.
    Returns (X, Y, Z) float32 within [0, ln K] (0 ln 0 taken as 0).
    """
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=0)
    return np.clip(h, 0.0, math.log(p.shape[0])).astype(np.float32)


def predict_volume(net, image: np.ndarray, config: dict, device) -> np.ndarray:
    """Softmax probabilities (K, X, Y, Z) float32 of one canonical image array (X, Y, Z)."""
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


def predict(
    dataset,
    model,
    output,
    *,
    cases=None,
    split=None,
    subset=None,
    device: str | None = "auto",
    threads: int | None = None,
    probabilities: bool = False,
    class_planes=None,
    overwrite: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> dict:
    """Predict labels and entropy maps; see the module docstring for the files.

    Returns
    -------
    dict with ``"output"`` (str), ``"entropy"`` ({case: mean entropy, nats} for the
    requested cases), ``"predicted"`` / ``"skipped"`` (case counts) and ``"seconds"``.

    ``class_planes``: path of a rule written by ``propagate`` (``class_planes.json``) or a
    :class:`semisam_o1.class_planes.ClassPlanes`; the written labels get its structure.

    Raises InputError for an unknown case, a model that is not a finished model
    folder, a model trained on other label values than the dataset's, a PRED
    folder written by another model or with another class-planes rule (without
    ``overwrite``), or an unreadable rule file.
    """
    from . import class_planes as planes
    import torch
    from tqdm.auto import tqdm

    output = Path(output)
    if command is None:
        command = (f"semisam_o1.predict.predict({str(dataset)!r}, {str(model)!r}, {str(output)!r}, cases={cases!r}, "
                   f"split={None if split is None else str(split)!r}, subset={subset!r}, device={device!r})")
    nets.set_threads(threads)
    dev = nets.resolve_device(device)
    ds = Dataset(dataset)
    chosen = ds.select(cases=cases, split=split, subset=subset)
    net, config = nets.load_model(model, dev)
    if list(config["label_map"]["values"]) != list(ds.label_map.values):
        raise InputError(f"{model}: trained on label values {config['label_map']['values']}, "
                         f"the dataset declares {list(ds.label_map.values)}")
    sha = nets.file_sha256(Path(model) / nets.WEIGHTS_NAME)
    rule = planes.read(class_planes) if isinstance(class_planes, (str, Path)) else class_planes
    rule_json = None if rule is None else rule.to_json()

    meta_path = output / PREDICT_JSON
    if meta_path.is_file() and not overwrite:
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        if old.get("model_sha256") not in (None, sha):
            raise InputError(f"{output}: holds predictions of another model ({old.get('model')}); "
                             "use another folder or --overwrite")
        if old and old.get("class_planes") != rule_json:
            raise InputError(f"{output}: holds predictions made with class planes {old.get('class_planes')}, "
                             f"this run asks for {rule_json}; use another folder or --overwrite")
    output.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, {"model": str(Path(model).resolve()), "model_sha256": sha, "dataset": str(ds.root.resolve()),
                           "class_planes": rule_json, "command": command, "entropy_unit": "nats",
                           "entropy_max": math.log(ds.label_map.num_classes)})

    ent_path = output / ENTROPY_JSON
    entropies: dict[str, float] = {}
    if ent_path.is_file() and not overwrite:
        try:
            entropies = {str(k): float(v) for k, v in json.loads(ent_path.read_text()).items()}
        except (ValueError, AttributeError, TypeError):
            entropies = {}

    t0 = time.time()
    n_pred = n_skip = 0
    for i, case in enumerate(tqdm(chosen, desc="predict", unit="case", disable=quiet, dynamic_ncols=True)):
        lab_p, ent_p, prob_p = label_file(output, case), entropy_file(output, case), probs_file(output, case)
        if not overwrite and lab_p.is_file() and ent_p.is_file() and (prob_p.is_file() or not probabilities):
            if case not in entropies:
                entropies[case] = _mean_entropy_from_file(ent_p)
            n_skip += 1
            continue
        img = ds.read_image(case)
        probs = predict_volume(net, img.array, config, dev)
        ent = entropy_map(probs)
        if probabilities:
            write_map(prob_p, np.moveaxis(probs, 0, -1), img)
        write_map(ent_p, ent, img)
        lab = np.argmax(probs, axis=0).astype(np.uint8)
        write_label(lab_p, lab if rule is None else planes.apply(lab, rule), img, ds.label_map)
        entropies[case] = float(ent.astype(np.float64).mean())
        n_pred += 1
        if n_pred % 25 == 0:
            write_json(ent_path, entropies)
    write_json(ent_path, entropies)
    seconds = time.time() - t0
    if not quiet:
        print(f"predict: {n_pred} cases predicted, {n_skip} already done, {seconds:.0f} s -> {output}", file=sys.stderr)
    return {"output": str(output), "entropy": {c: entropies[c] for c in chosen}, "predicted": n_pred,
            "skipped": n_skip, "seconds": round(seconds, 3), "device": str(dev)}
