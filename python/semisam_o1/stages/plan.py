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

  - ``spacing``: the working spacing (mm) the network trains and predicts at: the finest of a
    ladder of candidates (the fine axes coarsened first, towards isotropy) at which the planned
    network affords ``MIN_AFFORDED_ITERATIONS`` training iterations within the time budget, never
    so coarse that a template class is under ``MIN_CLASS_EDGE`` voxels across; a cohort of mixed
    spacings is always resampled (to the median at least, as nnU-Net's target spacing); ``null``
    when the cohort's own uniform spacing is kept;
  - ``unet.patch``: covers the template structure's extent plus a margin on each side, rounded
    up to the network's divisibility, never above the padded median image shape, and shrunk
    (largest axis first) until it fits the voxel budget of a patch;
  - ``unet.strides`` / ``unet.channels``: per level and axis, stride 2 while the axis's spacing
    is below twice the finest axis's and its edge stays at least 4 voxels (nnU-Net's rules for
    anisotropic data), at most 5 levels; channels start at 16 and double up to 128;
  - ``unet.iterations``: from a time budget per round (``--budget-minutes``), divided by the
    seconds per training iteration measured on this machine for the planned network;
  - ``unet.flip_axes``: every axis, except an axis along which the template's foreground classes
    follow each other (class planes: a flip would swap them, as MSD Hippocampus' Anterior |
    Posterior);
  - ``encode_axes``: the axes ``encode`` slices along: every axis whose slice plane has pixels
    within twice of square (a thin-slice stack is encoded along its slice axis only);
  - ``largest_component``: the classes whose predictions keep only their largest 26-connected
    component: those the template shows as one piece (:mod:`semisam_o1.methods.components`);
  - ``normalisation``: CT: clip to the template foreground's 0.5 / 99.5 percentiles and z-score
    with the template foreground's mean and sd (nnU-Net's CT scheme, from the one label there is);
    every other modality: per-volume percentile clip and z-score.

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
from semisam_o1.data.images import canonical_shape
from semisam_o1.methods import components
from semisam_o1.methods.class_planes import learn
from semisam_o1.methods.metrics import mask_extent
from semisam_o1.stages import nets

#: fraction of the structure's extent added on each side of the patch
PATCH_MARGIN = 0.25
#: smallest edge of the bottom feature map (nnU-Net's rule of 4 voxels)
MIN_BOTTOM_EDGE = 4
MAX_DOWNSAMPLINGS = 5
BASE_CHANNELS = 16
MAX_CHANNELS = 128
#: iterations are clipped to this range whatever the budget says
MIN_ITERATIONS, MAX_ITERATIONS = 200, 20000
#: the working spacing is coarsened until the planned network affords this many iterations in the
#: budget: the fewest measured on both datasets after which one round labels its pool better than
#: the round-0 labels it trained on (docs/experiments.md, "The working spacing";
#: experiments/training_length.json, la2018_working_spacing.json). MSD Hippocampus, 199 pool cases,
#: round 0 0.782: 600 / 1200 / 2400 / 4173 iterations give 0.774 / 0.776 / 0.790 / 0.789; 2018 Left
#: Atrium, 20 pool cases, round 0 0.779: 200 give 0.692, 1200 (at 2.5 mm) 0.788, 1647 0.786, and
#: 2683 on its 79 pool cases 0.789 (round 0 0.773)
MIN_AFFORDED_ITERATIONS = 2400
#: candidate working spacings, as multiples of the finest axis's spacing
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
#: a template class must stay at least this many voxels across at the working spacing: the
#: network's bottom level (MIN_BOTTOM_EDGE voxels) after one more halving
MIN_CLASS_EDGE = 2 * MIN_BOTTOM_EDGE
#: patches per batch of a 2D network (2D images: volumes of one slice)
BATCH_2D = 4


