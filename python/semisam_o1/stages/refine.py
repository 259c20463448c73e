"""Refine pseudo-labels: relabel uncertain voxels by a kNN vote in the encoder's feature space.

SemiSAM-O1 (Zhang et al., arXiv 2604.24109), stage 2 of each round: the
network's predictions (``predict``: ``<case>.nii.gz`` labels and
``<case>_entropy.nii.gz`` voxel-wise softmax entropy in nats) are corrected
where the network is unsure, using the foundation model's features
(``encode``'s feature store), which do not depend on the pseudo-labels.

Two modes:

``voxel`` (default; the paper's "correct high-uncertainty regions")
    1. *Threshold.* The entropy maps of all refined cases are read one by one;
       the threshold is the cohort-wide ``quantile`` of all their voxels'
       entropies (``numpy.quantile``, linear interpolation). Voxels with
       entropy at or above it (and above 0) are *queries*; all the others are
       *confident* (so a zero threshold still leaves the zero-entropy voxels
       confident).
    2. *Bank.* Candidates are the confident voxels of every case with their
       current (predicted) label, plus every voxel of the template with its
       real label (the one label a one-label run may read). The bank is
       class-balanced: each class gets an equal share of ``bank_size``
       (water-filling, :func:`class_quotas`: a class with fewer candidates gives
       its unused share to the others), drawn uniformly without replacement from
       that class's candidates across the whole cohort
       (``numpy.random.default_rng(seed)``). The features of the drawn voxels
       are read case by case (``FeatureStore.load(case).on_voxel_grid()``),
       never all cases at once. With ``project_dim`` > 0 a projection is fitted
       once on the bank (at most 65,536 of its rows, seeded):
       :func:`semisam_o1.methods.linalg.pca_basis`, uncentred PCA, the top
       ``project_dim`` eigenvectors of the bank's second-moment matrix, which
       best preserves the dot products the cosine vote uses; it is applied to
       bank and queries. The kNN cost is Q x N x C, so the vote time falls with
       the dimension (benchmarks/refine.md: time and agreement by dimension and
       bank size).
    3. *Vote.* Case by case, the queries' features go through the C++ kernel
       :func:`semisam_o1.core.kernels.knn_vote` (on the ``--device``'s side): cosine
       similarity to every bank entry, the k most similar, and the label with
       the largest sum of weights ``max(similarity, 0)``, a neighbour of class c
       counting ``n_c / m_c`` times (``n_c`` confident candidates of class c in
       the cohort, ``m_c`` of them in the bank; the kernel's ``label_weights``).
       This undoes the class balancing of the sample: the vote estimates the
       class posterior among the cohort's confident voxels. (Counting every
       neighbour once instead favours the rare foreground classes and labels the
       pool worse: benchmarks/refine.md, "Vote weights".)
       A query whose k neighbours all have similarity <= 0 keeps its label.
       Confident voxels never change.
       With ``position_weight`` w > 0 (default: ``propagate``'s, the same
       position term) the similarity is ``cos - (w^2 / 2) |p_q - p_b|^2``, p the
       voxel's position normalised to [-1, 1] along each axis of its volume
       (folded into the kernel's inner product by
       :func:`semisam_o1.methods.template_vote.augment_with_position`); this assumes the
       cohort shares a field of view (true of crops around one organ, as MSD
       Hippocampus; use 0 otherwise).

``volume`` (the official code's behaviour)
    The cases whose mean entropy is at or above the ``quantile`` of the cases'
    mean entropies are *uncertain*; the others, plus the template with its
    real label, are *confident*. Each case is described by its mean-pooled
    feature vector (the mean over its voxels of ``on_voxel_grid()``). Each
    uncertain case finds its k most similar confident cases (cosine, the same
    kernel) and takes their labels' per-voxel weighted vote, weights
    ``max(similarity, 0)`` (:func:`volume_vote`): each neighbour's label map is
    brought to the uncertain case's voxel grid by nearest-neighbour resizing in
    index space, centre-aligned (:func:`resize_nearest`; the grids are matched
    corner to corner, not by world coordinates), and every voxel takes the
    class with the largest sum of weights (ties: lowest class index).
    Confident cases keep their labels.

With ``--class-planes RULE`` (the ``class_planes.json`` that ``propagate``
learned from the template) every refined label's foreground is re-split into
classes by planes along the rule's axis (:func:`semisam_o1.methods.class_planes.apply`)
before it is written, as ``propagate`` and ``predict`` do with theirs.

Outputs, in ``output``: ``<case>.nii.gz`` for every refined case (changed or
not, so the folder is a complete set of pseudo-labels for the next round;
the template is not written), in the input image's voxel order, affine and
header; ``refine.json``: the summary (threshold, bank composition, voxels
changed per case and class, timings); and ``stage.json``, the resume record
(:mod:`semisam_o1.core.resume`): a re-run with the same settings and inputs returns
at once, or, after an interruption, keeps the cases already written.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from semisam_o1.core.device import resolve_device
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import file_sha256, write_json
from semisam_o1.core.progress import progress
from semisam_o1.core.resume import check_output_dir, digest, open_stage
from semisam_o1.core.settings import (
    CaseOptions,
    ComputeOptions,
    check_range,
    forwarded,
    option,
    redo_changed_option,
    select_cases,
)
from semisam_o1.data.cases import find_case_file
from semisam_o1.data.dataset import Dataset, load_split
from semisam_o1.data.images import check_same_grid, read_image, read_label, write_label
from semisam_o1.data.store import FeatureStore
from semisam_o1.methods import class_planes as planes
from semisam_o1.methods.class_planes import apply
from semisam_o1.methods.knn import (
    KnnBank,
    change_stats,
    class_quotas,
    flat_positions,
    prior_vote_weights,
    project,
    query_mask,
    volume_vote,
)
from semisam_o1.methods.linalg import pca_basis
from semisam_o1.methods.template_vote import MethodOptions, augment_with_position

__all__ = ["RefineSettings", "SETTINGS", "STAGE", "refine", "MODES"]

MODES = ("voxel", "volume")
PCA_FIT_ROWS = 65_536  # the second moments of 64-768 dimensions are settled long before this many rows
SUMMARY_JSON = "refine.json"


@dataclasses.dataclass(kw_only=True)
class RefineSettings(CaseOptions, ComputeOptions):
    """Settings of ``semisam-o1 refine`` (see the module docstring for the method)."""

    features: Path = option(help="feature store written by `semisam-o1 encode`", flags=("-f", "--features"),
                            type=Path, metavar="STORE")
    pred: Path = option(help="predictions folder: <case>.nii.gz labels and <case>_entropy.nii.gz entropy maps "
                        "(`semisam-o1 predict`)", flags=("-p", "--pred"), type=Path, metavar="FOLDER")
    output: Path = option(help="folder for the refined labels (<case>.nii.gz) and refine.json",
                          flags=("-o", "--output"), type=Path, metavar="FOLDER", neutral=True)
    template: str | None = option(None, "the annotated template case (its real label joins the bank; it is not "
                                  "refined); default: the --split's template", metavar="ID")
    subset: str = option("unlabeled", "comma-separated subsets of --split to refine")
    mode: str = option("voxel", "voxel: relabel uncertain voxels by a kNN vote; volume: the official code's "
                       "whole-volume vote", choices=MODES)
    k: int = option(5, "neighbours in the vote")
    quantile: float = option(0.9, "entropy quantile (cohort-wide) at or above which voxels (voxel mode) or "
                             "volumes (volume mode, mean entropy) are refined")
    bank_size: int = option(100_000, "voxel mode: bank entries (class-balanced sample of the cohort's confident "
                            "voxels and the template's); time and agreement by bank size: benchmarks/refine.md")
    project_dim: int = option(64, "voxel mode: uncentred-PCA dimension fitted on the bank (0: the store's full "
                              "dimension)")
    position_weight: float = forwarded(MethodOptions, "position_weight", help="voxel mode: w in cos - (w^2/2) |p_q - p_b|^2, p the voxel's "
                                    "position normalised to [-1, 1] per axis (the same term and weight as "
                                    "propagate's --position-weight; assumes a shared field of view); 0: features only")
    class_planes: Path | None = option(None, "class_planes.json written by `semisam-o1 propagate`: re-split each "
                                       "refined label's foreground into classes by planes along the rule's axis",
                                       type=Path, metavar="RULE")
    seed: int = option(0, "seed of the bank sampling (voxel mode)")
    overwrite: bool = option(False, "redo every case of an output folder written with other settings or inputs",
                             neutral=True)
    redo_changed: bool = redo_changed_option()

    def __post_init__(self):
        super().__post_init__()
        self.features, self.pred, self.output = Path(self.features), Path(self.pred), Path(self.output)
        if self.class_planes is not None:
            self.class_planes = Path(self.class_planes)
        if self.mode not in MODES:
            raise InputError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        check_range("k", self.k, 1)
        check_range("quantile", self.quantile, 0.0, 1.0)
        check_range("bank_size", self.bank_size, 1)
        check_range("project_dim", self.project_dim, 0)
        check_range("position_weight", self.position_weight, 0.0)


# --------------------------------------------------------------------------- primitives


# --------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class _Inputs:
    """Every input of a refine run, found and checked before anything is written."""

    dataset: object  # semisam_o1.data.dataset.Dataset
    store: object  # semisam_o1.data.store.FeatureStore
    template: str
    cases: list[str]
    label_paths: dict[str, Path]
    entropy_paths: dict[str, Path]
    rule: object | None  # semisam_o1.methods.class_planes.ClassPlanes

    @property
    def names(self) -> list[str]:
        return list(self.dataset.label_map.names)

    @property
    def n_classes(self) -> int:
        return int(self.dataset.label_map.num_classes)

    def read_case(self, case: str):
        """``(image Volume, predicted class indices uint8 (X, Y, Z), entropy float32 (X, Y, Z))``.

        Raises:
            InputError: a label or entropy map off its image's grid, or a negative entropy.
        """

        image = self.dataset.read_image(case)
        label = read_label(self.label_paths[case], self.dataset.label_map, reference=image)
        ent = read_image(self.entropy_paths[case])
        check_same_grid(ent, image)
        e = ent.array
        if e.min(initial=0.0) < 0:
            raise InputError(f"{ent.path}: negative entropy {float(e.min()):g}")
        return image, label.array, e

    def read_template(self) -> np.ndarray:
        """The template's real label, (X, Y, Z) class indices on its image's grid."""

        image = self.dataset.read_image(self.template)
        return read_label(self.dataset.label_path(self.template), self.dataset.label_map, reference=image).array

    def case_entry(self, case: str, shape):
        """The store's entry of ``case``, its voxel grid checked against ``shape``."""
        cf = self.store.load(case)
        if tuple(cf.voxel_shape) != tuple(shape):
            raise InputError(f"features of case {case}: voxel grid {tuple(cf.voxel_shape)} differs from its "
                             f"image {tuple(shape)} (re-encode it)")
        return cf

    def case_features(self, case: str, shape) -> np.ndarray:
        """(C, X, Y, Z) float32 voxel-grid features of ``case`` (``on_voxel_grid``), grid checked."""
        return self.case_entry(case, shape).on_voxel_grid()

    def digests(self) -> dict:
        """What the result depends on besides the settings: SHA-256 of every predicted label and
        entropy map and of the template's label, the digest of each store entry's meta.json (which
        holds the encoded image's hash), and the class-planes rule."""

        return {"cases": {c: {"label": file_sha256(self.label_paths[c]), "entropy": file_sha256(self.entropy_paths[c]),
                              "features": digest(self.store.read_meta(c))} for c in self.cases},
                "template_label": file_sha256(self.dataset.label_path(self.template)),
                "template_features": digest(self.store.read_meta(self.template)),
                "class_planes": None if self.rule is None else self.rule.to_json()}


