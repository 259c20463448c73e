"""Plain folders in: a folder of scans and one labelled scan become the MSD dataset the stages read.

``semisam-o1 run --images DIR --template-image FILE --template-label FILE -o WORK`` starts here:
:func:`materialise` checks the inputs (nothing is written when one is bad) and writes

    WORK/dataset/
      dataset.json      the label names (``--labels 1=name,2=name``, else the template label's values)
      imagesTr/         one file per image: a symbolic link to the user's NIfTI file, or the
                        SimpleITK conversion of a .nrrd / .mha file to NIfTI
      labelsTr/         the template's label (and the ``--test-labels``), linked or converted
      splits.json       template / unlabeled (every other image of DIR) / test (``--test-images``)
      cases.json        case id -> original file, format and role, the labels' original files,
                        and the digest of the sources

``run -i DATASET --split FILE`` with an nnU-Net v2 dataset of 2D files (``file_ending`` ``.png``,
:class:`NnUNet2DInput`, :func:`check_nnunet_2d`) is converted the same way: every image of
``imagesTr/`` / ``imagesTs/`` (``CASE_0000.png``, or nnU-Net's per-channel ``CASE_0000`` ..
``CASE_0002`` stacked into one colour image) and every label of ``labelsTr/``; roles from the
user's split; the final labels are named ``CASE.png`` as nnU-Net names labels.

The case id of a file is its name without the ending (``scan_07.nrrd`` -> ``scan_07``).
SimpleITK (Lowekamp et al., Front. Neuroinform. 2013) reads .nrrd / .mha and writes their
NIfTI conversion with spacing, origin and direction kept (ITK's LPS world converted to
NIfTI's RAS); :func:`write_label_like` writes labels back in the original file's format and
geometry. A re-run with the same sources reuses ``WORK/dataset``; one with changed sources (a
file fixed after a failed check) rewrites it while nothing else is in WORK yet.
:func:`name_sources` puts the user's file names back into a message about ``WORK/dataset``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, temporary_prefix, write_json
from semisam_o1.core.resume import digest
from semisam_o1.data.cases import list_paths
from semisam_o1.data.dataset import load_split, read_dataset_json
from semisam_o1.data.images import (
    ENDINGS,
    IMAGE_2D_ENDINGS,
    check_same_geometry,
    ending,
    geometry,
    is_2d_format,
    is_nifti,
    itk_reader,
    label_values,
    read_2d,
    read_itk,
    read_label_values,
    refuse_broken_link,
    sitk_module,
    write_2d,
)

CASES_JSON = "cases.json"
DATASET = "dataset"


def case_id(path: str | os.PathLike) -> str:
    """The file name without its supported ending."""
    e = ending(path)
    name = Path(path).name
    return name[: len(name) - len(e)] if e else name


def list_images(folder: str | os.PathLike, what: str = "--images") -> dict[str, Path]:
    """Case id -> file for the supported image files of ``folder`` (hidden files skipped).

    Raises:
        InputError: the folder is missing, holds no supported image, two files share a case id, or
            a supported file name is a broken symbolic link.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or ending(p) is None:
            continue
        refuse_broken_link(p)
        if not p.is_file():
            continue
        cid = case_id(p)
        if cid in found:
            raise InputError(f"{folder}: two files for case {cid}: {found[cid].name} and {p.name}; keep one")
        found[cid] = p
    if not found:
        raise InputError(f"{folder}: no image in the {what} folder (expected {', '.join(ENDINGS)} files)")
    return found


# --------------------------------------------------------------------------- geometry


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
    pixel_size: Path | None = None
    #: dataset.json's ``modality`` ("CT", "MRI", ...); None: "unknown" (the plan then recognises CT
    #: from the template's intensities, semisam_o1.stages.plan.recognise_modality)
    modality: str | None = None


