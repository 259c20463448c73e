"""Dataset I/O: the one reading and writing layer every stage uses.

Rules (each holds for every subcommand because they all come through here):

* **Orientation.** Volumes are read with nibabel and brought to the closest
  canonical orientation (RAS+), so every stage works in one voxel order.
  :class:`Volume` remembers the file's own orientation; outputs written with
  :func:`write_label` / :func:`write_map` go back to the input's voxel order
  with its exact affine and header.
* **Images** are read as real values (nibabel applies ``scl_slope`` /
  ``scl_inter``), float32. NaN/Inf, zero-size and non-3D images are errors.
  A 4D file whose 4th dimension is 1 is read as 3D.
* **Labels** stored as float are rounded when every value lies within 1e-3 of
  an integer, never truncated; other values are an error naming the file and
  the value. Label values come from ``dataset.json`` ``labels`` and are mapped
  to consecutive class indices inside (``LabelMap``), written back with their
  original values as uint8 (uint16 if needed), slope 1, intercept 0.
* **Naming** follows the MSD / nnU-Net conventions: ``.nii`` and ``.nii.gz``,
  nnU-Net's ``_0000`` channel suffix, ``dataset.json`` ``file_ending``.
* **Atomic writes**: every file goes through :func:`atomic_path` (temp file +
  rename), so a killed run never leaves a half-written output.

Every user-caused problem raises :class:`semisam_o1.errors.InputError` with one
line naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError

NIFTI_ENDINGS = (".nii.gz", ".nii")
FLOAT_LABEL_TOLERANCE = 1e-3

__all__ = [
    "InputError",
    "Volume",
    "LabelMap",
    "Dataset",
    "atomic_path",
    "case_id_from_path",
    "find_case_file",
    "read_image",
    "read_label",
    "write_label",
    "write_map",
    "write_json",
    "load_split",
]


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched,
    so no half-written output is ever visible. The temporary name keeps the
    file's endings (``.nii.gz``) so writers that look at the suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def strip_nifti_ending(name: str) -> str | None:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


def case_id_from_path(path: str | os.PathLike, strip_channel: bool = True) -> str | None:
    """Case id of a NIfTI path: the name without ``.nii``/``.nii.gz`` and, for
    images, without nnU-Net's ``_0000`` channel suffix. ``None`` if not NIfTI."""
    stem = strip_nifti_ending(Path(path).name)
    if stem is None or stem.startswith("."):
        return None
    if strip_channel:
        stem = _CHANNEL_SUFFIX.sub("", stem)
    return stem


def _index_folder(folder: Path, strip_channel: bool, endings: Sequence[str] = NIFTI_ENDINGS) -> dict[str, Path]:
    """Map case id -> file for the NIfTI files of ``folder``.

    Raises InputError when a case id appears under two endings or two channels.
    """
    found: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or not any(p.name.endswith(e) for e in endings):
            continue
        cid = case_id_from_path(p, strip_channel=strip_channel)
        if cid is None:
            continue
        found.setdefault(cid, []).append(p)
    out = {}
    for cid, paths in found.items():
        if len(paths) > 1:
            raise InputError(
                f"case {cid} has {len(paths)} files in {folder} ("
                + ", ".join(p.name for p in paths)
                + "): keep one (multi-channel images are not supported)"
            )
        out[cid] = paths[0]
    return out