def _open_inputs(s: RefineSettings) -> _Inputs:
    """Find every input of ``s``: dataset, template, cases (never the template), predicted labels,
    entropy maps, store entries, class-planes rule; check the output folder can be written.

    Raises:
        InputError: a missing dataset, predictions folder, store, template, case, label, entropy
            map or store entry; an unreadable rule; an output folder that is a file, not writable,
            or the predictions folder itself.
    """

    ds = Dataset(s.input)
    if not s.pred.is_dir():
        raise InputError(f"{s.pred}: predictions folder not found")
    template = s.template
    if template is None:
        sp = load_split(s.split) if s.split is not None else {}
        if "template" not in sp:
            raise InputError("--template is needed (or a --split file with a 'template' entry)")
        template = str(sp["template"])
    ds.image_path(template)
    ds.label_path(template)
    cases = [c for c in select_cases(ds, s) if c != template]
    if not cases:
        raise InputError("no case to refine (the template keeps its real label and is not refined)")
    labels = {c: find_case_file(s.pred, c, what="predicted label") for c in cases}
    entropy = {c: find_case_file(s.pred, f"{c}_entropy", what=f"entropy map of case {c}") for c in cases}
    if not s.features.is_dir():
        raise InputError(f"{s.features}: feature store not found")
    store = FeatureStore(s.features)
    for c in [template, *cases]:
        if not store.has(c):
            raise InputError(f"{s.features}: no features for case {c} (run `semisam-o1 encode` on it)")
    check_output_dir(s.output)
    if s.output.resolve() == s.pred.resolve():
        raise InputError(f"{s.output}: the output folder must differ from the predictions folder")
    rule = planes.read(s.class_planes) if s.class_planes is not None else None
    return _Inputs(ds, store, template, cases, labels, entropy, rule)


