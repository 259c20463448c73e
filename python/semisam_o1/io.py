"""Dataset I/O: the one reading and writing layer every stage uses.

Rules (each holds for every subcommand because they all come through here):

* **Orientation.** Volumes are read with nibabel and brought to the closest
  canonical orientation (RAS+), so every stage works in one voxel order.
  :class:`Volume` remembers the file's own orientation; outputs written with
  :func:`write_label` / :func:`write_map` go back to the input's voxel order
  with its exact affine, qform / sform codes and header (only the data type,
  the scaling and the display range ``cal_min`` / ``cal_max`` are reset).
* **Images** are read as real values (nibabel applies ``scl_slope`` /
  ``scl_inter``), float32. NaN/Inf, zero-size and non-3D images are errors.
  A 4D file whose 4th dimension is 1 is read as 3D.
* **Labels** stored as float are rounded when every value lies within 1e-3 of
  an integer, never truncated; other values are an error naming the file and
  the value. Label values come from ``dataset.json`` ``labels`` and are mapped
  to consecutive class indices inside (``LabelMap``), written back with their
  original values as uint8 (uint16 if needed), slope 1, intercept 0.
* **Naming** follows the MSD / nnU-Net conventions: ``.nii`` and ``.nii.gz``,
  nnU-Net's ``_0000`` channel suffix (stripped to find the case id when the
  folder uses it, see :func:`_index_folder`), ``dataset.json`` ``file_ending``.
  A case under two endings or channels, or labels without an image, is one
  error listing every offending path.
* **Atomic writes**: every file goes through :func:`atomic_path` (temp file +
  rename), so a killed run never leaves a half-written output; a temporary that a
  killed writer left behind is named for its process (:func:`temporary_prefix`) and
  removed when a stage next starts in that folder (:func:`sweep_temporaries`).

Every user-caused problem raises :class:`semisam_o1.errors.InputError` with one
line naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import InputError, OutputError

NIFTI_ENDINGS = (".nii.gz", ".nii")
FLOAT_LABEL_TOLERANCE = 1e-3

__all__ = [
    "InputError",
    "Volume",
    "LabelMap",
    "Dataset",
    "atomic_path",
    "sweep_temporaries",
    "case_id_from_path",
    "find_case_file",
    "index_label_folder",
    "read_image",
    "canonical_shape",
    "read_label",
    "read_label_values",
    "check_same_grid",
    "write_label",
    "write_map",
    "write_json",
    "load_split",
]


# --------------------------------------------------------------------------- files


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


TEMPORARY_MARK = ".~"


def temporary_prefix(name: str) -> str:
    """The start of the name of a temporary file or folder written beside ``name``:
    ``.~PID@HOST~NAME.`` (hidden; ``mkstemp`` / ``mkdtemp`` add a random part). The writer's
    process id and host let :func:`sweep_temporaries` tell a killed writer's leftovers from a live
    writer's (another process, or another machine of a Ray cluster sharing the folder)."""
    return f"{TEMPORARY_MARK}{os.getpid()}@{_host()}~{name}."


def _host() -> str:
    import socket

    return socket.gethostname()


def _temporary_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a name made by :func:`temporary_prefix`, None for any other name."""
    if not name.startswith(TEMPORARY_MARK):
        return None
    owner, sep, _ = name[len(TEMPORARY_MARK):].partition("~")
    pid, at, host = owner.partition("@")
    return (int(pid), host) if sep and at and pid.isdigit() and host else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below it) that a writer on this host left when it
    was killed (SIGKILL, a lost Ray actor, a power cut) before it could rename or delete them:
    names made by :func:`temporary_prefix` whose process is no longer running. Temporaries of a
    live process, or of another host, are kept.

    Returns:
        the removed paths (files or folders).
    """
    import shutil

    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    here, removed = _host(), []
    for entry in entries:
        owner = _temporary_owner(entry.name)
        if owner is None or owner[1] != here or _alive(owner[0]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


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
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the user's usual mode
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = is_write_failure(exc, path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full:
            raise OutputError(write_error_message(path, exc)) from None
        raise


def is_write_failure(exc: BaseException, folder: Path) -> bool:
    """``exc`` is a failed write into ``folder``: an OSError of a full disk, a read-only file system
    or a refused permission, or any writer's error (numpy's ``tofile`` and ``torch.save`` hide
    ENOSPC behind their own) raised while the file system has less than 64 KiB left."""
    if isinstance(exc, (InputError, KeyboardInterrupt)):
        return False
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError, ValueError)) and _disk_full(folder)


