"""Plan a run from the data in front of it: a dataset fingerprint and the decisions taken from it.

``semisam-o1 plan -i DATASET --split FILE -o PLAN.json`` writes

* ``fingerprint``: the dataset's name and modality (``dataset.json``), every cohort case's
  canonical shape and voxel spacing (headers only), their medians and ranges; and, from the
  template alone (the one label a one-label method may read): its classes, voxel counts,
  foreground extent in voxels and mm, and intensity statistics of the image and of its
  foreground;
* ``decisions``: each decision with its value and, beside it, the reason, in the manner of
  nnU-Net's experiment planner (Isensee et al., Nature Methods 2021: fingerprint -> rules ->
  plan), written for one template instead of a labelled training set:

  - ``spacing``: the working spacing (mm) the network trains and predicts at: the cohort's median
    spacing (nnU-Net's target spacing), refined on an axis towards the cohort's finest where a
    template class would otherwise be under ``MIN_CLASS_THICKNESS`` voxels thick (from the template
    label's Euclidean distance transform); never coarsened to pay for training time; ``null``
    when the cohort's own uniform spacing is kept;
  - ``unet.patch``: nnU-Net v2's rule: the median image shape at the working spacing, rounded up
    to the network's divisibility and shrunk (longest edge in mm first, the topology recomputed)
    until it fits a voxel budget: the smaller of ``--max-patch-voxels`` (memory) and the patch of
    which two per iteration afford ``MIN_AFFORDED_ITERATIONS`` iterations in the budget;
  - ``unet.strides`` / ``unet.channels``: per level and axis, stride 2 while the axis's spacing
    is below twice the finest axis's and its edge stays at least 4 voxels (nnU-Net's rules for
    anisotropic data), at most 5 levels; channels start at 16 and double up to 128;
  - ``unet.iterations``: the time budget per round (``--budget-minutes``) converted to voxels at
    the reference rate ``REFERENCE_VOXELS_PER_SECOND`` (a machine-independent cost model:
    patch voxels x batch per iteration, calibrated once on recorded runs), divided by the voxels of
    one iteration. No decision reads a time measured on this machine: the same data and settings
    give the same decisions everywhere; ``estimate`` (outside ``decisions``) records this
    machine's measured seconds per iteration and minutes per round (``--timing``);
  - ``unet.flip_axes``: every axis, except one whose flip moves a template class nearer another
    class's place than its own (mirrored centroids, :mod:`semisam_o1.methods.mirror`): classes
    that follow each other along it (MSD Hippocampus' Anterior | Posterior) or a left / right pair
    (OpenKBP's parotids);
  - ``encode_axes``: the axes ``encode`` slices along: every axis whose slice plane has pixels
    within twice of square (a thin-slice stack is encoded along its slice axis only);
  - ``largest_component``: the classes whose predictions keep only their largest 26-connected
    component: those the template shows as one piece (:mod:`semisam_o1.methods.components`);
  - ``normalisation``: CT (named in ``dataset.json``, or, when it names none, recognised from the
    template image: 1st percentile <= -900 (air, -1000 HU), integer values, 99th percentile <= 4000;
    the reason says which rule fired): clip to the template foreground's 0.5 / 99.5 percentiles and
    z-score with the template foreground's mean and sd (nnU-Net's CT scheme, from the one label there
    is); every other modality: per-volume percentile clip and z-score.

Only the template's label is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import write_json
from semisam_o1.core.resume import check_output_dir
from semisam_o1.core.settings import ComputeOptions, check_range, command_line, option
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import affine_spacing, canonical_shape
from semisam_o1.methods import components
from semisam_o1.methods.metrics import mask_extent
from semisam_o1.methods.mirror import swapped_classes
from semisam_o1.stages import nets

#: smallest edge of the bottom feature map (nnU-Net's rule of 4 voxels)
MIN_BOTTOM_EDGE = 4
MAX_DOWNSAMPLINGS = 5
BASE_CHANNELS = 16
MAX_CHANNELS = 128
#: patches per training iteration
BATCH_SIZE = 2
#: patches per batch of a 2D network (2D images: volumes of one slice)
BATCH_2D = 4
#: iterations are clipped to this range whatever the budget says
MIN_ITERATIONS, MAX_ITERATIONS = 200, 20000
#: the patch is shrunk until the planned network affords this many iterations in the budget (at
#: the reference rate): the fewest measured on both datasets after which one round labels its pool
#: better than the round-0 labels it trained on (docs/experiments.md, "The working spacing";
#: raw numbers in benchmarks/results/experiments/training_length.json and la2018_working_spacing.json)
MIN_AFFORDED_ITERATIONS = 2400
#: the machine-independent cost model of one training iteration: patch voxels x batch, processed at
#: this many voxels per second (the reference machine). Calibrated once on the two plans recorded
#: in benchmarks/results/datasets.json (`semisam-o1 run --preset cpu`, whole split, CPU "Intel(R)
#: Xeon(R) Processor", 2 cores, AVX-512), their measured (timing probe) seconds per iteration:
#: MSD Hippocampus, patch 32 x 56 x 40 x batch 2 = 143,360 voxels: 0.115 s (8.0e-7 s per voxel);
#: 2018 Left Atrium, patch 80 x 80 x 40 x batch 2 = 512,000 voxels: 0.179 s (3.5e-7 s per voxel).
#: The constant is their geometric mean, 5.3e-7 s per voxel = 1.89e6 voxels per second; it
#: predicts 0.076 s and 0.271 s for the two (within a factor 1.5 each way: small patches cost more
#: per voxel). The same runs' training stages (rounds 2-3, data loading included) took 0.091-0.100 s
#: and 0.205-0.214 s per iteration (6.4-7.0e-7 and 4.0-4.2e-7 s per voxel): the same geometric mean.
#: A budget in minutes is thus a budget in voxel-iterations; the time a round takes on another
#: machine is only estimated (plan.json "estimate"), never decided on.
REFERENCE_VOXELS_PER_SECOND = 1.89e6
#: a template class must stay at least this many voxels THICK (2 x its largest inside distance to the
#: boundary, Euclidean distance transform) at the working spacing where the cohort's finest spacing
#: allows. Measured (benchmarks/bench_thickness_floor.py, results/thickness_floor.json): a label
#: taken to a coarser grid and back, as labels and predictions travel, loses 1 - Dice = k / t at t
#: voxels thick, k 0.36-0.53 for every class of all five datasets (Hippocampus, Left Atrium,
#: OpenKBP, PH2, HC18; 700 label/factor pairs); 11 voxels keep the worst class (the left atrium
#: and its veins, k 0.525) at a ceiling >= 0.95: the grid takes at most half of the 10% below full
#: supervision the targets allow. Not measured: a network's own loss on thin structures.
MIN_CLASS_THICKNESS = 11
#: a template image is recognised as CT when its 1st percentile is at or below this (air is -1000 HU,
#: padding outside the field of view -1024 / -2048 / -3024 HU; MRI has no negative scale) ...
CT_AIR_HU = -900.0
#: ... at least this fraction of its voxels hold integers (HU are stored as integers) ...
CT_INTEGER_FRACTION = 0.99
#: ... and its 99th percentile is at most this (dense bone ~2000-3000 HU; arbitrary scanner units
#: of other modalities go higher)
CT_MAX_P99_HU = 4000.0


@dataclasses.dataclass(kw_only=True)
class PlanSettings(ComputeOptions):
    """Settings of ``semisam-o1 plan``."""

    input: Path = option(help="MSD / nnU-Net dataset folder", flags=("-i", "--input"), type=Path, metavar="DATASET")
    split: Path = option(help="split JSON with 'template', 'unlabeled' and 'test'", type=Path, metavar="FILE")
    output: Path = option(help="plan file to write (JSON)", flags=("-o", "--output"), type=Path,
                          metavar="PLAN.json", neutral=True)
    budget_minutes: float = option(8.0, "UNet training time of each round, in minutes on the reference CPU "
                                   "(REFERENCE_VOXELS_PER_SECOND: the same plan on every machine); the patch "
                                   "and iterations are planned from it", metavar="MIN")
    max_patch_voxels: int = option(64 * 64 * 64, "largest UNet patch, in voxels (memory and time per iteration)",
                                   metavar="N")
    timing: bool = option(True, "measure the seconds per training iteration of the planned network on this "
                          "machine and print the estimated minutes per round (plan.json 'estimate'; it decides "
                          "nothing); --no-timing skips the measurement")

    def __post_init__(self):
        super().__post_init__()
        self.input, self.split, self.output = Path(self.input), Path(self.split), Path(self.output)
        check_range("budget_minutes", self.budget_minutes, 0.0, lo_open=True)
        check_range("max_patch_voxels", self.max_patch_voxels, 8 ** 3)


# --------------------------------------------------------------------------- fingerprint


def _summary(values: np.ndarray) -> dict:
    """Per-axis median, min, max and 10th percentile of (N, 3) values."""
    return {"median": np.median(values, axis=0).round(4).tolist(), "min": values.min(axis=0).round(4).tolist(),
            "max": values.max(axis=0).round(4).tolist(), "p10": np.percentile(values, 10, axis=0).round(4).tolist()}


def cohort_geometry(dataset, cases: list[str]) -> dict:
    """Canonical shapes (voxels) and spacings (mm) of ``cases`` from their headers alone; the spacing
    from the affine (:func:`semisam_o1.data.images.affine_spacing`, as every stage reads it), not the
    header's zooms, which a file may hold inconsistent with its affine."""
    import nibabel as nib

    shapes, spacings = [], []
    for case in cases:
        path = dataset.image_path(case)
        shapes.append(canonical_shape(path))
        img = nib.load(str(path))
        ornt = nib.orientations.io_orientation(img.affine)
        zooms = affine_spacing(img.affine)
        spacings.append([float(zooms[int(d)]) for d in np.argsort(ornt[:, 0])])
    shapes_a, spacing_a = np.asarray(shapes, np.float64), np.asarray(spacings, np.float64)
    return {"cases": len(cases), "shape": _summary(shapes_a), "spacing_mm": _summary(spacing_a)}