@dataclass
class CheckedInputs:
    """The checked inputs: case id -> (source file, role), the label names, the test labels and the
    pixel sizes of 2D images (mm, from ``--pixel-size``; empty without it)."""

    cases: dict[str, dict]
    labels: dict[str, int]
    template: str
    test_labels: dict[str, Path]
    modality: str | None = None
    pixel_size: dict[str, float] = field(default_factory=dict)

    @property
    def sources_digest(self) -> str:
        given = {"modality": self.modality} if self.modality else {}  # a folder made without one: same digest
        return digest({"cases": {c: [e["source"], e["role"], _stat(e["source"]),
                                     *[[f, _stat(f)] for f in e.get("channels", [])[1:]]]
                                 for c, e in self.cases.items()},
                       "labels": self.labels, **({"pixel_size": self.pixel_size} if self.pixel_size else {}),
                       "test_labels": {c: [str(p), _stat(p)] for c, p in self.test_labels.items()}, **given})


def read_pixel_sizes(path: Path, cases: list[str]) -> dict[str, float]:
    """``--pixel-size CSV``: case id -> pixel size in mm, from a CSV whose first column is the case
    id (or the image's file name) and whose second is the pixel's side in mm (a header row is
    skipped); every 2D case must be listed.

    Raises:
        InputError: unreadable file, a value that is not a positive number, or a case missing.
    """
    import csv

    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: --pixel-size file unreadable ({exc})") from None
    sizes: dict[str, float] = {}
    for n, row in enumerate(rows, start=1):
        if not row or not row[0].strip():
            continue
        if len(row) < 2:
            raise InputError(f"{path}: line {n}: CASE,PIXEL_SIZE_MM expected")
        try:
            value = float(row[1])
        except ValueError:
            if n == 1:
                continue  # the header
            raise InputError(f"{path}: line {n}: pixel size {row[1]!r} is not a number") from None
        if not (value > 0 and np.isfinite(value)):
            raise InputError(f"{path}: line {n}: pixel size {value} must be a positive number of mm")
        sizes[case_id(row[0].strip())] = value
    missing = [c for c in cases if c not in sizes]
    if missing:
        raise InputError(f"{path}: no pixel size for {len(missing)} image(s), first {missing[0]}")
    return {c: sizes[c] for c in cases}


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


def check_inputs(inp: FolderInput) -> CheckedInputs:
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
    values = label_values(t_lab)
    if not any(values):
        raise InputError(f"{t_lab}: the template's label has no foreground voxel")
    names = parse_label_names(inp.labels, values)
    undeclared = sorted(set(values) - set(names.values()))
    if undeclared:
        raise InputError(f"{t_lab}: label value {undeclared[0]} is not named in --labels {inp.labels}")
    absent = {n: v for n, v in names.items() if v not in values}
    if absent:
        name, value = next(iter(absent.items()))
        raise InputError(f"{t_lab}: --labels {inp.labels} names {value}={name}, a value the template's label does "
                         "not hold (each class is learnt from its template voxels); drop it or label it")
    test_labels[template] = t_lab.resolve()
    flat = [c for c, e in cases.items() if is_2d_format(e["source"])]
    if flat and len(flat) != len(cases):
        raise InputError(f"{cases[flat[0]]['source']}: a 2D image among volumes; one run labels 2D images or "
                         "volumes, not both")
    for c, lab in test_labels.items():  # 2D masks are read now (converted later): name the user's file
        if c != template and is_2d_format(lab):
            extra = sorted(set(label_values(lab)) - set(names.values()))
            if extra:
                raise InputError(f"{lab}: label value {extra[0]} is not a class of the template's label "
                                 f"(classes {sorted(names.values())}; name it with --labels)")
    sizes = {}
    if inp.pixel_size is not None:
        if not flat:
            raise InputError(f"--pixel-size {inp.pixel_size}: for 2D images (PNG, JPEG, BMP, TIFF); volumes "
                             "carry their spacing")
        sizes = read_pixel_sizes(inp.pixel_size, list(cases))
    modality = (inp.modality or "").strip() or None
    if modality is not None and modality.lower() == "unknown":
        modality = None
    return CheckedInputs(cases=cases, labels=names, template=template, test_labels=test_labels, modality=modality,
                         pixel_size=sizes)