# --------------------------------------------------------------------------- writing the cases


def _write_cases(inputs: _Inputs, reuse: bool, output: Path, relabel: Callable[[str], tuple] | None,
                 quiet: bool) -> dict:
    """Write every case's refined label (class planes applied), keeping those already written
    under the same signature.

    Args:
        inputs: the run's inputs.
        reuse: the record's ``reuse``, read before :meth:`~semisam_o1.core.resume.StageRecord.start`
            (the files in the folder were written with this signature).
        output: the output folder.
        relabel: ``case -> (image Volume, predicted label, refined label, extra stats dict)``.
        quiet: no progress bar.

    Returns:
        {case: {"changed", "changed_from", "changed_to", ...extra, "seconds"}}; a kept case's
        counts are recomputed from its file (``"reused": True``, no extra stats).
    """

    out = {}
    for case in progress(inputs.cases, quiet=quiet, desc="refine: vote"):
        path = output / f"{case}.nii.gz"
        tc = time.perf_counter()
        if reuse and path.is_file():
            image, lab, _ = inputs.read_case(case)
            new = read_label(path, inputs.dataset.label_map, reference=image).array
            out[case] = {**change_stats(lab, new, inputs.names), "reused": True}
            continue
        image, lab, new, extra = relabel(case)
        if inputs.rule is not None:
            new = apply(new, inputs.rule)
        write_label(path, new, image, inputs.dataset.label_map)
        out[case] = {**extra, **change_stats(lab, new, inputs.names), "seconds": round(time.perf_counter() - tc, 4)}
    return out


