"""Round-0 pseudo-labels from one annotated template and the foundation model's features.

Stage 1 of SemiSAM-O1 (Zhang et al., arXiv 2604.24109): the template's real
label is carried to every other volume of the cohort through the encoder's
dense features (read from the feature store written by ``semisam-o1 encode``).
Only the template's label is ever read; the template itself is never among the
propagated cases (``train`` takes its real label from the dataset).

Two methods:

``knn`` (default): label transfer from the template's voxels. Each voxel of a
case takes the weighted vote of its ``k`` most similar template voxels
(weights max(similarity, 0), the C++ ``kernels.knn_vote``), where the
similarity of a case voxel q and a template voxel b is

    s(q, b) = mean over encoding axes of cos(f_q, f_b)  -  (w^2 / 2) * ||p_q - p_b||^2

with ``w = --position-weight`` and p the voxel's *normalised position* (see
below). The position term is folded into the kernel's inner product by
appending coordinates and bias terms to each vector (see
:func:`augment_with_position`), so no special kernel is needed. The template
bank holds every foreground voxel plus a random sample of background voxels
(``--bank-background``; optionally every background voxel near the
foreground, ``--bank-ring``, and inverse-sampling-rate vote weights,
``--bank-reweight``); queries run on a grid of stride ``--query-stride`` and
the per-class vote shares are brought back to the voxel grid by trilinear
interpolation, smoothed (``--smooth``) and arg-maxed. Defaults (k = 10,
w = 1.0, stride 2, 20,000 background voxels, smoothing sigma 1, largest
component) are the best of benchmarks/bench_propagate.py on the MSD Hippocampus
unlabeled pool (benchmarks/propagate.md; the weight w: docs/experiments.md,
"Position weight").

``--recentre N`` (default 1) removes part of what the position term inherits from
the template's box: after the vote, the case's coordinates are translated so that
the centroid of its predicted foreground meets the template's foreground centroid,
and the vote is run again (N times, so N + 1 votes). A template whose structure
sits off the cohort's mean place in its box hands that offset on to every case
through the position term; one pass removes part of it and raises the labels' Dice,
a second does not help further (docs/experiments.md, "Recentring").

``prototype``: class prototypes (the method's description in the paper). On
each encoding axis's own feature-cell grid the template label is brought to
the cells as area fractions (exact box overlaps, so thin structures keep a
partial weight), and each class's prototype is the fraction-weighted mean of
the L2-normalised cell features; ``--prototypes-per-class N`` (background:
``--background-prototypes``) splits a class into N prototypes by weighted
k-means. Every cell is scored against every prototype by cosine similarity
(C++ ``kernels.prototype_similarity``), a class's score is its best
prototype's, scores are brought to the voxel grid (trilinear), averaged over
axes, and the argmax is the label. ``--position-weight`` does not apply.

**Normalised position, and the assumption it makes.** ``--coords extent``
(default) maps each volume's voxel centres onto [-1, 1] along every axis
(canonical RAS order): p = (2 i + 1) / n - 1 for voxel i of n. The term
therefore assumes that the cohort shares a consistent field of view: the
anatomy sits at about the same place relative to each volume's bounding box
(true of crops around one organ such as MSD Hippocampus; false for
whole-body scans with varying coverage, where ``--position-weight 0`` must be
used). ``--coords mm`` instead centres each volume and scales millimetres by
the template's half-extent, so it keeps physical size but still assumes a
common centre.

**Registration prior** (``--prior``, :mod:`semisam_o1.methods.registration`): the template is registered
to each case by ANTs SyN (antspyx) and ``registration`` writes the warped template label alone;
``position`` keeps the kNN vote but takes each case voxel's position in the template's frame
through the warp (the bank's own normalised coordinates; no recentring); ``choose`` picks per case
between those two labels by a label-free rule (:func:`separation`). Warps are cached in
``OUTPUT/registration/`` (resumable). None of them beats ``none``, which stays the default
(benchmarks/propagate.md, "Registration as a prior").

Post-processing: ``--smooth SIGMA`` smooths each class's score map with a Gaussian
before the argmax; ``--largest-component`` keeps the largest 26-connected
component of every foreground class that the template's label shows in one piece
(other voxels of the class become background; :mod:`semisam_o1.methods.components`). ``--class-planes auto`` (default): when the template's foreground
classes follow each other along one axis, separated by planes (checked on its
label by :func:`semisam_o1.methods.class_planes.learn`; MSD Hippocampus: Anterior |
Posterior across the posterior-anterior axis), every pseudo-label's foreground
is re-split the same way (:func:`semisam_o1.methods.class_planes.apply`) and the rule is
written to ``OUTPUT/class_planes.json`` for ``predict --class-planes``.

Outputs: ``OUTPUT/<case>.nii.gz``, integer labels with the input image's
voxel order, affine and header (``io.write_label``), and with
``--save-scores`` ``OUTPUT/scores/<case>.nii.gz``, float32 per-class scores
(X, Y, Z, K) whose argmax is the label before the largest-component step (knn: vote
shares in [0, 1]; prototype: cosine scores); ``OUTPUT/stage.json``, the stage
record (:mod:`semisam_o1.core.resume`: signed by the settings, the store's signature,
the template label's SHA-256 and each case's store entry). Cases are processed one
at a time (memory does not grow with the cohort); an interrupted run resumes,
keeping the cases already written; a finished folder returns at once.

Errors (InputError, exit 2, nothing written): missing features for a case or
a features/image grid mismatch, a template label whose shape or affine differs
from its image, an empty template label, an output path that is a file or not
writable, a folder written with other settings (without ``--overwrite``), bad options.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from semisam_o1.core.device import resolve_device
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import file_sha256
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import digest, open_stage
from semisam_o1.core.settings import CaseOptions, ComputeOptions, option, redo_changed_option, select_cases
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import canonical_shape, write_label, write_map
from semisam_o1.data.store import FeatureStore
from semisam_o1.methods import class_planes as planes
from semisam_o1.methods.registration import cached_warp
from semisam_o1.methods.template_vote import (
    MethodOptions,
    TemplateModel,
    build_template_model,
    check_foreground,
    method_params,
    pseudo_label,
    registered_positions,
    score_case,
)

__all__ = ["PropagateSettings", "SETTINGS", "STAGE", "propagate", "case_label", "separation"]

CLASS_PLANES = ("auto", "off")

# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(kw_only=True)
class PropagateSettings(CaseOptions, ComputeOptions, MethodOptions):
    """Settings of ``semisam-o1 propagate``: which cases, from which store and template, into
    which folder, and the method (:class:`MethodOptions`)."""

    features: Path = option(help="feature store written by `semisam-o1 encode`", flags=("-f", "--features"),
                            type=Path, metavar="STORE")
    template: str = option(help="case id of the one annotated template", metavar="ID")
    output: Path = option(help="folder for the pseudo-labels (<case>.nii.gz)", flags=("-o", "--output"),
                          type=Path, metavar="FOLDER", neutral=True)
    subset: str = option("unlabeled", "comma-separated subsets of --split to propagate to (default: without "
                         "--cases or --split, every case of the dataset but the template)")
    axes: tuple[int, ...] | None = option(None, "encoding axes to use (default: all in the store)", nargs="+",
                                          type=int, metavar="AXIS")
    class_planes: str = option("auto", "auto: if the template's foreground classes follow each other along one "
                               "axis, separated by planes (MSD Hippocampus: Anterior | Posterior), give every "
                               "pseudo-label the same structure and write the rule to OUTPUT/class_planes.json",
                               choices=CLASS_PLANES)
    save_scores: bool = option(False, "also write per-class score maps to OUTPUT/scores/")
    overwrite: bool = option(False, "redo every case of a folder written with other settings or inputs",
                             neutral=True)
    redo_changed: bool = redo_changed_option()

    def __post_init__(self):
        super().__post_init__()
        self.features = Path(self.features)
        self.output = Path(self.output)
        if self.axes is not None:
            self.axes = tuple(int(a) for a in self.axes)
        if self.class_planes not in CLASS_PLANES:
            raise InputError(f"--class-planes {self.class_planes}: choose one of {', '.join(CLASS_PLANES)}")


# --------------------------------------------------------------------------- geometry helpers


# --------------------------------------------------------------------------- the template model


# --------------------------------------------------------------------------- scoring a case


# --------------------------------------------------------------------------- the stage


@dataclass
class _Inputs:
    """What the stage reads, opened and checked (see :func:`_open_inputs`)."""

    ds: object  # semisam_o1.data.dataset.Dataset
    store: object  # semisam_o1.data.store.FeatureStore
    cases: list[str]
    axes: tuple[int, ...]
    signed: dict
    registration: object = None  # a _Registration with --prior (set by propagate once the folder is open)


def _open_inputs(s: PropagateSettings) -> _Inputs:
    """Open the dataset and the store, choose the cases (never the template), and digest what
    the stage reads: the store's signature, the template label's SHA-256, each case's store entry
    (its meta.json, which holds the input image's hash).

    Raises:
        InputError: no such dataset, store, template or case; a case without features; an axis the
            store lacks.
    """

    ds = Dataset(s.input)
    if not s.features.is_dir():
        raise InputError(f"{s.features}: feature store not found (run `semisam-o1 encode` first)")
    store = FeatureStore(s.features)
    if s.template not in ds.images:
        raise InputError(f"{ds.root}: template case {s.template} not found in imagesTr/")
    if s.cases or s.split is not None:
        cases = [c for c in select_cases(ds, s) if c != s.template]
    else:
        cases = [c for c in ds.cases if c != s.template]
    missing = [c for c in [s.template, *cases] if not store.has(c)]
    if missing:
        raise InputError(f"{s.features}: no features for case {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; run `semisam-o1 encode` on them first")
    bad = [a for a in (s.axes or ()) if a not in tuple(store.axes)]
    if bad:
        raise InputError(f"--axes {bad[0]}: the store has axes {tuple(store.axes)}")
    signed = {"store": store.signature, "template_label": file_sha256(ds.label_path(s.template)),
              "features": {c: digest(store.read_meta(c)) for c in [s.template, *cases]}}
    return _Inputs(ds, store, cases, tuple(s.axes) if s.axes is not None else tuple(store.axes), signed)


def _check_grid(s: PropagateSettings, case: str, cf_shape, image_shape) -> None:
    if tuple(int(n) for n in cf_shape) != tuple(image_shape):
        raise InputError(f"{s.features}: features of {case} are on grid {tuple(int(n) for n in cf_shape)}, "
                         f"its image is {tuple(image_shape)}: re-encode it")


def _template_model(s: PropagateSettings, inp: _Inputs) -> tuple[TemplateModel, np.ndarray]:
    """Read and check the template (label on its image's grid, not empty, features on the same
    grid), check every case's features grid against its image header, and build the model.

    Returns:
        (model, template label (X, Y, Z) class indices).

    Raises:
        InputError: a label/image or features/image mismatch, an empty template label, k larger
            than the bank.
    """

    ds = inp.ds
    t_img = ds.read_image(s.template)
    t_lab = ds.read_label(s.template, reference=t_img)  # shape / affine mismatch -> InputError
    check_foreground(t_lab.array, t_lab.path)
    t_cf = inp.store.load(s.template)
    _check_grid(s, s.template, t_cf.voxel_shape, t_img.shape)
    for case in inp.cases:
        _check_grid(s, case, inp.store.load(case).voxel_shape, canonical_shape(ds.image_path(case)))
    model = build_template_model(t_cf, t_lab.array, ds.label_map.num_classes, s, axes=inp.axes,
                                 spacing=t_img.spacing, class_names=ds.label_map.names)
    return model, t_lab.array


def _class_planes(s: PropagateSettings, inp: _Inputs, label: np.ndarray, out: Path):
    """Learn the class-planes rule from the template's label (``--class-planes auto``) and write it
    to ``OUTPUT/class_planes.json``; with no rule, remove that file (one left by an overwritten run
    would otherwise be applied by ``predict``). Returns the rule or None."""

    names = inp.ds.label_map.names
    rule, errors = (planes.learn(label, inp.ds.label_map.num_classes) if s.class_planes == "auto"
                    else (None, None))
    rule_path = out / planes.CLASS_PLANES_JSON
    if rule is not None:
        planes.write(rule_path, rule, names)
    elif rule_path.exists():
        rule_path.unlink()
    if not s.quiet and s.class_planes == "auto":
        if rule is not None:
            print(f"propagate: class planes: {rule.describe(names)}; every pseudo-label gets "
                  f"the same structure ({rule_path})", file=sys.stderr)
        elif errors[0] is not None:
            print(f"propagate: class planes not used: the template's best planes misassign "
                  f"{100 * min(errors):.2f}% of its foreground", file=sys.stderr)
    return rule


@dataclass
class _Registration:
    """The template as ``--prior`` registers it (:mod:`semisam_o1.methods.registration`), warps cached in
    ``folder``; ITK runs on 1 thread, the only setting with reproducible warps
    (:mod:`semisam_o1.methods.registration`, "Reproducibility")."""

    folder: Path
    image: object  # semisam_o1.data.images.Volume
    label: object  # semisam_o1.data.images.Volume (class indices)
    label_map: object

    def warp(self, case: str, img):
        return cached_warp(self.folder, self.image, self.label, case, img, self.label_map, threads=1)


def _registration(s: PropagateSettings, inp: _Inputs, out: Path) -> _Registration | None:
    if s.prior == "none":
        return None
    t_img = inp.ds.read_image(s.template)
    return _Registration(out / "registration", t_img, inp.ds.read_label(s.template, reference=t_img),
                         inp.ds.label_map)


def case_label(model: TemplateModel, rule, cf, img, warp=None, *, device: str = "cpu",
               threads: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One case's pseudo-label as ``propagate`` makes it, for every ``model.params.prior``.

    Args:
        model, rule: the template model and class-planes rule (or None).
        cf: the case's store entry; img: its image (:class:`semisam_o1.data.images.Volume`).
        warp: the template's :class:`semisam_o1.methods.registration.Warp` to the case (any prior but none).

    Returns:
        (scores (K, X, Y, Z) float32 (registration: the warped label's one-hot), label (X, Y, Z) uint8,
        what was chosen: ``{"source": "knn" | "registration"[, criterion values]}``).
    """
    prior = model.params.prior
    if prior == "registration":
        onehot = (warp.label[None] == np.arange(model.num_classes)[:, None, None, None]).astype(np.float32)
        return onehot, warp.label.astype(np.uint8), {"source": "registration"}
    positions = None if prior == "none" else registered_positions(warp.coords, model)
    scores, lab = pseudo_label(score_case(model, cf, spacing=img.spacing, device=device, threads=threads,
                                          positions=positions), model, rule)
    if prior != "choose":
        return scores, lab, {"source": "knn"}
    return _choose(scores, lab, warp, img, model)


def separation(image: np.ndarray, labels: Sequence[np.ndarray]) -> list[float]:
    """Otsu's criterion (Otsu 1979) of each candidate label: the between-class share of the image's
    intensity variance, eta^2 = n_f n_b (mu_f - mu_b)^2 / (n^2 var), foreground (any class > 0)
    against background, over one region for all candidates: the bounding box of their foregrounds'
    union, grown by half its extent on every side (clipped to the volume). A label that follows the
    image's edges separates its intensities best. image: (X, Y, Z) float; labels: (X, Y, Z) each.
    Returns one value in [0, 1] per label (0 for an empty one or a flat region)."""
    union = np.any([np.asarray(lab) > 0 for lab in labels], 0)
    if not union.any():
        return [0.0] * len(labels)
    box = []
    for d, idx in enumerate(np.nonzero(union)):
        lo, hi = int(idx.min()), int(idx.max()) + 1
        grow = (hi - lo) // 2
        box.append(slice(max(0, lo - grow), min(union.shape[d], hi + grow)))
    x = np.asarray(image, np.float64)[tuple(box)]
    var, out = x.var(), []
    for lab in labels:
        fg = np.asarray(lab)[tuple(box)] > 0
        nf, n = int(fg.sum()), fg.size
        if var <= 0 or nf in (0, n):
            out.append(0.0)
            continue
        out.append(float(nf * (n - nf) * (x[fg].mean() - x[~fg].mean()) ** 2 / (n * n * var)))
    return out


def _choose(scores: np.ndarray, lab: np.ndarray, warp, img, model: TemplateModel):
    """``--prior choose``: the kNN (registered positions) label or the registration's, whichever
    separates the image's intensities better (:func:`separation`)."""
    knn, reg = separation(img.array, [lab, warp.label])
    chosen = {"knn_separation": round(knn, 5), "registration_separation": round(reg, 5)}
    if reg > knn:
        onehot = (warp.label[None] == np.arange(model.num_classes)[:, None, None, None]).astype(np.float32)
        return onehot, warp.label.astype(np.uint8), {"source": "registration", **chosen}
    return scores, lab, {"source": "knn", **chosen}


def _label_case(s: PropagateSettings, inp: _Inputs, model: TemplateModel, rule, case: str, out: Path,
                device: str) -> dict:
    """Score one case, turn the scores into its pseudo-label (:func:`case_label`) and write it (and its
    scores with ``--save-scores``), atomically. Returns what :func:`case_label` chose."""

    img = inp.ds.read_image(case)
    cf = inp.store.load(case)
    _check_grid(s, case, cf.voxel_shape, img.shape)
    warp = None if inp.registration is None else inp.registration.warp(case, img)
    scores, lab, chosen = case_label(model, rule, cf, img, warp, device=device, threads=s.threads)
    if s.save_scores:
        write_map(out / "scores" / f"{case}.nii.gz",
                  np.moveaxis(np.where(np.isfinite(scores), scores, -1.0), 0, -1), img)
    write_label(out / f"{case}.nii.gz", lab, img, inp.ds.label_map)
    return chosen


def _done(s: PropagateSettings, out: Path, case: str) -> bool:
    return (out / f"{case}.nii.gz").exists() and (not s.save_scores or (out / "scores" / f"{case}.nii.gz").exists())


def propagate(settings: PropagateSettings) -> dict:
    """Write round-0 pseudo-labels for the chosen cases (``cases``, or the ``subset`` of ``split``,
    or every case of the dataset; never the template) into ``settings.output``.

    Every input is checked before anything is written. A folder whose record (``stage.json``) says
    it finished with the same settings and inputs returns its summary at once; an unfinished one
    resumes, keeping the cases already written.

    Args:
        settings: a :class:`PropagateSettings`.

    Returns:
        the summary: ``written`` / ``skipped`` (cases), ``template``, ``method``, ``params`` (the
        :class:`MethodOptions`), ``axes``, ``class_planes`` (the rule's JSON or None), ``device``,
        ``seconds`` (the whole stage), ``seconds_per_case`` (mean over written cases, or None).

    Raises:
        InputError: see the module's docstring (one line; nothing written).
    """

    s = settings
    t_start = time.perf_counter()
    device = resolve_device(s.device, kernels=True)
    inp = _open_inputs(s)
    record = open_stage(s.output, "propagate", s, inputs=inp.signed, overwrite=s.overwrite,
                        redo_changed=s.redo_changed, per_case="features")
    if record.finished:
        return record.summary()
    model, t_label = _template_model(s, inp)
    reuse = record.reuse  # (read before start(), which marks the folder as this signature's)
    redone = record.drop_outputs(lambda c: (s.output / f"{c}.nii.gz", s.output / "scores" / f"{c}.nii.gz"), inp.cases)
    record.start()
    out = record.folder
    rule = _class_planes(s, inp, t_label, out)
    inp.registration = _registration(s, inp, out)
    todo = [c for c in inp.cases if not (reuse and _done(s, out, c))]
    seconds, chosen = [], {}
    for case in progress(todo, quiet=s.quiet, desc="propagate"):
        t0 = time.perf_counter()
        chosen[case] = _label_case(s, inp, model, rule, case, out, device)
        seconds.append(time.perf_counter() - t0)
    summary = dict(written=len(todo), skipped=len(inp.cases) - len(todo), template=s.template, method=s.method,
                   params=method_params(s), axes=list(model.axes),
                   class_planes=None if rule is None else rule.to_json(inp.ds.label_map.names), device=device,
                   seconds=round(time.perf_counter() - t_start, 2),
                   seconds_per_case=round(float(np.mean(seconds)), 3) if seconds else None,
                   **({"redone": redone} if record.redoing else {}),
                   **({"chosen": chosen} if s.prior == "choose" else {}))
    record.finish(summary)
    if not s.quiet:
        print(f"propagate: {summary['written']} cases written, {summary['skipped']} already done, into {out} "
              f"({summary['seconds']:.1f} s)", file=sys.stderr)
    return summary


SETTINGS = PropagateSettings
STAGE = propagate