# --------------------------------------------------------------------------- nnU-Net v2 2D datasets


@dataclass
class NnUNet2DInput:
    """``run -i DATASET --split FILE`` where DATASET is an nnU-Net v2 dataset of 2D files
    (``dataset.json`` ``file_ending`` ``.png``, ``.jpg``, ``.bmp``, ``.tif``; :func:`nnunet_2d_ending`):
    converted into ``WORK/dataset`` as ``--images`` is."""

    root: Path
    split: Path


_CHANNEL_NAME = re.compile(r"(.+)_(\d{4})")


def nnunet_2d_ending(root: str | os.PathLike | None) -> str | None:
    """The ``file_ending`` of the ``dataset.json`` in ``root`` when it names a 2D format (an nnU-Net
    v2 dataset of PNG, JPEG, BMP or TIFF files), else None (no folder, no or unreadable
    ``dataset.json``: :class:`semisam_o1.data.dataset.Dataset` reports those)."""
    if root is None:
        return None
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    found = meta.get("file_ending") if isinstance(meta, dict) else None
    return found if isinstance(found, str) and ending(f"x{found}") in IMAGE_2D_ENDINGS else None


def _channel_files(folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """Case id -> its channel files ``CASE_0000<ending>``, ``CASE_0001<ending>``, ... (in channel
    order) in an nnU-Net images folder; hidden files and other endings skipped.

    Raises:
        InputError: a file without the ``_XXXX`` channel suffix, channels with a gap, or a broken link.
    """
    if not folder.is_dir():
        return {}
    files: dict[str, dict[int, Path]] = {}
    bad = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.lower().endswith(file_ending.lower()):
            continue
        refuse_broken_link(f)
        if not f.is_file():
            continue
        m = _CHANNEL_NAME.fullmatch(f.name[: len(f.name) - len(file_ending)])
        if m is None:
            bad.append(f)
            continue
        files.setdefault(m.group(1), {})[int(m.group(2))] = f
    if bad:
        raise InputError(f"{folder}: {len(bad)} image(s) without nnU-Net's channel suffix (CASE_0000{file_ending}): "
                         + list_paths(bad))
    for case, chans in files.items():
        if sorted(chans) != list(range(len(chans))):
            raise InputError(f"{folder}: case {case} has channel files {sorted(chans)}; nnU-Net numbers them "
                             "_0000, _0001, ... without a gap")
    return {case: [chans[i] for i in range(len(chans))] for case, chans in files.items()}


def check_nnunet_2d(inp: NnUNet2DInput) -> CheckedInputs:
    """Check an nnU-Net v2 2D dataset and its split without writing anything: ``dataset.json``
    (``labels``, ``file_ending``, ``channel_names``), ``imagesTr/`` and ``imagesTs/`` (``CASE_0000``
    one file per case, greyscale or RGB; or ``CASE_0000`` .. ``CASE_0002`` three greyscale files,
    red, green and blue), ``labelsTr/CASE<ending>`` on their images' grids, the split's cases.

    Returns:
        the :class:`CheckedInputs` :func:`materialise` writes: every image (roles from the split;
        images the split does not name are ``unlabeled``), every label of ``labelsTr``, and per
        case ``label_name``, ``CASE<ending>`` (``.png`` for JPEG), the name of its label in
        ``WORK/final/labels``.

    Raises:
        InputError: one line naming the file: unreadable ``dataset.json`` or no ``labels``, no
            image, files without the channel suffix, channel counts that differ between cases or
            from ``channel_names``, a label without an image, a label of another size than its
            image, a split naming a case the dataset lacks, or a template without a label.
    """
    root = Path(inp.root)
    meta_path = root / "dataset.json"
    meta, label_map = read_dataset_json(meta_path)
    file_ending = str(meta.get("file_ending"))
    images: dict[str, list[Path]] = {}
    for sub in ("imagesTr", "imagesTs"):
        for case, files in _channel_files(root / sub, file_ending).items():
            if case in images:
                raise InputError(f"case {case} has an image in two folders: {images[case][0]} and {files[0]}")
            images[case] = files
    if not images:
        raise InputError(f"{root}: no images in imagesTr/ (names CASE_0000{file_ending})")
    counts = sorted({len(f) for f in images.values()})
    if len(counts) > 1:
        example = next(c for c, f in images.items() if len(f) != counts[0])
        raise InputError(f"{root}: cases have {' or '.join(map(str, counts))} channel files (e.g. {example}: "
                         f"{len(images[example])}); every case needs the same channels")
    n = counts[0]
    if n not in (1, 3):
        raise InputError(f"{images[next(iter(images))][0]}: {n} channel files per case; 1 (a greyscale or RGB image) "
                         "or 3 (red, green, blue) are supported")
    declared = meta.get("channel_names") or {}
    if declared and len(declared) != n and not (n == 1 and len(declared) == 3):  # 3: one RGB file, as nnU-Net
        raise InputError(f"{meta_path}: channel_names lists {len(declared)} channel(s), imagesTr holds {n} file(s) "
                         "per case")
    labels = {}
    lab_dir = root / "labelsTr"
    for f in sorted(lab_dir.iterdir()) if lab_dir.is_dir() else []:
        if f.name.startswith(".") or not f.name.lower().endswith(file_ending.lower()):
            continue
        refuse_broken_link(f)
        labels[f.name[: len(f.name) - len(file_ending)]] = f
    orphans = [f for c, f in labels.items() if c not in images]
    if orphans:
        raise InputError(f"{root}: {len(orphans)} label(s) without an image in imagesTr/: {list_paths(orphans)}")
    sp = load_split(inp.split)
    template = sp.get("template")
    if not isinstance(template, str):
        raise InputError(f"{inp.split}: the split has no single 'template' case")
    test = [str(c) for c in sp.get("test", []) or []]
    unknown = [c for c in [template, *(sp.get("unlabeled", []) or []), *test] if c not in images]
    if unknown:
        raise InputError(f"{inp.split}: case {unknown[0]} is not in {root / 'imagesTr'} or imagesTs"
                         + (f" ({len(unknown)} such cases)" if len(unknown) > 1 else ""))
    if template not in labels:
        raise InputError(f"{lab_dir}: no label for the template {template} ({template}{file_ending})")
    for case, lab in labels.items():
        check_same_geometry(lab, images[case][0])
    cases = {}
    for case in [template, *sorted(c for c in images if c != template)]:
        files = images[case]
        cases[case] = {"source": str(files[0].resolve()), "role": "template" if case == template else "test"
                       if case in test else "unlabeled", "label_name": output_name(f"{case}{file_ending}"),
                       **({"channels": [str(f.resolve()) for f in files]} if n > 1 else {})}
    modality = str(next(iter(declared.values()))).strip() if len(declared) == 1 else None
    return CheckedInputs(cases=cases, labels=dict(zip(label_map.names, label_map.values)), template=template,
                         test_labels={c: f.resolve() for c, f in labels.items()},
                         modality=None if not modality or modality.lower() == "unknown" else modality)


def nifti_2d(pixels: np.ndarray, pixel_size: float | None):
    """The NIfTI image of a 2D file's pixels (rows, columns[, 3]): (rows, columns, 1) or, for
    colour, (rows, columns, 1, 3), stored as read (uint8 / uint16 / ...), with the pixel size (mm)
    on both in-plane axes and 1 across (no pixel size: 1, units unknown)."""
    import nibabel as nib

    data = pixels[:, :, None] if pixels.ndim == 2 else pixels[:, :, None, :]
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    s = float(pixel_size) if pixel_size else 1.0
    affine = np.diag([s, s, s, 1.0])
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm" if pixel_size else "unknown")
    return img


def place_file(source: Path, folder: Path, case: str, label: bool = False, pixel_size: float | None = None) -> Path:
    """``folder/<case><ending>``: a symbolic link to a NIfTI source, else its NIfTI conversion (a 2D
    file: :func:`nifti_2d`; a label's values through
    :func:`semisam_o1.data.images.mask_values`, so a 0 / 255 mask becomes 0 / 1)."""
    sitk = sitk_module()

    folder.mkdir(parents=True, exist_ok=True)
    if is_2d_format(source):
        import nibabel as nib

        pixels = read_label_values(source).array[:, :, 0] if label else read_2d(source)
        target = folder / f"{case}.nii.gz"
        nib.save(nifti_2d(pixels, pixel_size), str(target))
        return target
    if is_nifti(source):
        target = folder / f"{case}{ending(source)}"
        target.symlink_to(source.resolve())
        return target
    target = folder / f"{case}.nii.gz"
    sitk.WriteImage(read_itk(source), str(target), useCompression=True)
    return target


def place_channels(sources: list[Path], folder: Path, case: str) -> Path:
    """``folder/<case>.nii.gz``: one colour image (:func:`nifti_2d`, ``(rows, columns, 1, 3)``) from
    nnU-Net's three per-channel files of a case (``case_0000`` red, ``_0001`` green, ``_0002`` blue).

    Raises:
        InputError: a channel file that is not greyscale, or channels of different sizes.
    """
    import nibabel as nib

    planes = [read_2d(f) for f in sources]
    for f, plane in zip(sources, planes):
        if plane.ndim != 2:
            raise InputError(f"{f}: a colour file as one of {len(sources)} channel files; each channel file of "
                             "a case holds one greyscale plane")
        if plane.shape != planes[0].shape:
            raise InputError(f"{f}: size {plane.shape} differs from its case's first channel {sources[0]} "
                             f"{planes[0].shape}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{case}.nii.gz"
    nib.save(nifti_2d(np.stack(planes, axis=-1), None), str(target))
    return target


def materialise(inp: FolderInput | NnUNet2DInput, work: str | os.PathLike) -> tuple[Path, Path]:
    """Write (or reuse) ``WORK/dataset``; returns ``(dataset folder, split file)`` (the split of a
    :class:`NnUNet2DInput` is the user's; ``WORK/dataset/splits.json`` then holds its roles).

    Raises:
        InputError: a bad input (see :func:`check_inputs`, :func:`check_nnunet_2d`; nothing written),
            or a ``WORK/dataset`` made from other sources (or unreadable) once a stage has written
            into ``WORK``.
    """

    p = check_inputs(inp) if isinstance(inp, FolderInput) else check_nnunet_2d(inp)
    root = Path(work) / DATASET
    split_file = root / "splits.json"
    mapping = root / CASES_JSON
    if mapping.is_file():
        try:
            before = json.loads(mapping.read_text()).get("sources_digest")
        except (OSError, ValueError, AttributeError):
            before = None  # rewritten below unless a stage used it
        if before == p.sources_digest and split_file.is_file():
            return root, split_file
        if _work_in_use(Path(work)):
            raise InputError(f"{root}: was made from other images, labels or names; use a new -o folder")
    Path(work).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(DATASET), dir=work))
    try:
        _write_dataset(p, tmp)
        write_json(tmp / CASES_JSON, {"template": p.template, "sources_digest": p.sources_digest,
                                      "cases": p.cases, "labels": {c: str(f) for c, f in p.test_labels.items()}})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root, split_file


