"""Plain folders in: a folder of scans and one labelled scan become the MSD dataset the stages read.

``semisam-o1 run --images DIR --template-image FILE --template-label FILE -o WORK`` starts here:
:func:`materialise` checks the inputs (nothing is written when one is bad) and writes

    WORK/dataset/
      dataset.json      the label names (``--labels 1=name,2=name``, else the template label's values)
      imagesTr/         one file per image: a symbolic link to the user's NIfTI file, or the
                        SimpleITK conversion of a .nrrd / .mha file to NIfTI
      labelsTr/         the template's label (and the ``--test-labels``), linked or converted
      splits.json       template / unlabeled (every other image of DIR) / test (``--test-images``)
      cases.json        case id -> original file, format and role, and the digest of the sources

The case id of a file is its name without the ending (``scan_07.nrrd`` -> ``scan_07``).
SimpleITK (Lowekamp et al., Front. Neuroinform. 2013) reads .nrrd / .mha and writes their
NIfTI conversion with spacing, origin and direction kept (ITK's LPS world converted to
NIfTI's RAS); :func:`write_label_like` writes labels back in the original file's format and
geometry. A re-run with the same sources reuses ``WORK/dataset``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".mha")
ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
CASES_JSON = "cases.json"
DATASET = "dataset"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ending(path: str | os.PathLike) -> str | None:
    """The supported ending of ``path`` (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``;
    case-insensitive), or None."""
    name = Path(path).name.lower()
    return next((e for e in ENDINGS if name.endswith(e) and len(name) > len(e)), None)


def case_id(path: str | os.PathLike) -> str:
    """The file name without its supported ending."""
    e = ending(path)
    name = Path(path).name
    return name[: len(name) - len(e)] if e else name


def is_nifti(path: str | os.PathLike) -> bool:
    return ending(path) in NIFTI_ENDINGS


def list_images(folder: str | os.PathLike, what: str = "--images") -> dict[str, Path]:
    """Case id -> file for the supported image files of ``folder`` (hidden files skipped).

    Raises:
        InputError: the folder is missing, holds no supported image, or two files share a case id.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or ending(p) is None:
            continue
        cid = case_id(p)
        if cid in found:
            raise InputError(f"{folder}: two files for case {cid}: {found[cid].name} and {p.name}; keep one")
        found[cid] = p
    if not found:
        raise InputError(f"{folder}: no image in the {what} folder (expected {', '.join(ENDINGS)} files)")
    return found


# --------------------------------------------------------------------------- geometry


def _sitk():
    """SimpleITK, with ITK's warning window (printed on stderr) turned off."""
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


def _itk_reader(path: Path):
    sitk = _sitk()
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
    if is_nifti(path):
        from .io import _load_nifti, _squeeze_3d

        img = _load_nifti(path)
        shape, affine = _squeeze_3d(img.shape, path), img.affine
    else:
        r = _itk_reader(path)
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


# --------------------------------------------------------------------------- label names


def parse_label_names(text: str | None, values: list[int] | None = None) -> dict[str, int]:
    """``dataset.json`` labels (name -> value) from ``"1=Anterior,2=Posterior"``, or, without
    text, from the template label's values (each named by its value).

    Raises:
        InputError: a malformed entry, a value that is not a positive integer, or a repeated
            name or value.
    """
    labels = {"background": 0}
    if not text:
        for v in values or []:
            if v:
                labels[str(int(v))] = int(v)
        return labels
    for item in text.split(","):
        value, sep, name = item.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--labels {text}: each entry must be VALUE=NAME with VALUE >= 1 (got {item!r})")
        name = name.strip()
        if name in labels or int(value) in labels.values():
            raise InputError(f"--labels {text}: {item!r} repeats a name or value")
        labels[name] = int(value)
    return labels


