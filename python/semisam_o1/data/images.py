"""Images read and written, every format in this one module: NIfTI through nibabel, NRRD and
MHA through SimpleITK.

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
* **Compressed files** (``.nii.gz``; a ``.nrrd`` with gzip encoding, an ``.mha`` with compressed
  data) are decompressed to their end before their voxels are used, so the stream's own checks
  run (gzip: CRC-32 and length; zlib: Adler-32) and its length is the header's: a corrupt stream is
  an error naming the file, never silently wrong voxels (nibabel alone stops reading at the last
  voxel, before the check; SimpleITK returns wrong voxels for some damaged .mha streams).
* **Labels** stored as float are rounded when every value lies within 1e-3 of
  an integer, never truncated; other values are an error naming the file and
  the value. Label values come from ``dataset.json`` ``labels`` and are mapped
  to consecutive class indices inside (``LabelMap``), written back with their
  original values as uint8 (uint16 if needed), slope 1, intercept 0.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path
from semisam_o1.data.labels import LabelMap

NIFTI_ENDINGS = (".nii.gz", ".nii")


FLOAT_LABEL_TOLERANCE = 1e-3


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis of a 4x4 voxel-to-world ``affine``: the lengths of its
    first three columns, float64 (3,)."""
    return np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))


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
    #: (X, Y, Z, 3) float32 RGB of a colour 2D image (``array`` then holds its luma), else None
    channels: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def is_2d(self) -> bool:
        """A 2D image: one slice along the third canonical axis."""
        return self.array.shape[2] == 1

    @property
    def encoder_input(self) -> np.ndarray:
        """What a 2D encoder is given: the RGB channels of a colour image (X, Y, Z, 3), else the
        intensities (X, Y, Z)."""
        return self.channels if self.channels is not None else self.array

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(s) for s in affine_spacing(self.affine))

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Bring an array on the canonical grid (X, Y, Z[, ...]) back to the file's voxel order."""
        import nibabel as nib

        inverse = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.io_orientation(self.native_affine)
        )
        return nib.orientations.apply_orientation(array, inverse)


def refuse_broken_link(path: Path) -> None:
    """Raise InputError naming ``path`` when it is a symbolic link whose target does not exist (a
    moved or unmounted scan), so that a folder's listing never drops it silently."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path}: a broken symbolic link (its target {os.readlink(path)} does not exist)")


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


def _squeeze_3d(data_shape: tuple, path: Path, rgb_ok: bool = False) -> tuple[int, ...]:
    """The 3D shape of a file: trailing singleton dimensions (a 4D file with one
    channel or time point) are dropped; a 2D file is (X, Y, 1). With ``rgb_ok``, a colour 2D
    image ``(X, Y, 1, 3)`` is kept as it is. Raises InputError for a real 4D file,
    fewer than 2 dimensions or a zero-size dimension."""
    shape = tuple(int(s) for s in data_shape)
    if len(shape) >= 2 and min(shape) < 1:
        raise InputError(f"{path}: empty image (shape {shape})")
    if len(shape) == 2:  # a 2D NIfTI: one slice along the third axis
        return shape + (1,)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4 and shape[2] == 1 and shape[3] == 3 and rgb_ok:
        return shape
    if len(shape) == 4:
        raise InputError(
            f"{path}: a 4D image with {shape[3]} channels or time points (shape {shape}); "
            "a 3D volume is needed (split the channels and pass one)"
        )
    if len(shape) != 3:
        raise InputError(f"{path}: a {len(shape)}D image of shape {shape}; a 3D volume is needed")
    return shape


def _verified_gzip_bytes(path: Path) -> bytes:
    """The whole decompressed content of a ``.gz`` file, its CRC-32 and length checked (Python's
    gzip does both at the end of the stream). Raises InputError naming the file when they fail,
    the stream is cut short or it does not decompress."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except gzip.BadGzipFile as exc:
        check = "CRC" if "CRC" in str(exc) else "length" if "length" in str(exc) else None
        problem = f"gzip {check} check failed" if check else f"not a valid gzip stream: {exc}"
        raise InputError(f"{path}: the file is corrupt ({problem})") from None
    except EOFError:
        raise InputError(f"{path}: the file is truncated (its gzip stream ends early)") from None
    except zlib.error as exc:
        raise InputError(f"{path}: the file is corrupt (gzip stream: {exc})") from None