def _todo(inputs: _Inputs, reuse: bool, output: Path) -> list[str]:
    """The cases whose refined label is still to be written."""
    return [c for c in inputs.cases if not (reuse and (output / f"{c}.nii.gz").is_file())]


def _finish(inputs: _Inputs, record, output: Path, summary: dict) -> dict:
    """Add the cohort's change counts to ``summary``, write it (``refine.json``) and finish the record."""

    cases = summary["cases"]
    names = inputs.names
    summary["resumed_cases"] = sum(1 for v in cases.values() if v.get("reused"))
    summary["voxels_changed_total"] = int(sum(v["changed"] for v in cases.values()))
    summary["voxels_changed_per_class"] = {
        "from": {n: int(sum(v["changed_from"][n] for v in cases.values())) for n in names},
        "to": {n: int(sum(v["changed_to"][n] for v in cases.values())) for n in names}}
    if inputs.rule is not None:
        summary["class_planes"] = inputs.rule.to_json(names)
    write_json(output / SUMMARY_JSON, summary)
    record.finish(summary)
    return summary


# --------------------------------------------------------------------------- voxel mode


@dataclasses.dataclass
class _BankLayout:
    """Which confident voxels form the bank. Source 0 is the template, source i the i-th case.

    Attributes:
        available: (n_classes,) int64 candidates per class in the cohort (template included).
        quotas: bank entries per class (:func:`class_quotas`).
        picks: picks[i][c]: int64 indices, in increasing order, into source i's candidates of
            class c (its confident voxels of class c in C order).
        queries: {case: number of query voxels}.
    """

    available: np.ndarray
    quotas: list[int]
    picks: list[list[np.ndarray]]
    queries: dict[str, int]

    @property
    def size(self) -> int:
        return int(sum(self.quotas))


