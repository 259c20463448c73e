"""Round-0 pseudo-labels from one annotated template and the foundation model's features.

Stage 1 of SemiSAM-O1 (Zhang et al., arXiv 2604.24109): the template's real
label is carried to every other volume of the cohort through the encoder's
dense features (read from the feature store written by ``semisam-o1 encode``).
Only the template's label is ever read.

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
unlabeled pool (benchmarks/propagate.md; w moved from 1.5 to 1.0 after a finer
grid at k = 10: mean Dice 0.781 / 0.782 / 0.780 / 0.778 for w = 0.75 / 1 /
1.25 / 1.5 on 19 pool cases, 0.772 vs 0.764 on all 199).

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

Post-processing: ``--smooth SIGMA`` smooths each class's score map with a Gaussian
before the argmax; ``--largest-component`` keeps the largest 26-connected
component of every foreground class (other voxels of the class become
background). ``--class-planes auto`` (default): when the template's foreground
classes follow each other along one axis, separated by planes (checked on its
label by :func:`semisam_o1.class_planes.learn`; MSD Hippocampus: Anterior |
Posterior across the posterior-anterior axis), every pseudo-label's foreground
is re-split the same way (:func:`semisam_o1.class_planes.apply`) and the rule is
written to ``OUTPUT/class_planes.json`` for ``predict --class-planes``.

Outputs: ``OUTPUT/<case>.nii.gz``, integer labels with the input image's
voxel order, affine and header (``io.write_label``), and with
``--save-scores`` ``OUTPUT/scores/<case>.nii.gz``, float32 per-class scores
(X, Y, Z, K) whose argmax is the label before the largest-component step (knn: vote
shares in [0, 1]; prototype: cosine scores). Cases are processed one at a time (memory does not grow with
the cohort); a finished case is skipped on a re-run, so an interrupted run
resumes. All inputs are checked before anything is written.

Errors (InputError, exit 2, nothing written): missing features for a case or
a features/image grid mismatch, a template label whose shape or affine differs
from its image, an empty template label, bad options.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "add_arguments",
    "main",
    "propagate",
    "area_fractions",
    "class_prototypes",
    "normalised_coords",
    "augment_with_position",
    "build_template_model",
    "score_case",
    "largest_component",
    "DEFAULTS",
]

#: Defaults chosen by benchmarks/bench_propagate.py (see benchmarks/propagate.md).
DEFAULTS = dict(
    method="knn",
    k=10,
    position_weight=1.0,  # stop 3: 0.772 vs 0.764 (w=1.5) on all 199 pool cases (quality.json propagate_position_weight)
    coords="extent",
    bank_background=20000,
    bank_ring=0,
    bank_reweight=False,
    recentre=1,  # stop 5: pool 0.778 -> 0.782, round-1 UNet test 0.773 -> 0.775 (3 seeds); quality.json propagate_recentre
    query_stride=2,
    prototypes_per_class=3,
    background_prototypes=8,
    largest_component=True,
    smooth=1.0,
    seed=0,
)


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
    out = []
    for d in range(3):
        n = int(shape[d])
        i = np.arange(n, dtype=np.float64)
        if mode == "extent":
            out.append(((2 * i + 1) / n - 1).astype(np.float32))
        elif mode == "mm":
            out.append(((i - (n - 1) / 2) * float(spacing[d]) / float(scale_mm[d])).astype(np.float32))
        else:
            raise InputError(f"--coords must be 'extent' or 'mm', not {mode!r}")
    return out


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


def largest_component(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep the largest 26-connected component of each foreground class; the rest of
    that class becomes background (0). (X, Y, Z) integer -> same dtype."""
    from scipy import ndimage

    out = labels.copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for c in range(1, num_classes):
        mask = labels == c
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[mask & (comp != int(np.argmax(sizes)))] = 0
    return out


# --------------------------------------------------------------------------- kernels / device


def _kernels():
    from . import kernels  # the C++ core (semisam_o1._core) behind a thin Python layer

    return kernels