def thickness_mm(mask: np.ndarray, spacing) -> float:
    """Thickness of a structure, in mm: twice the largest Euclidean distance (``scipy.ndimage.
    distance_transform_edt`` with the voxel spacing) from a voxel inside ``mask`` (X, Y, Z) bool to
    the nearest voxel outside it, the volume's border counting as outside: the diameter of the
    largest ball inside (a slab t voxels thick gives t + 1 for odd t, t for even t).

    An axis the mask has a single voxel along (a 2D image stored as X x Y x 1) is not measured:
    the ball is then a disc in the image's plane. Padded like the others, that axis would put every
    pixel one pixel from the outside and make any 2D structure look one pixel thick.

    Returns 0.0 for an empty mask.
    """
    from scipy import ndimage

    if not mask.any():
        return 0.0
    axes = [a for a in range(mask.ndim) if mask.shape[a] > 1] or [0]
    plane = mask.reshape([mask.shape[a] for a in axes])
    nonzero = np.nonzero(plane)
    lo = [int(i.min()) for i in nonzero]
    hi = [int(i.max()) + 1 for i in nonzero]
    box = np.pad(plane[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)  # the border is outside
    sampling = [float(spacing[a]) for a in axes]
    return float(2.0 * ndimage.distance_transform_edt(box, sampling=sampling).max())


def template_fingerprint(dataset, template: str) -> dict:
    """Classes, voxel counts, extents and intensities of the template (its image and label).

    Returns a dict: ``classes`` {index: {name, voxels, extent_vox, extent_mm, thickness_mm
    (:func:`thickness_mm`), components (26-connected pieces)}}, ``foreground``
    (the union: voxels, extent_vox, extent_mm, box_fraction), ``intensity`` (image and foreground
    percentiles 0.5 / 50 / 99.5, mean and sd; the image's also its 1st / 99th percentiles and the
    fraction of voxels holding integers, read by the CT rule of :func:`recognise_modality`).

    Raises:
        InputError: the template's label has no foreground voxel.
    """
    image = dataset.read_image(template)
    label = dataset.read_label(template, reference=image)
    lab, spacing = label.array, np.asarray(image.spacing, np.float64)
    if not np.any(lab > 0):
        raise InputError(f"{dataset.label_path(template)}: the template's label has no foreground voxel")

    def extent(mask):
        vox = mask_extent(mask)
        return vox, [round(v * s, 2) for v, s in zip(vox, spacing)]

    classes = {}
    for c in range(1, dataset.label_map.num_classes):
        mask = lab == c
        if mask.any():
            vox, mm = extent(mask)
            classes[str(c)] = {"name": dataset.label_map.names[c], "voxels": int(mask.sum()), "extent_vox": vox,
                               "extent_mm": mm, "thickness_mm": round(thickness_mm(mask, spacing), 3),
                               "components": components.count(mask)}
    fg = lab > 0
    vox, mm = extent(fg)
    values, fg_values = image.array.ravel(), image.array[fg]

    def stats(v):
        p = np.percentile(v, [0.5, 50, 99.5])
        return {"p0_5": float(p[0]), "median": float(p[1]), "p99_5": float(p[2]), "mean": float(v.mean()),
                "sd": float(v.std())}

    p1, p99 = np.percentile(values, [1, 99])
    image_stats = {**stats(values), "p1": float(p1), "p99": float(p99),
                   "integer_fraction": round(float(np.mean(values == np.round(values))), 4)}
    return {"case": template, "shape": list(image.shape), "spacing_mm": spacing.round(4).tolist(),
            "classes": classes,
            "foreground": {"voxels": int(fg.sum()), "extent_vox": vox, "extent_mm": mm,
                           "box_fraction": float(np.prod(vox) / np.prod(image.shape))},
            "intensity": {"image": image_stats, "foreground": stats(fg_values)}}


def fingerprint(dataset, template: str, cases: list[str]) -> dict:
    """The dataset fingerprint (see the module docstring)."""
    meta = dataset.meta
    modality = meta.get("modality") or meta.get("channel_names") or {}
    return {"name": meta.get("name", dataset.root.name), "modality": str(next(iter(modality.values()), "unknown")),
            "cohort": cohort_geometry(dataset, cases), "template": template_fingerprint(dataset, template)}


# --------------------------------------------------------------------------- decisions


def plan_strides(patch, spacing) -> list[list[int]]:
    """Per-level (x, y, z) strides of the UNet, nnU-Net's rule for anisotropic data: an axis is
    downsampled (stride 2) at a level only while its spacing at that level is below twice the finest
    axis's, and only while its edge at the next level stays at least ``MIN_BOTTOM_EDGE`` voxels; at
    most ``MAX_DOWNSAMPLINGS`` levels, stopping when no axis can be downsampled."""
    size = [float(p) for p in patch]
    sp = [float(s) for s in spacing]
    levels = []
    while len(levels) < MAX_DOWNSAMPLINGS:
        finest = min(v for v, n in zip(sp, size) if n > 1)  # a one-slice axis (2D images) has no say
        stride = [2 if (sp[a] < 2 * finest and size[a] / 2 >= MIN_BOTTOM_EDGE) else 1 for a in range(3)]
        if not any(s == 2 for s in stride):
            break
        levels.append(stride)
        size = [size[a] / stride[a] for a in range(3)]
        sp = [sp[a] * stride[a] for a in range(3)]
    return levels


def plan_patch(median_shape, spacing, max_voxels: int) -> tuple[list[int], list[list[int]], str]:
    """UNet patch and per-level strides, nnU-Net v2's ``ExperimentPlanner`` rule (Isensee et al.
    2021): start from the cohort's median image shape at the working spacing and shrink the patch,
    recomputing the network's topology, until it fits ``max_voxels`` voxels; the edge reduced each
    step is the longest in mm (towards a patch isotropic in mm), by its axis's divisibility.

    Returns ``(patch, strides, reason)``; each patch edge is a multiple of the product of its
    axis's strides (the UNet's divisibility) and at least ``2 * MIN_BOTTOM_EDGE`` voxels unless the
    median shape is smaller.
    """
    start = [1 if int(m) == 1 else max(int(m), 2 * MIN_BOTTOM_EDGE) for m in median_shape]  # 2D: one slice
    patch, shrunk = list(start), False
    for _ in range(10000):  # each pass removes voxels: ends long before
        strides = plan_strides(patch, spacing)
        step = [int(np.prod([lv[a] for lv in strides])) if strides else 1 for a in range(3)]
        patch = [int(math.ceil(p / st)) * st for p, st in zip(patch, step)]
        if int(np.prod(patch)) <= max_voxels:
            break
        can = [a for a in range(3) if patch[a] - step[a] >= 2 * MIN_BOTTOM_EDGE]
        if not can:
            break
        i = max(can, key=lambda a: (patch[a] * float(spacing[a]), -a))
        patch[i] -= step[i]
        shrunk = True
    reason = (f"the cohort's median image shape at the working spacing {start} voxels (nnU-Net's starting "
              f"patch), multiples of {step}"
              + (f", shrunk (longest edge in mm first) to at most {max_voxels} voxels" if shrunk else
                 f", within {max_voxels} voxels"))
    return patch, strides, reason


def patch_voxel_budget(budget_seconds: float, max_patch_voxels: int, batch: int = BATCH_SIZE) -> tuple[int, str]:
    """The patch's voxel budget: the largest patch of which ``batch`` per iteration afford
    ``MIN_AFFORDED_ITERATIONS`` iterations in ``budget_seconds`` at ``REFERENCE_VOXELS_PER_SECOND``,
    at most ``max_patch_voxels`` (memory); no machine is timed."""
    afford = int(budget_seconds * REFERENCE_VOXELS_PER_SECOND / (MIN_AFFORDED_ITERATIONS * batch))
    if afford >= max_patch_voxels:
        return max_patch_voxels, f"--max-patch-voxels {max_patch_voxels} (the budget affords more)"
    return max(afford, 1), (f"{MIN_AFFORDED_ITERATIONS} iterations of {batch} patches in the budget at the "
                            f"reference {REFERENCE_VOXELS_PER_SECOND:.3g} voxels per second")


def plan_flip_axes(dataset, template: str) -> tuple[list[int], str]:
    """Every axis whose flip keeps each template class nearest its own place
    (:func:`semisam_o1.methods.mirror.swapped_classes`): not an axis along which classes follow each
    other (MSD Hippocampus' Anterior | Posterior) nor one that mirrors a left / right pair onto
    itself (OpenKBP's parotids)."""

    vol = dataset.read_label(template)
    label, spacing = vol.array, vol.spacing
    names = dataset.label_map.names
    every = [a for a in range(3) if label.shape[a] > 1]  # a 2D image has no third axis to flip
    swaps = {a: swapped_classes(label, a, spacing) for a in every}
    axes = [a for a in every if not swaps[a]]
    if len(axes) == len(every):
        return axes, ("no flip moves a template class nearer another class's place (mirrored centroids): "
                      "a flip along any axis keeps the classes")
    said = "; ".join(f"axis {a}: " + ", ".join(f"{names[c]} -> {names[d]}" for c, d in pairs)
                     for a, pairs in swaps.items() if pairs)
    return axes, (f"a flip would put a template class nearer another class's place than its own ({said}: "
                  "mirrored centroids), so those axes are not flipped")


def plan_largest_component(fp: dict) -> tuple[list[int], str]:
    """The classes whose predictions keep only their largest 26-connected component: those the
    template shows as one piece (a structure that is one organ in the one labelled case is one in
    every case; a class in several pieces, as two kidneys under one label, keeps them all).

    Returns:
        (sorted class indices, the reason).
    """
    classes = fp["template"]["classes"]
    one = sorted(int(c) for c, v in classes.items() if v.get("components") == 1)
    pieces = {v["name"]: v.get("components") for v in classes.values()}
    if not one:
        return one, f"no template class is one 26-connected piece ({pieces}): predictions kept whole"
    return one, (f"template classes in 26-connected pieces {pieces}: each one-piece class keeps its largest "
                 "component in every prediction")


def recognise_modality(fp: dict) -> tuple[str, str]:
    """The modality the plan acts on, and which rule gave it: ``dataset.json``'s when it names one
    (anything but empty / ``unknown``); otherwise CT when the template image looks like Hounsfield
    units: its 1st percentile at or below ``CT_AIR_HU`` (air, -1000 HU), at least
    ``CT_INTEGER_FRACTION`` of its voxels integers, and its 99th percentile at most ``CT_MAX_P99_HU``;
    else ``unknown``.

    Returns:
        (modality, the rule that fired, with the numbers).
    """
    given = str(fp.get("modality", "unknown")).strip()
    if given and given.lower() != "unknown":
        return given, f"modality {given} from dataset.json"
    image = fp["template"]["intensity"]["image"]
    p1, p99, integer = image.get("p1"), image.get("p99"), image.get("integer_fraction")
    if p1 is None or p99 is None or integer is None:
        return "unknown", "modality unknown (not in dataset.json; no intensity statistics to recognise it)"
    facts = (f"template image 1st percentile {p1:g} (CT if <= {CT_AIR_HU:g}: air is -1000 HU), "
             f"{integer:.1%} integer values (CT if >= {CT_INTEGER_FRACTION:.0%}), 99th percentile {p99:g} "
             f"(CT if <= {CT_MAX_P99_HU:g})")
    if p1 <= CT_AIR_HU and integer >= CT_INTEGER_FRACTION and p99 <= CT_MAX_P99_HU:
        return "CT", f"modality not in dataset.json, recognised as CT from the intensities: {facts}"
    return "unknown", f"modality not in dataset.json and not recognised as CT: {facts}"


def plan_normalisation(fp: dict) -> tuple[dict, str]:
    """CT (given or recognised, :func:`recognise_modality`): fixed clip and z-score from the
    template's foreground; other modalities: per volume."""
    modality, rule = recognise_modality(fp)
    if modality.upper() == "CT":
        fg = fp["template"]["intensity"]["foreground"]
        return ({"method": "fixed_clip_zscore", "lower": fg["p0_5"], "upper": fg["p99_5"], "mean": fg["mean"],
                 "sd": max(fg["sd"], 1e-6)},
                f"{rule}; CT intensities are calibrated (HU): one clip and z-score for every volume, from the "
                "template's foreground")
    return ({"method": "percentile_clip_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5},
            f"{rule}; modality {modality}: intensities have no fixed scale, normalised per volume")


def seconds_per_iteration(unet: dict, num_classes: int, threads: int | None = None, steps: int = 4) -> float:
    """Fastest of ``steps`` timed training iterations (forward, DiceCE loss, backward, AdamW step) of
    the planned MONAI UNet on random data on this machine's CPU, after one warm-up step (the fastest,
    not the median: other work on a shared machine only ever slows a step down)."""
    import torch
    from monai.losses import DiceCELoss

    if threads:
        torch.set_num_threads(int(threads))
    if int(unet["patch"][2]) == 1:  # 2D images: MONAI's 2D UNet, as train builds it
        unet = nets.for_2d(unet | {"flip_axes": []})
    net = nets.build_net(nets.net_params(unet, num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(unet["batch_size"], 1, *unet["patch"])
    y = torch.randint(0, num_classes, (unet["batch_size"], 1, *unet["patch"]))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.min(times))


def plan_network(fp: dict, working: list[float], max_voxels: int) -> tuple[dict, str]:
    """The UNet (patch, strides, channels, residual units, batch) for the cohort at ``working`` mm
    within a patch of ``max_voxels`` voxels; returns ``(unet, patch reason)``."""
    spacing = fp["cohort"]["spacing_mm"]["median"]
    median_shape = [int(round(n * s / w)) for n, s, w in zip(fp["cohort"]["shape"]["median"], spacing, working)]
    if is_flat(fp):
        median_shape[2] = 1
    patch, strides, reason = plan_patch(median_shape, working, max_voxels)
    channels = [min(BASE_CHANNELS * 2 ** i, MAX_CHANNELS) for i in range(len(strides) + 1)]
    return ({"patch": patch, "strides": strides, "channels": channels, "num_res_units": 1,
             "batch_size": BATCH_2D if is_flat(fp) else BATCH_SIZE}, reason)


def is_flat(fp: dict) -> bool:
    """A cohort of 2D images: every case is one slice along the third axis."""
    shape = fp["cohort"]["shape"]
    return int(shape.get("max", shape["median"])[2]) == 1


def plan_spacing(fp: dict) -> dict:
    """The working spacing, from the data alone: the cohort's median spacing (nnU-Net's target
    spacing), except on an axis where that would leave a template class under
    ``MIN_CLASS_THICKNESS`` voxels thick (:func:`thickness_mm`): there the spacing is refined
    towards the cohort's fine spacings on that axis, at most to their 10th percentile (nnU-Net's
    choice for an anisotropic axis; the minimum when no percentile is recorded): never finer than
    most of the data holds detail for, and not led by one outlying volume.
    Never coarsened to pay for training time (the patch is shrunk instead).

    Returns:
        ``{"spacing": mm list, "native": bool, "reason": str}``; ``native`` is True when the
        cohort's own (uniform) spacing is kept and no volume is resampled.
    """
    geometry = fp["cohort"]["spacing_mm"]
    median = [float(x) for x in geometry["median"]]
    finest = [float(x) for x in geometry.get("p10", geometry["min"])]
    uniform = np.allclose(geometry["min"], geometry["max"], rtol=1e-3) and np.allclose(geometry["min"], median,
                                                                                        rtol=1e-3)
    classes = fp["template"]["classes"].values()
    thin = min(classes, key=lambda c: c["thickness_mm"])
    limit = thin["thickness_mm"] / MIN_CLASS_THICKNESS  # the coarsest spacing that keeps the floor
    spacing = [round(min(m, max(f, limit)), 4) for m, f in zip(median, finest)]
    if is_flat(fp):  # 2D images: the one-slice axis keeps its spacing (one slice stays one slice)
        spacing[2] = round(median[2], 4)
    refined = [a for a in range(3) if spacing[a] < median[a]]
    vox = [round(thin["thickness_mm"] / w, 1) for w in spacing]
    why = (f"the cohort's median spacing {[round(m, 4) for m in median]} mm (nnU-Net's target spacing; "
           "never coarsened to pay for training time)")
    floor = (f"the thinnest template class, {thin['name']}, is {thin['thickness_mm']:g} mm thick (2 x its largest "
             f"distance to its boundary): {vox} voxels along each axis; floor {MIN_CLASS_THICKNESS} voxels "
             "thick (a class that thick keeps a Dice ceiling >= 0.95 through the grid: measured on five datasets)")
    if refined:
        why += (f", refined on axes {refined} towards the cohort's 10th-percentile spacing {finest} mm to keep {thin['name']} "
                f"at least {MIN_CLASS_THICKNESS} voxels thick where the data allows")
    grid = ("each volume on its own grid (the cohort's spacing is uniform)" if uniform else
            "every volume resampled to it, outputs resampled back to each input's grid")
    return {"spacing": median if uniform else spacing, "native": bool(uniform), "reason": f"{why}; {floor}; {grid}"}


def plan_encode_axes(spacing, flat: bool = False) -> tuple[list[int], str]:
    """The axes encode slices along: an axis whose slices (the plane of the two other axes) have
    pixels more than twice as long one way as the other is left out (the encoder sees square
    pixels; a 1.5 x 10 mm strip costs a canvas for little detail), unless that would leave none.
    The factor 2 is the strides rule's anisotropy bound (:func:`plan_strides`)."""
    if flat:
        return [2], "2D images: the image itself, one canvas per image (axis 2)"
    sp = [float(x) for x in spacing]
    keep = [a for a in range(3) if max(sp[b] for b in range(3) if b != a) <= 2 * min(sp[b] for b in range(3) if b != a)]
    if not keep:
        keep = [int(np.argmax(sp))]
    if keep == [0, 1, 2]:
        return keep, f"every slice plane has pixels within 2x of square (median spacing {sp} mm)"
    return keep, (f"slices along {[a for a in range(3) if a not in keep]} would have pixels more than 2x longer one "
                  f"way (median spacing {sp} mm)")


def decide(dataset, fp: dict, settings: PlanSettings) -> dict:
    """Every decision of the plan, each ``{"value": ..., "reason": ...}``: from the dataset and the
    settings alone (no machine is timed), so the same data and settings give the same decisions
    everywhere."""
    budget = settings.budget_minutes * 60.0
    spacing = fp["cohort"]["spacing_mm"]["median"]
    sp = plan_spacing(fp)
    max_voxels, budget_reason = patch_voxel_budget(budget, settings.max_patch_voxels,
                                                   BATCH_2D if is_flat(fp) else BATCH_SIZE)
    unet, patch_reason = plan_network(fp, sp["spacing"], max_voxels)
    strides = unet["strides"]
    voxels = int(np.prod(unet["patch"])) * unet["batch_size"]
    flips, flip_reason = plan_flip_axes(dataset, fp["template"]["case"])
    norm, norm_reason = plan_normalisation(fp)
    iters = int(np.clip(int(budget * REFERENCE_VOXELS_PER_SECOND / voxels), MIN_ITERATIONS, MAX_ITERATIONS))
    axes, axes_reason = plan_encode_axes(spacing, flat=is_flat(fp))
    lcc, lcc_reason = plan_largest_component(fp)
    return {
        "encode_axes": {"value": axes, "reason": axes_reason},
        "spacing": {"value": None if sp["native"] else sp["spacing"], "mm": sp["spacing"], "reason": sp["reason"]},
        "patch": {"value": unet["patch"], "reason": f"{patch_reason}; the voxel budget: {budget_reason}"},
        "strides": {"value": strides, "reason": f"{len(strides)} levels; an axis is downsampled while its spacing "
                                                f"is below twice the finest and its edge stays >= {MIN_BOTTOM_EDGE} "
                                                f"voxels (working spacing {sp['spacing']} mm)"},
        "channels": {"value": unet["channels"], "reason": f"{BASE_CHANNELS} doubling per level, at most "
                                                          f"{MAX_CHANNELS}"},
        "batch_size": {"value": unet["batch_size"], "reason": (
            f"{BATCH_2D} 2D patches (a 2D patch costs a fraction of a 3D one; nnU-Net's 2D batches are larger "
            "than its 3D ones)" if is_flat(fp) else "two patches: one foreground-centred on average")},
        "iterations": {"value": iters, "reason": f"{settings.budget_minutes:g} min per round x "
                                                 f"{REFERENCE_VOXELS_PER_SECOND:.3g} voxels per second (the reference "
                                                 f"CPU's training rate) / {voxels} voxels per iteration (patch x "
                                                 f"{unet['batch_size']}), clipped to [{MIN_ITERATIONS}, "
                                                 f"{MAX_ITERATIONS}]; the same on every machine (this machine's "
                                                 "time: plan.json 'estimate')"},
        "flip_axes": {"value": flips, "reason": flip_reason},
        "normalisation": {"value": norm, "reason": norm_reason},
        "largest_component": {"value": lcc, "reason": lcc_reason},
    }


def estimate(decisions: dict, num_classes: int, settings: PlanSettings) -> dict:
    """This machine's time for one round of the planned training, from :func:`seconds_per_iteration`
    (``--timing``): printed and recorded, never decided on."""
    d = decisions
    voxels = int(np.prod(d["patch"]["value"])) * d["batch_size"]["value"]
    out = {"reference_seconds_per_iteration": round(voxels / REFERENCE_VOXELS_PER_SECOND, 4),
           "reference_minutes_per_round": round(d["iterations"]["value"] * voxels / REFERENCE_VOXELS_PER_SECOND
                                                / 60.0, 2)}
    if not settings.timing:
        return {**out, "measured": False, "note": "not measured on this machine (--no-timing)"}
    unet = {"patch": d["patch"]["value"], "strides": d["strides"]["value"], "channels": d["channels"]["value"],
            "num_res_units": 1, "batch_size": d["batch_size"]["value"]}
    sec = float(seconds_per_iteration(unet, num_classes, settings.threads))
    return {**out, "measured": True, "seconds_per_iteration": round(sec, 4),
            "minutes_per_round": round(d["iterations"]["value"] * sec / 60.0, 2),
            "note": "measured on this machine now (fastest of 4 steps): an estimate only; no decision reads it"}


def read_plan(path: str | os.PathLike) -> dict:
    """The plan file ``path`` (written by :func:`make_plan`), decoded and checked: the one reader
    of ``plan.json`` (``train --plan`` and ``run`` both come through here).

    Returns:
        ``{"fingerprint": ..., "decisions": {name: {"value": ..., "reason": ...}}, ...}``.

    Raises:
        InputError: the file cannot be read, is not JSON, or holds no decisions.
    """
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable plan file ({type(exc).__name__}: {exc})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("decisions"), dict):
        raise InputError(f"{path}: not a plan file (no 'decisions'; write one with `semisam-o1 plan`)")
    return plan


def unet_overrides(plan: dict) -> dict:
    """The UNet preset keys a plan sets (``patch``, ``strides``, ``channels``, ``batch_size``,
    ``iterations``, ``flip_axes``, ``largest_component``) and the normalisation, as one dict to lay
    over a preset (a plan written before it had ``spacing`` or ``largest_component`` sets neither)."""
    d = plan["decisions"]
    keys = ("patch", "strides", "channels", "batch_size", "iterations", "flip_axes")
    out = {**{k: d[k]["value"] for k in keys}, "normalisation": d["normalisation"]["value"]}
    for key in ("spacing", "largest_component"):
        if key in d:
            out[key] = d[key]["value"]
    return out


def encode_overrides(plan: dict) -> dict:
    """The encode settings a plan sets (``axes``; none from a plan written before it had them)."""
    axes = plan["decisions"].get("encode_axes")
    return {"axes": tuple(axes["value"])} if axes else {}


def make_plan(settings: PlanSettings) -> dict:
    """Fingerprint the dataset, decide, and write the plan (JSON) to ``settings.output``.

    Returns:
        the plan: ``{"fingerprint": ..., "decisions": ..., "estimate": ..., "command": ...}``; the
        decisions depend on the data and settings only, the estimate on this machine.

    Raises:
        InputError: bad dataset or split, an empty template label, or an unwritable output.
    """

    check_output_dir(settings.output.parent, "plan's folder")
    if settings.output.is_dir():
        raise InputError(f"{settings.output}: the plan file is an existing folder")
    dataset = Dataset(settings.input)
    sp = load_split(settings.split)
    template = sp.get("template")
    if template is None:
        raise InputError(f"{settings.split}: split has no 'template'")
    cases = dataset.select(cases=[template, *sp.get("unlabeled", [])])
    fp = fingerprint(dataset, template, cases)
    decisions = decide(dataset, fp, settings)
    plan = {"fingerprint": fp, "decisions": decisions,
            "estimate": estimate(decisions, dataset.label_map.num_classes, settings),
            "command": command_line("plan", settings)}
    write_json(settings.output, plan)
    if not settings.quiet:
        for key, d in plan["decisions"].items():
            print(f"[plan] {key}: {d['value']}  ({d['reason']})", flush=True)
        est = plan["estimate"]
        here = (f"{est['minutes_per_round']:g} min per round on this machine now ({est['seconds_per_iteration']:g} s "
                "per iteration)" if est["measured"] else "not measured here (--no-timing)")
        print(f"[plan] estimate: {here}; {est['reference_minutes_per_round']:g} min on the reference CPU "
              "(decides nothing)", flush=True)
    return plan


SETTINGS = PlanSettings
STAGE = make_plan