def _work_in_use(work: Path) -> bool:
    """A stage has written into ``work`` (anything beside ``WORK/dataset`` and hidden files such as
    the lock): its outputs come from ``WORK/dataset``, which must then stay as it was made."""
    return any(e.name != DATASET and not e.name.startswith(".") for e in work.iterdir())


def _placed_name(source: str, case: str) -> str:
    """The name :func:`place_file` gives ``source`` in the dataset."""
    return f"{case}{ending(source)}" if is_nifti(source) else f"{case}.nii.gz"


def name_sources(message: str, dataset: str | os.PathLike) -> str:
    """``message`` with each ``WORK/dataset`` image or label path (as given, or resolved) replaced
    by the user's own file it was made from (``cases.json``); unchanged when there is none."""
    try:
        record = json.loads((Path(dataset) / CASES_JSON).read_text())
    except (OSError, ValueError):
        return message
    files = {("imagesTr", c): e["source"] for c, e in record.get("cases", {}).items()}
    files.update({("labelsTr", c): src for c, src in record.get("labels", {}).items()})
    for root in dict.fromkeys((Path(dataset), Path(dataset).resolve())):
        for (folder, case), source in sorted(files.items(), key=lambda kv: -len(kv[0][1])):
            message = message.replace(str(root / folder / _placed_name(source, case)), source)
    return message