def _read_data(img, path: Path, dtype, rgb_ok: bool = False) -> np.ndarray:
    shape = _squeeze_3d(img.shape, path, rgb_ok=rgb_ok)
    if path.name.endswith(".gz"):  # the voxels from the checked bytes, decompressed once
        img = type(img).from_bytes(_verified_gzip_bytes(path))
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
    if is_2d_format(path):
        return geometry(path)[0]
    img = _load_nifti(path)
    shape = _squeeze_3d(img.shape, path, rgb_ok=True)[:3]
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
    if is_2d_format(path):
        return _volume_2d(path, read_2d(path), label=False)
    img = _load_nifti(path)
    data = _read_data(img, path, np.float32, rgb_ok=True)  # applies scl_slope / scl_inter
    if not np.all(np.isfinite(data)):
        n = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {n} voxels are NaN or Inf; an image must hold finite intensities")
    channels = None
    if data.ndim == 4:  # a colour 2D image (X, Y, 1, 3)
        channels = data
        data = luma(data)
    array, affine, ornt = _to_canonical(img, path, data)
    if channels is not None:
        channels = np.ascontiguousarray(_to_canonical(img, path, channels)[0], dtype=np.float32)
    return Volume(array=array.astype(np.float32, copy=False), affine=affine, path=path,
                  native_affine=img.affine.copy(), header=img.header.copy(), ornt=ornt, channels=channels)


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
    if is_2d_format(path):
        vol = _volume_2d(path, mask_values(path, read_2d(path)), label=True)
        if reference is not None:
            check_same_grid(vol, reference)
        return vol
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



# --------------------------------------------------------------------------- ITK formats and headers




ITK_ENDINGS = (".nrrd", ".mha")


#: 2D image formats read through Pillow (Clark et al., Pillow): images and masks
IMAGE_2D_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS + IMAGE_2D_ENDINGS
#: the formats a label (mask) may come in: every image format but lossy JPEG
LABEL_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS + tuple(e for e in IMAGE_2D_ENDINGS if e not in (".jpg", ".jpeg"))


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``;
    case-insensitive), or None."""
    name = Path(path).name.lower()
    return next((e for e in ENDINGS if name.endswith(e) and len(name) > len(e)), None)


def is_nifti(path: str | os.PathLike) -> bool:
    return ending(path) in NIFTI_ENDINGS


def sitk_module():
    """SimpleITK, with ITK's warning window (printed on stderr) turned off."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def itk_reader(path: Path):
    sitk = sitk_module()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable image ({first[:200]})") from None
    return reader


def _itk_affine(size, spacing, origin, direction) -> tuple[tuple[int, ...], np.ndarray]:
    """The RAS voxel-to-world affine of an ITK image's geometry (ITK's world is LPS)."""
    dim = len(size)
    d = np.asarray(direction, np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, np.float64)[:3])
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, np.float64)[:3]
    shape = tuple(int(s) for s in size)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, affine


def geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """Canonical (RAS+) voxel shape and affine of a 3D image from its header alone.

    Raises:
        InputError: unreadable file, not 3D (a 4D file with one channel counts as 3D),
            or a singular affine.
    """
    import nibabel as nib

    path = Path(path)
    if is_2d_format(path):
        return _header_2d(path), np.eye(4)
    if is_nifti(path):
        img = _load_nifti(path)
        shape, affine = _squeeze_3d(img.shape, path, rgb_ok=True)[:3], img.affine
    else:
        r = itk_reader(path)
        shape, affine = _itk_affine(r.GetSize(), r.GetSpacing(), r.GetOrigin(), r.GetDirection())
        if r.GetNumberOfComponents() != 1:
            raise InputError(f"{path}: {r.GetNumberOfComponents()} components per voxel; a scalar volume is needed")
    if len(shape) != 3:
        raise InputError(f"{path}: a {len(shape)}D image of shape {shape}; a 3D volume is needed")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the voxel-to-world transform is singular or not finite")
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    canon = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    canon_shape = tuple(int(shape[int(d)]) for d in np.argsort(ornt[:, 0]))
    return canon_shape, canon


