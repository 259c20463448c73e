"""Atlas registration of the template to a case (antspyx), as a prior for ``propagate``.

The template image is registered to a case with ANTs (Avants et al., "Symmetric diffeomorphic
image registration with cross-correlation", Med. Image Anal. 2008; antspyx ``ants.registration``):
``type_of_transform="SyN"`` by default, which in ANTs is a centre-of-mass initialisation
(``-r [fixed,moving,1]``), an affine stage (Mattes mutual information, 4 resolutions) and a SyN
stage (Mattes, ``reg_iterations`` per resolution, default (40, 20, 0)). The template's label is
then warped to the case's voxel grid with ``ants.apply_transforms(interpolator="genericLabel")``,
and the composed transform is kept as a field of template voxel coordinates (for every case
voxel, where it lands in the template), from which ``propagate --prior position`` takes its
position term and from which the soft per-class prior (the one-hot label, trilinear) is read.

**Physical frames.** Images are read through :mod:`semisam_o1.data.images`, so every array is in canonical
RAS voxel order with its spacing. They are handed to ANTs with that spacing, origin 0 and the
identity direction: template and case then share one axis convention (RAS voxel order, whatever
the files' own orientation), spacing makes the metric and the regularisation physical (mm), and
the absolute origin does not matter because ANTs' first step aligns the two images' intensity
centres of mass. The small rotations a canonical reorientation leaves in an oblique affine are
ignored by both images alike, and the affine stage absorbs any residual.

**Reproducibility.** ANTs' metric sampling is random (``aff_random_sampling_rate``); the seed is
passed as ``--random-seed`` (antspyx's ``ants.config._random_seed``, the value that
``ants.set_ants_deterministic`` sets; ANTs takes 0 for "seed from the clock", so the default is 1).
Threads: ITK's ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which ITK reads once per process, when the
first ANTs image is made: :func:`warp_template` sets it before that, so the first call's ``threads``
holds for the process. With 1 thread and a fixed seed the warps are identical run to run; with
2 threads they were not (docs/experiments.md, "The position term"), so ``propagate`` and
:func:`registration_labels` register on 1 thread.

**Cases in parallel.** :func:`warp_cases` (behind :func:`registration_labels` and
:func:`position_check`) registers several cases at once, one per process of a
``concurrent.futures.ProcessPoolExecutor`` (``spawn`` start: no ITK or torch state forked), each
process single-threaded (ITK's variable set before it imports ANTs) with the same seed, so each
case's warp is the one the serial loop computes, bit for bit (tests/test_registration.py). Workers:
the CPUs this process may run on (``os.sched_getaffinity``) unless given; a tqdm bar counts the cases.
Measured: benchmarks/results/registration.json, key ``parallel``.

**Cache.** :func:`cached_warp` keeps each case's warped label (``<case>.nii.gz``, the case's own
voxel order and affine, :func:`semisam_o1.data.images.write_label`) and template-coordinate field
(``<case>_coords.npz``, float32 (X, Y, Z, 3) in canonical order, numpy compressed) in ``FOLDER/<key>/``, where the key digests the
template's image and label hashes and the registration parameters; files are written atomically,
so an interrupted run resumes with the cases already done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from semisam_o1.core.files import atomic_path, file_sha256
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import digest
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import read_label, write_label
from semisam_o1.methods.metrics import mask_extent

__all__ = ["RegistrationParams", "Warp", "to_ants", "register", "warp_template", "soft_prior",
           "cached_warp", "warp_cases", "registration_labels", "available_cpus"]


@dataclass(frozen=True)
class RegistrationParams:
    """ANTs parameters (antspyx ``ants.registration``): ``transform`` its ``type_of_transform``,
    ``reg_iterations`` the SyN iterations per resolution (None: antspyx's default (40, 20, 0)),
    ``seed`` the sampling seed."""

    transform: str = "SyN"
    reg_iterations: tuple[int, ...] | None = None
    seed: int = 1

    def to_json(self) -> dict:
        return {"transform": self.transform, "seed": int(self.seed),
                "reg_iterations": None if self.reg_iterations is None else [int(i) for i in self.reg_iterations]}


@dataclass
class Warp:
    """The template warped to one case.

    Attributes:
        label: (X, Y, Z) uint8 class indices on the case's canonical grid (genericLabel).
        coords: (X, Y, Z, 3) float32: for each case voxel, the template voxel coordinate (continuous,
            canonical index units) it corresponds to; may lie outside the template's box.
        seconds: wall-clock seconds of the registration and warps (0 when read from a cache).
    """

    label: np.ndarray
    coords: np.ndarray
    seconds: float = 0.0


def to_ants(array: np.ndarray, spacing: Sequence[float]):
    """An ``ants.ANTsImage`` of a canonical (X, Y, Z) array: float32, ``spacing`` (mm), origin 0,
    identity direction (see the module's docstring for why that suffices). A 2D image (Z = 1) is
    a 2D ANTsImage: ANTs registers 2D images with the same transforms."""
    import ants

    if array.ndim == 3 and array.shape[2] == 1:
        return ants.from_numpy(np.ascontiguousarray(array[:, :, 0], dtype=np.float32), origin=(0.0, 0.0),
                               spacing=tuple(float(s) for s in spacing[:2]), direction=np.eye(2))
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=(0.0, 0.0, 0.0),
                           spacing=tuple(float(s) for s in spacing), direction=np.eye(3))


@contextlib.contextmanager
def _ants_settings(threads: int | None, seed: int):
    """ITK threads (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``; see the module's docstring) and ANTs'
    random seed for the duration of a registration."""
    import ants

    old_env = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    old_seed = ants.config._random_seed
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    ants.config._random_seed = int(seed)
    try:
        yield
    finally:
        ants.config._random_seed = old_seed
        if old_env is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = old_env


def register(fixed, moving, params: RegistrationParams, folder: str) -> list[str]:
    """Register ``moving`` (the template, an ANTsImage) to ``fixed`` (the case) with ANTs' seed
    ``params.seed``; the transform files are written under ``folder``. Returns antspyx's
    ``fwdtransforms`` (warp, then affine)."""
    import ants

    kwargs = {} if params.reg_iterations is None else {"reg_iterations": tuple(params.reg_iterations)}
    with _ants_settings(None, params.seed):
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=params.transform,
                                outprefix=os.path.join(folder, "reg_"), **kwargs)
    return list(reg["fwdtransforms"])


def _coords_field(fixed, moving, transforms: list[str], folder: str, moving_spacing) -> np.ndarray:
    """(X, Y, Z, 3) float32 template voxel coordinates of every case voxel: the composed transform's
    displacement field (``ants.apply_transforms(compose=...)``, mm, fixed -> moving) added to the
    voxel's physical position, divided by the template's spacing (both origins are 0)."""
    import ants

    path = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                 compose=os.path.join(folder, "comp_"))
    disp = ants.image_read(path).numpy().astype(np.float64)  # (X, Y, Z, 3) mm; 2D: (X, Y, 2)
    dim = disp.shape[-1]
    shape = disp.shape[:dim]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    phys = grid * np.asarray(fixed.spacing, np.float64) + disp
    coords = (phys / np.asarray(moving_spacing[:dim], np.float64)).astype(np.float32)
    if dim == 2:  # a 2D image: (X, Y, 1, 3), on the template's one slice
        coords = np.concatenate([coords, np.zeros(coords.shape[:2] + (1,), np.float32)], -1)[:, :, None]
    return coords


def warp_template(template_image, template_label: np.ndarray, case_image, params: RegistrationParams | None = None,
                  threads: int | None = None) -> Warp:
    """Register the template to a case and warp its label.

    Args:
        template_image, case_image: :class:`semisam_o1.data.images.Volume` images (canonical arrays, spacing).
        template_label: (X, Y, Z) integer class indices on the template's grid.
        params: the registration (default: SyN, antspyx's defaults, seed 0).
        threads: ITK threads (default: ITK's own, all cores).

    Returns:
        a :class:`Warp` on the case's grid.
    """
    import ants

    params = params or RegistrationParams()
    t0 = time.perf_counter()
    with _ants_settings(threads, params.seed), tempfile.TemporaryDirectory(prefix="semisam_reg_") as folder:
        fixed = to_ants(case_image.array, case_image.spacing)
        moving = to_ants(template_image.array, template_image.spacing)
        tx = register(fixed, moving, params, folder)
        lab = ants.apply_transforms(fixed=fixed, moving=to_ants(template_label, template_image.spacing),
                                    transformlist=tx, interpolator="genericLabel")
        coords = _coords_field(fixed, moving, tx, folder, template_image.spacing)
    label = np.rint(lab.numpy()).astype(np.uint8)
    if label.ndim == 2:
        label = label[:, :, None]
    return Warp(label=label, coords=coords, seconds=time.perf_counter() - t0)


def soft_prior(template_label: np.ndarray, coords: np.ndarray, num_classes: int) -> np.ndarray:
    """The soft per-class prior: the template's one-hot label read at ``coords`` (X, Y, Z, 3)
    by trilinear interpolation (scipy.ndimage.map_coordinates, order 1; outside the template's box:
    background). Returns (K, X, Y, Z) float32 summing to 1 per voxel."""
    from scipy import ndimage

    pts = np.moveaxis(coords, -1, 0).astype(np.float64)
    out = np.empty((num_classes, *coords.shape[:3]), np.float32)
    for c in range(num_classes):
        out[c] = ndimage.map_coordinates((template_label == c).astype(np.float32), pts, order=1, mode="constant",
                                         cval=1.0 if c == 0 else 0.0)
    return out / np.maximum(out.sum(0, keepdims=True), 1e-12)


def cache_key(template_image_path, template_label_path, params: RegistrationParams) -> str:
    """The cache folder's name: a digest of the template image's and label's SHA-256 and ``params``."""

    return digest({"image": file_sha256(template_image_path), "label": file_sha256(template_label_path),
                   "params": params.to_json()})


def cached_warp(folder: Path, template_image, template_label, case: str, case_image, label_map,
                params: RegistrationParams | None = None, threads: int | None = None) -> Warp:
    """:func:`warp_template` through the cache ``folder/<key>/`` (see the module's docstring):
    read the case's warp when both its files are there, else compute and write them atomically.

    Args:
        template_label: the template's label :class:`semisam_o1.data.images.Volume` (class indices).
        label_map: the dataset's :class:`semisam_o1.data.labels.LabelMap` (to write label values).
    """

    params = params or RegistrationParams()
    sub = Path(folder) / cache_key(template_image.path, template_label.path, params)
    lab_path, co_path = sub / f"{case}.nii.gz", sub / f"{case}_coords.npz"
    if lab_path.exists() and co_path.exists():
        lab = read_label(lab_path, label_map, reference=case_image)
        with np.load(co_path) as z:
            return Warp(label=lab.array, coords=z["coords"])
    warp = warp_template(template_image, template_label.array, case_image, params, threads)
    sub.mkdir(parents=True, exist_ok=True)
    with atomic_path(co_path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, coords=warp.coords)
    write_label(lab_path, warp.label, case_image, label_map)
    return warp


def available_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# One template per worker process, read once by _worker_init: {"dataset", "image", "label", "out_dir",
# "params", "threads"}.
_WORKER: dict = {}


def _worker_init(root: str, template: str, out_dir: str, params: RegistrationParams, threads: int | None) -> None:
    """A registration worker's start: ITK's thread count before anything imports ANTs (ITK reads it once
    per process), then the dataset and the template."""
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
    ds = Dataset(root)
    image = ds.read_image(template)
    _WORKER.update(dataset=ds, image=image, label=ds.read_label(template, reference=image), out_dir=Path(out_dir),
                   params=params, threads=threads)


def _worker_warp(case: str) -> tuple[str, float]:
    """Compute (or find in the cache) ``case``'s warp in a worker; returns ``(case, seconds)``."""
    w = _WORKER
    ds = w["dataset"]
    warp = cached_warp(w["out_dir"], w["image"], w["label"], case, ds.read_image(case), ds.label_map, w["params"],
                       w["threads"])
    return case, warp.seconds


def warp_cases(dataset, template: str, cases: Sequence[str], out_dir, threads: int | None = 1,
               params: RegistrationParams | None = None, workers: int | None = None, quiet: bool = True) -> dict:
    """The template's warp to every case of ``cases`` in the cache ``out_dir`` (:func:`cached_warp`),
    several cases at once (module docstring, "Cases in parallel").

    Args:
        dataset: a :class:`semisam_o1.data.dataset.Dataset` or its folder.
        template: the template's case id.
        cases: case ids (the template and cases already cached are skipped).
        out_dir: cache folder.
        threads: ITK threads per registration (1: reproducible).
        params: the registration.
        workers: processes (default: :func:`available_cpus`); 1 registers in this process, one
            case after the other.
        quiet: no progress bar.

    Returns:
        ``{"warp_dir": the cache's key folder, "seconds": {case: seconds of its registration, for the
        cases computed now}}``.

    Raises:
        InputError: an unknown case, a template label that does not fit its image.
    """

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    params = params or RegistrationParams()
    t_img = ds.read_image(template)
    t_lab = ds.read_label(template, reference=t_img)
    sub = Path(out_dir) / cache_key(t_img.path, t_lab.path, params)
    todo = [c for c in dict.fromkeys(cases) if c != template
            and not ((sub / f"{c}.nii.gz").exists() and (sub / f"{c}_coords.npz").exists())]
    for c in todo:
        ds.image_path(c)  # an unknown case is refused before any registration starts
    workers = min(int(workers or available_cpus()), len(todo))
    seconds: dict[str, float] = {}
    if workers <= 1:
        for case in progress(todo, quiet=quiet, desc="registration"):
            seconds[case] = cached_warp(Path(out_dir), t_img, t_lab, case, ds.read_image(case), ds.label_map,
                                        params, threads).seconds
        return {"warp_dir": sub, "seconds": seconds}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                initargs=(str(ds.root), template, str(out_dir), params,
                                                          threads)) as pool:
        futures = [pool.submit(_worker_warp, c) for c in todo]
        try:
            for fut in progress(concurrent.futures.as_completed(futures), quiet=quiet, desc="registration",
                                total=len(futures)):
                case, sec = fut.result()
                seconds[case] = sec
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return {"warp_dir": sub, "seconds": seconds}


def registration_labels(dataset, template: str, cases: Sequence[str], out_dir, threads: int | None = 1,
                        params: RegistrationParams | None = None, workers: int | None = None,
                        quiet: bool = True) -> dict[str, Path]:
    """Warped template labels for ``cases`` (an independent label source, e.g. a referee for the
    rounds' labels), computed once and cached in ``out_dir`` (see :func:`cached_warp`).

    Args:
        dataset: a :class:`semisam_o1.data.dataset.Dataset` or its folder.
        template: the template's case id (its label is the only one read).
        cases: case ids (the template is skipped).
        out_dir: cache folder.
        threads: ITK threads per registration.
        workers: registrations at once (:func:`warp_cases`; default: the available CPUs).
        quiet: no progress bar.

    Returns:
        {case: path of its warped label (NIfTI, the case image's voxel order and affine)}.

    Raises:
        InputError: an unknown case, a template label that does not fit its image.
    """

    done = warp_cases(dataset, template, cases, out_dir, threads, params, workers, quiet)
    return {case: done["warp_dir"] / f"{case}.nii.gz" for case in cases if case != template}


# --------------------------------------------------------------------------- does the position term apply?

#: the position term applies when, by the registration, the voxels of a typical class of a typical
#: case sit less than the template class's half-extent away from where the normalised box puts
#: them (the class overlaps its template place). Hippocampus (0.19) and Left Atrium (0.28) sit
#: well inside the limit, and there the position term lifts the round-0 labels; OpenKBP (2.61)
#: far outside, and there it lowers them (docs/experiments.md, "The position term";
#: benchmarks/results/registration.json, keys "position_check" and "position_check_per_class")
POSITION_OFFSET_LIMIT = 1.0
#: names the rule of :func:`position_offset` in position.json, so that a work folder whose decision
#: was taken by an earlier rule (over the union of the classes) decides again
POSITION_RULE = "per class: median over the template's classes of each class's median voxel offset"


def position_offset(case_label: np.ndarray, coords: np.ndarray, template_label: np.ndarray) -> float:
    """How far the position term's assumption is off in one case, in template-class half-extents.

    The position term of ``propagate`` (``--coords extent``) pairs a case voxel with the template
    voxels at the same normalised position p = (2 i + 1) / n - 1 of their boxes. The registration
    says where the voxel really lands in the template (``coords``). For every voxel of the case's
    warped class c, the gap between the two normalised positions is divided per axis by the
    template class c's normalised half-extent (its extent / the template's shape) and the largest
    axis is taken; a class's offset is the median over its voxels, the case's the median over the
    template's classes. Per class, not over the union of the classes: the term pairs each class
    with its own template place, and a union that spans the box (a spinal cord) would hide classes
    that miss theirs (OpenKBP: 0.34 over the union, 1.62 per class, from the real labels'
    centroids; docs/experiments.md, "The position term").

    Args:
        case_label: (X, Y, Z) the template's label warped to the case (class indices).
        coords: (X, Y, Z, 3) float template voxel coordinates of every case voxel.
        template_label: (X', Y', Z') the template's label (class indices).

    Returns:
        the offset (0: the boxes agree exactly); a class missing from the warped label counts as
        inf, so the offset is inf when most classes are missing.
    """
    n_case = np.asarray(case_label.shape, np.float64)
    n_t = np.asarray(template_label.shape, np.float64)
    per_class = []
    for c in np.unique(template_label[template_label > 0]):
        vox = np.argwhere(case_label == c)
        if not len(vox):
            per_class.append(float("inf"))
            continue
        half = np.asarray(mask_extent(template_label == c), np.float64) / n_t
        p_case = (2.0 * vox + 1.0) / n_case - 1.0
        p_tmpl = (2.0 * coords[tuple(vox.T)].astype(np.float64) + 1.0) / n_t - 1.0
        per_class.append(float(np.median(np.max(np.abs(p_case - p_tmpl) / half, axis=1))))
    return float(np.median(per_class)) if per_class else float("inf")


def position_check(dataset, template: str, cases: Sequence[str], out_dir, threads: int | None = 1,
                   params: RegistrationParams | None = None, workers: int | None = None,
                   quiet: bool = True) -> dict:
    """Whether the position term applies to this cohort, from the template registered to each case
    (the cached warps of :func:`registration_labels`; missing ones are computed first, ``workers``
    at once: :func:`warp_cases`).

    Returns:
        ``{"offsets": {case: offset, or None where a case's classes were mostly lost (inf)},
        "median_offset": m, "limit": POSITION_OFFSET_LIMIT, "applies": m < limit, "rule": POSITION_RULE,
        "reason": ...}`` (offsets: :func:`position_offset`).
    """

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    params = params or RegistrationParams()
    warp_cases(ds, template, cases, out_dir, threads, params, workers, quiet)
    t_img = ds.read_image(template)
    t_lab = ds.read_label(template, reference=t_img)
    offsets = {}
    for case in [c for c in cases if c != template]:
        warp = cached_warp(Path(out_dir), t_img, t_lab, case, ds.read_image(case), ds.label_map, params, threads)
        offsets[case] = position_offset(warp.label, warp.coords, t_lab.array)
    m = float(np.median(list(offsets.values()))) if offsets else 0.0
    offsets = {c: round(v, 4) if np.isfinite(v) else None for c, v in offsets.items()}  # JSON: no Infinity
    applies = m < POSITION_OFFSET_LIMIT
    reason = (f"registered to {len(offsets)} cases, each class's voxels sit a median {m:.2f} template-class "
              f"half-extents from where the normalised box puts them (limit {POSITION_OFFSET_LIMIT:g}): the position "
              + ("term applies" if applies else "term is switched off (the cohort's fields of view differ)"))
    return {"offsets": offsets, "median_offset": round(m, 4), "limit": POSITION_OFFSET_LIMIT, "applies": applies,
            "rule": POSITION_RULE, "reason": reason}