def _write_dataset(p: CheckedInputs, root: Path) -> None:
    for case, entry in p.cases.items():
        if len(entry.get("channels", [])) > 1:
            place_channels([Path(f) for f in entry["channels"]], root / "imagesTr", case)
        else:
            place_file(Path(entry["source"]), root / "imagesTr", case, pixel_size=p.pixel_size.get(case))
    for case, lab in p.test_labels.items():
        place_file(lab, root / "labelsTr", case, label=True, pixel_size=p.pixel_size.get(case))
    write_json(root / "dataset.json", {"name": "folder input", "labels": p.labels,
                                       "modality": {"0": p.modality or "unknown"},
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
    """The label file name for an image: the image's own name (a JPEG image's label is PNG:
    JPEG is lossy)."""
    name = Path(source).name
    if ending(name) in (".jpg", ".jpeg"):
        return name[: len(name) - len(ending(name))] + ".png"
    return name


def write_label_like(nifti_label: str | os.PathLike, source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write a label NIfTI (on the grid of ``source``'s NIfTI form) as ``target`` in ``source``'s
    format: NIfTI is copied (re-saved when the ending differs); .nrrd / .mha is written by
    SimpleITK with ``source``'s spacing, origin and direction. Atomic.

    Returns:
        ``target``.
    """

    nifti_label, source, target = Path(nifti_label), Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_2d_format(source):
        import nibabel as nib

        values = np.asarray(nib.load(str(nifti_label)).dataobj)
        values = values.reshape(values.shape[:2]) if values.ndim > 2 else values
        rows, cols, _ = geometry(source)[0]
        if values.shape != (rows, cols):
            raise InputError(f"{nifti_label}: shape {values.shape} differs from its image {source} {(rows, cols)}")
        return write_2d(target if is_2d_format(target) else target.with_suffix(".png"), values)
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
    sitk = sitk_module()
    lab = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(nifti_label))))
    ref = itk_reader(source)
    if tuple(lab.GetSize()) != tuple(ref.GetSize()[:3]):
        raise InputError(f"{nifti_label}: shape {lab.GetSize()} differs from its image {source} {ref.GetSize()}")
    lab.SetSpacing(ref.GetSpacing()[:3])
    lab.SetOrigin(ref.GetOrigin()[:3])
    d = np.asarray(ref.GetDirection()).reshape(len(ref.GetSize()), -1)[:3, :3]
    lab.SetDirection(tuple(float(x) for x in d.ravel()))
    with atomic_path(target) as tmp:
        sitk.WriteImage(lab, str(tmp), useCompression=True)
    return target
