"""Train a MONAI 3D UNet from scratch on pseudo-labels (the template keeps its real label).

``semisam-o1 train -i DATASET -l LABELS --template ID [--cases ID ... | --split FILE]
-o MODEL [--ssl none|mt|uamt] [--preset quick|cpu|paper] [--iterations N] [--template-share F]
[--spatial-aug P] [--device cpu|cuda|auto] [--seed S] [--threads N] [--overwrite]``

What is read (the honest one-label protocol)
    The template's label comes from the dataset (``labelsTr``); every other
    training case's label comes from the LABELS folder (pseudo-labels, one
    NIfTI per case, ``<case>.nii.gz`` or ``<case>.nii``). No other label is
    read. With ``--split`` the training cases are the split's ``template`` and
    ``unlabeled`` cases, never ``test``. Without ``--cases``/``--split`` they
    are the template and every dataset case with a file in LABELS.

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
    :func:`semisam_o1.nets.normalise` (0.5/99.5 percentile clip + z-score),
    the same function ``predict`` uses. All volumes are kept in memory.
    Each patch comes from a training volume drawn uniformly, or, with
    ``--template-share F``, from the template (the one real label) with
    probability F and uniformly from the pseudo-labelled volumes otherwise.

Spatial augmentation and pseudo-labels (measured on MSD Hippocampus)
    A single UNet trained on pseudo-labels gains from ``--spatial-aug 0.5``
    (mean foreground test Dice: +0.0015 to +0.0037 in four scratch models;
    the loop's round-1 models +0.003 on average over four seeds), one trained
    on the real labels does not (the "noisy student" effect, Xie et al., CVPR
    2020); but ``run``'s whole loop with it in every round ends no better
    (four seeds: 0.774 vs 0.776 without), so ``run`` leaves it off. Numbers:
    ``benchmarks/results/quality.json``, key ``spatial_augmentation``.

Semi-supervised consistency (``--ssl``)
    ``mt``: mean teacher (Tarvainen & Valpola, NeurIPS 2017): the teacher is an
    exponential moving average of the student (decay ``ema_decay``), sees the
    batch with Gaussian noise (sigma 0.1, clipped to +-0.2, as Yu et al.), and
    the student is pulled to the teacher's softmax by a mean squared error
    weighted by ``consistency * exp(-5 (1 - t/T)^2)`` (sigmoid ramp-up over
    ``consistency_rampup`` of the iterations).
    ``uamt``: uncertainty-aware mean teacher (Yu et al., MICCAI 2019): the
    teacher runs ``uamt_passes`` noisy passes; the entropy of their mean
    softmax is the uncertainty, and only voxels whose uncertainty is below
    ``(0.75 + 0.25 ramp(t)) * ln K`` enter the consistency loss.
    The supervised loss uses the labels of every training case (here every
    case has a pseudo-label); the consistency is added on the same batch.

Model selection
    The **last checkpoint** is kept: ``model.pt`` holds the student's weights
    after the final iteration. No validation Dice on labelled volumes (as the
    paper's code does) and no label outside the training labels is read.

Output (MODEL folder, every file written atomically)
    ``model.pt`` (state_dict), ``config.json`` (preset, network parameters,
    normalisation, label map, training cases, seed, command, times; written
    last, so its presence with ``model.pt`` marks a finished model) and
    ``train_log.csv``. A finished MODEL folder is skipped unless
    ``--overwrite``. An interrupted run resumes from ``checkpoint.pt``
    (written every ``checkpoint_every`` iterations) when its settings match;
    random generators are re-seeded at each checkpoint boundary, so a resumed
    CPU run gives the same model as an uninterrupted one.

Errors (InputError, one line naming the case, nothing written): a training
case without a label in LABELS, a label whose shape or affine differs from its
image, label values outside the dataset's classes.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from . import nets
from .errors import InputError
from .io import Dataset, atomic_path, find_case_file, load_split, read_label, write_json

SSL_MODES = ("none", "mt", "uamt")

LOG_FIELDS = ["iteration", "loss", "supervised", "consistency", "consistency_weight", "lr", "seconds"]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--dataset", required=True, default=argparse.SUPPRESS, help="MSD / nnU-Net dataset folder (dataset.json, imagesTr/, labelsTr/)")
    parser.add_argument("-l", "--labels", required=True, default=argparse.SUPPRESS,
                        help="folder of (pseudo-)labels, one NIfTI per training case (the template's is taken from the dataset)")
    parser.add_argument("--template", default=argparse.SUPPRESS, help="the annotated template case id (default: the split's 'template')")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cases", nargs="+", default=argparse.SUPPRESS, metavar="ID", help="training case ids (template added)")
    group.add_argument("--split", default=argparse.SUPPRESS, help="split JSON: train on its 'template' + 'unlabeled' cases")
    parser.add_argument("-o", "--output", required=True, default=argparse.SUPPRESS, help="model folder to write")
    parser.add_argument("--ssl", choices=SSL_MODES, default="none", help="semi-supervised consistency: mean teacher or uncertainty-aware MT")
    parser.add_argument("--preset", choices=list(nets.PRESETS), default="cpu", help="network / schedule size")
    parser.add_argument("--iterations", type=int, default=argparse.SUPPRESS, help="optimiser steps of the preset's batch (default: the preset's)")
    parser.add_argument("--template-share", type=float, default=argparse.SUPPRESS, metavar="F",
                        help="probability that a training patch comes from the template's real label "
                             "(default: every training volume equally likely)")
    parser.add_argument("--spatial-aug", type=float, default=0.0, metavar="P",
                        help="probability of a random rotation (+-15 deg) and scaling (+-15%%) of each drawn "
                             "volume (MONAI RandAffined; default 0, off, as in run)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights, sampling and augmentation")
    parser.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if MODEL is a finished model")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    command = "semisam-o1 " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    opt = lambda name: getattr(args, name, None)  # noqa: E731 (argparse.SUPPRESS leaves unset options out)
    train(
        args.dataset, args.labels, opt("template"), args.output,
        cases=opt("cases"), split=opt("split"), ssl=args.ssl, preset=args.preset,
        iterations=opt("iterations"), template_share=opt("template_share"), spatial_aug=args.spatial_aug,
        device=args.device, seed=args.seed,
        threads=opt("threads"),
        overwrite=args.overwrite, quiet=args.quiet, command=command,
    )
    return 0


# --------------------------------------------------------------------------- data


def training_cases(ds: Dataset, labels: Path, template: str | None, cases=None, split=None) -> tuple[str, list[str]]:
    """(template, training case ids): explicit ``cases`` (+ template), the split's
    template + unlabeled, or the template + every case with a file in ``labels``."""
    sp = None
    if split is not None:
        sp = load_split(split) if not isinstance(split, dict) else split
        if template is None:
            template = sp.get("template")
            if not isinstance(template, str):
                raise InputError(f"{split}: the split has no single 'template' case; give --template")
    if template is None:
        raise InputError("no template: give --template ID (or a --split with a 'template')")
    ds.image_path(template)  # unknown template -> InputError
    if cases:
        chosen = ds.select(cases=cases)
    elif sp is not None:
        chosen = ds.select(split=sp, subset=["unlabeled"]) if "unlabeled" in sp else []
        test = set(sp.get("test", []) or [])
        leaked = [c for c in chosen if c in test]
        if leaked:
            raise InputError(f"{split}: case {leaked[0]} is in both 'unlabeled' and 'test'")
    else:
        from .io import case_id_from_path

        found = sorted({case_id_from_path(p, strip_channel=False) for p in labels.iterdir()} - {None})
        chosen = [c for c in found if c in ds.images]
    chosen = [template] + [c for c in chosen if c != template]
    return template, chosen


def load_training_data(ds: Dataset, labels: Path, template: str, cases: list[str], norm: dict, quiet: bool = True):
    """Read and check every training image / label, normalise, keep in memory.

    Returns a list of dicts ``{"case", "image": (1, X, Y, Z) float32, "label": (1, X, Y, Z) uint8}``.
    Raises InputError naming the case for a missing label, a label on another
    grid, or undeclared label values -- before anything is written.
    """
    from tqdm.auto import tqdm

    data = []
    for case in tqdm(cases, desc="load", unit="case", disable=quiet, leave=False):
        img = ds.read_image(case)
        if case == template:
            if case not in ds.labels:
                raise InputError(f"template {case}: no real label in {ds.root / 'labelsTr'}")
            lab = ds.read_label(case, reference=img)
        else:
            path = find_case_file(labels, case, what="label")
            lab = read_label(path, ds.label_map, reference=img)
        data.append({
            "case": case,
            "image": nets.normalise(img.array, norm)[None],
            "label": np.ascontiguousarray(lab.array)[None],
        })
    return data


def _pad_to(data: list[dict], patch) -> None:
    """Zero-pad (symmetrically) every volume smaller than ``patch`` in place."""
    for d in data:
        shape = d["image"].shape[1:]
        pads = [max(0, int(p) - int(s)) for s, p in zip(shape, patch)]
        if any(pads):
            width = [(0, 0)] + [(q // 2, q - q // 2) for q in pads]
            d["image"] = np.pad(d["image"], width, mode="constant", constant_values=0.0)
            d["label"] = np.pad(d["label"], width, mode="constant", constant_values=0)


def _add_indices(data: list[dict]) -> None:
    """Foreground / background voxel indices per volume, for RandCropByPosNegLabeld."""
    for d in data:
        flat = d["label"].reshape(-1)
        d["fg"] = np.flatnonzero(flat > 0)
        d["bg"] = np.flatnonzero(flat == 0)
        if d["fg"].size == 0:  # no foreground: every centre is background
            d["fg"] = d["bg"]


#: ``--spatial-aug``'s random affine: rotation range (radians, each axis) and scale range (each axis)
SPATIAL_AUG_ROTATE = 0.26  # ~15 degrees
SPATIAL_AUG_SCALE = 0.15


def _transforms(cfg: dict, spatial_aug: float = 0.0):
    from monai.transforms import (Compose, RandAffined, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                                  RandShiftIntensityd)

    pos, neg = cfg["pos_neg"]
    ts = []
    index_keys = dict(fg_indices_key="fg", bg_indices_key="bg")
    if spatial_aug > 0:
        ts.append(RandAffined(keys=["image", "label"], prob=float(spatial_aug),
                              rotate_range=(SPATIAL_AUG_ROTATE,) * 3, scale_range=(SPATIAL_AUG_SCALE,) * 3,
                              mode=("bilinear", "nearest"), padding_mode="border"))
        index_keys = {}  # the label moves: the crop finds its foreground again
    ts.append(RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=list(cfg["patch"]),
                                     pos=pos, neg=neg, num_samples=1, **index_keys))
    for axis in cfg["flip_axes"]:
        ts.append(RandFlipd(keys=["image", "label"], prob=cfg["flip_prob"], spatial_axis=int(axis)))
    ts.append(RandScaleIntensityd(keys="image", factors=cfg["intensity_scale"], prob=cfg["intensity_prob"]))
    ts.append(RandShiftIntensityd(keys="image", offsets=cfg["intensity_shift"], prob=cfg["intensity_prob"]))
    return Compose(ts)


def draw_volumes(rng: np.random.Generator, n_volumes: int, size: int, template_share: float | None) -> np.ndarray:
    """Indices of the training volumes the next ``size`` patches come from (index 0 is the template).

    ``template_share`` None: uniform over the ``n_volumes``; else index 0 with probability
    ``template_share`` and uniform over 1 .. n_volumes - 1 otherwise (all 0 when the template is alone).
    Returns (size,) int64.
    """
    if template_share is None or n_volumes == 1:
        return rng.integers(n_volumes, size=size)
    return np.where(rng.random(size) < template_share, 0, 1 + rng.integers(n_volumes - 1, size=size))


def _sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2), t = current / length clipped to [0, 1] (Laine & Aila 2017)."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# --------------------------------------------------------------------------- training


#: training settings added after models and checkpoints were first written, with the value every
#: older one was trained with: an older config.json or checkpoint signature lacking one reads as this
_LATER_SETTINGS = {"spatial_aug": 0.0}


def _signature(config: dict) -> dict:
    """The settings a checkpoint must share to be resumed; applied to a stored signature too, so
    that one written before a setting of :data:`_LATER_SETTINGS` existed compares by its value."""
    config = {**_LATER_SETTINGS, **config}
    keys = ("preset_params", "iterations", "ssl", "net", "normalisation", "training_cases", "template",
            "labels", "dataset", "seed", "label_map", "template_share", *_LATER_SETTINGS)
    return {k: config.get(k) for k in keys}


def spatial_aug_probability(p) -> float:
    """``p`` (``--spatial-aug``) as a float; InputError unless it is a probability in [0, 1]."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise InputError(f"--spatial-aug {p}: must be a probability in [0, 1]")
    return p