def check_same_geometry(label: Path, image: Path, atol_mm: float = 1e-3) -> None:
    """Raise InputError (one line) unless ``label`` and ``image`` share shape and affine."""
    ls, la = geometry(label)
    is_, ia = geometry(image)
    if ls != is_:
        raise InputError(f"{label}: shape {ls} differs from its image {image} {is_}")
    if not np.allclose(la, ia, atol=atol_mm, rtol=0):
        raise InputError(f"{label}: grid differs from its image {image} (affine off by up to "
                         f"{float(np.abs(la - ia).max()):.4g} mm)")


def label_values(path: Path) -> list[int]:
    """The values a label file holds (NIfTI through semisam_o1.data.images, others through SimpleITK)."""

    if is_nifti(path) or is_2d_format(path):
        return [int(v) for v in np.unique(read_label_values(path).array)]
    arr = sitk_module().GetArrayViewFromImage(read_itk(path))
    rounded = np.rint(arr)
    if np.abs(arr - rounded).max(initial=0) > 1e-3 or rounded.min(initial=0) < 0:
        raise InputError(f"{path}: a label must hold non-negative integer values")
    return [int(v) for v in np.unique(rounded)]


def read_itk(path: Path):
    """A .nrrd / .mha image read by SimpleITK, its compressed voxel data checked to its end first
    (:func:`check_itk_compression`: SimpleITK returns wrong voxels for some damaged .mha streams
    and accepts a .nrrd whose gzip trailer is cut off).

    Raises:
        InputError: one line naming the file (a damaged stream, or what SimpleITK could not read).
    """
    sitk = sitk_module()
    check_itk_compression(Path(path))
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from None


#: bytes per value of the NRRD ``type`` names and the MetaImage ``ElementType`` names
_NRRD_TYPES = {**dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
               **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                                "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
               **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                                "uint32_t", "float"), 4),
               **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                                "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
                                "uint64", "uint64_t", "double"), 8)}