def _entropy_threshold(inputs: _Inputs, quantile: float, quiet: bool) -> tuple[float, int]:
    """The cohort-wide ``quantile`` of every case's voxel entropies (``numpy.quantile``, linear).

    Returns:
        (threshold in nats, number of voxels). Reads (and so checks) every case.
    """

    values = [inputs.read_case(case)[2].ravel() for case in progress(inputs.cases, quiet=quiet,
                                                                     desc="refine: entropy")]
    all_values = np.concatenate(values)
    return float(np.quantile(all_values, quantile)), int(all_values.size)


def _layout_bank(inputs: _Inputs, t_label: np.ndarray, threshold: float, bank_size: int, seed: int,
               quiet: bool) -> _BankLayout:
    """Draw the class-balanced bank over the whole cohort: per class, ``quotas[c]`` of the
    cohort's candidates uniformly without replacement (``numpy.random.default_rng(seed)``).

    Args:
        inputs: the run's inputs.
        t_label: (X, Y, Z) the template's real label (every voxel a candidate).
        threshold: the entropy threshold (nats): a case's candidates are its confident voxels.
        bank_size: entries asked for.
        seed: seed of the draw.
        quiet: no progress bar.
    """

    n_cls = inputs.n_classes
    counts = np.zeros((len(inputs.cases) + 1, n_cls), np.int64)
    counts[0] = np.bincount(t_label.ravel(), minlength=n_cls)[:n_cls]
    queries = {}
    for i, case in enumerate(progress(inputs.cases, quiet=quiet, desc="refine: bank layout"), start=1):
        _, lab, ent = inputs.read_case(case)
        conf = ~query_mask(ent, threshold)
        counts[i] = np.bincount(lab[conf].ravel(), minlength=n_cls)[:n_cls]
        queries[case] = int((~conf).sum())
    available = counts.sum(axis=0)
    quotas = class_quotas(available, bank_size)
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([np.zeros((1, n_cls), np.int64), np.cumsum(counts, axis=0)])
    picks: list[list[np.ndarray]] = [[np.zeros(0, np.int64)] * n_cls for _ in range(len(counts))]
    for c in range(n_cls):
        chosen = np.sort(rng.choice(int(available[c]), size=int(quotas[c]), replace=False)) if quotas[c] else \
            np.zeros(0, np.int64)
        bounds = np.searchsorted(chosen, offsets[:, c])
        for i in range(len(counts)):
            picks[i][c] = chosen[bounds[i]:bounds[i + 1]] - offsets[i, c]
    return _BankLayout(available, quotas, picks, queries)