def _label_values(path: Path) -> list[int]:
    """The values a label file holds (NIfTI through semisam_o1.io, others through SimpleITK)."""
    from .io import read_label_values

    if is_nifti(path):
        return [int(v) for v in np.unique(read_label_values(path).array)]
    arr = _sitk().GetArrayViewFromImage(_read_itk(path))
    rounded = np.rint(arr)
    if np.abs(arr - rounded).max(initial=0) > 1e-3 or rounded.min(initial=0) < 0:
        raise InputError(f"{path}: a label must hold non-negative integer values")
    return [int(v) for v in np.unique(rounded)]


def _read_itk(path: Path):
    sitk = _sitk()
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1][:200]})") from None


# --------------------------------------------------------------------------- the dataset


@dataclass
class FolderInput:
    """What ``run`` was given instead of a dataset folder."""

    images: Path
    template_image: Path
    template_label: Path
    labels: str | None = None
    test_images: Path | None = None
    test_labels: Path | None = None


@dataclass
class Plan:
    """The checked inputs: case id -> (source file, role), the label names, the test labels."""

    cases: dict[str, dict]
    labels: dict[str, int]
    template: str
    test_labels: dict[str, Path]

    @property
    def sources_digest(self) -> str:
        from .resume import digest

        return digest({"cases": {c: [e["source"], e["role"], _stat(e["source"])] for c, e in self.cases.items()},
                       "labels": self.labels,
                       "test_labels": {c: [str(p), _stat(p)] for c, p in self.test_labels.items()}})


def _stat(path) -> list:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _check_file(path: Path | None, flag: str) -> Path:
    if path is None:
        raise InputError(f"{flag} is needed")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {flag} file not found")
    if ending(path) is None:
        raise InputError(f"{path}: {flag} must be one of {', '.join(ENDINGS)}")
    return path


def plan(inp: FolderInput) -> Plan:
    """Check every input (headers, the template label's grid and values, test pairs) without
    writing anything.

    Raises:
        InputError: one line naming the file and the problem.
    """
    images = list_images(inp.images, "--images")
    t_img = _check_file(inp.template_image, "--template-image")
    t_lab = _check_file(inp.template_label, "--template-label")
    template = case_id(t_img)
    same = [c for c, p in images.items() if p.resolve() == t_img.resolve()]
    if template in images and not same:
        raise InputError(f"{t_img}: the template's name {template} is also another image's in {inp.images} "
                         f"({images[template].name}); rename one")
    cases = {template: {"source": str(t_img.resolve()), "role": "template"}}
    for c, p in images.items():
        if c != template:
            cases[c] = {"source": str(p.resolve()), "role": "unlabeled"}
    if len(cases) < 2:
        raise InputError(f"{inp.images}: holds only the template; at least one other image is needed")
    test_labels: dict[str, Path] = {}
    if (inp.test_images is None) != (inp.test_labels is None):
        raise InputError("--test-images and --test-labels go together (the test labels score the model)")
    if inp.test_images is not None:
        tests = list_images(inp.test_images, "--test-images")
        labs = list_images(inp.test_labels, "--test-labels")
        for c, p in tests.items():
            if c in cases:
                raise InputError(f"{p}: test case {c} has the name of a cohort image; rename it")
            if c not in labs:
                raise InputError(f"{p}: test image without a label named {c} in {inp.test_labels}")
            check_same_geometry(labs[c], p)
            cases[c] = {"source": str(p.resolve()), "role": "test"}
            test_labels[c] = labs[c].resolve()
    for c, e in cases.items():
        geometry(e["source"])
    check_same_geometry(t_lab, t_img)
    values = _label_values(t_lab)
    if not any(values):
        raise InputError(f"{t_lab}: the template's label has no foreground voxel")
    names = parse_label_names(inp.labels, values)
    undeclared = sorted(set(values) - set(names.values()))
    if undeclared:
        raise InputError(f"{t_lab}: label value {undeclared[0]} is not named in --labels {inp.labels}")
    test_labels[template] = t_lab.resolve()
    return Plan(cases=cases, labels=names, template=template, test_labels=test_labels)


