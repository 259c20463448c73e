"""Case ids and folder indexing (MSD / nnU-Net naming: ``.nii`` / ``.nii.gz``, the ``_0000``
channel suffix); a case under two endings or channels, or labels without an image, is one error
listing every offending path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from semisam_o1.core.errors import InputError
from semisam_o1.data.images import NIFTI_ENDINGS, refuse_broken_link


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


def list_paths(paths: Sequence[Path | str], limit: int = _MAX_LISTED) -> str:
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


def index_folder(
    folder: Path,
    strip_channel: bool | str,
    endings: Sequence[str] = NIFTI_ENDINGS,
    label_ids: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Map case id -> file for the files of ``folder`` with one of ``endings`` (default: NIfTI; hidden
    files skipped).

    ``strip_channel``: True / False, or ``"auto"`` to decide from the names (and
    ``label_ids`` when given) whether the folder uses nnU-Net's ``_0000``
    suffix (see :func:`_decide_strip_channel`).

    Raises InputError, one message listing every offending path, when case ids
    appear under two endings or two channels; one naming the link for a broken symbolic link.
    """
    if not folder.is_dir():
        return {}
    files = []
    for p in sorted(folder.iterdir()):
        matched = [e for e in endings if p.name.endswith(e)]
        if not matched or p.name.startswith("."):
            continue
        stem = p.name[: len(p.name) - max(len(e) for e in matched)]
        refuse_broken_link(p)
        if not p.is_file():
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
            + "; ".join(f"{cid}: {list_paths(paths)}" for cid, paths in list(clashes.items())[:_MAX_LISTED])
            + (f"; and {len(clashes) - _MAX_LISTED} more cases" if len(clashes) > _MAX_LISTED else "")
        )
    return {cid: paths[0] for cid, paths in found.items()}


def index_label_folder(folder: str | os.PathLike, endings: Sequence[str] = NIFTI_ENDINGS) -> dict[str, Path]:
    """Case id -> label file for a plain folder of label NIfTI files (``case.nii.gz``),
    e.g. predictions or pseudo-labels. Raises InputError for a case under two endings."""
    return index_folder(Path(folder), strip_channel=False, endings=endings)


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