def train(
    dataset,
    labels,
    template: str | None,
    output,
    *,
    cases=None,
    split=None,
    ssl: str = "none",
    preset: str = "cpu",
    iterations: int | None = None,
    template_share: float | None = None,
    spatial_aug: float = 0.0,
    device: str | None = "auto",
    seed: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> dict:
    """Train a 3D UNet; see the module docstring for the method and the files.

    Parameters
    ----------
    dataset : path of the MSD / nnU-Net dataset folder.
    labels : folder of (pseudo-)labels, ``<case>.nii.gz`` per non-template training case.
    template : the annotated case id (None: the split's ``template``).
    output : model folder.
    cases, split : training cases (see :func:`training_cases`).
    ssl : ``"none"``, ``"mt"`` or ``"uamt"``.
    preset : key of :data:`semisam_o1.nets.PRESETS`; ``iterations`` overrides its count.
    template_share : probability in [0, 1) that a training patch comes from the template (its real
        label); None draws every training volume with the same probability.
    spatial_aug : probability in [0, 1] of a random affine of each drawn volume (module docstring).
    device : ``"cpu"``, ``"cuda"`` or ``"auto"``; threads: torch CPU threads.

    Returns
    -------
    dict: the model's config (as in config.json) plus ``"skipped": bool``.

    Raises InputError for bad input (see module docstring), before writing anything.
    """
    import torch

    output = Path(output)
    if command is None:
        command = (f"semisam_o1.train.train({str(dataset)!r}, {str(labels)!r}, {template!r}, {str(output)!r}, "
                   f"cases={cases!r}, split={None if split is None else str(split)!r}, ssl={ssl!r}, "
                   f"preset={preset!r}, iterations={iterations!r}, template_share={template_share!r}, "
                   f"spatial_aug={spatial_aug!r}, device={device!r}, seed={seed!r})")
    if nets.is_finished(output) and not overwrite:
        try:
            config = {**_LATER_SETTINGS, **json.loads((output / nets.CONFIG_NAME).read_text())}
        except (OSError, ValueError) as exc:
            raise InputError(f"{output / nets.CONFIG_NAME}: cannot read ({exc}); use --overwrite to retrain") from None
        asked = {"preset": preset, "ssl": ssl, "seed": int(seed), "labels": str(Path(labels).resolve()),
                 "template_share": template_share, "spatial_aug": float(spatial_aug)}
        if iterations is not None:
            asked["iterations"] = int(iterations)
        differ = [k for k, v in asked.items() if config.get(k) != v]
        if differ:
            print(f"train: warning: {output} is a finished model trained with other settings "
                  f"({', '.join(f'{k}={config.get(k)!r}' for k in differ)}); kept as is, --overwrite to retrain",
                  file=sys.stderr)
        elif not quiet:
            print(f"train: {output} is a finished model, skipped (--overwrite to retrain)", file=sys.stderr)
        return {**config, "skipped": True}
    if ssl not in SSL_MODES:
        raise InputError(f"--ssl {ssl}: choose from {', '.join(SSL_MODES)}")
    if template_share is not None and not (0.0 <= float(template_share) < 1.0):
        raise InputError(f"--template-share {template_share}: must be in [0, 1)")
    spatial_aug = spatial_aug_probability(spatial_aug)
    cfg = nets.preset(preset)
    if iterations is not None:
        if iterations < 1:
            raise InputError(f"--iterations {iterations}: must be at least 1")
        cfg["iterations"] = int(iterations)
    n_iter = int(cfg["iterations"])
    nets.set_threads(threads)
    dev = nets.resolve_device(device)

    ds = Dataset(dataset)
    labels = Path(labels)
    if not labels.is_dir():
        raise InputError(f"{labels}: labels folder not found")
    template, chosen = training_cases(ds, labels, template, cases=cases, split=split)
    K = ds.label_map.num_classes
    norm = dict(nets.NORMALISATION)

    t0 = time.time()
    data = load_training_data(ds, labels, template, chosen, norm, quiet=quiet)
    load_seconds = time.time() - t0

    config = {
        "format": "semisam-o1 model 1",
        "preset": preset,
        "preset_params": cfg,
        "iterations": n_iter,
        "ssl": ssl,
        "net_class": "monai.networks.nets.UNet",
        "net": nets.net_params(cfg, K),
        "normalisation": norm,
        "patch": list(cfg["patch"]),
        "label_map": {"values": list(ds.label_map.values), "names": list(ds.label_map.names)},
        "dataset": str(ds.root.resolve()),
        "labels": str(labels.resolve()),
        "template": template,
        "training_cases": chosen,
        "num_training_cases": len(chosen),
        "seed": int(seed),
        "template_share": template_share,
        "spatial_aug": spatial_aug,
        "loss": "monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)",
        "optimizer": f"AdamW(lr={cfg['lr']}, weight_decay={cfg['weight_decay']}), poly decay power 0.9",
        "model_selection": "last checkpoint: student weights after the final iteration (no label outside the training labels is read)",
        "command": command,
    }

    _pad_to(data, cfg["patch"])
    _add_indices(data)
    transforms = _transforms(cfg, spatial_aug)

    from monai.data import set_track_meta
    from monai.losses import DiceCELoss

    set_track_meta(False)
    torch.manual_seed(int(seed))  # the initial weights depend on the seed only
    net = nets.build_net(config["net"]).to(dev)
    optim = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    teacher = None
    if ssl != "none":
        teacher = nets.build_net(config["net"]).to(dev)
        teacher.load_state_dict(net.state_dict())
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    start, log_rows, elapsed_before = 0, [], 0.0
    ckpt_path = output / nets.CHECKPOINT_NAME
    if overwrite:
        for name in (nets.CONFIG_NAME, nets.WEIGHTS_NAME, nets.LOG_NAME, nets.CHECKPOINT_NAME):
            (output / name).unlink(missing_ok=True)
    elif ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if _signature(ck.get("signature") or {}) == _signature(config):
                net.load_state_dict(ck["net"])
                optim.load_state_dict(ck["optim"])
                if teacher is not None and ck.get("teacher") is not None:
                    teacher.load_state_dict(ck["teacher"])
                start, log_rows, elapsed_before = int(ck["iteration"]), list(ck["log"]), float(ck["seconds"])
                if not quiet:
                    print(f"train: resuming {output} from iteration {start}", file=sys.stderr)
        except Exception as exc:  # unreadable checkpoint: start over
            if not quiet:
                print(f"train: ignoring unreadable {ckpt_path} ({type(exc).__name__})", file=sys.stderr)

    ckpt_every = int(cfg.get("checkpoint_every") or 0)
    block = ckpt_every if ckpt_every > 0 else n_iter
    log_every = max(1, int(cfg.get("log_every", 1)))
    log_k = math.log(K)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_iter, initial=start, desc="train", unit="it", disable=quiet, dynamic_ncols=True)
    t_train = time.time()
    c_train = time.process_time()
    rng = None
    net.train()
    for it in range(start, n_iter):
        if it == start or it % block == 0:
            # re-seed at block boundaries: a resumed run draws what an uninterrupted one would
            rng = np.random.default_rng([int(seed), it])
            transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
            torch.manual_seed(int(rng.integers(2**31 - 1)))
        lr = cfg["lr"] * (1.0 - it / n_iter) ** 0.9
        for group in optim.param_groups:
            group["lr"] = lr
        picks = draw_volumes(rng, len(data), cfg["batch_size"], template_share)
        samples = [transforms(dict(data[i]))[0] for i in picks]
        x = torch.stack([torch.as_tensor(np.asarray(s["image"]), dtype=torch.float32) for s in samples]).to(dev)
        y = torch.stack([torch.as_tensor(np.asarray(s["label"])).long() for s in samples]).to(dev)

        logits = net(x)
        sup = loss_fn(logits, y)
        cons = torch.zeros((), device=dev)
        w = 0.0
        if teacher is not None:
            w = cfg["consistency"] * _sigmoid_rampup(it, cfg["consistency_rampup"] * n_iter)
            prob_s = torch.softmax(logits, dim=1)
            with torch.no_grad():
                passes = 1 if ssl == "mt" else max(1, int(cfg["uamt_passes"]))
                probs_t = []
                for _ in range(passes):
                    noise = torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)
                    probs_t.append(torch.softmax(teacher(x + noise), dim=1))
                prob_t = torch.stack(probs_t).mean(0)
            mse = (prob_s - prob_t) ** 2
            if ssl == "mt":
                cons = mse.mean()
            else:
                unc = -(prob_t * torch.log(prob_t.clamp_min(1e-6))).sum(1, keepdim=True)
                threshold = (0.75 + 0.25 * _sigmoid_rampup(it, n_iter)) * log_k
                mask = (unc < threshold).float()
                cons = (mask * mse).sum() / (2.0 * mask.sum() + 1e-16)  # Yu et al.'s normalisation
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
        lv = float(loss.detach())
        if not np.isfinite(lv):
            raise RuntimeError(f"training diverged at iteration {it + 1} (loss {lv})")
        if (it + 1) % log_every == 0 or it + 1 == n_iter:
            log_rows.append([it + 1, round(lv, 6), round(float(sup.detach()), 6), round(float(cons.detach()), 6),
                             round(w, 6), lr, round(elapsed_before + time.time() - t_train, 3)])
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.4f}")
        if ckpt_every and (it + 1) % ckpt_every == 0 and it + 1 < n_iter:
            with atomic_path(ckpt_path) as tmp:
                torch.save({"signature": _signature(config), "net": net.state_dict(), "optim": optim.state_dict(),
                            "teacher": None if teacher is None else teacher.state_dict(), "iteration": it + 1,
                            "log": log_rows, "seconds": elapsed_before + time.time() - t_train}, tmp)
    bar.close()
    train_seconds = elapsed_before + time.time() - t_train
    done = max(0, n_iter - start)

    last = [r[1] for r in log_rows[-max(1, 50 // log_every):]]
    config.update({
        "device": str(dev),
        "threads": int(torch.get_num_threads()),
        "load_seconds": round(load_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "train_cpu_seconds_this_run": round(time.process_time() - c_train, 3),
        "iterations_this_run": done,
        "iterations_per_second": round(done / max(time.time() - t_train, 1e-9), 4) if done else None,
        "final_loss": float(np.mean(last)) if last else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"semisam_o1": __version__, "torch": torch.__version__, "monai": _monai_version(),
                     "python": sys.version.split()[0]},
    })
    # weights and log first, config last: config.json + model.pt marks a finished model
    with atomic_path(output / nets.WEIGHTS_NAME) as tmp:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(LOG_FIELDS)
    writer.writerows(log_rows)
    with atomic_path(output / nets.LOG_NAME) as tmp:
        tmp.write_text(buf.getvalue())
    write_json(output / nets.CONFIG_NAME, config)
    ckpt_path.unlink(missing_ok=True)
    if not quiet:
        print(f"train: {len(chosen)} cases, {n_iter} iterations in {train_seconds:.0f} s -> {output}", file=sys.stderr)
    return {**config, "skipped": False}


def _monai_version() -> str:
    import monai

    return monai.__version__