_MET_TYPES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _itk_compressed_payload(path: Path) -> tuple[bytes, int, int | None, str] | None:
    """The compressed voxel data of a .nrrd (``encoding: gzip``) or .mha (``CompressedData = True``)
    whose data follow the header in the same file: ``(payload, zlib wbits, expected bytes or None,
    stream name)``; None for an uncompressed file, detached data or a header not understood here
    (SimpleITK alone reads those)."""
    blob = path.read_bytes()
    if blob.startswith(b"NRRD000"):
        end = blob.find(b"\n\n")
        if end < 0:
            return None
        fields = {}
        for line in blob[:end].decode("latin-1").splitlines()[1:]:
            if line.startswith("#") or ":=" in line or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if fields.get("encoding", "").lower() not in ("gzip", "gz") or any(
                k in fields for k in ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip")):
            return None
        try:
            n = int(np.prod([int(s) for s in fields["sizes"].split()]))
            expected = n * _NRRD_TYPES[fields["type"].lower()]
        except (KeyError, ValueError):
            expected = None
        return blob[end + 2:], 16 + zlib.MAX_WBITS, expected, "gzip"
    marker = b"ElementDataFile = LOCAL"
    pos = blob.find(marker)
    if not blob.startswith((b"ObjectType", b"NDims")) or pos < 0:
        return None
    start = blob.find(b"\n", pos) + 1
    fields = {}
    for line in blob[:pos].decode("latin-1").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    if fields.get("CompressedData", "").lower() != "true" or start <= 0:
        return None
    payload = blob[start:]
    if "CompressedDataSize" in fields:
        try:
            size = int(fields["CompressedDataSize"])
        except ValueError:
            size = None
        if size is not None and len(payload) < size:
            raise InputError(f"{path}: the file is truncated (its compressed data hold {len(payload)} of the "
                             f"{size} bytes its header gives)")
        payload = payload[:size] if size is not None else payload
    try:
        n = int(np.prod([int(s) for s in fields["DimSize"].split()]))
        expected = n * int(fields.get("ElementNumberOfChannels", "1")) * _MET_TYPES[fields["ElementType"]]
    except (KeyError, ValueError):
        expected = None
    return payload, 32 + zlib.MAX_WBITS, expected, "zlib"


def check_itk_compression(path: Path) -> None:
    """Decompress the voxel data of a compressed .nrrd / .mha to their end, so that the stream's own
    checks run (gzip: CRC-32 and length; zlib: Adler-32) and its length is the header's sizes times
    the value size, as :func:`_verified_gzip_bytes` does for a .nii.gz. Nothing is kept (the stream
    is inflated in pieces); SimpleITK then reads the file.

    Raises:
        InputError: ``FILE: the file is corrupt (...)`` or ``FILE: the file is truncated (...)``.
    """
    try:
        found = _itk_compressed_payload(path)
    except OSError:
        return  # SimpleITK names what cannot be read
    if found is None:
        return
    payload, wbits, expected, name = found
    inflater = zlib.decompressobj(wbits)
    size, view, piece = 0, memoryview(payload), 1 << 20
    try:
        for i in range(0, len(view), piece):
            data = view[i:i + piece]
            while data and not inflater.eof:
                size += len(inflater.decompress(data, 1 << 26))
                data = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as exc:
        text = str(exc)
        check = ("CRC" if name == "gzip" else "Adler-32") if "incorrect data check" in text else \
            "length" if "incorrect length check" in text else None
        problem = f"{name} {check} check failed" if check else f"its {name} stream does not decompress: {text}"
        raise InputError(f"{path}: the file is corrupt ({problem})") from None
    if not inflater.eof:
        raise InputError(f"{path}: the file is truncated (its {name} stream ends early)")
    if expected is not None and size != expected:
        raise InputError(f"{path}: the file is corrupt (its compressed voxel data hold {size} bytes, its header's "
                         f"sizes need {expected})")




# --------------------------------------------------------------------------- 2D images (Pillow)
#
# A 2D image is a volume with one slice: array (X, Y, 1) with X the image's rows and Y its columns
# (``array[i, j, 0]`` is the pixel of row i, column j, as Pillow / NumPy show it), an identity
# affine (1 "pixel" per voxel; a pixel size comes from a 2D NIfTI or ``run --pixel-size``, which
# converts the file to NIfTI with it), and, for a colour image, its RGB in ``Volume.channels``.

#: ITU-R BT.601 luma weights: the intensities of a colour image
LUMA = (0.299, 0.587, 0.114)

_NOTED_255: set[str] = set()


def is_2d_format(path: str | os.PathLike) -> bool:
    """A file of a 2D format read through Pillow (:data:`IMAGE_2D_ENDINGS`)."""
    return ending(path) in IMAGE_2D_ENDINGS


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) float32 luma (:data:`LUMA`)."""
    return np.tensordot(np.asarray(rgb, np.float32), np.asarray(LUMA, np.float32), axes=([-1], [0]))


def _open_2d(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    if getattr(img, "n_frames", 1) > 1:
        raise InputError(f"{path}: {img.n_frames} frames or pages; a 2D image has one")
    return img


def _header_2d(path: Path) -> tuple[int, int, int]:
    """(rows, columns, 1) of a 2D file from its header."""
    w, h = _open_2d(Path(path)).size
    if w < 1 or h < 1:
        raise InputError(f"{path}: empty image ({h} x {w})")
    return (int(h), int(w), 1)


#: Pillow modes :func:`read_2d` reads as colour (rows, columns, 3)
COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV")


def colour_channels(path: str | os.PathLike) -> int:
    """3 when :func:`read_image` gives ``path`` colour channels (``Volume.channels``: an RGB 2D file,
    or a 2D NIfTI of shape (X, Y, 1, 3)), else 1; from the header alone.

    Raises:
        InputError: an unreadable file (as :func:`geometry`).
    """
    path = Path(path)
    if is_2d_format(path):
        return 3 if _open_2d(path).mode in COLOUR_MODES else 1
    if is_nifti(path):
        shape = _squeeze_3d(_load_nifti(path).shape, path, rgb_ok=True)
        return 3 if len(shape) == 4 else 1
    return 1


def read_2d(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a 2D file: (rows, columns) for greyscale (uint8, uint16, int32 or float32 as
    stored: 8- and 16-bit TIFF keep their values) or (rows, columns, 3) for colour. Palette images
    are expanded; the alpha channel of an RGBA / LA image is dropped.

    Raises:
        InputError: unreadable or truncated file, several frames, NaN / Inf, or an image whose
            colour channels are constant while its alpha channel is not (the picture is in the
            alpha channel only).
    """
    path = Path(path)
    img = _open_2d(path)
    try:
        img.load()
        mode = img.mode
        if mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            mode = img.mode
        if mode in ("RGBA", "LA", "PA"):
            arr = np.asarray(img)
            colour, alpha = arr[..., :-1], arr[..., -1]
            if colour.min() == colour.max() and alpha.min() != alpha.max():
                raise InputError(f"{path}: the picture is in the alpha channel only (its {mode[:-1]} channels "
                                 "are constant); save it as a greyscale or RGB image")
            arr = colour if mode == "RGBA" else colour[..., 0]
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            arr = np.asarray(img.convert("RGB"))
        elif mode == "1":
            arr = np.asarray(img, dtype=np.uint8)
        else:
            arr = np.asarray(img)
    except InputError:
        raise
    except Exception as exc:  # truncated files, unsupported TIFF compressions
        raise InputError(f"{path}: cannot read the pixels, is the file truncated? ({type(exc).__name__}: {exc})") \
            from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] != 3:
        raise InputError(f"{path}: {arr.shape[2]} channels per pixel; greyscale or RGB is needed")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: {int((~np.isfinite(arr)).sum())} pixels are NaN or Inf")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def mask_values(path: str | os.PathLike, pixels: np.ndarray) -> np.ndarray:
    """The integer class values of a 2D mask's pixels (rows, columns). A mask holding only 0 and
    255 is read as binary (255 -> 1), with one note line on stderr (the first such file of the
    process). A colour mask is accepted when its three channels are equal.

    Raises:
        InputError: channels that differ, or values that are not non-negative integers.
    """
    path = Path(path)
    if pixels.ndim == 3:
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise InputError(f"{path}: a colour mask; a mask holds one class value per pixel (greyscale)")
        pixels = pixels[..., 0]
    values = _integer_label_data(pixels, path)
    present = np.unique(values)
    if 255 in present and set(present.tolist()) <= {0, 255}:
        if not _NOTED_255:
            import sys

            print(f"semisam-o1: note: {path}: the mask holds only 0 and 255: read as binary (255 -> 1); "
                  "other such masks are read the same way", file=sys.stderr, flush=True)
        _NOTED_255.add(str(path))
        values = (values > 0).astype(np.uint8)
    return values