def _bank_features(inputs: _Inputs, layout: _BankLayout, t_label: np.ndarray, threshold: float, with_positions: bool,
                   quiet: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Read the drawn voxels' features, case by case (every store entry's grid is checked).

    Returns:
        ``(bank (N, C) float16, labels (N,) int32, positions (N, 3) float32 or None, origin (N, 2)
        int64)``, N = layout.size; ``origin`` holds each entry's source (0: the template, i: the i-th
        case) and flat voxel index.
    """

    n = layout.size
    bank, labels = None, np.empty(n, np.int32)
    positions = np.empty((n, 3), np.float32) if with_positions else None
    origin = np.empty((n, 2), np.int64)
    pos = 0
    for i, case in enumerate(progress([inputs.template, *inputs.cases], quiet=quiet, desc="refine: bank features")):
        if i == 0:
            lab, conf = t_label, np.ones(t_label.shape, bool)
        else:
            _, lab, ent = inputs.read_case(case)
            conf = ~query_mask(ent, threshold)
        if sum(len(p) for p in layout.picks[i]) == 0:
            inputs.case_entry(case, lab.shape)  # still checked before anything is written
            continue
        flat = inputs.case_features(case, lab.shape).reshape(-1, lab.size)
        if bank is None:
            bank = np.empty((n, flat.shape[0]), np.float16)
        for c in range(inputs.n_classes):
            if len(layout.picks[i][c]):
                where = np.flatnonzero(conf.ravel() & (lab.ravel() == c))[layout.picks[i][c]]
                bank[pos:pos + len(where)] = flat[:, where].T
                labels[pos:pos + len(where)] = c
                origin[pos:pos + len(where)] = np.stack([np.full(len(where), i), where], axis=1)
                if with_positions:
                    positions[pos:pos + len(where)] = flat_positions(where, lab.shape)
                pos += len(where)
    if pos != n:  # pragma: no cover - the layout counts the same voxels
        raise RuntimeError(f"refine: bank holds {pos} entries, planned {n}")
    return bank, labels, positions, origin


def _project_bank(bank: np.ndarray, project_dim: int, seed: int) -> tuple[np.ndarray, tuple | None, dict]:
    """Fit the uncentred PCA (:func:`semisam_o1.methods.linalg.pca_basis`) on at most :data:`PCA_FIT_ROWS`
    bank rows (``numpy.random.default_rng(seed + 1)``) and project the bank.

    Args:
        bank: (N, C) float16 bank features.
        project_dim: dimension kept; 0 or >= C: no projection.
        seed: the run's seed.

    Returns:
        ``(bank (N, project_dim) float32 or the bank itself, (mean, basis) or None, description)``.
    """

    n, dim_in = bank.shape
    if not project_dim or project_dim >= dim_in:
        return bank, None, {"kind": "none", "dim_in": int(dim_in), "dim": int(dim_in)}
    rows = np.arange(n)
    if n > PCA_FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed + 1).choice(n, PCA_FIT_ROWS, replace=False))
    mean, basis, kept = pca_basis(bank[rows], project_dim)
    projected = np.empty((n, basis.shape[1]), np.float32)
    for s in range(0, n, 65536):
        projected[s:s + 65536] = project(bank[s:s + 65536], (mean, basis))
    return projected, (mean, basis), {"kind": "uncentred-pca", "dim_in": int(dim_in), "dim": int(basis.shape[1]),
                                      "energy_kept": kept, "fit_rows": int(len(rows))}


def _kernel_bank(bank: np.ndarray, positions: np.ndarray | None, project_dim: int, seed: int,
                 position_weight: float) -> tuple[np.ndarray, tuple | None, dict]:
    """The kernel's bank vectors: :func:`_project_bank`, then the position term appended
    (:func:`semisam_o1.methods.template_vote.augment_with_position`) when ``position_weight`` > 0.

    Returns:
        ``(bank (N, D) float16 or float32, projection or None, projection description)``.
    """

    bank, projection, info = _project_bank(bank, project_dim, seed)
    if position_weight:
        bank = augment_with_position(np.asarray(bank, np.float32), positions, position_weight, "bank")
    return bank, projection, info


def _query_features(inputs: _Inputs, case: str, lab: np.ndarray, qmask: np.ndarray, projection,
                    position_weight: float) -> np.ndarray:
    """The kernel's query vectors of the ``qmask`` voxels of ``case``: features projected like the
    bank, with the position term appended when ``position_weight`` > 0.

    Returns:
        (Q, D) float32, Q = qmask.sum(), D = the bank's dimension.
    """

    where = np.flatnonzero(qmask.ravel())
    feats = inputs.case_features(case, lab.shape)
    q = feats.reshape(feats.shape[0], -1)[:, where].T
    del feats
    q = np.ascontiguousarray(project(q, projection), dtype=np.float32)
    if position_weight:
        q = augment_with_position(q, flat_positions(where, lab.shape), position_weight, "query")
    return q


def _vote_queries(inputs: _Inputs, case: str, threshold: float, knn: KnnBank, projection, position_weight: float,
                  k: int, vote_weights: np.ndarray) -> tuple:
    """Relabel the query voxels of ``case`` by the kNN vote against the bank.

    Returns:
        ``(image Volume, predicted label, refined label (X, Y, Z) uint8, {"queries": Q})``.
    """
    image, lab, ent = inputs.read_case(case)
    qmask = query_mask(ent, threshold)
    new = lab.copy()
    n_q = int(qmask.sum())
    if n_q:
        q = _query_features(inputs, case, lab, qmask, projection, position_weight)
        voted, share = knn.vote(q, k, label_weights=vote_weights)
        keep = share <= 0  # every neighbour dissimilar: no evidence, keep the label
        new[qmask] = np.where(keep, lab[qmask], voted).astype(np.uint8)
    return image, lab, new, {"queries": n_q}


def _relabel_cases(inputs: _Inputs, s: RefineSettings, record, reuse: bool, relabel, summary: dict,
                   timings: dict, t_start: float) -> dict:
    """Both modes' last step: write every case with ``relabel`` (None: nothing left to do), time
    it, and finish the record; returns the summary."""
    t0 = time.perf_counter()
    record.start()
    summary["cases"] = _write_cases(inputs, reuse, s.output, relabel, s.quiet)
    timings["vote_s"] = time.perf_counter() - t0
    summary["timings"] = dict(timings, total_s=time.perf_counter() - t_start)
    return _finish(inputs, record, s.output, summary)


def _refine_voxel(inputs: _Inputs, s: RefineSettings, record, device: str) -> dict:
    """Voxel mode (module docstring): threshold, bank, projection, vote; returns the summary."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    names = inputs.names
    t0 = time.perf_counter()
    threshold, n_voxels = _entropy_threshold(inputs, s.quantile, s.quiet)
    timings["threshold_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    t_label = inputs.read_template()
    layout = _layout_bank(inputs, t_label, threshold, s.bank_size, s.seed, s.quiet)
    timings["bank_plan_s"] = time.perf_counter() - t0
    bank_info = {"size": layout.size,
                 "per_class": {names[c]: int(layout.quotas[c]) for c in range(inputs.n_classes)},
                 "from_template": {names[c]: int(len(layout.picks[0][c])) for c in range(inputs.n_classes)},
                 "candidates": {names[c]: int(layout.available[c]) for c in range(inputs.n_classes)},
                 "cases_contributing": int(sum(1 for p in layout.picks[1:] if any(len(x) for x in p)))}
    summary = {"mode": "voxel", "device": device, "threshold": threshold,
               "threshold_units": "nats (voxel-wise softmax entropy)", "voxels_in_cohort": n_voxels,
               "queries_total": int(sum(layout.queries.values())), "bank": bank_info}
    relabel, reuse = None, record.reuse  # (read before start(), which marks the folder as this run's)
    if _todo(inputs, reuse, s.output):
        t0 = time.perf_counter()
        pos_w = float(s.position_weight)
        bank, bank_labels, bank_pos, _ = _bank_features(inputs, layout, t_label, threshold, bool(pos_w), s.quiet)
        timings["bank_features_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        bank, projection, bank_info["projection"] = _kernel_bank(bank, bank_pos, s.project_dim, s.seed, pos_w)
        if pos_w:
            bank_info["position_weight"] = pos_w
        knn = KnnBank(bank, bank_labels, device=device, threads=s.threads)
        del bank
        vote_weights = prior_vote_weights(layout.available, layout.quotas)
        bank_info["vote_weight_per_class"] = {names[c]: float(vote_weights[c]) for c in range(inputs.n_classes)}
        timings["projection_s"] = time.perf_counter() - t0
        k = min(s.k, layout.size)

        def relabel(case):
            return _vote_queries(inputs, case, threshold, knn, projection, pos_w, k, vote_weights)

    return _relabel_cases(inputs, s, record, reuse, relabel, summary, timings, t_start)


# --------------------------------------------------------------------------- volume mode


def _describe_volumes(inputs: _Inputs, t_label: np.ndarray, quiet: bool) -> tuple[dict, dict]:
    """Each case's mean entropy, and each volume's mean-pooled feature vector (template included).

    Returns:
        ``({case: mean entropy (nats)}, {case: (C,) float32 mean of on_voxel_grid() over the voxels})``.
    """

    means, desc = {}, {}

    def pooled(case, shape):
        feats = inputs.case_features(case, shape)
        return feats.reshape(feats.shape[0], -1).astype(np.float64).mean(axis=1).astype(np.float32)

    for case in progress(inputs.cases, quiet=quiet, desc="refine: volumes"):
        _, lab, ent = inputs.read_case(case)
        means[case] = float(ent.astype(np.float64).mean())
        desc[case] = pooled(case, lab.shape)
    desc[inputs.template] = pooled(inputs.template, t_label.shape)
    return means, desc


def _volume_neighbours(uncertain: list[str], confident: list[str], desc: dict, k: int, device: str,
                       threads: int | None) -> dict[str, list[tuple[str, float]]]:
    """Each uncertain case's k most cosine-similar confident volumes (the kNN kernel, with the bank
    index as the label), most similar first: ``{case: [(neighbour, similarity), ...]}``."""
    if not uncertain or not confident:
        return {}
    knn = KnnBank(np.stack([desc[c] for c in confident]), np.arange(len(confident), dtype=np.int32),
                   device=device, threads=threads)
    _, _, idx, sim = knn.vote(np.stack([desc[c] for c in uncertain]), min(k, len(confident)), return_topk=True)
    return {case: [(confident[int(j)], float(x)) for j, x in zip(idx[qi], sim[qi])]
            for qi, case in enumerate(uncertain)}


def _refine_volume(inputs: _Inputs, s: RefineSettings, record, device: str) -> dict:
    """Volume mode (module docstring; the official code's rule); returns the summary."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    t_label = inputs.read_template()
    means, desc = _describe_volumes(inputs, t_label, s.quiet)
    threshold = float(np.quantile(np.array([means[c] for c in inputs.cases]), s.quantile))
    uncertain = [c for c in inputs.cases if means[c] >= threshold]
    confident = [inputs.template] + [c for c in inputs.cases if means[c] < threshold]
    timings["describe_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    neighbours = _volume_neighbours(uncertain, confident, desc, s.k, device, s.threads)
    timings["neighbours_s"] = time.perf_counter() - t0
    summary = {"mode": "volume", "device": device, "threshold": threshold,
               "threshold_units": "nats (mean voxel-wise softmax entropy of a volume)", "mean_entropy": means,
               "uncertain_cases": uncertain, "confident_cases": confident,
               "neighbours": {c: [{"case": n, "similarity": x} for n, x in v] for c, v in neighbours.items()},
               "resize": "nearest neighbour in index space, centre-aligned: "
                         "src = min(floor((i + 0.5) * n_src / n_dst), n_src - 1)"}
    reuse = record.reuse  # (read before start(), which marks the folder as this run's)
    label_cache: dict[str, np.ndarray] = {inputs.template: t_label}

    def neighbour_label(case: str) -> np.ndarray:
        if case not in label_cache:
            label_cache[case] = inputs.read_case(case)[1]
        return label_cache[case]

    def relabel(case):
        image, lab, _ = inputs.read_case(case)
        new = lab
        if case in neighbours:
            new = volume_vote(lab, [(neighbour_label(n), x) for n, x in neighbours[case]], inputs.n_classes)
        return image, lab, new, {"uncertain": case in neighbours, "mean_entropy": means[case]}

    return _relabel_cases(inputs, s, record, reuse, relabel, summary, timings, t_start)


# --------------------------------------------------------------------------- the stage


def refine(settings: RefineSettings) -> dict:
    """Refine the predicted labels in ``settings.pred`` into ``settings.output`` (module docstring).

    Args:
        settings: the stage's settings.

    Returns:
        the JSON-ready summary (also ``output/refine.json`` and the record's summary): ``mode``,
        ``device``, ``threshold`` (nats) and ``threshold_units``, ``cases`` ({case: ``changed``,
        ``changed_from``, ``changed_to`` per class, ``seconds``; voxel mode ``queries``; volume mode
        ``uncertain``, ``mean_entropy``}), ``resumed_cases``, ``voxels_changed_total``,
        ``voxels_changed_per_class``, ``timings`` (seconds); voxel mode also ``voxels_in_cohort``,
        ``queries_total``, ``bank`` (size, per class, from the template, candidates, projection,
        position weight, vote weights); volume mode ``mean_entropy``, ``uncertain_cases``,
        ``confident_cases``, ``neighbours``; ``class_planes`` (the rule) when one is given.
        A finished output folder with the same settings and inputs returns its recorded summary.

    Raises:
        InputError: unknown cases or template, a missing predicted label, entropy map or feature
            entry, grids that differ, an output folder that is a file or not writable, a folder
            written with other settings (without ``overwrite``), ``--device cuda`` where it cannot
            run. Every input is checked (and the threshold and bank are built) before any output is
            written.
    """

    device = resolve_device(settings.device, kernels=True)
    inputs = _open_inputs(settings)
    record = open_stage(settings.output, "refine", settings, inputs=inputs.digests(), overwrite=settings.overwrite,
                        redo_changed=settings.redo_changed)  # no per-case redo: the threshold is cohort-wide
    if record.finished:
        return record.summary()
    record.drop_outputs(lambda c: (settings.output / f"{c}.nii.gz",), inputs.cases)
    run = _refine_voxel if settings.mode == "voxel" else _refine_volume
    summary = run(inputs, settings, record, device)
    if not settings.quiet:
        print(f"refine ({summary['mode']}): {summary['voxels_changed_total']} voxels changed in "
              f"{len(summary['cases'])} cases; threshold {summary['threshold']:.4g} nats; "
              f"{summary['timings']['total_s']:.1f} s -> {settings.output}")
    return summary


SETTINGS = RefineSettings
STAGE = refine