def _disk_full(folder: Path) -> bool:
    """Less than 64 KiB left on the file system of ``folder``."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def write_error_message(path, exc: BaseException) -> str:
    """One line for an output that could not be written (disk full, read-only, no permission)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror and exc.errno in _WRITE_ERRNOS else None
    reason = reason or os.strerror(errno.ENOSPC)  # only full disks reach here without an errno
    return (f"{path}: cannot write ({reason}); nothing half-written is left and finished outputs "
            "are kept: free space or fix the folder, then run the same command again to resume")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (weights, inputs: part of stores' signatures)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_json_key(path: str | os.PathLike, key: str, value) -> None:
    """Read-modify-write of one top-level ``key`` of a JSON object file, atomically
    (benchmark results files that several benchmarks share). A missing or unparsable
    file starts from an empty object."""
    path = Path(path)
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    data[key] = value
    write_json(path, data)


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


_MAX_LISTED = 20


def _list_paths(paths: Sequence[Path | str], limit: int = _MAX_LISTED) -> str:
    """``a, b, c and 7 more``: a one-line listing of paths."""
    paths = [str(p) for p in paths]
    text = ", ".join(paths[:limit])
    if len(paths) > limit:
        text += f" and {len(paths) - limit} more"
    return text


def _decide_strip_channel(stems: Sequence[str], label_ids: Iterable[str] | None) -> bool:
    """Whether the image stems of one folder carry nnU-Net's ``_XXXX`` channel suffix.

    MSD names (``hippocampus_001``) never end in ``_`` + 4 digits, nnU-Net names
    always do (``case_0000``). A name such as ``img_0001`` is ambiguous, so:

    * the suffix is stripped only when every stem has one;
    * when label ids are known (``labelsTr``), the reading that matches more
      labels wins (ties: strip, the nnU-Net reading);
    * without labels, the suffixes must look like channels: every case has the
      same channels ``0000 .. 000n`` (at most 16), e.g. all ``_0000``.
    """
    stems = list(stems)
    if not stems or not all(_CHANNEL_SUFFIX.search(s) for s in stems):
        return False
    if label_ids is not None:
        label_ids = set(label_ids)
        if label_ids:
            plain = sum(s in label_ids for s in stems)
            stripped = len({_CHANNEL_SUFFIX.sub("", s) for s in stems} & label_ids)
            return stripped >= plain
    groups: dict[str, set[int]] = {}
    for s in stems:
        groups.setdefault(_CHANNEL_SUFFIX.sub("", s), set()).add(int(_CHANNEL_SUFFIX.search(s).group(1)))
    channel_sets = {frozenset(v) for v in groups.values()}
    if len(channel_sets) != 1:
        return False
    (channels,) = channel_sets
    return len(channels) <= 16 and channels == frozenset(range(len(channels)))


def _index_folder(
    folder: Path,
    strip_channel: bool | str,
    endings: Sequence[str] = NIFTI_ENDINGS,
    label_ids: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Map case id -> file for the NIfTI files of ``folder`` (hidden files skipped).

    ``strip_channel``: True / False, or ``"auto"`` to decide from the names (and
    ``label_ids`` when given) whether the folder uses nnU-Net's ``_0000``
    suffix (see :func:`_decide_strip_channel`).

    Raises InputError, one message listing every offending path, when case ids
    appear under two endings or two channels.
    """
    if not folder.is_dir():
        return {}
    files = []
    for p in sorted(folder.iterdir()):
        if not any(p.name.endswith(e) for e in endings) or not p.is_file():
            continue
        stem = case_id_from_path(p, strip_channel=False)
        if stem is None:
            continue
        files.append((stem, p))
    if strip_channel == "auto":
        strip_channel = _decide_strip_channel([s for s, _ in files], label_ids)
    found: dict[str, list[Path]] = {}
    for stem, p in files:
        cid = _CHANNEL_SUFFIX.sub("", stem) if strip_channel else stem
        found.setdefault(cid, []).append(p)
    clashes = {cid: paths for cid, paths in found.items() if len(paths) > 1}
    if clashes:
        raise InputError(
            f"{folder}: {len(clashes)} case(s) have several files (two endings or several channels; "
            "keep one per case, multi-channel images are not supported): "
            + "; ".join(f"{cid}: {_list_paths(paths)}" for cid, paths in list(clashes.items())[:_MAX_LISTED])
            + (f"; and {len(clashes) - _MAX_LISTED} more cases" if len(clashes) > _MAX_LISTED else "")
        )
    return {cid: paths[0] for cid, paths in found.items()}


def index_label_folder(folder: str | os.PathLike, endings: Sequence[str] = NIFTI_ENDINGS) -> dict[str, Path]:
    """Case id -> label file for a plain folder of label NIfTI files (``case.nii.gz``),
    e.g. predictions or pseudo-labels. Raises InputError for a case under two endings."""
    return _index_folder(Path(folder), strip_channel=False, endings=endings)


def find_case_file(folder: str | os.PathLike, case: str, what: str = "label") -> Path:
    """The NIfTI file of ``case`` in ``folder`` (``.nii.gz`` or ``.nii``, with or
    without ``_0000``). Raises InputError if none or several."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    hits = [folder / f"{case}{suffix}{ending}" for suffix in ("", "_0000") for ending in NIFTI_ENDINGS]
    hits = [h for h in hits if h.is_file()]
    if not hits:
        raise InputError(f"{folder}: no {what} file for case {case} ({case}.nii.gz or {case}.nii)")
    if len(hits) > 1:
        raise InputError(f"{folder}: case {case} has several {what} files: " + ", ".join(str(h) for h in hits))
    return hits[0]


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """The declared classes: label values on disk <-> consecutive class indices.

    ``values[i]`` is the value written on disk for class index ``i``;
    ``names[i]`` its name from ``dataset.json``. Index 0 is value 0, background
    (declared in every MSD / nnU-Net dataset). Values are 0 .. 65535 (they are
    written as uint8 or uint16); class indices are uint8 (uint16 beyond 256
    classes).

    Example: BraTS ``{"0": "background", "1": "NCR", "2": "ED", "4": "ET"}``
    gives ``values == (0, 1, 2, 4)``: a voxel of value 4 is class index 3
    inside, and index 3 is written back as 4.
    """

    values: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        values = tuple(int(v) for v in self.values)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if not values:
            raise InputError("no label values declared")
        if len(self.names) != len(values):
            raise ValueError("LabelMap: values and names differ in length")
        if list(values) != sorted(set(values)):
            raise InputError(f"label values {list(values)} must be distinct (and are kept sorted)")
        if values[0] != 0:
            raise InputError(f"label values {list(values)}: background value 0 must be declared")
        if values[-1] > 65535:
            raise InputError(f"label value {values[-1]} is too large (at most 65535)")

    @classmethod
    def from_dataset_json(cls, labels: dict, source: str = "dataset.json") -> "LabelMap":
        """Parse MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``) labels.

        Raises InputError for regions (nnU-Net v2 lists), non-integer values,
        duplicates, a missing background 0 or values above 65535.
        """
        if not isinstance(labels, dict):
            raise InputError(f"{source}: 'labels' must be an object")
        pairs = []
        for key, val in labels.items():
            if isinstance(val, list):  # nnU-Net v2 region: not supported
                raise InputError(f"{source}: label {key!r} is a region ({val}); only plain label values are supported")
            if isinstance(val, bool):
                raise InputError(f"{source}: label {key!r}: {val!r} is not a label value")
            if isinstance(val, (int, float)):  # nnU-Net v2: name -> value
                value, name = val, key
            else:  # MSD: "value" -> name
                value, name = key, val
            try:
                fval = float(value)
            except (TypeError, ValueError):
                raise InputError(f"{source}: label {key!r}: {value!r} is not an integer label value") from None
            if not np.isfinite(fval) or fval != int(fval):
                raise InputError(f"{source}: label {key!r}: {value!r} is not an integer label value")
            if fval < 0:
                raise InputError(f"{source}: negative label value {int(fval)}")
            pairs.append((int(fval), str(name)))
        if not pairs:
            raise InputError(f"{source}: 'labels' is empty")
        pairs.sort()
        values = tuple(v for v, _ in pairs)
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})
            raise InputError(f"{source}: label value {dup[0]} is declared twice in 'labels'")
        try:
            return cls(values=values, names=tuple(n for _, n in pairs))
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None

    @classmethod
    def from_values(cls, values: Iterable[int], names: Sequence[str] | None = None) -> "LabelMap":
        """A label map from label values found in files (0 is always added);
        names are the values as text unless given."""
        values = sorted({0, *(int(v) for v in values)})
        names = list(names) if names is not None else [("background" if v == 0 else str(v)) for v in values]
        return cls(values=tuple(values), names=tuple(names))

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def foreground(self) -> list[int]:
        """Class indices other than 0 (background)."""
        return list(range(1, self.num_classes))

    @property
    def index_dtype(self):
        """dtype of class-index arrays: uint8, or uint16 beyond 256 classes."""
        return np.uint8 if self.num_classes <= 256 else np.uint16

    @property
    def value_dtype(self):
        """dtype of label files written: uint8 when the largest value fits, else uint16."""
        return np.uint8 if max(self.values) <= 255 else np.uint16

    def lut(self) -> np.ndarray:
        """Lookup table value -> index (-1 for undeclared values), int32."""
        lut = np.full(max(self.values) + 1, -1, dtype=np.int32)
        lut[list(self.values)] = np.arange(self.num_classes, dtype=np.int32)
        return lut

    def to_index(self, values: np.ndarray, source: str = "label") -> np.ndarray:
        """Integer label values -> class indices (:attr:`index_dtype`).

        Raises InputError naming ``source`` and the undeclared values when a
        value is not declared.
        """
        values = np.asarray(values)
        if values.size == 0:
            return np.zeros(values.shape, dtype=self.index_dtype)
        vmin, vmax = int(values.min()), int(values.max())
        lut = self.lut()
        if vmin >= 0 and vmax < lut.size:
            idx = lut[values]
            if idx.min() >= 0:
                return idx.astype(self.index_dtype)
        uniq = np.unique(values)
        bad = [int(u) for u in uniq if u < 0 or u >= lut.size or lut[int(u)] < 0]
        shown = ", ".join(str(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InputError(
            f"{source}: label value{'s' if len(bad) > 1 else ''} {shown} not declared in dataset.json labels "
            f"{list(self.values)}"
        )

    def to_value(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> label values, uint8 if the largest value fits, else uint16.

        Raises ValueError for an index outside ``0 .. num_classes - 1``.
        """
        indices = np.asarray(indices)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_classes):
            raise ValueError(
                f"class index {int(indices.max()) if int(indices.max()) >= self.num_classes else int(indices.min())}"
                f" outside 0..{self.num_classes - 1}"
            )
        return np.asarray(self.values, dtype=self.value_dtype)[indices]


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
        The file's header (kept on outputs; dtype, scaling and cal_min / cal_max are reset).
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
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    if not any(path.name.endswith(e) for e in NIFTI_ENDINGS):
        raise InputError(f"{path}: not a NIfTI file name (.nii or .nii.gz expected)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind == "c":
        raise InputError(f"{path}: voxel type {dtype} (RGB or complex) is not supported; a scalar volume is needed")
    _warn_if_forms_disagree(img, path)
    return img


_WARNED_FORMS: set[str] = set()


def _warn_if_forms_disagree(img, path: Path) -> None:
    """One warning line (once per file) when the header's qform and sform are both set and
    give different axis orientations: nibabel, and so every stage, uses the sform."""
    import nibabel as nib

    hdr = img.header
    if int(hdr["qform_code"]) <= 0 or int(hdr["sform_code"]) <= 0 or str(path) in _WARNED_FORMS:
        return
    q, s = hdr.get_qform(), hdr.get_sform()
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        return
    codes_q = "".join(nib.aff2axcodes(q))
    codes_s = "".join(nib.aff2axcodes(s))
    if codes_q != codes_s:
        _WARNED_FORMS.add(str(path))
        import sys

        print(f"semisam-o1: warning: {path}: qform ({codes_q}) and sform ({codes_s}) disagree in orientation; "
              "the sform is used", file=sys.stderr, flush=True)


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
    """The 3D shape of a file: trailing singleton dimensions (a 4D file with one
    channel or time point) are dropped. Raises InputError for a real 4D file,
    fewer than 3 dimensions or a zero-size dimension."""
    shape = tuple(int(s) for s in data_shape)
    if len(shape) >= 3 and min(shape) < 1:
        raise InputError(f"{path}: empty image (shape {shape})")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(
            f"{path}: a 4D image with {shape[3]} channels or time points (shape {shape}); "
            "a 3D volume is needed (split the channels and pass one)"
        )
    if len(shape) != 3:
        raise InputError(f"{path}: a {len(shape)}D image of shape {shape}; a 3D volume is needed")
    return shape


def _read_data(img, path: Path, dtype) -> np.ndarray:
    shape = _squeeze_3d(img.shape, path)
    try:
        data = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip, short file
        raise InputError(f"{path}: cannot read the voxel data, is the file truncated? ({type(exc).__name__}: {exc})") from None
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path}: the voxel data has {data.size} values, the header says {shape}")
    return data.reshape(shape)


def canonical_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """The canonical (RAS) voxel shape (X, Y, Z) of a 3D NIfTI image from its header
    alone (no voxel data read). Raises InputError like :func:`read_image`."""
    import nibabel as nib

    path = Path(path)
    img = _load_nifti(path)
    shape = _squeeze_3d(img.shape, path)
    ornt = nib.orientations.io_orientation(img.affine)
    return tuple(int(shape[int(d)]) for d in np.argsort(ornt[:, 0]))


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D image as float32 real values in canonical (RAS+) orientation.

    nibabel applies ``scl_slope`` / ``scl_inter`` (stored value * slope + inter).
    A 4D file whose 4th dimension is 1 is read as 3D.

    Raises InputError, naming the file, for a missing, unreadable or truncated
    file, a real 4D (several channels / time points) or non-3D image, a
    zero-size image, or NaN/Inf intensities.
    """
    path = Path(path)
    img = _load_nifti(path)
    data = _read_data(img, path, np.float32)  # applies scl_slope / scl_inter
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {n} voxels are NaN or Inf; an image must hold finite intensities")
    array, affine, ornt = _to_canonical(img, path, data)
    return Volume(array=array.astype(np.float32, copy=False), affine=affine, path=path,
                  native_affine=img.affine.copy(), header=img.header.copy(), ornt=ornt)


def _integer_label_data(raw: np.ndarray, path: Path) -> np.ndarray:
    """Label voxel values -> non-negative integers (smallest unsigned dtype).

    Float values are rounded to the nearest integer when every value is within
    ``FLOAT_LABEL_TOLERANCE`` (1e-3) of one, never truncated. Raises InputError
    naming the file and the offending value otherwise, and for NaN/Inf or
    negative values.
    """
    if np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.complexfloating):
        raw = np.asarray(raw.real if np.iscomplexobj(raw) else raw, dtype=np.float64)
        finite = np.isfinite(raw)
        if not finite.all():
            raise InputError(f"{path}: label contains {int((~finite).sum())} NaN or Inf voxels")
        rounded = np.rint(raw)
        err = np.abs(raw - rounded)
        if raw.size and err.max() > FLOAT_LABEL_TOLERANCE:
            worst = int(np.argmax(err))
            bad = raw.flat[worst]
            n_bad = int((err > FLOAT_LABEL_TOLERANCE).sum())
            raise InputError(
                f"{path}: label value {bad:.6g} is not an integer (more than {FLOAT_LABEL_TOLERANCE:g} from one; "
                f"{n_bad} such voxels); labels must hold integer class values"
            )
        raw = rounded
    elif raw.dtype == np.bool_:
        raw = raw.astype(np.uint8)
    if raw.size == 0:
        return raw.astype(np.uint8)
    vmin, vmax = raw.min(), raw.max()
    if vmin < 0:
        raise InputError(f"{path}: negative label value {int(vmin)}")
    if vmax > np.iinfo(np.uint32).max:
        raise InputError(f"{path}: label value {int(vmax)} is too large")
    dtype = np.uint8 if vmax <= 255 else np.uint16 if vmax <= 65535 else np.uint32
    return raw.astype(dtype)


def read_label_values(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a label volume as its integer label values (not mapped to class
    indices), in canonical orientation; ``array`` is uint8 / uint16 / uint32.

    Float files are rounded as in :func:`read_label`. Use it to find which values
    a file holds (e.g. to build a :meth:`LabelMap.from_values`). Raises
    InputError as :func:`read_label` does, except for undeclared values.
    """
    path = Path(path)
    img = _load_nifti(path)
    raw = _read_data(img, path, None)  # scl_slope / scl_inter applied when set
    values = _integer_label_data(raw, path)
    array, affine, ornt = _to_canonical(img, path, values)
    vol = Volume(array=array, affine=affine, path=path, native_affine=img.affine.copy(),
                 header=img.header.copy(), ornt=ornt)
    if reference is not None:
        check_same_grid(vol, reference)
    return vol


def read_label(
    path: str | os.PathLike,
    label_map: LabelMap,
    reference: Volume | None = None,
) -> Volume:
    """Read a label volume as uint8 class indices (see :class:`LabelMap`) in
    canonical orientation.

    Float files are rounded to the nearest integer when every value is within
    1e-3 of one (0.99999 -> 1, 2.00001 -> 2); never truncated. A 4D file whose
    4th dimension is 1 is read as 3D. With ``reference`` (the case's image), the
    label must have the same canonical shape and affine (to 1e-3 mm).

    Raises InputError, naming the file, for a non-integral value (e.g. 0.6),
    NaN, a negative value, a value ``dataset.json`` does not declare, or a
    shape or affine that differs from ``reference``.
    """
    vol = read_label_values(path, reference=reference)
    vol.array = label_map.to_index(vol.array, source=str(vol.path))
    return vol


def check_same_grid(vol: Volume, reference: Volume, atol_mm: float = 1e-3, what: str = "image") -> None:
    """Raise InputError unless ``vol`` and ``reference`` share shape and affine
    (canonical; world positions to ``atol_mm``). The message names ``vol``'s file
    and ``reference`` (called ``what``)."""
    if vol.shape != reference.shape:
        raise InputError(f"{vol.path}: shape {vol.shape} differs from its {what} {reference.path} {reference.shape}")
    if not np.allclose(vol.affine, reference.affine, atol=atol_mm, rtol=0):
        diff = float(np.abs(vol.affine - reference.affine).max())
        raise InputError(
            f"{vol.path}: affine differs from its {what} {reference.path} (by up to {diff:.4g} mm; "
            f"spacing {_fmt_spacing(vol.spacing)} vs {_fmt_spacing(reference.spacing)})"
        )


def _fmt_spacing(spacing) -> str:
    return "x".join(f"{s:.4g}" for s in spacing)


def _output_header(reference: Volume, dtype):
    """The reference's header for an output: same geometry and fields; dtype,
    scaling (slope 1, intercept 0) and display range (cal_min / cal_max, which
    belong to the input's intensities) reset."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = 0
    header["cal_max"] = 0
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
        self.file_ending = ending
        self.labels: dict[str, Path] = _index_folder(self.root / "labelsTr", strip_channel=False, endings=endings)
        self.images: dict[str, Path] = {}
        for sub in ("imagesTr", "imagesTs"):
            label_ids = self.labels if sub == "imagesTr" else None
            for cid, p in _index_folder(self.root / sub, strip_channel="auto", endings=endings,
                                        label_ids=label_ids).items():
                if cid in self.images:
                    raise InputError(f"case {cid} has an image in two folders: {self.images[cid]} and {p}")
                self.images[cid] = p
        if not self.images:
            raise InputError(f"{self.root}: no images found in imagesTr/ (ending {' or '.join(endings)})")
        orphans = sorted(set(self.labels) - set(self.images))
        if orphans:
            raise InputError(
                f"{self.root}: {len(orphans)} label(s) without an image in imagesTr/: "
                + _list_paths([self.labels[c] for c in orphans])
            )

    def missing_labels(self, cases: Iterable[str]) -> list[str]:
        """The case ids among ``cases`` that have no label in ``labelsTr/``."""
        return [c for c in cases if c not in self.labels]

    def require_labels(self, cases: Iterable[str], purpose: str = "") -> dict[str, Path]:
        """case id -> label file for every case of ``cases``; raises one InputError
        listing the image of every case without a label."""
        cases = list(cases)
        missing = self.missing_labels(cases)
        if missing:
            paths = [self.images.get(c, c) for c in missing]
            raise InputError(
                f"{self.root}: {len(missing)} case(s) have no label in labelsTr/"
                + (f" ({purpose})" if purpose else "") + ": images " + _list_paths(paths)
            )
        return {c: self.labels[c] for c in cases}

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