def find_case_file(folder: str | os.PathLike, case: str, what: str = "label") -> Path:
    """The NIfTI file of ``case`` in ``folder`` (``.nii.gz`` or ``.nii``, with or
    without ``_0000``). Raises InputError if none or several."""
    folder = Path(folder)
    hits = [folder / f"{case}{suffix}{ending}" for suffix in ("", "_0000") for ending in NIFTI_ENDINGS]
    hits = [h for h in hits if h.is_file()]
    if not hits:
        raise InputError(f"{folder}: no {what} file for case {case} ({case}.nii.gz or {case}.nii)")
    if len(hits) > 1:
        raise InputError(f"{folder}: case {case} has several {what} files: " + ", ".join(h.name for h in hits))
    return hits[0]


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """The declared classes: label values on disk <-> consecutive class indices.

    ``values[i]`` is the value written on disk for class index ``i``;
    ``names[i]`` its name from ``dataset.json``. Index 0 is the lowest value
    (background in every MSD / nnU-Net dataset).
    """

    values: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_dataset_json(cls, labels: dict, source: str = "dataset.json") -> "LabelMap":
        """Parse MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``) labels."""
        pairs = []
        try:
            for key, val in labels.items():
                if isinstance(val, (int, float)) and not isinstance(val, bool):
                    pairs.append((int(val), str(key)))  # nnU-Net v2: name -> value
                elif isinstance(val, list):  # nnU-Net v2 region: not supported
                    raise InputError(f"{source}: label {key!r} is a region ({val}); only plain label values are supported")
                else:
                    pairs.append((int(key), str(val)))  # MSD: "value" -> name
        except ValueError as exc:
            raise InputError(f"{source}: cannot read 'labels' ({exc})") from None
        if not pairs:
            raise InputError(f"{source}: 'labels' is empty")
        pairs.sort()
        values = tuple(v for v, _ in pairs)
        if len(set(values)) != len(values):
            raise InputError(f"{source}: a label value is declared twice in 'labels'")
        if values[0] < 0:
            raise InputError(f"{source}: negative label value {values[0]}")
        return cls(values=values, names=tuple(n for _, n in pairs))

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def foreground(self) -> list[int]:
        """Class indices other than 0 (background)."""
        return list(range(1, self.num_classes))

    def lut(self) -> np.ndarray:
        """Lookup table value -> index (-1 for undeclared values), int16."""
        lut = np.full(max(self.values) + 1, -1, dtype=np.int16)
        lut[list(self.values)] = np.arange(self.num_classes, dtype=np.int16)
        return lut

    def to_index(self, values: np.ndarray, source: str = "label") -> np.ndarray:
        """Integer label values -> class indices (uint8). Undeclared value: InputError."""
        values = np.asarray(values)
        uniq = np.unique(values)
        bad = [int(u) for u in uniq if u < 0 or u > max(self.values) or int(u) not in self.values]
        if bad:
            raise InputError(
                f"{source}: label value {bad[0]} is not declared in dataset.json labels {list(self.values)}"
            )
        return self.lut()[values].astype(np.uint8)

    def to_value(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> label values, uint8 if the largest value fits, else uint16."""
        dtype = np.uint8 if max(self.values) <= 255 else np.uint16
        return np.asarray(self.values, dtype=dtype)[np.asarray(indices)]


# --------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A 3D volume in canonical (RAS+) voxel order, with what is needed to write
    results back in the file's own voxel order.

    Attributes
    ----------
    array : np.ndarray, shape (X, Y, Z)
        float32 intensities for images; uint8 class indices for labels.
    affine : np.ndarray, (4, 4) float64
        Canonical affine: voxel (i, j, k) of ``array`` -> world mm (RAS).
    path : Path
        The file it came from.
    native_affine : np.ndarray
        The file's own affine (written back on every output).
    header : nibabel header
        The file's header (kept on outputs; dtype and scaling are reset).
    ornt : np.ndarray
        nibabel orientation transform from the file's voxel order to canonical.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    native_affine: np.ndarray
    header: object
    ornt: np.ndarray = field(repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Bring an array on the canonical grid (X, Y, Z[, ...]) back to the file's voxel order."""
        import nibabel as nib

        inverse = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(self.native_affine)
        )
        return nib.orientations.apply_orientation(array, inverse)


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def _to_canonical(img, path: Path, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import nibabel as nib

    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the affine is singular or not finite")
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    array = nib.orientations.apply_orientation(data, transform)
    canon_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    return np.ascontiguousarray(array), canon_affine, transform


def _squeeze_3d(data_shape: tuple, path: Path) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in data_shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(f"{path}: a 4D image with {shape[3]} channels or time points; a 3D volume is needed")
    if len(shape) != 3:
        raise InputError(f"{path}: a {len(shape)}D image of shape {shape}; a 3D volume is needed")
    if min(shape) < 1:
        raise InputError(f"{path}: empty image (shape {shape})")
    return shape


def _read_data(img, path: Path, dtype) -> np.ndarray:
    shape = _squeeze_3d(img.shape, path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file
        raise InputError(f"{path}: cannot read the voxel data ({type(exc).__name__}: {exc})") from None
    return data.reshape(shape)


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D image as float32 real values in canonical (RAS+) orientation.

    Raises InputError for a missing or unreadable file, a non-3D image, an
    empty image, or NaN/Inf intensities.
    """
    path = Path(path)
    img = _load_nifti(path)
    data = _read_data(img, path, np.float32)  # applies scl_slope / scl_inter
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {n} voxels are NaN or Inf")
    array, affine, ornt = _to_canonical(img, path, data)
    return Volume(array=array.astype(np.float32, copy=False), affine=affine, path=path,
                  native_affine=img.affine.copy(), header=img.header.copy(), ornt=ornt)


def read_label(
    path: str | os.PathLike,
    label_map: LabelMap,
    reference: Volume | None = None,
) -> Volume:
    """Read a label volume as uint8 class indices (see :class:`LabelMap`) in
    canonical orientation.

    Float files are rounded to the nearest integer when every value is within
    1e-3 of one. With ``reference`` (the case's image), the label must have the
    same canonical shape and affine (to 1e-3 mm).

    Raises InputError for non-integral values, undeclared values, or a shape
    or affine that differs from ``reference``.
    """
    path = Path(path)
    img = _load_nifti(path)
    raw = _read_data(img, path, None)
    if np.issubdtype(raw.dtype, np.floating):
        raw = raw.astype(np.float64)
        if not np.all(np.isfinite(raw)):
            raise InputError(f"{path}: label contains NaN or Inf")
        rounded = np.rint(raw)
        err = np.abs(raw - rounded)
        if err.max(initial=0.0) > FLOAT_LABEL_TOLERANCE:
            bad = raw.flat[int(np.argmax(err))]
            raise InputError(f"{path}: label value {bad:g} is not an integer (more than 1e-3 from one)")
        raw = rounded.astype(np.int64)
    else:
        raw = raw.astype(np.int64)
    indices = label_map.to_index(raw, source=str(path))
    array, affine, ornt = _to_canonical(img, path, indices)
    vol = Volume(array=array, affine=affine, path=path, native_affine=img.affine.copy(),
                 header=img.header.copy(), ornt=ornt)
    if reference is not None:
        check_same_grid(vol, reference)
    return vol


def check_same_grid(vol: Volume, reference: Volume, atol_mm: float = 1e-3) -> None:
    """Raise InputError unless ``vol`` and ``reference`` share shape and affine (canonical)."""
    if vol.shape != reference.shape:
        raise InputError(f"{vol.path}: shape {vol.shape} differs from its image {reference.path.name} {reference.shape}")
    if not np.allclose(vol.affine, reference.affine, atol=atol_mm, rtol=0):
        raise InputError(f"{vol.path}: affine differs from its image {reference.path.name}")


def _output_header(reference: Volume, dtype):
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    return header


def _write_nifti(path: Path, data: np.ndarray, reference: Volume, dtype) -> None:
    import nibabel as nib

    header = _output_header(reference, dtype)
    cls = nib.Nifti2Image if isinstance(reference.header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(np.asarray(data, dtype=dtype), reference.native_affine, header=header)
    img.set_qform(reference.header.get_qform(), code=int(reference.header["qform_code"]))
    img.set_sform(reference.header.get_sform(), code=int(reference.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_label(path: str | os.PathLike, indices: np.ndarray, reference: Volume, label_map: LabelMap) -> Path:
    """Write class indices on ``reference``'s canonical grid as a label file in
    the reference file's own voxel order, affine and header, with the original
    label values (uint8, or uint16 when a value exceeds 255), atomically.

    Raises ValueError if ``indices`` does not have the reference's canonical shape.
    """
    path = Path(path)
    indices = np.asarray(indices)
    if indices.shape != reference.shape:
        raise ValueError(f"indices shape {indices.shape} != reference shape {reference.shape}")
    values = label_map.to_value(indices)
    _write_nifti(path, reference.to_native(values), reference, values.dtype)
    return path


def write_map(path: str | os.PathLike, array: np.ndarray, reference: Volume) -> Path:
    """Write a float map (entropy, scores) on ``reference``'s canonical grid as float32
    NIfTI in the reference's voxel order, affine and header, atomically. A 4th
    (channel) axis is allowed."""
    path = Path(path)
    array = np.asarray(array, dtype=np.float32)
    if array.shape[:3] != reference.shape:
        raise ValueError(f"array shape {array.shape} != reference shape {reference.shape}")
    _write_nifti(path, reference.to_native(array), reference, np.float32)
    return path


# --------------------------------------------------------------------------- datasets


class Dataset:
    """An MSD / nnU-Net dataset folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``
    (and ``imagesTs/`` when present).

    Attributes
    ----------
    root : Path
    label_map : LabelMap
        Declared classes from ``dataset.json`` ``labels``.
    images : dict[str, Path]
        case id -> image file (``imagesTr`` and ``imagesTs``).
    labels : dict[str, Path]
        case id -> label file (``labelsTr``).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not self.root.is_dir():
            raise InputError(f"{self.root}: dataset folder not found")
        if not meta_path.is_file():
            raise InputError(f"{meta_path}: not found (an MSD / nnU-Net dataset needs dataset.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{meta_path}: cannot parse ({exc})") from None
        if "labels" not in self.meta:
            raise InputError(f"{meta_path}: no 'labels' entry")
        self.label_map = LabelMap.from_dataset_json(self.meta["labels"], source=str(meta_path))
        ending = self.meta.get("file_ending")
        endings = (ending,) if ending else NIFTI_ENDINGS
        if ending and ending not in NIFTI_ENDINGS:
            raise InputError(f"{meta_path}: file_ending {ending!r} is not supported (only .nii.gz and .nii)")
        self.images: dict[str, Path] = {}
        for sub in ("imagesTr", "imagesTs"):
            for cid, p in _index_folder(self.root / sub, strip_channel=True, endings=endings).items():
                if cid in self.images:
                    raise InputError(f"case {cid} is in both {self.images[cid]} and {p}")
                self.images[cid] = p
        self.labels: dict[str, Path] = _index_folder(self.root / "labelsTr", strip_channel=False, endings=endings)
        if not self.images:
            raise InputError(f"{self.root}: no images found in imagesTr/ (ending {' or '.join(endings)})")
        orphans = sorted(set(self.labels) - set(self.images))
        if orphans:
            raise InputError(
                "labels without an image: " + ", ".join(str(self.labels[c]) for c in orphans[:5])
                + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
            )

    @property
    def cases(self) -> list[str]:
        return sorted(self.images)

    def image_path(self, case: str) -> Path:
        try:
            return self.images[case]
        except KeyError:
            raise InputError(f"{self.root}: case {case} not found in imagesTr/") from None

    def label_path(self, case: str) -> Path:
        try:
            return self.labels[case]
        except KeyError:
            raise InputError(f"{self.root}: case {case} has no label in labelsTr/ "
                             f"(image {self.image_path(case)})") from None

    def read_image(self, case: str) -> Volume:
        return read_image(self.image_path(case))

    def read_label(self, case: str, reference: Volume | None = None) -> Volume:
        return read_label(self.label_path(case), self.label_map, reference=reference)

    def select(
        self,
        cases: Iterable[str] | None = None,
        split: str | os.PathLike | dict | None = None,
        subset: str | Sequence[str] | None = None,
    ) -> list[str]:
        """Case ids chosen by explicit ``cases``, or by ``subset`` names of a split
        file (e.g. ``"template,unlabeled"``), or all cases. Order: as given /
        split order. Unknown case ids raise InputError."""
        if cases:
            chosen = list(dict.fromkeys(cases))
        elif split is not None:
            sp = load_split(split) if not isinstance(split, dict) else split
            names = subset.split(",") if isinstance(subset, str) else list(subset or ["template", "unlabeled", "test"])
            chosen = []
            for name in names:
                name = name.strip()
                if name not in sp:
                    raise InputError(f"split has no subset {name!r} (it has {', '.join(k for k in sp if k != 'note')})")
                entry = sp[name]
                chosen.extend([entry] if isinstance(entry, str) else list(entry))
            chosen = list(dict.fromkeys(chosen))
        else:
            chosen = self.cases
        missing = [c for c in chosen if c not in self.images]
        if missing:
            raise InputError(f"{self.root}: case {missing[0]} not found in imagesTr/"
                             + (f" ({len(missing)} missing)" if len(missing) > 1 else ""))
        return chosen


def load_split(path: str | os.PathLike) -> dict:
    """Read a split file (``{"template": ID, "unlabeled": [...], "test": [...]}``)."""
    path = Path(path)
    try:
        sp = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot parse split file ({exc})") from None
    if not isinstance(sp, dict):
        raise InputError(f"{path}: a split file must be a JSON object")
    return sp