class _Device:
    """Moves arrays to the device the kernels should run on (CPU NumPy, or torch CUDA
    tensors, which the kernels dispatch to their CUDA build) and results back."""

    def __init__(self, name: str):
        self.name = name
        if name == "cuda":
            try:
                import torch
            except ImportError:  # pragma: no cover
                raise InputError("--device cuda: torch is not installed") from None
            if not torch.cuda.is_available():
                raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
            if not _kernels().cuda_available():
                raise InputError("--device cuda: the CUDA kernels (semisam_o1._core_cuda) are not built "
                                 "in this install (use --device cpu)")
        elif name != "cpu":
            raise InputError(f"--device must be 'cpu' or 'cuda', not {name!r}")

    def put(self, x: np.ndarray):
        if self.name == "cuda":
            import torch

            return torch.as_tensor(np.ascontiguousarray(x), device="cuda")
        return np.ascontiguousarray(x)

    @staticmethod
    def get(x) -> np.ndarray:
        if hasattr(x, "detach"):
            return x.detach().cpu().numpy()
        if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
            return x.get()
        return np.asarray(x)


# --------------------------------------------------------------------------- the template model


@dataclass
class TemplateModel:
    """What is kept of the template: prototypes per axis, or the kNN bank."""

    method: str
    num_classes: int
    axes: tuple[int, ...]
    params: dict
    prototypes: dict = field(default_factory=dict)  # axis -> (P, C) float32
    owner: dict = field(default_factory=dict)  # axis -> (P,) int32
    bank: np.ndarray | None = None  # (N, C') float32, position-augmented
    bank_labels: np.ndarray | None = None  # (N,) int32
    bank_weights: np.ndarray | None = None  # (N,) float32 vote weight of each bank row
    fg_centroid: np.ndarray | None = None  # (3,) normalised position of the template's foreground centroid
    bank_norm: float | None = None
    coord_scale_mm: tuple[float, float, float] | None = None


def _fg_check(label: np.ndarray, label_path) -> None:
    if not np.any(label > 0):
        raise InputError(f"{label_path}: the template label is empty (no foreground voxel)")


def build_template_model(cf, label: np.ndarray, num_classes: int, *, method: str = DEFAULTS["method"],
                         axes: Sequence[int] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                         class_names: Sequence[str] | None = None, **params) -> TemplateModel:
    """Build the template model from the template's features ``cf`` (a store entry:
    ``grid``, ``cell_to_voxel``, ``on_voxel_grid``, ``voxel_shape``) and its label
    (X, Y, Z) uint8 class indices.

    Parameters (``params``, defaults in :data:`DEFAULTS`): prototype method:
    ``prototypes_per_class``, ``background_prototypes``, ``seed``; knn method: ``k``,
    ``position_weight``, ``coords``, ``bank_background``, ``bank_ring``, ``bank_reweight``,
    ``recentre``, ``query_stride``, ``seed``. Both: ``smooth``, ``largest_component`` (applied by
    :func:`labels_from_scores`).

    Raises InputError for an unknown method, k < 1 or k larger than the bank; warns
    (UserWarning, naming the class) when a class has no voxel on the template's grid.
    """
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    p["method"] = method
    axes = tuple(axes) if axes is not None else tuple(cf.axes if hasattr(cf, "axes") else (0, 1, 2))
    model = TemplateModel(method=method, num_classes=num_classes, axes=axes, params=p)
    if method == "prototype":
        per = [int(p["background_prototypes"])] + [int(p["prototypes_per_class"])] * (num_classes - 1)
        for axis in axes:
            grid = cf.grid(axis)
            offset, step = cf.cell_to_voxel(axis)
            frac = area_fractions(label, num_classes, grid.shape[1:], offset, step)
            with warnings.catch_warnings():
                if axis != axes[0]:
                    warnings.simplefilter("ignore")  # warn once, not once per axis
                protos, owner = class_prototypes(grid, frac, per, seed=int(p["seed"]), class_names=class_names)
            model.prototypes[axis], model.owner[axis] = protos, owner
        return model
    if method != "knn":
        raise InputError(f"--method must be 'knn' or 'prototype', not {method!r}")
    if int(p["k"]) < 1:
        raise InputError("--k must be at least 1")
    if int(p.get("recentre") or 0) < 0:
        raise InputError(f"--recentre {p['recentre']}: must be 0 (off) or more passes")
    feats = cf.on_voxel_grid(axes=list(axes))  # (C, X, Y, Z) float32
    C = feats.shape[0]
    shape = label.shape
    for c in range(1, num_classes):
        if not np.any(label == c):
            name = class_names[c] if class_names else str(c)
            warnings.warn(f"template: class {c} ({name}) has no voxel in the template label; "
                          "it cannot be propagated", UserWarning, stacklevel=2)
    rng = np.random.default_rng(int(p["seed"]))
    flat = label.reshape(-1)
    fg = np.flatnonzero(flat > 0)
    ring_r = int(p["bank_ring"])
    if ring_r > 0:
        from scipy import ndimage

        near = ndimage.binary_dilation(label > 0, iterations=ring_r).reshape(-1) & (flat == 0)
    else:
        near = np.zeros(flat.shape, bool)
    ring = np.flatnonzero(near)
    far = np.flatnonzero((flat == 0) & ~near)
    nbg = int(p["bank_background"])
    far_weight = 1.0
    if 0 <= nbg < len(far):
        far_weight = len(far) / max(nbg, 1)
        far = np.sort(rng.choice(far, size=nbg, replace=False))
    idx = np.concatenate([fg, ring, far])
    # importance weights: a sampled voxel stands for far_weight voxels of its region, so the vote
    # estimates the full template's vote (Horvitz-Thompson); fg and ring voxels are all kept
    model.bank_weights = np.concatenate([np.ones(len(fg) + len(ring), np.float32),
                                         np.full(len(far), far_weight if p["bank_reweight"] else 1.0, np.float32)])
    if len(idx) < int(p["k"]):
        raise InputError(f"--k {p['k']} is larger than the template bank ({len(idx)} voxels)")
    f = feats.reshape(C, -1)[:, idx].T
    scale = tuple(float(n) * float(s) / 2 for n, s in zip(shape, spacing))
    model.coord_scale_mm = scale
    cx, cy, cz = normalised_coords(shape, p["coords"], spacing, scale)
    ii, jj, kk = np.unravel_index(idx, shape)
    pos = np.stack([cx[ii], cy[jj], cz[kk]], 1)
    model.bank = augment_with_position(f, pos, float(p["position_weight"]), "bank")
    model.fg_centroid = pos[: len(fg)].mean(0) if len(fg) else np.zeros(3, np.float32)
    model.bank_norm = float(np.sqrt((model.bank.astype(np.float64) ** 2).sum(1).max()))
    model.bank_labels = flat[idx].astype(np.int32)
    return model


