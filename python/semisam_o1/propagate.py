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
component) are the best of benchmarks/bench_propagate.py on the Hippocampus
unlabeled pool (benchmarks/propagate.md; for w at k = 10: mean Dice 0.781 /
0.782 / 0.780 / 0.778 for w = 0.75 / 1 / 1.25 / 1.5 on 19 pool cases, 0.772
for w = 1 vs 0.764 for w = 1.5 on all 199).

``--recentre N`` (default 1) removes part of what the position term inherits from
the template's box: after the vote, the case's coordinates are translated so that
the centroid of its predicted foreground meets the template's foreground centroid,
and the vote is run again (N times). On MSD Hippocampus the template's
hippocampus sits 1.3 / 0.7 / 0.4 voxels off the pool's mean place in its box
(left-right / posterior-anterior / inferior-superior); one pass moves the
pseudo-labels' mean left-right centroid error from +0.63 to +0.48 voxels, the
whole-hippocampus Dice on the 199 pool cases from 0.826 to 0.833 and the mean
foreground Dice from 0.778 to 0.782 (class planes on; a second pass: 0.834 /
0.780), at twice the vote time.

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

**Registration prior** (``--prior``, :mod:`semisam_o1.registration`): the template is registered
to each case by ANTs SyN (antspyx) and ``registration`` writes the warped template label alone;
``position`` keeps the kNN vote but takes each case voxel's position in the template's frame
through the warp (the bank's own normalised coordinates; no recentring); ``choose`` picks per case
between those two labels by a label-free rule (:func:`separation`). Warps are cached in
``OUTPUT/registration/`` (resumable). Measured on both datasets' 20 pool cases
(benchmarks/propagate.md): not better than ``none``, which stays the default.

Post-processing: ``--smooth SIGMA`` smooths each class's score map with a Gaussian
before the argmax; ``--largest-component`` keeps the largest 26-connected
component of every foreground class that the template's label shows in one piece
(other voxels of the class become background; :mod:`semisam_o1.components`). ``--class-planes auto`` (default): when the template's foreground
classes follow each other along one axis, separated by planes (checked on its
label by :func:`semisam_o1.class_planes.learn`; MSD Hippocampus: Anterior |
Posterior across the posterior-anterior axis), every pseudo-label's foreground
is re-split the same way (:func:`semisam_o1.class_planes.apply`) and the rule is
written to ``OUTPUT/class_planes.json`` for ``predict --class-planes``.

Outputs: ``OUTPUT/<case>.nii.gz``, integer labels with the input image's
voxel order, affine and header (``io.write_label``), and with
``--save-scores`` ``OUTPUT/scores/<case>.nii.gz``, float32 per-class scores
(X, Y, Z, K) whose argmax is the label before the largest-component step (knn: vote
shares in [0, 1]; prototype: cosine scores); ``OUTPUT/stage.json``, the stage
record (:mod:`semisam_o1.resume`: signed by the settings, the store's signature,
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .settings import CaseOptions, Checked, ComputeOptions, check_range, option

__all__ = [
    "MethodOptions",
    "PropagateSettings",
    "SETTINGS",
    "STAGE",
    "propagate",
    "area_fractions",
    "class_prototypes",
    "normalised_coords",
    "augment_with_position",
    "build_template_model",
    "score_case",
    "smooth_scores",
    "labels_from_scores",
    "pseudo_label",
    "method_params",
    "largest_component",
    "registered_positions",
    "case_label",
]

METHODS = ("knn", "prototype")
COORDS = ("extent", "mm")
CLASS_PLANES = ("auto", "off")
PRIORS = ("none", "registration", "position", "choose")

# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(kw_only=True)
class MethodOptions(Checked):
    """How the template's label is carried to a case (the method's parameters).

    A field group of :class:`PropagateSettings`; :func:`build_template_model`,
    :func:`score_case` and :func:`labels_from_scores` read only these fields, so
    a benchmark can build one without a dataset or an output folder. Defaults:
    the best of benchmarks/bench_propagate.py (benchmarks/propagate.md).
    """

    method: str = option("knn", "knn: transfer by the k most similar template voxels; prototype: class "
                         "prototypes", choices=METHODS)
    k: int = option(10, "knn: neighbours per voxel")
    position_weight: float = option(1.0, "knn: w in cos - (w^2/2)|p_q - p_b|^2; 0 switches the position term "
                                    "off (needed when the cohort's field of view is not consistent)")
    coords: str = option("extent", "knn: normalised positions: each volume's box onto [-1,1] (extent), or "
                         "centred mm scaled by the template's half-extent (mm)", choices=COORDS)
    bank_background: int = option(20000, "knn: background template voxels sampled into the bank (-1: all)")
    bank_ring: int = option(0, "knn: keep every background voxel within this many voxels of the foreground in "
                            "the bank (benchmarks/propagate.md, 19 pool cases, k=10 w=1.5, 5000 sampled: ring 3 "
                            "mean Dice 0.768 with smoothing + largest component, vs 0.778 for the 20000-voxel "
                            "bank without ring)")
    bank_reweight: bool = option(False, "knn: weight sampled background voxels by the inverse sampling rate in "
                                 "the vote (benchmarks/propagate.md, 19 pool cases, k=10 w=1.5, 5000 sampled: mean "
                                 "Dice 0.764, with ring 3 0.758, vs 0.778 unweighted with 20000)")
    recentre: int = option(1, "knn: passes that shift the case's coordinates so its predicted foreground "
                           "centroid meets the template's, then vote again (0: none)")
    query_stride: int = option(2, "knn: query every n-th voxel per axis, interpolate the vote shares")
    prototypes_per_class: int = option(3, "prototype: prototypes per foreground class (k-means when > 1)")
    background_prototypes: int = option(8, "prototype: prototypes for the background (k-means when > 1)")
    largest_component: bool = option(True, "keep the largest 26-connected component of each foreground class "
                                      "that the template's label shows in one piece")
    smooth: float = option(1.0, "Gaussian smoothing (sigma, voxels) of the class scores before the argmax; "
                           "0: none")
    seed: int = option(0, "seed of the background sample (knn) and of k-means (prototype)")
    prior: str = option("none", "where a case voxel sits, for the position term: none: its normalised box "
                        "coordinates; registration: no vote, the template's label warped to the case by ANTs SyN "
                        "(semisam_o1.registration); position: knn with the voxel's position taken in the "
                        "template's frame through that warp (no recentring); choose: per case, the label-free "
                        "choice between the position and registration labels (benchmarks/propagate.md). Warps "
                        "are cached in OUTPUT/registration/", choices=PRIORS)

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise InputError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        if self.coords not in COORDS:
            raise InputError(f"--coords {self.coords}: choose one of {', '.join(COORDS)}")
        check_range("k", self.k, 1)
        check_range("position_weight", self.position_weight, 0)
        check_range("bank_background", self.bank_background, -1)
        check_range("bank_ring", self.bank_ring, 0)
        check_range("recentre", self.recentre, 0)
        check_range("query_stride", self.query_stride, 1)
        check_range("prototypes_per_class", self.prototypes_per_class, 1)
        check_range("background_prototypes", self.background_prototypes, 1)
        check_range("smooth", self.smooth, 0)
        if self.prior not in PRIORS:
            raise InputError(f"--prior {self.prior}: choose one of {', '.join(PRIORS)}")
        if self.prior in ("position", "choose") and self.method != "knn":
            raise InputError(f"--prior {self.prior}: needs --method knn (the position term is the kNN vote's)")


def method_params(options: MethodOptions) -> dict:
    """The :class:`MethodOptions` fields of ``options`` (a settings object) as a JSON-ready dict."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(MethodOptions)}


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

    def __post_init__(self):
        super().__post_init__()
        self.features = Path(self.features)
        self.output = Path(self.output)
        if self.axes is not None:
            self.axes = tuple(int(a) for a in self.axes)
        if self.class_planes not in CLASS_PLANES:
            raise InputError(f"--class-planes {self.class_planes}: choose one of {', '.join(CLASS_PLANES)}")


# --------------------------------------------------------------------------- geometry helpers


def _box_overlap_matrix(n_cells: int, n_vox: int, offset: float, step: float) -> np.ndarray:
    """(n_cells, n_vox) float64: fraction of cell i's extent covered by voxel j.

    Cell i is centred at voxel coordinate ``offset + step * i`` with width
    ``max(step, tiny)``; voxel j spans [j - 0.5, j + 0.5]. Rows sum to the part
    of the cell that lies inside the volume (1 inside, less at the border).
    """
    centres = offset + step * np.arange(n_cells, dtype=np.float64)
    half = max(abs(step), 1e-6) / 2.0
    lo = np.maximum(centres[:, None] - half, np.arange(n_vox)[None, :] - 0.5)
    hi = np.minimum(centres[:, None] + half, np.arange(n_vox)[None, :] + 0.5)
    return np.clip(hi - lo, 0.0, None) / (2 * half)


def area_fractions(label: np.ndarray, num_classes: int, cell_shape: Sequence[int],
                   offset: Sequence[float], step: Sequence[float]) -> np.ndarray:
    """Template label brought onto a feature-cell grid as per-class area (volume) fractions.

    Parameters
    ----------
    label : (X, Y, Z) integer class indices on the voxel grid.
    num_classes : K.
    cell_shape : (a, b, c) the feature grid's shape.
    offset, step : (3,) cell index i -> voxel coordinate ``offset + step * i`` (the store's
        ``cell_to_voxel``); a cell covers ``step`` voxels around its centre.

    Returns
    -------
    (K, a, b, c) float32: the fraction of each cell's box covered by voxels of each class
    (exact box overlap, separable over axes). Cells entirely inside the volume sum to 1.
    """
    label = np.asarray(label)
    mats = [_box_overlap_matrix(int(cell_shape[d]), label.shape[d], float(offset[d]), float(step[d]))
            for d in range(3)]
    out = np.empty((num_classes, *[int(s) for s in cell_shape]), dtype=np.float32)
    for c in range(num_classes):
        onehot = (label == c).astype(np.float64)
        t = np.einsum("ix,xyz->iyz", mats[0], onehot, optimize=True)
        t = np.einsum("jy,iyz->ijz", mats[1], t, optimize=True)
        t = np.einsum("kz,ijz->ijk", mats[2], t, optimize=True)
        out[c] = t
    return out


def _l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.sqrt((x * x).sum(axis=axis, keepdims=True))
    return x / np.maximum(n, 1e-12)


def _weighted_kmeans(x: np.ndarray, w: np.ndarray, n: int, rng: np.random.Generator, iters: int = 25) -> np.ndarray:
    """Spherical k-means (cosine) of rows ``x`` (M, C, unit norm) with weights ``w`` (M,);
    returns (n', C) unit centroids, n' <= n (fewer when there are fewer distinct rows).
    k-means++ seeding (Arthur & Vassilvitskii, 2007)."""
    m = x.shape[0]
    n = min(n, m)
    if n <= 1:
        return _l2_normalise((w[:, None] * x).sum(0, keepdims=True))
    p = w / w.sum()
    centres = [x[rng.choice(m, p=p)]]
    dist = np.full(m, np.inf)
    for _ in range(1, n):
        dist = np.minimum(dist, 1.0 - x @ centres[-1])
        q = w * np.clip(dist, 0, None)
        if q.sum() <= 0:
            break
        centres.append(x[rng.choice(m, p=q / q.sum())])
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmax(x @ c.T, axis=1)
        new = np.zeros_like(c)
        np.add.at(new, assign, w[:, None] * x)
        keep = np.linalg.norm(new, axis=1) > 0
        new = _l2_normalise(new[keep])
        if new.shape == c.shape and np.allclose(new, c, atol=1e-6):
            break
        c = new
    return c


def class_prototypes(features: np.ndarray, fractions: np.ndarray, per_class: Sequence[int] | int = 1,
                     seed: int = 0, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class prototypes: fraction-weighted mean of L2-normalised features per class.

    Parameters
    ----------
    features : (C, a, b, c) features on a feature-cell grid (any float dtype).
    fractions : (K, a, b, c) area fractions of each class per cell (:func:`area_fractions`).
    per_class : prototypes per class (int, or one per class). With 1, the prototype of
        class k is ``sum_cells frac_k * f_hat / sum_cells frac_k`` (f_hat = f / ||f||), not
        renormalised. With N > 1, weighted spherical k-means on the f_hat of cells with
        ``frac_k > 0`` (weights frac_k) gives N unit-norm prototypes.

    Returns
    -------
    prototypes : (P, C) float32.
    owner : (P,) int32, the class of each prototype. A class with no cell (zero total
        fraction) gets no prototype and a ``UserWarning`` naming it.
    """
    C = features.shape[0]
    K = fractions.shape[0]
    per = [int(per_class)] * K if np.isscalar(per_class) else [int(p) for p in per_class]
    f = _l2_normalise(np.asarray(features, dtype=np.float32).reshape(C, -1).T)  # (M, C)
    rng = np.random.default_rng(seed)
    protos, owner = [], []
    for k in range(K):
        w = fractions[k].reshape(-1).astype(np.float64)
        sel = w > 0
        if w.sum() <= 0:
            name = class_names[k] if class_names else str(k)
            warnings.warn(f"template: class {k} ({name}) has no voxel on the feature grid; "
                          "it cannot be propagated", UserWarning, stacklevel=2)
            continue
        if per[k] <= 1:
            protos.append(((w[sel, None] * f[sel]).sum(0) / w[sel].sum()).astype(np.float32)[None])
        else:
            protos.append(_weighted_kmeans(f[sel], w[sel], per[k], rng).astype(np.float32))
        owner += [k] * len(protos[-1])
    return np.concatenate(protos, 0), np.asarray(owner, dtype=np.int32)


def normalised_coords(shape: Sequence[int], mode: str = "extent", spacing: Sequence[float] = (1, 1, 1),
                      scale_mm: Sequence[float] | None = None) -> list[np.ndarray]:
    """Per-axis normalised voxel-centre coordinates of a volume of ``shape``.

    ``extent``: p = (2 i + 1) / n - 1, the volume's bounding box maps onto [-1, 1].
    ``mm``: p = (i - (n - 1) / 2) * spacing / scale_mm (scale_mm: the template's half-extent in mm).
    Returns three 1-D float32 arrays.
    """
    return [_normalise_index(np.arange(int(shape[d]), dtype=np.float64), int(shape[d]), mode, float(spacing[d]),
                             None if scale_mm is None else float(scale_mm[d])) for d in range(3)]


def _normalise_index(i: np.ndarray, n: int, mode: str, spacing: float, scale_mm: float | None) -> np.ndarray:
    """:func:`normalised_coords` of (continuous) voxel indices ``i`` along an axis of ``n`` voxels."""
    if mode == "extent":
        return ((2 * i + 1) / n - 1).astype(np.float32)
    if mode == "mm":
        return ((i - (n - 1) / 2) * spacing / scale_mm).astype(np.float32)
    raise InputError(f"--coords must be 'extent' or 'mm', not {mode!r}")


def registered_positions(coords: np.ndarray, model: "TemplateModel") -> np.ndarray:
    """Normalised positions of a case's voxels in the template's frame (``--prior position``).

    Args:
        coords: (X, Y, Z, 3) float32 template voxel coordinates of each case voxel (the registration's
            :attr:`semisam_o1.registration.Warp.coords`).
        model: the kNN template model (its coordinate mode, template shape and mm scale).

    Returns:
        (X, Y, Z, 3) float32: each voxel's template coordinate normalised as the bank's
        (:func:`normalised_coords` of the template, continuous).
    """
    p, shape = model.params, model.template_shape
    spacing = [2 * model.coord_scale_mm[d] / shape[d] for d in range(3)]
    return np.stack([_normalise_index(coords[..., d].astype(np.float64), shape[d], p.coords, spacing[d],
                                      model.coord_scale_mm[d]) for d in range(3)], -1)


def augment_with_position(features: np.ndarray, coords: np.ndarray, weight: float, role: str,
                          bank_norm: float | None = None) -> np.ndarray:
    """Fold the position term into an inner product.

    For queries q and bank rows b with unit-ish features f and positions p,
    ``dot(aug(q), aug(b)) = f_q . f_b - (w^2/2) ||p_q - p_b||^2``, using

        query:  [f_q, w p_q, 1, -(w^2/2)||p_q||^2, 0]
        bank :  [f_b, w p_b, -(w^2/2)||p_b||^2, 1, pad_b]

    where ``pad_b = sqrt(M^2 - ||bank row without pad||^2)`` makes every bank row's norm
    equal to ``M = bank_norm`` (default: the largest bank row norm). A cosine kernel
    then returns ``s(q, b) / (||aug(q)|| M)``: the ranking of bank rows for a query is
    exactly that of s, and the vote weights max(cos, 0) are s's up to a positive
    per-query factor, so the weighted vote is unchanged.

    features : (N, C) float; coords : (N, 3) float; role : "query" or "bank".
    Returns (N, C + 6) float32.
    """
    f = np.asarray(features, dtype=np.float32)
    p = np.asarray(coords, dtype=np.float32)
    half = 0.5 * weight * weight
    sq = (p * p).sum(1, keepdims=True)
    n = f.shape[0]
    if role == "query":
        return np.concatenate([f, weight * p, np.ones((n, 1), np.float32), -half * sq,
                               np.zeros((n, 1), np.float32)], 1)
    if role != "bank":
        raise ValueError("role must be 'query' or 'bank'")
    core = np.concatenate([f, weight * p, -half * sq, np.ones((n, 1), np.float32)], 1)
    norm2 = (core.astype(np.float64) ** 2).sum(1)
    m2 = float(norm2.max()) if bank_norm is None else float(bank_norm) ** 2
    pad = np.sqrt(np.clip(m2 * (1 + 1e-6) - norm2, 0, None)).astype(np.float32)
    return np.concatenate([core, pad[:, None]], 1)


def _grid_points(shape: Sequence[int], stride: int) -> tuple[np.ndarray, ...]:
    """Indices of a stride-``stride`` sub-grid that always includes the last voxel."""
    idx = []
    for n in shape:
        g = np.arange(0, n, stride)
        if g[-1] != n - 1:
            g = np.append(g, n - 1)
        idx.append(g)
    return tuple(idx)


def _interp_to_grid(values: np.ndarray, src_coords: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Trilinear interpolation of ``values`` (K, a, b, c) sampled at voxel coordinates
    ``src_coords`` (three increasing 1-D arrays) onto the full voxel grid ``shape``;
    clamped at the borders. Separable (one 1-D linear interpolation per axis)."""
    out = np.asarray(values, dtype=np.float32)
    for d in range(3):
        src = np.asarray(src_coords[d], dtype=np.float64)
        tgt = np.arange(int(shape[d]), dtype=np.float64)
        if len(src) == 1:
            out = np.repeat(out.take([0], axis=d + 1), len(tgt), axis=d + 1)
            continue
        pos = np.clip(np.interp(tgt, src, np.arange(len(src))), 0, len(src) - 1)
        i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(src) - 2)
        t = (pos - i0).astype(np.float32)
        shp = [1] * out.ndim
        shp[d + 1] = len(tgt)
        t = t.reshape(shp)
        out = out.take(i0, axis=d + 1) * (1 - t) + out.take(i0 + 1, axis=d + 1) * t
    return out


# --------------------------------------------------------------------------- the template model


def _kernels():
    from . import kernels  # the C++ core (semisam_o1._core) behind a thin Python layer

    return kernels


@dataclass
class TemplateModel:
    """What is kept of the template: prototypes per axis, or the kNN bank.

    Attributes:
        method: "knn" or "prototype".
        num_classes: K, background included.
        axes: encoding axes used.
        params: the method's options (:class:`MethodOptions`).
        prototypes, owner: prototype method: axis -> (P, C) float32 prototypes and (P,) int32 their classes.
        bank, bank_labels, bank_weights: knn: (N, C + 6) float32 position-augmented template voxels
            (:func:`augment_with_position`), (N,) int32 their classes, (N,) float32 their vote weights.
        fg_centroid: knn: (3,) normalised position of the template's foreground centroid.
        bank_norm: knn: the bank rows' common norm.
        coord_scale_mm: the template's half-extent in mm per axis (``--coords mm``).
        template_shape: knn: the template's (X, Y, Z) shape.
        one_piece: the foreground classes the template's label shows as one 26-connected piece
            (those ``largest_component`` reduces to their largest component).
    """

    method: str
    num_classes: int
    axes: tuple[int, ...]
    params: MethodOptions
    prototypes: dict = field(default_factory=dict)
    owner: dict = field(default_factory=dict)
    bank: np.ndarray | None = None
    bank_labels: np.ndarray | None = None
    bank_weights: np.ndarray | None = None
    fg_centroid: np.ndarray | None = None
    bank_norm: float | None = None
    coord_scale_mm: tuple[float, float, float] | None = None
    template_shape: tuple[int, int, int] | None = None
    one_piece: tuple[int, ...] = ()


def _fg_check(label: np.ndarray, label_path) -> None:
    if not np.any(label > 0):
        raise InputError(f"{label_path}: the template label is empty (no foreground voxel)")


def build_template_model(cf, label: np.ndarray, num_classes: int, params: MethodOptions, *,
                         axes: Sequence[int] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                         class_names: Sequence[str] | None = None) -> TemplateModel:
    """The template model from the template's features and label.

    Args:
        cf: the template's store entry (:class:`semisam_o1.store.CaseFeatures`: ``grid``,
            ``cell_to_voxel``, ``on_voxel_grid``, ``voxel_shape``, ``axes``).
        label: (X, Y, Z) integer class indices on the template's canonical voxel grid.
        num_classes: K, background included.
        params: the method and its options (a :class:`MethodOptions`, e.g. the stage's settings).
        axes: encoding axes to use (default: the entry's).
        spacing: (3,) the template's voxel spacing in mm (``--coords mm``).
        class_names: K names, for warnings.

    Returns:
        a :class:`TemplateModel`.

    Raises:
        InputError: k larger than the kNN bank. Warns (UserWarning, naming the class) when a
            class has no voxel on the template's grid.
    """
    axes = tuple(axes) if axes is not None else tuple(cf.axes if hasattr(cf, "axes") else (0, 1, 2))
    from . import components

    one_piece = tuple(c for c in range(1, num_classes) if components.count(label == c) == 1)
    model = TemplateModel(method=params.method, num_classes=num_classes, axes=axes, params=params,
                          one_piece=one_piece)
    if params.method == "prototype":
        _build_prototypes(model, cf, label, class_names)
    else:
        _build_knn_bank(model, cf, label, spacing, class_names)
    return model


def _build_prototypes(model: TemplateModel, cf, label: np.ndarray, class_names) -> None:
    """Fill ``model.prototypes`` / ``model.owner``: per axis, the class prototypes of the template's
    cells (:func:`area_fractions`, :func:`class_prototypes`)."""
    p, K = model.params, model.num_classes
    per = [int(p.background_prototypes)] + [int(p.prototypes_per_class)] * (K - 1)
    for axis in model.axes:
        grid = cf.grid(axis)
        offset, step = cf.cell_to_voxel(axis)
        frac = area_fractions(label, K, grid.shape[1:], offset, step)
        with warnings.catch_warnings():
            if axis != model.axes[0]:
                warnings.simplefilter("ignore")  # warn once, not once per axis
            protos, owner = class_prototypes(grid, frac, per, seed=int(p.seed), class_names=class_names)
        model.prototypes[axis], model.owner[axis] = protos, owner


def _bank_indices(label: np.ndarray, p: MethodOptions, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel indices of the template's kNN bank and their vote weights.

    Every foreground voxel, every background voxel within ``bank_ring`` voxels of the foreground,
    and ``bank_background`` other background voxels drawn without replacement (all when -1 or
    fewer exist). With ``bank_reweight`` a drawn voxel weighs the inverse sampling rate (it stands
    for that many voxels of its region: the Horvitz-Thompson estimate of the full template's vote).

    Returns:
        (idx (N,) int64, weights (N,) float32).
    """
    flat = label.reshape(-1)
    fg = np.flatnonzero(flat > 0)
    if p.bank_ring > 0:
        from scipy import ndimage

        near = ndimage.binary_dilation(label > 0, iterations=int(p.bank_ring)).reshape(-1) & (flat == 0)
    else:
        near = np.zeros(flat.shape, bool)
    ring = np.flatnonzero(near)
    far = np.flatnonzero((flat == 0) & ~near)
    nbg = int(p.bank_background)
    far_weight = 1.0
    if 0 <= nbg < len(far):
        far_weight = len(far) / max(nbg, 1)
        far = np.sort(rng.choice(far, size=nbg, replace=False))
    idx = np.concatenate([fg, ring, far])
    weights = np.concatenate([np.ones(len(fg) + len(ring), np.float32),
                              np.full(len(far), far_weight if p.bank_reweight else 1.0, np.float32)])
    return idx, weights


def _build_knn_bank(model: TemplateModel, cf, label: np.ndarray, spacing, class_names) -> None:
    """Fill the kNN bank of ``model``: the template's bank voxels' features with their normalised
    positions folded in (:func:`augment_with_position`), labels, weights and foreground centroid."""
    p, K = model.params, model.num_classes
    feats = cf.on_voxel_grid(axes=list(model.axes))  # (C, X, Y, Z) float32
    C = feats.shape[0]
    shape = label.shape
    for c in range(1, K):
        if not np.any(label == c):
            name = class_names[c] if class_names else str(c)
            warnings.warn(f"template: class {c} ({name}) has no voxel in the template label; "
                          "it cannot be propagated", UserWarning, stacklevel=3)
    idx, model.bank_weights = _bank_indices(label, p, np.random.default_rng(int(p.seed)))
    if len(idx) < int(p.k):
        raise InputError(f"--k {p.k} is larger than the template bank ({len(idx)} voxels)")
    n_fg = int((label > 0).sum())
    f = feats.reshape(C, -1)[:, idx].T
    model.coord_scale_mm = tuple(float(n) * float(s) / 2 for n, s in zip(shape, spacing))
    model.template_shape = tuple(int(n) for n in shape)
    cx, cy, cz = normalised_coords(shape, p.coords, spacing, model.coord_scale_mm)
    ii, jj, kk = np.unravel_index(idx, shape)
    pos = np.stack([cx[ii], cy[jj], cz[kk]], 1)
    model.bank = augment_with_position(f, pos, float(p.position_weight), "bank")
    model.fg_centroid = pos[:n_fg].mean(0) if n_fg else np.zeros(3, np.float32)
    model.bank_norm = float(np.sqrt((model.bank.astype(np.float64) ** 2).sum(1).max()))
    model.bank_labels = label.reshape(-1)[idx].astype(np.int32)


# --------------------------------------------------------------------------- scoring a case


def score_case(model: TemplateModel, cf, *, spacing: Sequence[float] = (1.0, 1.0, 1.0), device: str = "cpu",
               threads: int | None = None, positions: np.ndarray | None = None) -> np.ndarray:
    """Per-class scores of one case from its store entry ``cf``.

    prototype: the best prototype's cosine per class, trilinear to the voxel grid, mean
    over axes (classes with no prototype score -inf). knn: the vote share of each class
    among the k nearest template voxels (weights max(s, 0)), on the query grid, trilinear
    to the voxel grid.

    Args:
        model: from :func:`build_template_model`.
        cf: the case's store entry.
        spacing: (3,) the case's voxel spacing in mm (``--coords mm``).
        device: ``"cpu"`` or ``"cuda"`` (a :func:`semisam_o1.device.resolve_device` result): where
            the kernels run.
        threads: CPU threads of the kernels (default: all).
        positions: knn: (X, Y, Z, 3) normalised positions of the case's voxels to use instead of its own
            box coordinates (:func:`registered_positions`); no recentring then.

    Returns:
        (K, X, Y, Z) float32 on the case's canonical voxel grid.
    """
    if model.method == "prototype":
        return _score_prototypes(model, cf, device, threads)
    return _score_knn(model, cf, spacing, device, threads, positions)


def _score_prototypes(model: TemplateModel, cf, device: str, threads: int | None) -> np.ndarray:
    from .device import to_device, to_host

    K = model.num_classes
    shape = tuple(int(s) for s in cf.voxel_shape)
    kern = _kernels()
    total = np.zeros((K, *shape), dtype=np.float32)
    for axis in model.axes:
        grid = cf.grid(axis)
        C, cells = grid.shape[0], grid.shape[1:]
        protos, owner = model.prototypes[axis], model.owner[axis]
        scores, _ = kern.prototype_similarity(to_device(np.asarray(grid).reshape(C, -1).T, device),
                                              to_device(protos, device), threads=threads)
        scores = to_host(scores)
        per_class = np.full((K, scores.shape[0]), -np.inf, dtype=np.float32)
        for c in range(K):
            sel = owner == c
            if sel.any():
                per_class[c] = scores[:, sel].max(1)
        offset, step = cf.cell_to_voxel(axis)
        src = [offset[d] + step[d] * np.arange(cells[d]) for d in range(3)]
        vals = np.where(np.isfinite(per_class), per_class, -2.0).reshape(K, *cells)
        total += _interp_to_grid(vals, src, shape)
    total /= len(model.axes)
    for c in range(K):
        if not (model.owner[model.axes[0]] == c).any():
            total[c] = -np.inf
    return total


def _vote_shares(model: TemplateModel, q: np.ndarray, positions: np.ndarray, device: str,
                 threads: int | None) -> np.ndarray:
    """(Q, K) float32 weighted vote shares of the k nearest bank rows of queries ``q`` (Q, C) at
    normalised ``positions`` (Q, 3); a query with no positive neighbour is background."""
    from .device import to_device, to_host

    p, K = model.params, model.num_classes
    qa = augment_with_position(q, positions, float(p.position_weight), "query")
    _, _, idx, sim = _kernels().knn_vote(to_device(qa, device), to_device(model.bank, device),
                                         to_device(model.bank_labels, device), int(p.k), threads=threads,
                                         return_topk=True)
    idx, sim = to_host(idx), to_host(sim)
    w = np.maximum(sim, 0).astype(np.float32)
    if model.bank_weights is not None:
        w = w * model.bank_weights[idx]
    lab = model.bank_labels[idx]
    votes = np.zeros((len(q), K), dtype=np.float32)
    for c in range(K):
        votes[:, c] = (w * (lab == c)).sum(1)
    tot = votes.sum(1, keepdims=True)
    share = np.where(tot > 0, votes / np.maximum(tot, 1e-30), 0.0)
    share[tot[:, 0] <= 0, 0] = 1.0  # no positive neighbour: background
    return share


def _score_knn(model: TemplateModel, cf, spacing, device: str, threads: int | None,
               positions: np.ndarray | None = None) -> np.ndarray:
    p, K = model.params, model.num_classes
    shape = tuple(int(s) for s in cf.voxel_shape)
    stride = max(1, int(p.query_stride))
    sub = _grid_points(shape, stride)
    feats = cf.on_voxel_grid(axes=list(model.axes))
    C = feats.shape[0]
    q = feats[:, sub[0]][:, :, sub[1]][:, :, :, sub[2]].reshape(C, -1).T
    if positions is None:
        cx, cy, cz = normalised_coords(shape, p.coords, spacing, model.coord_scale_mm)
        gx, gy, gz = np.meshgrid(cx[sub[0]], cy[sub[1]], cz[sub[2]], indexing="ij")
        pos = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], 1)
    else:
        pos = np.ascontiguousarray(positions[np.ix_(*sub)].reshape(-1, 3), dtype=np.float32)
    share = _vote_shares(model, q, pos, device, threads)
    for _ in range(int(p.recentre) if p.position_weight > 0 and positions is None else 0):
        # translate the case's coordinates so that its predicted foreground centroid lands on the
        # template's foreground centroid, and vote again
        fgq = np.argmax(share, 1) > 0
        if not fgq.any():
            break
        pos = pos + (model.fg_centroid - pos[fgq].mean(0))[None].astype(np.float32)
        share = _vote_shares(model, q, pos, device, threads)
    share = share.T.reshape(K, len(sub[0]), len(sub[1]), len(sub[2]))
    if stride == 1:
        return np.ascontiguousarray(share, dtype=np.float32)
    return _interp_to_grid(share, sub, shape)


def smooth_scores(scores: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` voxels, scipy.ndimage.gaussian_filter, borders: nearest)
    of each class's score map (K, X, Y, Z); a map holding -inf (a class without prototype) is kept."""
    if not sigma or sigma <= 0:
        return scores
    from scipy import ndimage

    out = np.empty_like(scores)
    for c in range(scores.shape[0]):
        if np.isfinite(scores[c]).all():
            out[c] = ndimage.gaussian_filter(scores[c], float(sigma), mode="nearest")
        else:
            out[c] = scores[c]
    return out


def labels_from_scores(scores: np.ndarray, model: TemplateModel, smooth: bool = True) -> np.ndarray:
    """Labels from class scores: Gaussian smoothing (``model.params.smooth``; skipped with
    ``smooth=False``, for scores already smoothed), argmax over classes (ties: lowest class),
    then, with ``model.params.largest_component``, the largest component of each class the
    template shows in one piece (``model.one_piece``).

    Args:
        scores: (K, X, Y, Z) float32 (:func:`score_case`).

    Returns:
        (X, Y, Z) uint8 class indices.
    """
    if smooth:
        scores = smooth_scores(scores, float(model.params.smooth))
    lab = np.argmax(scores, axis=0).astype(np.uint8)
    if model.params.largest_component:
        from .components import largest_component

        lab = largest_component(lab, model.one_piece)
    return lab


def pseudo_label(scores: np.ndarray, model: TemplateModel, rule=None) -> tuple[np.ndarray, np.ndarray]:
    """A case's pseudo-label from its class scores, as the stage makes it: Gaussian smoothing
    (``model.params.smooth``), argmax, largest component (``model.params.largest_component``), then
    the class-planes re-split (:func:`semisam_o1.class_planes.apply`) when ``rule`` is given.

    Args:
        scores: (K, X, Y, Z) float32 from :func:`score_case`.
        model: the template model (its ``params`` say the post-processing).
        rule: a :class:`semisam_o1.class_planes.ClassPlanes`, or None.

    Returns:
        (smoothed scores (K, X, Y, Z) float32, label (X, Y, Z) uint8 class indices).
    """
    scores = smooth_scores(scores, float(model.params.smooth))
    lab = labels_from_scores(scores, model, smooth=False)
    if rule is not None:
        from . import class_planes as planes

        lab = planes.apply(lab, rule)
    return scores, lab


# --------------------------------------------------------------------------- the stage


@dataclass
class _Inputs:
    """What the stage reads, opened and checked (see :func:`_open_inputs`)."""

    ds: object  # semisam_o1.io.Dataset
    store: object  # semisam_o1.store.FeatureStore
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
    from .io import Dataset, file_sha256
    from .resume import digest
    from .settings import select_cases
    from .store import FeatureStore

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
    from .io import canonical_shape

    ds = inp.ds
    t_img = ds.read_image(s.template)
    t_lab = ds.read_label(s.template, reference=t_img)  # shape / affine mismatch -> InputError
    _fg_check(t_lab.array, t_lab.path)
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
    from . import class_planes as planes

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
    """The template as ``--prior`` registers it (:mod:`semisam_o1.registration`), warps cached in
    ``folder``; ITK runs on 1 thread, the only setting with reproducible warps (measured)."""

    folder: Path
    image: object  # semisam_o1.io.Volume
    label: object  # semisam_o1.io.Volume (class indices)
    label_map: object

    def warp(self, case: str, img):
        from .registration import cached_warp

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
        cf: the case's store entry; img: its image (:class:`semisam_o1.io.Volume`).
        warp: the template's :class:`semisam_o1.registration.Warp` to the case (any prior but none).

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
    from .io import write_label, write_map

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
    from .device import resolve_device
    from .progress import progress
    from .resume import open_stage

    s = settings
    t_start = time.perf_counter()
    device = resolve_device(s.device, kernels=True)
    inp = _open_inputs(s)
    record = open_stage(s.output, "propagate", s, inputs=inp.signed, overwrite=s.overwrite)
    if record.finished:
        return record.summary()
    model, t_label = _template_model(s, inp)
    reuse = record.reuse  # (read before start(), which marks the folder as this signature's)
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
                   **({"chosen": chosen} if s.prior == "choose" else {}))
    record.finish(summary)
    if not s.quiet:
        print(f"propagate: {summary['written']} cases written, {summary['skipped']} already done, into {out} "
              f"({summary['seconds']:.1f} s)", file=sys.stderr)
    return summary


SETTINGS = PropagateSettings
STAGE = propagate