@dataclasses.dataclass(kw_only=True)
class PlanSettings(ComputeOptions):
    """Settings of ``semisam-o1 plan``."""

    input: Path = option(help="MSD / nnU-Net dataset folder", flags=("-i", "--input"), type=Path, metavar="DATASET")
    split: Path = option(help="split JSON with 'template', 'unlabeled' and 'test'", type=Path, metavar="FILE")
    output: Path = option(help="plan file to write (JSON)", flags=("-o", "--output"), type=Path,
                          metavar="PLAN.json", neutral=True)
    budget_minutes: float = option(8.0, "UNet training time of each round on this machine, in minutes; the "
                                   "iterations are planned from it", metavar="MIN")
    max_patch_voxels: int = option(64 * 64 * 64, "largest UNet patch, in voxels (memory and time per iteration)",
                                   metavar="N")
    timing: bool = option(True, "measure the seconds per training iteration of the planned network on this "
                          "machine (--no-timing: plan the iterations from the budget at 1 s per iteration)")

    def __post_init__(self):
        super().__post_init__()
        self.input, self.split, self.output = Path(self.input), Path(self.split), Path(self.output)
        check_range("budget_minutes", self.budget_minutes, 0.0, lo_open=True)
        check_range("max_patch_voxels", self.max_patch_voxels, 8 ** 3)


# --------------------------------------------------------------------------- fingerprint


def _summary(values: np.ndarray) -> dict:
    """Per-axis median, min and max of (N, 3) values."""
    return {"median": np.median(values, axis=0).round(4).tolist(), "min": values.min(axis=0).round(4).tolist(),
            "max": values.max(axis=0).round(4).tolist()}


def cohort_geometry(dataset, cases: list[str]) -> dict:
    """Canonical shapes (voxels) and spacings (mm) of ``cases`` from their headers alone."""
    import nibabel as nib

    shapes, spacings = [], []
    for case in cases:
        path = dataset.image_path(case)
        shapes.append(canonical_shape(path))
        img = nib.load(str(path))
        ornt = nib.orientations.io_orientation(img.affine)
        zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
        spacings.append([float(zooms[int(d)]) for d in np.argsort(ornt[:, 0])])
    shapes_a, spacing_a = np.asarray(shapes, np.float64), np.asarray(spacings, np.float64)
    return {"cases": len(cases), "shape": _summary(shapes_a), "spacing_mm": _summary(spacing_a)}


