"""Everything ``semisam-o1 run`` checks before it starts any stage, one case at a time.

A run takes hours; a bad file found after the encoding (or a disk that fills up during it)
wastes them. :func:`validate_run` therefore reads, before anything is written:

* the work folder: an existing file, or a folder above it that cannot be written, is refused
  (:func:`semisam_o1.core.resume.check_output_dir`);
* the template: its image (header, 3D, finite intensities) and its label, which must lie on the
  image's grid, hold only the classes ``dataset.json`` declares (:func:`semisam_o1.data.images.read_label`
  does both checks), have at least one foreground voxel and hold every class ``dataset.json``
  declares (a class without template voxels cannot be learnt: ``run --images`` refuses a
  ``--labels`` value the template lacks in the same way);
* every pool and test image in full, streaming one case at a time with a progress bar
  (:func:`semisam_o1.data.images.read_image`: a readable 3D NIfTI, finite intensities); every test case
  needs its label (``evaluate`` scores against it), on its image's grid with declared classes
  only. Pool labels are never read (a one-label run does not look at them);
* the free disk of the work folder's file system against the bytes the run will write: the
  feature store (:func:`semisam_o1.data.store.estimate_store_bytes`, from the images' shapes and
  ``encode``'s settings: :func:`run_store_geometry`; int8, or the dtype of the store a resumed run
  adds to) plus a margin, the rounds' labels and one round's spilled training volumes (:func:`needed_bytes`).

Each problem is one :class:`semisam_o1.core.errors.InputError` naming the file (or folder).
Measured seconds for 200 Hippocampus volumes: docs/accepted-inputs.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from semisam_o1.core.errors import InputError
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import check_output_dir
from semisam_o1.data.store import (
    CONFIG_FILE,
    DEFAULT_STORAGE,
    FeatureStore,
    StoreGeometry,
    config_storage,
    estimate_store_bytes,
)
from semisam_o1.stages import encode
from semisam_o1.stages.encoders import DEFAULT_LAYERS, LITEMEDSAM_LAYERS

# The store formula's error bound: the formula matches both datasets' real stores far more closely
# (docs/accepted-inputs.md, "Before `run` starts any stage"); kept at the brief's 10% so that a
# store written by another version of the encoder still fits.
STORE_MARGIN = 0.10
# Per round, each case's outputs, uncompressed (an upper bound of the .nii.gz files): pool cases
# get a prediction (uint8), an entropy map (float32) and a pseudo-label (uint8); test cases a
# prediction and an entropy map.
POOL_BYTES_PER_VOXEL_ROUND = 1 + 4 + 1
TEST_BYTES_PER_VOXEL_ROUND = 1 + 4
# While a round trains, its training volumes (template + pool) lie spilled on disk
# (:func:`semisam_o1.stages.train.spill_volume`; removed when the training ends, so one round at a
# time): a float32 image, a uint8 label, int32 crop-centre indices (foreground and background: one per
# voxel) and a float32 confidence weight. Counted on the native grid: the working spacing may differ.
TRAIN_SPILL_BYTES_PER_VOXEL = 4 + 1 + 4 + 4


def run_store_geometry(existing: dict | None = None) -> StoreGeometry:
    """The geometry of the store ``run`` writes: ``encode``'s default settings (``--channels``,
    ``--axes``, ``--tile-size``, ``--storage``: int8, or the dtype of ``existing``, the ``store.json``
    of a store the run adds to) and its default encoder (LiteMedSAM's default layers, their channels
    and grid side at the 256-pixel canvas: :data:`semisam_o1.stages.encoders.LITEMEDSAM_LAYERS`)."""

    defaults = {f.name: f.default for f in dataclasses.fields(encode.EncodeSettings)}
    layers = [LITEMEDSAM_LAYERS[name] for name in DEFAULT_LAYERS["litemedsam"]]
    input_size = 256  # the LiteMedSAM canvas (encoders module docstring: "Input 3x256x256")
    grid = min(side for _, side in layers)
    return StoreGeometry(input_size=input_size, cell=input_size // grid, raw_channels=sum(c for c, _ in layers),
                         channels=int(defaults["channels"]), axes=tuple(defaults["axes"]),
                         tile=int(defaults["tile_size"]),
                         storage=config_storage(existing) if existing else defaults["storage"] or DEFAULT_STORAGE)


def needed_bytes(store_bytes: int, pool_voxels: int, test_voxels: int, rounds: int, template_voxels: int = 0) -> int:
    """Free bytes a run needs: the store plus :data:`STORE_MARGIN` of it, plus every round's label
    and entropy files uncompressed (an upper bound: they are written gzip-compressed), plus one
    round's spilled training volumes (:data:`TRAIN_SPILL_BYTES_PER_VOXEL` of template + pool)."""
    rounds_bytes = rounds * (POOL_BYTES_PER_VOXEL_ROUND * pool_voxels + TEST_BYTES_PER_VOXEL_ROUND * test_voxels)
    train_bytes = TRAIN_SPILL_BYTES_PER_VOXEL * (pool_voxels + template_voxels) if rounds else 0
    return math.ceil(store_bytes * (1.0 + STORE_MARGIN)) + rounds_bytes + train_bytes


