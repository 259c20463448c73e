"""The feature store written by ``semisam-o1 encode`` and read by ``propagate`` / ``refine``.

Layout of a store folder::

    store.json                 the store's record: its configuration and signature (encoder,
                               layers, weights hash, preprocessing, packing, channel reduction,
                               axes, package version) and the command that wrote it
    reduction.npy              (C_encoder, C) float32 projection basis (when channels are reduced)
    cases/<case>/meta.json     per case: input file hash, voxel shape, canonical affine, per axis
                               the grid shape and its cell -> voxel mapping, the store signature
    cases/<case>/axis<a>.npy   (C, a, b, c) features on axis a's feature-cell grid: int8 with one
                               scale per channel in meta.json (format 2, ``storage`` int8: value =
                               scale[c] * q, scale[c] = max |x_c| / 127 over the file), or float16
                               (format 1, and format 2 with ``storage`` float16)

A case folder is written under a temporary name and renamed into place when complete, so a
case is either absent or finished; :meth:`FeatureStore.check_case` verifies its files (a file
damaged afterwards, e.g. cut short by a copy, is found before ``encode`` skips the case). ``.npy`` files are memory-mapped on load (no copy), which is
what the C++ core needs.

Grid of axis ``a``: the 2D encoder ran on the slices ``index a = first + stride * j``; the grid has
one cell per encoded slice along ``a`` (step ``stride`` voxels, offset ``first``; 1 and 0 without
``--slice-stride``) and the encoder's feature cells in-plane. Cell index ``i`` (3-vector) maps to
canonical voxel coordinate ``offset + step * i`` (voxel centres at integers), see
:meth:`CaseFeatures.cell_to_voxel`.

Formats: 1 (float16 files, every store written before int8 storage) and 2 (``storage`` in
store.json says the files' dtype) are both read; any other is refused with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from semisam_o1.core.errors import InputError, OutputError
from semisam_o1.core.files import (
    UMASK,
    WRITE_ERRNOS,
    is_write_failure,
    temporary_prefix,
    write_error_message,
    write_json,
)
from semisam_o1.data.slicing import SliceLayout, auto_tile

STORE_FORMAT = 2
READ_FORMATS = (1, 2)
STORAGE_DTYPES = ("int8", "float16")
# ``encode --storage`` of a new store: int8 is half the bytes of float16 at no round-0 pool Dice loss
# (Hippocampus -0.0002, Left Atrium 2018 -0.0001: benchmarks/encode.md).
DEFAULT_STORAGE = "int8"
CONFIG_FILE = "store.json"
REDUCTION_FILE = "reduction.npy"
CASES_DIR = "cases"


UNSIGNED_KEYS = ("signature", "created", "notes", "command")


def quantise_int8(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 quantisation of a (C, ...) feature grid.

    Returns:
        ``(q, scale)``: int8 (C, ...) ``round(x / scale[c])`` clipped to [-127, 127], and float32
        (C,) ``scale[c] = max |x_c| / 127`` (1 for an all-zero channel), so that
        ``|scale[c] * q - x| <= scale[c] / 2``.
    """
    g = np.asarray(grid, np.float32)
    scale = (np.abs(g.reshape(g.shape[0], -1)).max(1) if g.size else np.zeros(g.shape[0])) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(g / scale.reshape(-1, *([1] * (g.ndim - 1)))), -127, 127).astype(np.int8)
    return q, scale


def config_storage(config: dict) -> str:
    """The dtype of a store's features from its ``store.json``: its ``storage`` key, float16 for a
    format-1 store (written before int8 storage, no key)."""
    return str(config.get("storage") or "float16")


def _file_dtype(am: dict) -> np.dtype:
    """The dtype an axis entry of meta.json says its file holds (float16 when it says none: format 1)."""
    return np.dtype(am.get("dtype", "float16"))