def score_case(model: TemplateModel, cf, *, spacing: Sequence[float] = (1.0, 1.0, 1.0), device: str = "cpu",
               threads: int | None = None) -> np.ndarray:
    """Per-class scores (K, X, Y, Z) float32 of one case from its store entry ``cf``.

    prototype: the best prototype's cosine per class, trilinear to the voxel grid, mean
    over axes (classes with no prototype score -inf). knn: the vote share of each class
    among the k nearest template voxels (weights max(s, 0)), on the query grid, trilinear
    to the voxel grid.
    """
    K = model.num_classes
    shape = tuple(int(s) for s in cf.voxel_shape)
    dev = device if isinstance(device, _Device) else _Device(device)
    kern = _kernels()
    if model.method == "prototype":
        total = np.zeros((K, *shape), dtype=np.float32)
        for axis in model.axes:
            grid = cf.grid(axis)
            C = grid.shape[0]
            cells = grid.shape[1:]
            protos, owner = model.prototypes[axis], model.owner[axis]
            scores, _ = kern.prototype_similarity(dev.put(np.asarray(grid).reshape(C, -1).T),
                                                  dev.put(protos), threads=threads)
            scores = dev.get(scores)
            per_class = np.full((K, scores.shape[0]), -np.inf, dtype=np.float32)
            for c in range(K):
                sel = owner == c
                if sel.any():
                    per_class[c] = scores[:, sel].max(1)
            offset, step = cf.cell_to_voxel(axis)
            src = [offset[d] + step[d] * np.arange(cells[d]) for d in range(3)]
            finite = np.isfinite(per_class)
            vals = np.where(finite, per_class, -2.0).reshape(K, *cells)
            total += _interp_to_grid(vals, src, shape)
        total /= len(model.axes)
        for c in range(K):
            if not (model.owner[model.axes[0]] == c).any():
                total[c] = -np.inf
        return total
    p = model.params
    stride = max(1, int(p["query_stride"]))
    sub = _grid_points(shape, stride)
    feats = cf.on_voxel_grid(axes=list(model.axes))
    C = feats.shape[0]
    q = feats[:, sub[0]][:, :, sub[1]][:, :, :, sub[2]].reshape(C, -1).T
    cx, cy, cz = normalised_coords(shape, p["coords"], spacing, model.coord_scale_mm)
    gx, gy, gz = np.meshgrid(cx[sub[0]], cy[sub[1]], cz[sub[2]], indexing="ij")
    pos = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], 1)
    k = int(p["k"])
    w_pos = float(p["position_weight"])

    def vote(positions):
        qa = augment_with_position(q, positions, w_pos, "query")
        _, _, idx, sim = kern.knn_vote(dev.put(qa), dev.put(model.bank), dev.put(model.bank_labels), k,
                                       threads=threads, return_topk=True)
        idx, sim = dev.get(idx), dev.get(sim)
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

    share = vote(pos)
    for _ in range(int(p.get("recentre") or 0) if w_pos > 0 else 0):
        # translate the case's coordinates so that its predicted foreground centroid lands on the
        # template's foreground centroid, and vote again
        fgq = np.argmax(share, 1) > 0
        if not fgq.any():
            break
        shift = model.fg_centroid - pos[fgq].mean(0)
        pos = pos + shift[None].astype(np.float32)
        share = vote(pos)
    share = share.T.reshape(K, len(sub[0]), len(sub[1]), len(sub[2]))
    if stride == 1:
        return np.ascontiguousarray(share, dtype=np.float32)
    return _interp_to_grid(share, sub, shape)