def _existing_folder(path: Path) -> Path:
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def check_free_disk(folder: Path, needed: int, what: str) -> int:
    """Refuse (InputError, one line with the folder, the needed and the free bytes) unless the file
    system of ``folder`` (or of its nearest existing parent) has ``needed`` bytes free. Returns
    the free bytes."""
    probe = _existing_folder(folder)
    free = int(shutil.disk_usage(probe).free)
    if free < needed:
        raise InputError(f"{folder}: not enough free disk: {what} need about {_fmt_bytes(needed)} ({needed} bytes), "
                         f"{probe} has {_fmt_bytes(free)} ({free} bytes) free; free space or choose another -o "
                         "folder")
    return free


def _encoded_cases(features: Path, cases: Iterable[str]) -> set[str]:
    """Cases already in the run's feature store (a resumed run): their bytes are on disk already."""
    return {c for c in cases if (features / "cases" / c / "meta.json").is_file()}


def _read_cohort(dataset, template: str, others: Sequence[str], test: set[str], quiet: bool) -> dict:
    """Read the template (image, label: grid, declared classes, foreground) and every other image
    (and each test case's label) one case at a time. Returns {case: canonical shape}."""
    import numpy as np

    image = dataset.read_image(template)
    label = dataset.read_label(template, reference=image)  # same grid, declared classes only
    if not np.any(label.array > 0):
        raise InputError(f"{dataset.label_path(template)}: the template's label has no foreground voxel")
    lm = dataset.label_map
    absent = sorted(set(lm.foreground) - {int(k) for k in np.unique(label.array)})
    if absent:  # as run --images refuses a --labels value the template lacks
        name, value = lm.names[absent[0]], lm.values[absent[0]]
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise InputError(f"{dataset.root / 'dataset.json'}: declares the class {name}={value}{more}, which the "
                         f"template's label {dataset.label_path(template)} does not hold (each class is learnt from "
                         "its template voxels); drop it from labels or label it in the template")
    shapes = {template: image.shape}
    del image, label
    for case in progress(list(others), quiet=quiet, desc="validate inputs"):
        vol = dataset.read_image(case)  # header, 3D, finite intensities
        if case in test:
            dataset.read_label(case, reference=vol)  # evaluate scores against it
        shapes[case] = vol.shape
    return shapes


def validate_run(dataset, template: str, unlabeled: Sequence[str], test: Sequence[str], work: Path, *,
                 rounds: int, quiet: bool = False) -> dict:
    """Check everything a run reads and the room it needs before any stage starts (module
    docstring), streaming one case at a time; nothing is written.

    Args:
        dataset: the :class:`semisam_o1.data.dataset.Dataset`.
        template, unlabeled, test: the run's case ids (``test`` may be empty).
        work: the work folder (``WORK/features`` is the feature store).
        rounds: the run's rounds (for the size of their outputs).
        quiet: no progress bar.

    Returns:
        ``{"cases": n, "store_bytes": estimate, "needed_bytes": n, "free_bytes": n}``.

    Raises:
        InputError: the first problem, one line naming the file or folder.
    """

    work = check_output_dir(work, "work folder")
    test_set = set(test)
    dataset.require_labels(test, "the test cases are scored against them")
    others = [c for c in dict.fromkeys([*unlabeled, *test]) if c != template]
    shapes = _read_cohort(dataset, template, others, test_set, quiet)
    store_cases = [template, *[c for c in unlabeled if c != template]]
    missing = [c for c in store_cases if c not in _encoded_cases(work / "features", store_cases)]
    existing = FeatureStore(work / "features").config if (work / "features" / CONFIG_FILE).is_file() else None
    store = estimate_store_bytes({c: shapes[c] for c in missing}, shapes[template], run_store_geometry(existing)) \
        if missing else 0
    voxels = {c: int(math.prod(s)) for c, s in shapes.items()}
    needed = needed_bytes(store, sum(voxels[c] for c in unlabeled if c in voxels and c != template),
                          sum(voxels[c] for c in test), rounds, voxels.get(template, 0))
    free = check_free_disk(work, needed, f"the feature store of {len(missing)} cases, {rounds} round(s) of labels "
                           "and the training volumes")
    return {"cases": len(shapes), "store_bytes": store, "needed_bytes": needed, "free_bytes": free}