def template_fingerprint(dataset, template: str) -> dict:
    """Classes, voxel counts, extents and intensities of the template (its image and label).

    Returns a dict: ``classes`` {index: {name, voxels, extent_vox, extent_mm, components (26-connected
    pieces)}}, ``foreground``
    (the union: voxels, extent_vox, extent_mm, box_fraction), ``intensity`` (image and foreground
    percentiles 0.5 / 50 / 99.5, mean and sd).

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
                               "extent_mm": mm, "components": components.count(mask)}
    fg = lab > 0
    vox, mm = extent(fg)
    values, fg_values = image.array.ravel(), image.array[fg]

    def stats(v):
        p = np.percentile(v, [0.5, 50, 99.5])
        return {"p0_5": float(p[0]), "median": float(p[1]), "p99_5": float(p[2]), "mean": float(v.mean()),
                "sd": float(v.std())}

    return {"case": template, "shape": list(image.shape), "spacing_mm": spacing.round(4).tolist(),
            "classes": classes,
            "foreground": {"voxels": int(fg.sum()), "extent_vox": vox, "extent_mm": mm,
                           "box_fraction": float(np.prod(vox) / np.prod(image.shape))},
            "intensity": {"image": stats(values), "foreground": stats(fg_values)}}


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


def plan_patch(extent_vox, median_shape, spacing, max_voxels: int) -> tuple[list[int], list[list[int]], str]:
    """UNet patch and per-level strides for a structure of ``extent_vox`` voxels.

    Returns ``(patch, strides, reason)``; each patch edge is a multiple of the product of its
    axis's strides (the UNet's divisibility).
    """
    want = [e * (1 + 2 * PATCH_MARGIN) for e in extent_vox]
    cap = [max(m, 16) for m in median_shape]
    patch = [max(2 * MIN_BOTTOM_EDGE, min(w, c)) for w, c in zip(want, cap)]
    patch = [1 if m == 1 else p for p, m in zip(patch, median_shape)]  # 2D images: one slice
    strides = plan_strides(patch, spacing)
    step = [int(np.prod([lv[a] for lv in strides])) if strides else 1 for a in range(3)]
    patch = [int(math.ceil(p / st)) * st for p, st in zip(patch, step)]
    shrunk = False
    while int(np.prod(patch)) > max_voxels and max(p // st for p, st in zip(patch, step)) > 1:
        i = int(np.argmax([p / max(st, 1) * sp for p, st, sp in zip(patch, step, spacing)]))
        if patch[i] - step[i] < step[i] * MIN_BOTTOM_EDGE // 2:
            break
        patch[i] -= step[i]
        shrunk = True
    reason = (f"template foreground extent {list(extent_vox)} voxels + {PATCH_MARGIN:.0%} margin per side, "
              f"capped at the median image shape {list(median_shape)}, multiples of {step}"
              + (f", shrunk to at most {max_voxels} voxels (largest extent in mm first)" if shrunk else ""))
    return patch, strides, reason


def plan_flip_axes(dataset, template: str) -> tuple[list[int], str]:
    """Every axis but one along which the template's classes follow each other (class planes)."""

    label = dataset.read_label(template).array
    rule, _ = learn(label, dataset.label_map.num_classes)
    every = [a for a in range(3) if label.shape[a] > 1]  # a 2D image has no third axis to flip
    if rule is None:
        return every, "no axis orders the template's foreground classes: a flip along any axis keeps them"
    axes = [a for a in every if a != rule.axis]
    return axes, (f"the template's classes follow each other along axis {rule.axis}: a flip there would swap "
                  "them")


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