def smooth_scores(scores: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` voxels, scipy.ndimage.gaussian_filter, borders reflected)
    of each class's score map (K, X, Y, Z); -inf (a class without prototype) is kept."""
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
    """Optional Gaussian smoothing of the scores (``smooth`` parameter of the model, skipped
    with ``smooth=False``), argmax over classes (ties: lowest class), then optional largest
    component per class. (K, X, Y, Z) -> (X, Y, Z) uint8."""
    if smooth:
        scores = smooth_scores(scores, float(model.params.get("smooth") or 0.0))
    lab = np.argmax(scores, axis=0).astype(np.uint8)
    if model.params.get("largest_component"):
        lab = largest_component(lab, model.num_classes)
    return lab


# --------------------------------------------------------------------------- the stage


def _open_store(features):
    if hasattr(features, "load") and hasattr(features, "has"):
        return features
    from .store import FeatureStore

    if not Path(features).is_dir():
        raise InputError(f"{features}: feature store not found (run `semisam-o1 encode` first)")
    return FeatureStore(features)


def propagate(input, features, template: str, output, *, cases: Sequence[str] | None = None,
              split=None, subset: str | None = "unlabeled", method: str = DEFAULTS["method"],
              k: int | None = None, position_weight: float | None = None, coords: str | None = None,
              bank_background: int | None = None, bank_ring: int | None = None,
              bank_reweight: bool | None = None, recentre: int | None = None, query_stride: int | None = None,
              prototypes_per_class: int | None = None, background_prototypes: int | None = None,
              largest_component: bool | None = None, smooth: float | None = None, axes: Sequence[int] | None = None,
              class_planes: str = "auto", save_scores: bool = False, device: str = "cpu",
              threads: int | None = None, overwrite: bool = False, seed: int | None = None,
              quiet: bool = False) -> dict:
    """Write round-0 pseudo-labels for ``cases`` (or the ``subset`` of ``split``, or every
    case of the dataset but the template) into ``output``.

    ``input``: dataset folder (MSD / nnU-Net) or :class:`semisam_o1.io.Dataset`.
    ``features``: feature store folder, or an object with the ``FeatureStore`` interface.
    Only the template's label is read. The template itself, if listed, gets its own label.
    ``class_planes``: ``"auto"`` learns :mod:`semisam_o1.class_planes` from the template's
    label and, when the template's foreground classes are separated by planes across one axis,
    gives every pseudo-label the same structure and writes the rule to
    ``OUTPUT/class_planes.json`` (for ``predict --class-planes``); ``"off"`` does neither.
    Returns a summary dict (cases written / skipped, seconds, the class-planes rule).
    Raises InputError.
    """
    from . import class_planes as planes
    from .io import Dataset, canonical_shape, write_label, write_map

    t_start = time.perf_counter()
    ds = input if isinstance(input, Dataset) else Dataset(input)
    store = _open_store(features)
    if cases:
        chosen = ds.select(cases=cases)
    elif split is not None:
        chosen = ds.select(split=split, subset=subset or "unlabeled")
    else:
        chosen = [c for c in ds.cases if c != template]
    if template not in ds.images:
        raise InputError(f"{ds.root}: template case {template} not found in imagesTr/")
    dev = _Device(device)
    if threads is not None and int(threads) < 1:
        raise InputError("--threads must be at least 1")
    if class_planes not in ("auto", "off"):
        raise InputError(f"--class-planes must be 'auto' or 'off', not {class_planes!r}")

    # ---- check every input before writing anything
    t_img = ds.read_image(template)
    t_lab = ds.read_label(template, reference=t_img)  # shape / affine mismatch -> InputError
    _fg_check(t_lab.array, t_lab.path)
    missing = [c for c in dict.fromkeys([template, *chosen]) if not store.has(c)]
    if missing:
        raise InputError(f"{features}: no features for case {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + "; run `semisam-o1 encode` on them first")
    t_cf = store.load(template)
    if tuple(t_cf.voxel_shape) != t_img.shape:
        raise InputError(f"{features}: features of {template} are on grid {tuple(t_cf.voxel_shape)}, "
                         f"its image is {t_img.shape}: re-encode it")
    if axes is not None:
        bad = [a for a in axes if a not in tuple(store.axes)]
        if bad:
            raise InputError(f"--axes {bad[0]}: the store has axes {tuple(store.axes)}")
    for case in chosen:
        if case == template:
            continue
        shape = canonical_shape(ds.image_path(case))
        cf_shape = tuple(int(s) for s in store.load(case).voxel_shape)
        if cf_shape != shape:
            raise InputError(f"{features}: features of {case} are on grid {cf_shape}, "
                             f"its image is {shape}: re-encode it")
    out = Path(output)
    params = dict(k=k, position_weight=position_weight, coords=coords, bank_background=bank_background,
                  bank_ring=bank_ring, bank_reweight=bank_reweight, recentre=recentre,
                  query_stride=query_stride, prototypes_per_class=prototypes_per_class,
                  background_prototypes=background_prototypes, largest_component=largest_component,
                  smooth=smooth, seed=seed)
    axes = tuple(axes) if axes is not None else tuple(store.axes)
    model = build_template_model(t_cf, t_lab.array, ds.label_map.num_classes, method=method, axes=axes,
                                 spacing=t_img.spacing, class_names=ds.label_map.names, **params)
    rule, plane_errors = (planes.learn(t_lab.array, ds.label_map.num_classes) if class_planes == "auto"
                          else (None, None))
    rule_path = out / planes.CLASS_PLANES_JSON
    if rule is not None:
        planes.write(rule_path, rule, ds.label_map.names)
    elif rule_path.exists():
        rule_path.unlink()  # a rule from an earlier run with other settings
    if not quiet and class_planes == "auto":
        if rule is not None:
            print(f"propagate: class planes: {rule.describe(ds.label_map.names)}; every pseudo-label gets "
                  f"the same structure ({rule_path})", file=sys.stderr)
        elif plane_errors[0] is not None:
            print(f"propagate: class planes not used: the template's best planes misassign "
                  f"{100 * min(plane_errors):.2f}% of its foreground", file=sys.stderr)
    todo = [c for c in chosen if overwrite or not (out / f"{c}.nii.gz").exists()
            or (save_scores and not (out / "scores" / f"{c}.nii.gz").exists())]
    skipped = len(chosen) - len(todo)
    from tqdm import tqdm

    seconds = []
    for case in tqdm(todo, desc="propagate", unit="case", disable=quiet):
        t0 = time.perf_counter()
        img = ds.read_image(case)
        if case == template:
            write_label(out / f"{case}.nii.gz", t_lab.array, img, ds.label_map)
            continue
        cf = store.load(case)
        if tuple(cf.voxel_shape) != img.shape:
            raise InputError(f"{features}: features of {case} are on grid {tuple(cf.voxel_shape)}, "
                             f"its image is {img.shape}: re-encode it")
        scores = score_case(model, cf, spacing=img.spacing, device=dev, threads=threads)
        scores = smooth_scores(scores, float(model.params.get("smooth") or 0.0))
        lab = labels_from_scores(scores, model, smooth=False)
        if rule is not None:
            lab = planes.apply(lab, rule)
        if save_scores:
            write_map(out / "scores" / f"{case}.nii.gz", np.moveaxis(np.where(np.isfinite(scores), scores, -1.0), 0, -1), img)
        write_label(out / f"{case}.nii.gz", lab, img, ds.label_map)
        seconds.append(time.perf_counter() - t0)
    summary = dict(written=len(todo), skipped=skipped, template=template, method=method,
                   params={k2: v for k2, v in model.params.items()}, axes=list(model.axes),
                   class_planes=None if rule is None else rule.to_json(ds.label_map.names),
                   seconds=round(time.perf_counter() - t_start, 2),
                   seconds_per_case=round(float(np.mean(seconds)), 3) if seconds else None)
    if not quiet:
        print(f"propagate: {len(todo)} cases written, {skipped} already done, into {out} "
              f"({summary['seconds']:.1f} s)", file=sys.stderr)
    return summary


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, help="dataset folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("-f", "--features", required=True, help="feature store written by `semisam-o1 encode`")
    parser.add_argument("--template", required=True, help="case id of the one annotated template")
    parser.add_argument("-o", "--output", required=True, help="folder for the pseudo-labels (<case>.nii.gz)")
    sel = parser.add_argument_group("cases (default: every case of the dataset but the template)")
    sel.add_argument("--cases", nargs="+", metavar="ID", help="case ids")
    sel.add_argument("--split", help="split file (splits.json)")
    sel.add_argument("--subset", default="unlabeled", help="subset(s) of --split, comma-separated")
    m = parser.add_argument_group("method")
    m.add_argument("--method", choices=["knn", "prototype"], default=DEFAULTS["method"],
                   help="knn: transfer by the k most similar template voxels; prototype: class prototypes")
    m.add_argument("--k", type=int, default=DEFAULTS["k"], help="knn: neighbours per voxel")
    m.add_argument("--position-weight", type=float, default=DEFAULTS["position_weight"],
                   help="knn: w in cos - (w^2/2)|p_q - p_b|^2; 0 switches the position term off "
                        "(needed when the cohort's field of view is not consistent)")
    m.add_argument("--coords", choices=["extent", "mm"], default=DEFAULTS["coords"],
                   help="knn: normalised positions: each volume's box onto [-1,1] (extent), or centred mm "
                        "scaled by the template's half-extent (mm)")
    m.add_argument("--bank-background", type=int, default=DEFAULTS["bank_background"],
                   help="knn: background template voxels sampled into the bank (-1: all)")
    m.add_argument("--bank-ring", type=int, default=DEFAULTS["bank_ring"],
                   help="knn: keep every background voxel within this many voxels of the foreground in the bank")
    m.add_argument("--bank-reweight", action="store_true", default=DEFAULTS["bank_reweight"],
                   help="knn: weight sampled background voxels by the inverse sampling rate in the vote")
    m.add_argument("--recentre", type=int, default=DEFAULTS["recentre"],
                   help="knn: passes that shift the case's coordinates so its predicted foreground centroid "
                        "meets the template's, then vote again")
    m.add_argument("--query-stride", type=int, default=DEFAULTS["query_stride"],
                   help="knn: query every n-th voxel per axis, interpolate the vote shares")
    m.add_argument("--prototypes-per-class", type=int, default=DEFAULTS["prototypes_per_class"],
                   help="prototype: prototypes per foreground class (k-means when > 1)")
    m.add_argument("--background-prototypes", type=int, default=DEFAULTS["background_prototypes"],
                   help="prototype: prototypes for the background (k-means when > 1)")
    lcc = m.add_mutually_exclusive_group()
    lcc.add_argument("--largest-component", dest="largest_component", action="store_true",
                     default=DEFAULTS["largest_component"], help="keep the largest component per class")
    lcc.add_argument("--no-largest-component", dest="largest_component", action="store_false")
    m.add_argument("--smooth", type=float, default=DEFAULTS["smooth"],
                   help="Gaussian smoothing (sigma, voxels) of the class scores before the argmax; 0: none")
    m.add_argument("--axes", type=int, nargs="+", help="encoding axes to use (default: all in the store)")
    m.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    m.add_argument("--class-planes", choices=["auto", "off"], default="auto",
                   help="auto: if the template's foreground classes follow each other along one axis, "
                        "separated by planes (MSD Hippocampus: Anterior | Posterior), give every pseudo-label "
                        "the same structure and write the rule to OUTPUT/class_planes.json (default: auto)")
    parser.add_argument("--save-scores", action="store_true", help="also write per-class score maps to OUTPUT/scores/")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="recompute cases already written")
    parser.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    propagate(args.input, args.features, args.template, args.output, cases=args.cases, split=args.split,
              subset=args.subset, method=args.method, k=args.k, position_weight=args.position_weight,
              coords=args.coords, bank_background=args.bank_background, bank_ring=args.bank_ring,
              bank_reweight=args.bank_reweight, recentre=args.recentre, query_stride=args.query_stride,
              prototypes_per_class=args.prototypes_per_class, background_prototypes=args.background_prototypes,
              largest_component=args.largest_component, smooth=args.smooth, axes=args.axes,
              class_planes=args.class_planes, save_scores=args.save_scores,
              device=args.device, threads=args.threads, overwrite=args.overwrite, seed=args.seed, quiet=args.quiet)
    return 0
