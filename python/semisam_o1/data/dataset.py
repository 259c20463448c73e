"""MSD / nnU-Net dataset folders (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``)
and the fixed splits (``splits.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from semisam_o1.core.errors import InputError
from semisam_o1.data.cases import index_folder, list_paths
from semisam_o1.data.images import IMAGE_2D_ENDINGS, NIFTI_ENDINGS, Volume, read_image, read_label
from semisam_o1.data.labels import LabelMap


def read_dataset_json(meta_path: Path) -> tuple[dict, LabelMap]:
    """``dataset.json`` decoded, and the label map of its ``labels`` (the one reader of the file).

    Raises:
        InputError: one line naming ``meta_path``: unreadable, not JSON, not an object, or without
            ``labels`` (or labels :class:`LabelMap` refuses).
    """
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_path}: cannot parse ({exc})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise InputError(f"{meta_path}: no 'labels' entry")
    return meta, LabelMap.from_dataset_json(meta["labels"], source=str(meta_path))


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
        self.meta, self.label_map = read_dataset_json(meta_path)
        ending = self.meta.get("file_ending")
        endings = (ending,) if ending else NIFTI_ENDINGS
        if ending and ending not in NIFTI_ENDINGS:
            hint = "; `semisam-o1 run -i` converts an nnU-Net 2D dataset of PNG / JPEG / BMP / TIFF files" \
                if str(ending).lower() in IMAGE_2D_ENDINGS else ""
            raise InputError(f"{meta_path}: file_ending {ending!r} is not supported (only .nii.gz and .nii){hint}")
        self.file_ending = ending
        self.labels: dict[str, Path] = index_folder(self.root / "labelsTr", strip_channel=False, endings=endings)
        self.images: dict[str, Path] = {}
        for sub in ("imagesTr", "imagesTs"):
            label_ids = self.labels if sub == "imagesTr" else None
            for cid, p in index_folder(self.root / sub, strip_channel="auto", endings=endings,
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
                + list_paths([self.labels[c] for c in orphans])
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
                + (f" ({purpose})" if purpose else "") + ": images " + list_paths(paths)
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

