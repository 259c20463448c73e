"""The feature store written by ``semisam-o1 encode`` and read by ``propagate`` / ``refine``.

Layout of a store folder::

    store.json                 the store's configuration and its signature (encoder, layers,
                               weights hash, preprocessing, packing, channel reduction, axes,
                               package version)
    reduction.npy              (C_encoder, C) float32 projection basis (when channels are reduced)
    cases/<case>/meta.json     per case: input file hash, voxel shape, canonical affine, per axis
                               the grid shape and its cell -> voxel mapping, the store signature
    cases/<case>/axis<a>.npy   float16 (C, a, b, c) features on axis a's feature-cell grid

A case folder is written under a temporary name and renamed into place when complete, so a
case is either absent or finished. ``.npy`` files are memory-mapped on load (no copy), which is
what the C++ core needs.

Grid of axis ``a``: the 2D encoder ran on the slices ``index a = k``; the grid has one cell per
slice along ``a`` (step 1 voxel, offset 0) and the encoder's feature cells in-plane. Cell index
``i`` (3-vector) maps to canonical voxel coordinate ``offset + step * i`` (voxel centres at
integers), see :meth:`CaseFeatures.cell_to_voxel`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

STORE_FORMAT = 1
CONFIG_FILE = "store.json"
REDUCTION_FILE = "reduction.npy"
CASES_DIR = "cases"


def config_signature(config: dict) -> str:
    """SHA-256 (hex, 16 chars) of a store configuration without its ``signature`` field."""
    body = {k: v for k, v in config.items() if k not in ("signature", "created", "notes")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class CaseFeatures:
    """The features of one case. Obtain with :meth:`FeatureStore.load`.

    Attributes
    ----------
    case : str
    voxel_shape : (X, Y, Z)   the case's canonical voxel grid (``semisam_o1.io.read_image(...).shape``)
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

    def grid(self, axis: int) -> np.ndarray:
        """float16 (C, a, b, c) features on ``axis``'s feature-cell grid, memory-mapped (read-only)."""
        axis = int(axis)
        if axis not in self._grids:
            am = self._axis_meta(axis)
            path = self.folder / am["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"case {self.case}: cannot read {path} ({exc})") from None
            if list(arr.shape) != list(am["shape"]) or arr.dtype != np.float16:
                raise InputError(f"case {self.case}: {path} has shape {arr.shape} {arr.dtype}, "
                                 f"expected {tuple(am['shape'])} float16")
            self._grids[axis] = arr
        return self._grids[axis]

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
            f = voxel_features(self.grid(axis), *self.cell_to_voxel(axis), self.voxel_shape)
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


# --------------------------------------------------------------------------- writing


def write_config(root: str | os.PathLike, config: dict) -> dict:
    """Write ``store.json`` of a new store at ``root`` (atomically) with its signature added;
    returns the config as written."""
    from .io import write_json

    config = dict(config)
    config["signature"] = config_signature(config)
    write_json(Path(root) / CONFIG_FILE, config)
    return config


def write_case(store_root: str | os.PathLike, case: str, grids: dict, maps: dict, meta: dict) -> None:
    """Write one case folder atomically (temporary folder + rename), replacing an older one.

    Args:
        store_root: the store folder.
        case: case id.
        grids: {axis: (C, a, b, c) float16 features on that axis's cell grid}.
        maps: {axis: (offset (3,), step (3,))}: cell index i -> canonical voxel offset + step * i.
        meta: the case's meta.json fields (``case``, ``voxel_shape``, ``affine``, ``axes``,
            ``store_signature``, input hash ...); ``grids`` is filled in here.
    """
    cases_dir = Path(store_root) / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case}-", dir=cases_dir))
    try:
        meta = dict(meta)
        meta["grids"] = {}
        for axis, g in grids.items():
            name = f"axis{axis}.npy"
            np.save(tmp / name, np.ascontiguousarray(g, dtype=np.float16))
            meta["grids"][str(axis)] = {"file": name, "shape": list(g.shape),
                                        "offset": [float(x) for x in maps[axis][0]],
                                        "step": [float(x) for x in maps[axis][1]]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        final = cases_dir / case
        old = None
        if final.exists():
            old = cases_dir / f".old-{case}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