def _volume_2d(path: Path, pixels: np.ndarray, label: bool) -> Volume:
    """A :class:`Volume` (X = rows, Y = columns, Z = 1; identity affine) of a 2D file's pixels."""
    import nibabel as nib

    if label:
        array = np.ascontiguousarray(pixels[:, :, None])
        channels = None
    elif pixels.ndim == 3:
        channels = np.ascontiguousarray(pixels[:, :, None, :], dtype=np.float32)
        array = np.ascontiguousarray(luma(channels))
    else:
        array, channels = np.ascontiguousarray(pixels[:, :, None], dtype=np.float32), None
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header.set_xyzt_units("unknown")
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt(("R", "A", "S")))
    return Volume(array=array, affine=np.eye(4), path=path, native_affine=np.eye(4), header=header, ornt=ornt,
                  channels=channels)


def distance_unit(vol: Volume) -> str:
    """The unit of distances measured on ``vol``'s grid: ``"pixels"`` for a one-slice image (2D)
    whose header names no length unit (a 2D file, or a 2D NIfTI written without ``--pixel-size``:
    its spacing is 1 per pixel, not a size), else ``"mm"`` (NIfTI's and ITK's convention for volumes)."""
    if vol.array.shape[2] != 1:
        return "mm"
    try:
        unit = vol.header.get_xyzt_units()[0]
    except AttributeError:  # a header that carries no units (ITK formats: mm by convention)
        return "mm"
    return "pixels" if unit in (None, "unknown") else "mm"


def write_2d(path: str | os.PathLike, values: np.ndarray) -> Path:
    """Write a 2D label (rows, columns) of non-negative integer values as ``path``'s format (PNG,
    TIFF or BMP; 8-bit when every value is at most 255, else 16-bit PNG / TIFF), atomically.

    Raises:
        ValueError: a value above 65535, or above 255 for BMP; or a JPEG target (lossy: write PNG).
    """
    from PIL import Image

    path = Path(path)
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[2] == 1:
        values = values[..., 0]
    e = ending(path)
    if e in (".jpg", ".jpeg"):
        raise ValueError(f"{path}: labels are not written as JPEG (lossy); write PNG")
    vmax = int(values.max(initial=0))
    if vmax > 65535 or (vmax > 255 and e == ".bmp"):
        raise ValueError(f"{path}: label value {vmax} does not fit the format")
    img = Image.fromarray(values.astype(np.uint8)) if vmax <= 255 else Image.fromarray(values.astype(np.uint16))
    fmt = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}[e]
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path