def config_signature(config: dict) -> str:
    """SHA-256 (hex, 16 chars) of a store configuration without the keys that do not change
    the features (:data:`UNSIGNED_KEYS`: the signature itself, the creation time, notes, the
    command that wrote it)."""
    body = {k: v for k, v in config.items() if k not in UNSIGNED_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class CaseFeatures:
    """The features of one case. Obtain with :meth:`FeatureStore.load`.

    Attributes
    ----------
    case : str
    voxel_shape : (X, Y, Z)   the case's canonical voxel grid (``semisam_o1.data.images.read_image(...).shape``)
    affine : (4, 4) float64   canonical affine of the image
    axes : tuple[int, ...]    axes stored for this case
    meta : dict               the case's meta.json
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder = Path(folder)
        self.meta = meta
        self.case = meta["case"]
        self.voxel_shape = tuple(int(s) for s in meta["voxel_shape"])
        self.affine = np.asarray(meta["affine"], dtype=np.float64)
        self.axes = tuple(int(a) for a in meta["axes"])
        self._grids: dict[int, np.ndarray] = {}

    def _axis_meta(self, axis: int) -> dict:
        try:
            return self.meta["grids"][str(int(axis))]
        except KeyError:
            raise InputError(f"case {self.case}: axis {axis} was not encoded (axes: {self.axes})") from None

    def stored(self, axis: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``axis``'s file as stored: ``(array (C, a, b, c) memory-mapped read-only, int8 or float16;
        scale (C,) float32 for int8, else None)``; features = ``scale[c] * array[c]``.

        Raises:
            InputError: the file cannot be read or is not the shape / dtype meta.json says.
        """
        axis = int(axis)
        if axis not in self._grids:
            am = self._axis_meta(axis)
            path = self.folder / am["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"case {self.case}: cannot read {path} ({exc})") from None
            want = _file_dtype(am)
            if list(arr.shape) != list(am["shape"]) or arr.dtype != want:
                raise InputError(f"case {self.case}: {path} has shape {arr.shape} {arr.dtype}, "
                                 f"expected {tuple(am['shape'])} {want}")
            scale = None
            if want == np.int8:
                scale = np.asarray(am.get("scale", ()), np.float32)
                if scale.shape != (arr.shape[0],):
                    raise InputError(f"case {self.case}: {self.folder / 'meta.json'}: axis {axis} needs "
                                     f"{arr.shape[0]} channel scales, has {scale.size}")
            self._grids[axis] = (arr, scale)
        return self._grids[axis]

    def grid(self, axis: int) -> np.ndarray:
        """float16 (C, a, b, c) features on ``axis``'s feature-cell grid: the memory-mapped file
        (read-only) of a float16 store, ``scale[c] * q`` of an int8 one (a copy on the cell grid)."""
        arr, scale = self.stored(axis)
        if scale is None:
            return arr
        return (arr.astype(np.float32) * scale.reshape(-1, 1, 1, 1)).astype(np.float16)

    def cell_to_voxel(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """(offset (3,), step (3,)) float64: cell index i -> canonical voxel coordinate offset + step * i."""
        am = self._axis_meta(axis)
        return np.asarray(am["offset"], np.float64), np.asarray(am["step"], np.float64)

    @property
    def channels(self) -> int:
        return int(self._axis_meta(self.axes[0])["shape"][0])

    def on_voxel_grid(self, axes: Sequence[int] | None = None) -> np.ndarray:
        """float32 (C * n_axes, X, Y, Z): every axis's features trilinearly brought to the voxel grid
        (clamped at the borders), L2-normalised per voxel per axis, scaled by 1/sqrt(n_axes) and
        concatenated over axes, so the dot product of two voxels' vectors is the mean of their
        per-axis cosine similarities."""
        axes = self.axes if axes is None else tuple(int(a) for a in axes)
        parts = []
        scale = 1.0 / np.sqrt(len(axes))
        for axis in axes:
            arr, channel_scale = self.stored(axis)  # int8 scales commute with the (linear) interpolation
            f = voxel_features(arr, *self.cell_to_voxel(axis), self.voxel_shape)
            if channel_scale is not None:
                f *= channel_scale.reshape(-1, 1, 1, 1)
            norm = np.sqrt(np.einsum("cxyz,cxyz->xyz", f, f))
            f *= (scale / np.maximum(norm, 1e-12))[None]
            parts.append(f)
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def linear_weights(n_out: int, n_cells: int, offset: float, step: float) -> np.ndarray:
    """(n_out, n_cells) float32 linear interpolation weights from cells to voxels 0..n_out-1 for the
    mapping voxel = offset + step * cell, clamped at the grid's ends."""
    pos = (np.arange(n_out, dtype=np.float64) - offset) / step
    pos = np.clip(pos, 0.0, n_cells - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_cells - 1)
    w_hi = pos - lo
    w = np.zeros((n_out, n_cells), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), 1.0 - w_hi)
    np.add.at(w, (rows, hi), w_hi)
    return w


def voxel_features(grid: np.ndarray, offset, step, voxel_shape) -> np.ndarray:
    """Trilinear interpolation of (C, a, b, c) cell features to (C, X, Y, Z) float32 voxels
    (separable: one small matrix product per spatial axis)."""
    out = np.asarray(grid, dtype=np.float32)
    for d in range(3):
        n_cells = out.shape[1 + d]
        if n_cells == voxel_shape[d] and offset[d] == 0 and step[d] == 1:
            continue
        w = linear_weights(voxel_shape[d], n_cells, float(offset[d]), float(step[d]))
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [1 + d])), 0, 1 + d)
    return np.ascontiguousarray(out, dtype=np.float32)