def _place(source: Path, folder: Path, case: str) -> Path:
    """``folder/<case><ending>``: a symbolic link to a NIfTI source, else its NIfTI conversion."""
    sitk = _sitk()

    folder.mkdir(parents=True, exist_ok=True)
    if is_nifti(source):
        target = folder / f"{case}{ending(source)}"
        target.symlink_to(source.resolve())
        return target
    target = folder / f"{case}.nii.gz"
    sitk.WriteImage(_read_itk(source), str(target), useCompression=True)
    return target


def materialise(inp: FolderInput, work: str | os.PathLike) -> tuple[Path, Path]:
    """Write (or reuse) ``WORK/dataset``; returns ``(dataset folder, split file)``.

    Raises:
        InputError: a bad input (see :func:`plan`; nothing written), or a ``WORK/dataset`` made
            from other sources.
    """
    from .io import temporary_prefix, write_json

    p = plan(inp)
    root = Path(work) / DATASET
    split_file = root / "splits.json"
    mapping = root / CASES_JSON
    if mapping.is_file():
        try:
            before = json.loads(mapping.read_text()).get("sources_digest")
        except (OSError, ValueError, AttributeError) as exc:
            raise InputError(f"{mapping}: unreadable ({exc}); delete {root} to redo it") from None
        if before == p.sources_digest and split_file.is_file():
            return root, split_file
        raise InputError(f"{root}: was made from other images, labels or names; use a new -o folder")
    Path(work).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(DATASET), dir=work))
    try:
        _write_dataset(p, tmp)
        write_json(tmp / CASES_JSON, {"template": p.template, "sources_digest": p.sources_digest,
                                      "cases": p.cases})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root, split_file


def _write_dataset(p: Plan, root: Path) -> None:
    from .io import write_json

    for case, entry in p.cases.items():
        _place(Path(entry["source"]), root / "imagesTr", case)
    for case, lab in p.test_labels.items():
        _place(lab, root / "labelsTr", case)
    write_json(root / "dataset.json", {"name": "folder input", "labels": p.labels, "modality": {"0": "unknown"},
                                       "numTraining": len(p.cases)})
    by_role = lambda role: [c for c, e in p.cases.items() if e["role"] == role]  # noqa: E731
    write_json(root / "splits.json", {"template": p.template, "unlabeled": by_role("unlabeled"),
                                      "test": by_role("test")})


def read_cases(dataset: str | os.PathLike) -> dict[str, dict] | None:
    """The ``cases.json`` mapping of a materialised dataset (None for a user's MSD folder)."""
    path = Path(dataset) / CASES_JSON
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text())["cases"])


# --------------------------------------------------------------------------- writing labels back


def output_name(source: str | os.PathLike) -> str:
    """The label file name for an image: the image's own name."""
    return Path(source).name


def write_label_like(nifti_label: str | os.PathLike, source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write a label NIfTI (on the grid of ``source``'s NIfTI form) as ``target`` in ``source``'s
    format: NIfTI is copied (re-saved when the ending differs); .nrrd / .mha is written by
    SimpleITK with ``source``'s spacing, origin and direction. Atomic.

    Returns:
        ``target``.
    """
    from .io import atomic_path

    nifti_label, source, target = Path(nifti_label), Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_nifti(target):
        if ending(target) == ending(nifti_label):
            with atomic_path(target) as tmp:
                shutil.copyfile(nifti_label, tmp)
            return target
        import nibabel as nib

        img = nib.load(str(nifti_label))
        with atomic_path(target) as tmp:
            nib.save(img, str(tmp))
        return target
    sitk = _sitk()
    lab = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti_label))))
    ref = _itk_reader(source)
    if tuple(lab.GetSize()) != tuple(ref.GetSize()[:3]):
        raise InputError(f"{nifti_label}: shape {lab.GetSize()} differs from its image {source} {ref.GetSize()}")
    lab.SetSpacing(ref.GetSpacing()[:3])
    lab.SetOrigin(ref.GetOrigin()[:3])
    d = np.asarray(ref.GetDirection()).reshape(len(ref.GetSize()), -1)[:3, :3]
    lab.SetDirection(tuple(float(x) for x in d.ravel()))
    with atomic_path(target) as tmp:
        sitk.WriteImage(lab, str(tmp), useCompression=True)
    return target
