"""The template vote: round-0 pseudo-labels from the one annotated template (SemiSAM-O1's
propagation step). Each voxel of a case takes the label of its most similar template voxels
in the foundation model's feature space (kNN, optionally with a position term), or of the
nearest class prototype; array level, no dataset or work folder needed.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from semisam_o1.core import kernels
from semisam_o1.core.device import to_device, to_host
from semisam_o1.core.errors import InputError
from semisam_o1.core.settings import Checked, check_range, option
from semisam_o1.methods import class_planes as planes
from semisam_o1.methods import components
from semisam_o1.methods.components import largest_component

METHODS = ("knn", "prototype")


COORDS = ("extent", "mm")


PRIORS = ("none", "registration", "position", "choose")
QUERY_GRIDS = ("cells", "voxels")


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
                            "the bank (no gain: benchmarks/propagate.md, rows 'bank ring 3')")
    bank_reweight: bool = option(False, "knn: weight sampled background voxels by the inverse sampling rate in "
                                 "the vote (no gain: benchmarks/propagate.md, rows 'reweighted')")
    recentre: int = option(1, "knn: passes that shift the case's coordinates so its predicted foreground "
                           "centroid meets the template's, then vote again (0: none)")
    query_stride: int = option(2, "knn: query every n-th voxel per axis, interpolate the vote shares")
    query_grid: str = option("cells", "knn: cells: per axis, query no finer than the features' cells (the "
                             "larger of --query-stride and the cell size in voxels; benchmarks/propagate.md, "
                             "'Query grid'); voxels: every --query-stride-th voxel", choices=QUERY_GRIDS)
    prototypes_per_class: int = option(3, "prototype: prototypes per foreground class (k-means when > 1)")
    background_prototypes: int = option(8, "prototype: prototypes for the background (k-means when > 1)")
    largest_component: bool = option(True, "keep the largest 26-connected component of each foreground class "
                                      "that the template's label shows in one piece")
    smooth: float = option(1.0, "Gaussian smoothing (sigma, voxels) of the class scores before the argmax; "
                           "0: none")
    seed: int = option(0, "seed of the background sample (knn) and of k-means (prototype)")
    prior: str = option("none", "where a case voxel sits, for the position term: none: its normalised box "
                        "coordinates; registration: no vote, the template's label warped to the case by ANTs SyN "
                        "(semisam_o1.methods.registration); position: knn with the voxel's position taken in the "
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
        if self.query_grid not in QUERY_GRIDS:
            raise InputError(f"--query-grid {self.query_grid}: choose one of {', '.join(QUERY_GRIDS)}")
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
            :attr:`semisam_o1.methods.registration.Warp.coords`).
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


def _grid_points(shape: Sequence[int], strides: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Indices of a sub-grid with stride ``strides[d]`` along axis d that always includes the last voxel."""
    idx = []
    for n, stride in zip(shape, strides):
        g = np.arange(0, n, int(stride))
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


def _kernels():
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


def check_foreground(label: np.ndarray, label_path) -> None:
    if not np.any(label > 0):
        raise InputError(f"{label_path}: the template label is empty (no foreground voxel)")


def build_template_model(cf, label: np.ndarray, num_classes: int, params: MethodOptions, *,
                         axes: Sequence[int] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                         class_names: Sequence[str] | None = None) -> TemplateModel:
    """The template model from the template's features and label.

    Args:
        cf: the template's store entry (:class:`semisam_o1.data.store.CaseFeatures`: ``grid``,
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
        device: ``"cpu"`` or ``"cuda"`` (a :func:`semisam_o1.core.device.resolve_device` result): where
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


def query_strides(params: MethodOptions, axes: Sequence[int], cf) -> tuple[int, int, int]:
    """Per voxel axis, every how many voxels the kNN vote is queried (the shares are interpolated between).

    ``--query-grid voxels``: ``query_stride`` on every axis. ``cells`` (default): per axis the larger of
    ``query_stride`` and the features' resolution there, the size in voxels (floored) of the finest
    feature cell among the encoding axes: a query between two cells sees interpolated features only, so
    it adds work and little else (a 2D image of 384 pixels on a 1024-pixel canvas has cells of 6 pixels:
    36 times fewer queries than every pixel, 9 times fewer than stride 2).

    Args:
        params: the method's options (``query_grid``, ``query_stride``).
        axes: the encoding axes the vote uses.
        cf: the case's store entry (:meth:`CaseFeatures.cell_to_voxel`).

    Returns:
        (3,) ints >= 1.
    """
    base = max(1, int(params.query_stride))
    if params.query_grid == "voxels":
        return (base, base, base)
    finest = np.min([np.asarray(cf.cell_to_voxel(a)[1], dtype=np.float64) for a in axes], axis=0)
    return tuple(max(base, int(np.floor(f + 1e-9))) for f in finest)


def _score_knn(model: TemplateModel, cf, spacing, device: str, threads: int | None,
               positions: np.ndarray | None = None) -> np.ndarray:
    p, K = model.params, model.num_classes
    shape = tuple(int(s) for s in cf.voxel_shape)
    strides = query_strides(p, model.axes, cf)
    sub = _grid_points(shape, strides)
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
    if all(n == 1 for n in strides):
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
        lab = largest_component(lab, model.one_piece)
    return lab


def pseudo_label(scores: np.ndarray, model: TemplateModel, rule=None) -> tuple[np.ndarray, np.ndarray]:
    """A case's pseudo-label from its class scores, as the stage makes it: Gaussian smoothing
    (``model.params.smooth``), argmax, largest component (``model.params.largest_component``), then
    the class-planes re-split (:func:`semisam_o1.methods.class_planes.apply`) when ``rule`` is given.

    Args:
        scores: (K, X, Y, Z) float32 from :func:`score_case`.
        model: the template model (its ``params`` say the post-processing).
        rule: a :class:`semisam_o1.methods.class_planes.ClassPlanes`, or None.

    Returns:
        (smoothed scores (K, X, Y, Z) float32, label (X, Y, Z) uint8 class indices).
    """
    scores = smooth_scores(scores, float(model.params.smooth))
    lab = labels_from_scores(scores, model, smooth=False)
    if rule is not None:
        lab = planes.apply(lab, rule)
    return scores, lab