class FeatureStore:
    """A feature store folder written by ``semisam-o1 encode``.

    Raises InputError when the folder holds no store (no ``store.json``).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise InputError(f"{self.root}: not a feature store (no {CONFIG_FILE}; run `semisam-o1 encode` first)")
        try:
            self.config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot parse ({exc})") from None
        fmt = self.config.get("format", 1) if isinstance(self.config, dict) else None
        if fmt not in READ_FORMATS:
            raise InputError(f"{path}: feature store format {fmt} is not one this version reads "
                             f"({', '.join(map(str, READ_FORMATS))}); re-encode it with this version")
        self.signature = self.config.get("signature") or config_signature(self.config)

    @property
    def axes(self) -> tuple[int, ...]:
        """Canonical (RAS) axes the 2D encoder ran along."""
        return tuple(int(a) for a in self.config["axes"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    def case_dir(self, case: str) -> Path:
        return self.root / CASES_DIR / case

    def cases(self) -> list[str]:
        """Finished cases written with this store's signature, sorted."""
        d = self.root / CASES_DIR
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and self.has(p.name))

    def has(self, case: str) -> bool:
        """True if ``case`` is finished and was written with this store's signature."""
        meta = self.read_meta(case)
        return meta is not None and meta.get("store_signature") == self.signature

    def read_meta(self, case: str) -> dict | None:
        p = self.case_dir(case) / "meta.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def check_case(self, case: str, axes: Sequence[int] | None = None) -> str | None:
        """What is wrong with the finished files of ``case`` (None when nothing is).

        Each axis file named in its meta.json must open as a memory-mapped ``.npy`` with the
        shape and dtype meta.json records (float16 when it names none; int8 with one scale per
        channel), and every axis of ``axes`` (default: the
        store's) must be there. Cheap: only the ``.npy`` headers are read.

        Returns:
            one phrase naming the file and the problem, or None.
        """
        folder = self.case_dir(case)
        meta = self.read_meta(case)
        if meta is None:
            return f"{folder / 'meta.json'}: missing or unreadable"
        grids = meta.get("grids")
        if not isinstance(grids, dict):
            return f"{folder / 'meta.json'}: no grids"
        for axis in self.axes if axes is None else axes:
            am = grids.get(str(int(axis)))
            if not isinstance(am, dict) or "file" not in am or "shape" not in am:
                return f"{folder / 'meta.json'}: axis {axis} missing"
            path = folder / am["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                return f"{path}: cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            want = _file_dtype(am)
            if list(arr.shape) != list(am["shape"]) or arr.dtype != want:
                return f"{path}: holds {arr.dtype} {tuple(arr.shape)}, meta.json says {want} {tuple(am['shape'])}"
            if want == np.int8 and len(am.get("scale", ())) != arr.shape[0]:
                return f"{folder / 'meta.json'}: axis {axis} has {len(am.get('scale', ()))} channel scales, not {arr.shape[0]}"
        return None

    def load(self, case: str) -> CaseFeatures:
        """The features of ``case``. Raises InputError naming the case if it is missing, unreadable,
        or was written with a different store signature."""
        meta = self.read_meta(case)
        if meta is None:
            if (self.case_dir(case) / "meta.json").is_file():
                raise InputError(f"case {case}: unreadable meta.json in {self.case_dir(case)}")
            raise InputError(f"case {case}: not in the feature store {self.root}")
        if meta.get("store_signature") != self.signature:
            raise InputError(f"case {case}: features in {self.root} were written with another store signature "
                             f"({meta.get('store_signature')} != {self.signature}); re-run encode with --overwrite")
        return CaseFeatures(self.case_dir(case), meta)

    def reduction(self) -> np.ndarray | None:
        """(C_encoder, C) float32 projection basis, or None when channels were not reduced."""
        p = self.root / REDUCTION_FILE
        return np.load(p) if p.is_file() else None

    def size_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total


# --------------------------------------------------------------------------- size on disk


NPY_HEADER_BYTES = 128  # numpy .npy format 1.0: magic + header padded to a multiple of 64 bytes (128 for 4D)
META_BYTES = 1200  # cases/<case>/meta.json (float16), rounded up from real stores (docs/accepted-inputs.md)
# int8 adds, per axis, ``"dtype": "int8"`` and the ``"scale"`` list (json indent 1: one line per channel of
# 4 spaces, repr of a float (at most 24 characters, e.g. 1.2345678901234567e-05), comma and newline)
INT8_META_AXIS_BYTES = 48
INT8_META_SCALE_BYTES = 30
RECORD_BYTES = 4096  # store.json + stage.json, rounded up from a real store (docs/accepted-inputs.md)


@dataclasses.dataclass(frozen=True)
class StoreGeometry:
    """What a store's size depends on besides the images' shapes.

    Attributes:
        input_size: the encoder's canvas side in pixels (LiteMedSAM: 256).
        cell: pixels per feature cell (LiteMedSAM: 256 / 64 = 4).
        raw_channels: the encoder's channels before the reduction (LiteMedSAM stage1-3: 800).
        channels: stored channels (``encode --channels``; 0 keeps ``raw_channels``).
        axes: slicing axes (``encode --axes``).
        tile: tile side in pixels (``encode --tile-size``; 0: auto, from the template's shape).
        storage: the stored dtype (``encode --storage``: ``"int8"``, the default, or ``"float16"``).
    """

    input_size: int
    cell: int
    raw_channels: int
    channels: int
    axes: tuple[int, ...]
    tile: int = 0
    storage: str = DEFAULT_STORAGE

    @property
    def stored_channels(self) -> int:
        return min(self.channels, self.raw_channels) if self.channels else self.raw_channels

    def tile_for(self, template_shape: Sequence[int]) -> int:
        """The tile side ``encode`` packs with for this template (the reduction case): ``tile``,
        else :func:`semisam_o1.data.slicing.auto_tile` of its largest side."""

        return int(self.tile) if self.tile else auto_tile(max(template_shape), self.input_size)


def meta_bytes(geometry: StoreGeometry) -> int:
    """Upper bound of one case's ``meta.json`` in bytes: :data:`META_BYTES`, plus for int8 storage
    the channel scales of every axis (:data:`INT8_META_AXIS_BYTES` + C * :data:`INT8_META_SCALE_BYTES`
    per axis; 64 channels on 3 axes: 5,904 bytes more)."""
    if geometry.storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {geometry.storage!r}: choose one of {STORAGE_DTYPES}")
    extra = 0
    if geometry.storage == "int8":
        extra = len(geometry.axes) * (INT8_META_AXIS_BYTES + INT8_META_SCALE_BYTES * geometry.stored_channels)
    return META_BYTES + extra


def case_store_bytes(shape: Sequence[int], tile: int, geometry: StoreGeometry) -> int:
    """Bytes of one case folder (``cases/<case>/``) as :func:`write_case` writes it.

    Per slicing axis ``a``, ``axis<a>.npy`` is a grid (C, ...) of ``geometry.storage`` values with
    one cell per slice along ``a`` and the slice's valid feature cells in-plane: the slice (su, sv)
    is resized so its longest side is ``tile`` pixels and covers ceil(r / cell) cells per side
    (:class:`semisam_o1.data.slicing.SliceLayout`). So ``itemsize * C * shape[a] * nu * nv`` bytes
    (itemsize 1 for int8, 2 for float16) plus the .npy header, and ``meta.json``
    (:func:`meta_bytes`: int8 adds the per-channel scales of every axis).

    Args:
        shape: canonical (X, Y, Z) voxel shape.
        tile: tile side in pixels (:meth:`StoreGeometry.tile_for`).
        geometry: the store's :class:`StoreGeometry`.

    Returns:
        bytes (int).
    """

    itemsize = np.dtype(geometry.storage).itemsize
    total = meta_bytes(geometry)
    for axis in geometry.axes:
        su, sv = (int(shape[d]) for d in range(3) if d != axis)
        plan = SliceLayout(su, sv, tile, geometry.cell)
        total += NPY_HEADER_BYTES + itemsize * geometry.stored_channels * int(shape[axis]) * plan.nu * plan.nv
    return total


def estimate_store_bytes(shapes: Mapping[str, Sequence[int]], template_shape: Sequence[int],
                         geometry: StoreGeometry) -> int:
    """Bytes of a store holding ``shapes`` ({case: canonical shape}): every case
    (:func:`case_store_bytes`) plus :data:`REDUCTION_FILE` (``raw_channels x channels`` float32,
    :func:`write_reduction`) and the two small JSON records (``store.json``, ``stage.json``:
    :data:`RECORD_BYTES`). Bytes of the files themselves (not rounded up to file-system blocks)."""
    tile = geometry.tile_for(template_shape)
    total = sum(case_store_bytes(s, tile, geometry) for s in shapes.values())
    if geometry.channels and geometry.channels < geometry.raw_channels:
        total += NPY_HEADER_BYTES + np.dtype(np.float32).itemsize * geometry.raw_channels * geometry.channels
    return total + RECORD_BYTES


# --------------------------------------------------------------------------- writing


def _create_exclusive(path: Path, write) -> bool:
    """Write a file through a temporary file and hard-link it into place only if ``path`` does
    not exist yet, so that parallel ``encode`` shards starting a store agree on one file.

    Args:
        path: the file to create.
        write: ``write(tmp_path)`` writes the content.

    Returns:
        True if this call created ``path``, False if it was there already (left untouched).
    """

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise InputError(write_error_message(path, exc)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_config(root: str | os.PathLike, config: dict, *, exclusive: bool = False) -> dict:
    """Write ``store.json`` of a new store at ``root`` (atomically) with its signature added.

    Args:
        root: the store folder (created if needed).
        config: the configuration (JSON-ready).
        exclusive: keep a ``store.json`` that is already there (another shard's) instead of
            replacing it.

    Returns:
        the config in ``store.json`` afterwards (this one, or the one that was there).
    """

    config = dict(config)
    config["signature"] = config_signature(config)
    path = Path(root) / CONFIG_FILE
    if not exclusive:
        write_json(path, config)
        return config
    _create_exclusive(path, lambda tmp: tmp.write_text(json.dumps(config, indent=1) + "\n"))
    return FeatureStore(root).config


def write_reduction(root: str | os.PathLike, basis: np.ndarray) -> np.ndarray:
    """Write ``reduction.npy`` (the (C_encoder, C) float32 basis) unless one is there already
    (another shard's); returns the basis in the file afterwards."""
    path = Path(root) / REDUCTION_FILE

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(basis, np.float32))

    _create_exclusive(path, save)
    return np.load(path)


def write_case(store_root: str | os.PathLike, case: str, grids: dict, maps: dict, meta: dict,
               storage: str = "float16") -> None:
    """Write one case folder atomically (temporary folder + rename), replacing an older one.

    Args:
        store_root: the store folder.
        case: case id.
        grids: {axis: (C, a, b, c) features on that axis's cell grid} (float16 or float32).
        maps: {axis: (offset (3,), step (3,))}: cell index i -> canonical voxel offset + step * i.
        meta: the case's meta.json fields (``case``, ``voxel_shape``, ``affine``, ``axes``,
            ``store_signature``, input hash ...); ``grids`` is filled in here.
        storage: ``"float16"`` (the default here; ``encode`` passes its store's), or ``"int8"``
            (:func:`quantise_int8`, the scales in meta.json).
    """
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage {storage!r}: choose one of {STORAGE_DTYPES}")
    cases_dir = Path(store_root) / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(case), dir=cases_dir))
    try:
        meta = dict(meta)
        meta["grids"] = {}
        for axis, g in grids.items():
            name = f"axis{axis}.npy"
            entry = {"file": name, "shape": list(g.shape), "offset": [float(x) for x in maps[axis][0]],
                     "step": [float(x) for x in maps[axis][1]]}
            if storage == "int8":
                g, scale = quantise_int8(g)
                entry.update(dtype="int8", scale=[float(x) for x in scale])
            np.save(tmp / name, np.ascontiguousarray(g, dtype=np.int8 if storage == "int8" else np.float16))
            meta["grids"][str(axis)] = entry
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        final = cases_dir / case
        old = None
        if final.exists():
            old = cases_dir / f"{temporary_prefix('old-' + case)}{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        failed_write = is_write_failure(exc, cases_dir)  # before the temporary folder frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if failed_write:
            raise OutputError(write_error_message(cases_dir / case, exc)) from None
        raise