def plan_normalisation(fp: dict) -> tuple[dict, str]:
    """CT: fixed clip and z-score from the template's foreground; other modalities: per volume."""
    if fp["modality"].strip().upper() == "CT":
        fg = fp["template"]["intensity"]["foreground"]
        return ({"method": "fixed_clip_zscore", "lower": fg["p0_5"], "upper": fg["p99_5"], "mean": fg["mean"],
                 "sd": max(fg["sd"], 1e-6)},
                "CT intensities are calibrated (HU): one clip and z-score for every volume, from the template's "
                "foreground")
    return ({"method": "percentile_clip_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5},
            f"modality {fp['modality']}: intensities have no fixed scale, normalised per volume")


def seconds_per_iteration(unet: dict, num_classes: int, threads: int | None = None, steps: int = 4) -> float:
    """Fastest of ``steps`` timed training iterations (forward, DiceCE loss, backward, AdamW step) of
    the planned MONAI UNet on random data on this machine's CPU, after one warm-up step (the fastest,
    not the median: other work on a shared machine only ever slows a step down)."""
    import torch
    from monai.losses import DiceCELoss

    if threads:
        torch.set_num_threads(int(threads))
    net = nets.build_net(nets.net_params(unet, num_classes))  # 2D (one-slice patch): MONAI's 2D UNet
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


def working_spacings(spacing, flat: bool = False) -> list[list[float]]:
    """Candidate working spacings (mm), finest first: for each factor f of ``SPACING_FACTORS``,
    every axis at ``max(its spacing, f x the finest axis's)`` (the fine axes are coarsened first,
    towards isotropy; a coarse axis is never refined). ``flat`` (2D images): the in-plane axes
    only; the third keeps its spacing."""
    finest = min(spacing[:2] if flat else spacing)
    out = []
    for f in SPACING_FACTORS:
        ws = [round(max(float(s), f * finest), 4) for s in spacing]
        if flat:
            ws[2] = round(float(spacing[2]), 4)
        if ws not in out:
            out.append(ws)
    return out


def plan_network(fp: dict, working: list[float], max_voxels: int) -> tuple[dict, str]:
    """The UNet (patch, strides, channels, residual units, batch) for the template structure at
    ``working`` mm; returns ``(unet, patch reason)``."""
    spacing = fp["cohort"]["spacing_mm"]["median"]
    extent = [int(math.ceil(e / w)) for e, w in zip(fp["template"]["foreground"]["extent_mm"], working)]
    median_shape = [int(round(n * s / w)) for n, s, w in zip(fp["cohort"]["shape"]["median"], spacing, working)]
    if is_flat(fp):
        median_shape[2] = 1
    patch, strides, reason = plan_patch(extent, median_shape, working, max_voxels)
    channels = [min(BASE_CHANNELS * 2 ** i, MAX_CHANNELS) for i in range(len(strides) + 1)]
    unet = {"patch": patch, "strides": strides, "channels": channels, "num_res_units": 1,
            "batch_size": BATCH_2D if is_flat(fp) else 2}
    return (nets.for_2d(unet | {"flip_axes": []}) if is_flat(fp) else unet), reason


def smallest_class_edge(fp: dict, working: list[float]) -> float:
    """The smallest extent, in voxels at ``working`` mm, of any template class along any axis (the
    image axes of 2D images)."""
    n = 2 if is_flat(fp) else 3
    return min(e / w for c in fp["template"]["classes"].values() for e, w in zip(c["extent_mm"][:n], working[:n]))


def is_flat(fp: dict) -> bool:
    """A cohort of 2D images: every case is one slice along the third axis."""
    shape = fp["cohort"]["shape"]
    return int(shape.get("max", shape["median"])[2]) == 1


def plan_spacing(fp: dict, budget_seconds: float, cost, max_voxels: int) -> dict:
    """The working spacing: the finest candidate (:func:`working_spacings`) at which the planned
    network affords ``MIN_AFFORDED_ITERATIONS`` iterations within ``budget_seconds``, never so
    coarse that a template class is less than ``MIN_CLASS_EDGE`` voxels across.

    Args:
        fp: the fingerprint.
        budget_seconds: training seconds per round.
        cost: callable ``unet dict -> seconds per training iteration`` (the measured one is
            :func:`seconds_per_iteration`).
        max_voxels: the patch's voxel budget.

    Returns:
        ``{"spacing": mm list, "native": bool, "unet": ..., "patch_reason": ..., "seconds": s per
        iteration, "tried": [{"spacing", "patch", "seconds_per_iteration", "affords"}], "reason": ...}``;
        ``native`` is True when the cohort's own (uniform) spacing is kept.
    """
    geometry = fp["cohort"]["spacing_mm"]
    spacing = geometry["median"]
    uniform = np.allclose(geometry["min"], geometry["max"], rtol=1e-3) and np.allclose(geometry["min"], spacing,
                                                                                        rtol=1e-3)
    tried, chosen = [], None
    for i, ws in enumerate(working_spacings(spacing, flat=is_flat(fp))):
        if i and smallest_class_edge(fp, ws) < MIN_CLASS_EDGE:
            break
        unet, patch_reason = plan_network(fp, ws, max_voxels)
        sec = float(cost(unet))
        affords = int(budget_seconds / sec)
        tried.append({"spacing": ws, "patch": unet["patch"], "seconds_per_iteration": round(sec, 4),
                      "affords": affords})
        chosen = {"spacing": ws, "native": i == 0 and uniform, "unet": unet, "patch_reason": patch_reason,
                  "seconds": sec}
        if affords >= MIN_AFFORDED_ITERATIONS:
            break
    last = tried[-1]
    if last["affords"] >= MIN_AFFORDED_ITERATIONS:
        why = (f"the finest spacing at which the planned network affords >= {MIN_AFFORDED_ITERATIONS} iterations "
               f"in the budget ({last['affords']})")
    else:
        why = (f"no spacing affords {MIN_AFFORDED_ITERATIONS} iterations in the budget before a template class "
               f"would be under {MIN_CLASS_EDGE} voxels across: the coarsest allowed")
    grid = ("each volume on its own grid (the cohort's spacing is uniform)" if chosen["native"] else
            "every volume resampled to it, outputs resampled back to each input's grid")
    chosen["tried"] = tried
    chosen["reason"] = f"{why}; {grid}; tried {[(t['spacing'], t['affords']) for t in tried]}"
    return chosen


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
    """Every decision of the plan, each ``{"value": ..., "reason": ...}``."""
    num_classes = dataset.label_map.num_classes
    budget = settings.budget_minutes * 60.0
    spacing = fp["cohort"]["spacing_mm"]["median"]
    if settings.timing:
        sp = plan_spacing(fp, budget, lambda unet: seconds_per_iteration(unet, num_classes, settings.threads),
                          settings.max_patch_voxels)
        sec, sec_reason = sp["seconds"], f"measured {sp['seconds']:.3f} s per iteration on this machine"
    else:
        unet, patch_reason = plan_network(fp, spacing, settings.max_patch_voxels)
        sp = {"spacing": spacing, "native": True, "unet": unet, "patch_reason": patch_reason,
              "reason": "not measured (--no-timing): the cohort's median spacing, each volume on its own grid"}
        sec, sec_reason = 1.0, "not measured (--no-timing): 1 s per iteration assumed"
    unet, strides = sp["unet"], sp["unet"]["strides"]
    flips, flip_reason = plan_flip_axes(dataset, fp["template"]["case"])
    norm, norm_reason = plan_normalisation(fp)
    iters = int(np.clip(budget / sec, MIN_ITERATIONS, MAX_ITERATIONS))
    axes, axes_reason = plan_encode_axes(spacing, flat=is_flat(fp))
    lcc, lcc_reason = plan_largest_component(fp)
    return {
        "encode_axes": {"value": axes, "reason": axes_reason},
        "spacing": {"value": None if sp["native"] else sp["spacing"], "mm": sp["spacing"], "reason": sp["reason"]},
        "patch": {"value": unet["patch"], "reason": sp["patch_reason"]},
        "strides": {"value": strides, "reason": f"{len(strides)} levels; an axis is downsampled while its spacing "
                                                f"is below twice the finest and its edge stays >= {MIN_BOTTOM_EDGE} "
                                                f"voxels (working spacing {sp['spacing']} mm)"},
        "channels": {"value": unet["channels"], "reason": f"{BASE_CHANNELS} doubling per level, at most "
                                                          f"{MAX_CHANNELS}"},
        "batch_size": {"value": unet["batch_size"], "reason": (
            f"{BATCH_2D} 2D patches (a 2D patch costs a fraction of a 3D one; nnU-Net's 2D batches are larger "
            "than its 3D ones)" if is_flat(fp) else "two patches: one foreground-centred on average")},
        "iterations": {"value": iters, "reason": f"{settings.budget_minutes:g} min per round / {sec_reason}, "
                                                 f"clipped to [{MIN_ITERATIONS}, {MAX_ITERATIONS}]"},
        "flip_axes": {"value": flips, "reason": flip_reason},
        "normalisation": {"value": norm, "reason": norm_reason},
        "largest_component": {"value": lcc, "reason": lcc_reason},
    }


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
        the plan: ``{"fingerprint": ..., "decisions": ..., "command": ...}``.

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
    plan = {"fingerprint": fp, "decisions": decide(dataset, fp, settings),
            "command": command_line("plan", settings)}
    write_json(settings.output, plan)
    if not settings.quiet:
        for key, d in plan["decisions"].items():
            print(f"[plan] {key}: {d['value']}  ({d['reason']})", flush=True)
    return plan


SETTINGS = PlanSettings
STAGE = make_plan
