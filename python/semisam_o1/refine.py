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
       (water-filling: a class with fewer candidates gives its unused share to
       the others), drawn uniformly without replacement from that class's
       candidates across the cohort (``numpy.random.default_rng(seed)``).
       The features of the drawn voxels are read case by case
       (``FeatureStore.load(case).on_voxel_grid()``), never all cases at once.
       Optionally (``project_dim`` > 0) a projection is fitted once on the
       bank (at most 65,536 of its rows, seeded): uncentred PCA, the top
       ``project_dim`` eigenvectors of the bank's second-moment matrix, which
       best preserves the dot products the cosine vote uses; it is applied to
       bank and queries. The kNN cost is Q x N x C and the store's concatenated
       dimension is C_store x number of encoder axes (192 for the default
       LiteMedSAM store); 64 dimensions cut the vote time about threefold (see
       benchmarks/refine.md for what it costs in agreement).
    3. *Vote.* Case by case, the queries' features go through the C++ kernel
       :func:`semisam_o1.kernels.knn_vote`: cosine similarity to every bank
       entry, the k most similar, and the label with the largest sum of
       weights ``max(similarity, 0)``. With ``class_weights="prior"``
       (default) a neighbour of class c also counts ``n_c / m_c`` times
       (``n_c`` confident candidates of class c in the cohort, ``m_c`` of
       them in the bank; the kernel's ``label_weights``), which undoes the class
       balancing of the sample: the vote then estimates the class posterior
       among the cohort's confident voxels. ``"balanced"`` counts every
       neighbour once, which favours the rare (foreground) classes: on the
       demo protocol (20 pool cases, round 1) it moved pool pseudo-label Dice
       from 0.779 to 0.753, against 0.772 with ``"prior"``. A query whose k
       neighbours all have similarity <= 0 keeps its label. Confident voxels
       never change.
       With ``position_weight`` w > 0 (default 1.5, ``propagate``'s default until it moved to 1.0) the
       similarity is ``cos - (w^2 / 2) |p_q - p_b|^2``, p the voxel's position
       normalised to [-1, 1] along each axis of its volume (folded into the
       kernel's inner product by ``propagate.augment_with_position``); this
       assumes the cohort shares a field of view (true of crops around one
       organ, as MSD Hippocampus; use 0 otherwise).

``volume`` (the official code's behaviour, kept for reproduction)
    The cases whose mean entropy is at or above the ``quantile`` of the cases'
    mean entropies are *uncertain*; the others, plus the template with its
    real label, are *confident*. Each case is described by its mean-pooled
    feature vector (the mean over its voxels of ``on_voxel_grid()``). Each
    uncertain case finds its k most similar confident cases (cosine, the same
    kernel) and takes their labels' per-voxel weighted vote, weights
    ``max(similarity, 0)``: each neighbour's label map is brought to the
    uncertain case's voxel grid by nearest-neighbour resizing in index space,
    centre-aligned (target index ``i`` reads source index
    ``min(floor((i + 0.5) * n_src / n_dst), n_src - 1)`` on each axis, i.e.
    the grids are matched corner to corner, not by world coordinates), and
    every voxel takes the class with the largest sum of weights (ties: lowest
    class index). Confident cases keep their labels.

With ``--class-planes RULE`` (the ``class_planes.json`` that ``propagate``
learned from the template) every refined label's foreground is re-split into
classes by planes along the rule's axis (:func:`semisam_o1.class_planes.apply`)
before it is written, as ``propagate`` and ``predict`` do with theirs.

Outputs, in ``output``: ``<case>.nii.gz`` for every refined case (changed or
not, so the folder is a complete set of pseudo-labels for the next round;
the template is not written), in the input image's voxel order, affine and
header; and ``refine.json``: threshold, bank composition, voxels changed per
case and class, timings, and a signature of everything the result depends on.
A re-run with the same signature skips the cases already written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = ["refine", "add_arguments", "main", "resize_nearest", "class_quotas", "fit_projection"]

DEFAULT_BANK_SIZE = 100_000  # see benchmarks/refine.md: 200k costs twice the time for ~0.5 point
DEFAULT_PROJECT_DIM = 64
PCA_FIT_ROWS = 65_536
DEFAULT_CLASS_WEIGHTS = "prior"
DEFAULT_POSITION_WEIGHT = 1.5  # propagate's former default; on 11 real cases: 0.7676 mean Dice vs 0.7425 features only
SCHEMA = 1


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--dataset", "--input", dest="dataset", required=True,
                   help="MSD / nnU-Net dataset folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("-f", "--features", required=True, help="feature store written by `semisam-o1 encode`")
    p.add_argument("-p", "--pred", required=True,
                   help="predictions folder: <case>.nii.gz labels and <case>_entropy.nii.gz entropy maps")
    p.add_argument("-o", "--output", required=True, help="folder for the refined labels and refine.json")
    p.add_argument("--template", default=None,
                   help="the annotated template case (its real label joins the bank); None: the split's template")
    p.add_argument("--cases", nargs="+", default=None, help="cases to refine; None: the --subset of --split")
    p.add_argument("--split", default=None, help="split file (splits.json)")
    p.add_argument("--subset", default="unlabeled", help="subset(s) of --split to refine, comma separated")
    p.add_argument("--k", type=int, default=5, help="neighbours in the vote")
    p.add_argument("--quantile", type=float, default=0.9,
                   help="entropy quantile (cohort-wide) at or above which voxels (volumes) are refined")
    p.add_argument("--mode", choices=["voxel", "volume"], default="voxel",
                   help="voxel: relabel uncertain voxels; volume: the official code's whole-volume vote")
    p.add_argument("--bank-size", type=int, default=DEFAULT_BANK_SIZE,
                   help="voxel mode: most bank entries (class-balanced sample of confident voxels + template)")
    p.add_argument("--project-dim", type=int, default=DEFAULT_PROJECT_DIM,
                   help="voxel mode: uncentred-PCA dimension fitted on the bank (0: the store's full dimension)")
    p.add_argument("--position-weight", type=float, default=DEFAULT_POSITION_WEIGHT,
                   help="voxel mode: weight w of the position term in the similarity, "
                        "cos - (w^2/2) |p_q - p_b|^2 with p the voxel's position normalised to [-1, 1] per axis "
                        "(as propagate; assumes a shared field of view); 0: features only")
    p.add_argument("--class-weights", choices=["prior", "balanced"], default=DEFAULT_CLASS_WEIGHTS,
                   help="voxel mode: prior: a bank entry's vote counts for the confident voxels of its class it "
                        "stands for (the vote estimates the cohort's class posterior); balanced: every entry "
                        "counts the same (favours rare classes)")
    p.add_argument("--class-planes", default=None, metavar="RULE",
                   help="class_planes.json written by `semisam-o1 propagate`: re-split each refined label's "
                        "foreground into classes by planes along the rule's axis (background unchanged)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the kNN kernel runs")
    p.add_argument("--threads", type=int, default=None, help="kernel threads; None: all cores")
    p.add_argument("--seed", type=int, default=0, help="seed of the bank sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    info = refine(args.dataset, args.features, args.pred, args.output, template=args.template,
                  cases=args.cases, split=args.split, subset=args.subset, k=args.k, quantile=args.quantile,
                  mode=args.mode, bank_size=args.bank_size, project_dim=args.project_dim,
                  position_weight=args.position_weight, class_weights=args.class_weights,
                  class_planes=args.class_planes, device=args.device, threads=args.threads, seed=args.seed,
                  quiet=args.quiet)
    if not args.quiet:
        print(f"refine ({info['mode']}): {info['voxels_changed_total']} voxels changed in "
              f"{len(info['cases'])} cases; threshold {info['threshold']:.4g}; "
              f"{info['timings']['total_s']:.1f} s -> {Path(args.output) / 'refine.json'}")
    return 0


# --------------------------------------------------------------------------- helpers


def _positions(flat_index: np.ndarray, shape) -> np.ndarray:
    """(n, 3) float32 normalised positions p = (2 i + 1) / n - 1 per axis of flat voxel indices
    (``propagate.normalised_coords``, mode ``extent``)."""
    from .propagate import normalised_coords

    coords = normalised_coords(shape, mode="extent")
    idx = np.unravel_index(np.asarray(flat_index), tuple(shape))
    return np.stack([coords[d][idx[d]] for d in range(3)], axis=1).astype(np.float32)


def query_mask(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels to relabel: entropy at or above ``threshold`` and above 0. Every other voxel
    is *confident* (a voxel of zero entropy always is, even when the quantile is 0, as
    happens when most voxels have exactly zero entropy)."""
    return (entropy >= threshold) & (entropy > 0)


def resize_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 3D label map to ``shape`` in index space, centre-aligned.

    Target index ``i`` on an axis reads source index
    ``min(floor((i + 0.5) * n_src / n_dst), n_src - 1)`` (PyTorch's
    ``nearest-exact``). Returns an array of ``labels.dtype`` and ``shape``.
    """
    idx = []
    for n_src, n_dst in zip(labels.shape, shape):
        i = np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.int64)
        idx.append(np.minimum(i, n_src - 1))
    return labels[np.ix_(*idx)]


def class_quotas(available: Sequence[int], total: int) -> list[int]:
    """Class-balanced quotas: equal shares of ``total`` by water-filling.

    Each class gets ``min(available[c], share)`` with the share raised until the
    quotas add up to ``min(total, sum(available))``; leftovers of the integer
    division go to the classes with the most candidates left. Returns one int
    per class.
    """
    avail = [int(a) for a in available]
    target = min(int(total), sum(avail))
    quota = [0] * len(avail)
    remaining = target
    open_classes = [c for c in range(len(avail)) if avail[c] > 0]
    while remaining > 0 and open_classes:
        share = remaining // len(open_classes)
        if share == 0:  # fewer units left than classes: one each to the largest leftovers
            open_classes.sort(key=lambda c: avail[c] - quota[c], reverse=True)
            for c in open_classes[:remaining]:
                quota[c] += 1
            remaining = 0
            break
        for c in list(open_classes):
            take = min(share, avail[c] - quota[c])
            quota[c] += take
            remaining -= take
        open_classes = [c for c in open_classes if quota[c] < avail[c]]
    return quota


def fit_projection(bank: np.ndarray, dim: int, centred: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Projection of ``bank`` (N, C) rows to ``dim`` dimensions:
    ``(mean (C,) float32, components (C, dim) float32, kept)``; project with
    ``(x - mean) @ components``.

    Default (``centred=False``): *uncentred* PCA, the top-``dim`` eigenvectors of
    the second-moment matrix ``X^T X / N`` (``mean`` is 0), the rank-``dim``
    subspace that best preserves the rows' dot products, which is what the
    cosine vote uses; ``kept`` is the fraction of ``sum |x|^2`` it keeps.
    ``centred=True``: ordinary PCA (covariance eigenvectors, ``kept`` = fraction
    of the variance); centring changes the cosine geometry and cost more Dice in
    our measurements (benchmarks/refine.md). float64 accumulation over chunks.
    """
    n, c = bank.shape
    mean = np.zeros(c, np.float64)
    if centred:
        for s in range(0, n, 65536):
            mean += bank[s:s + 65536].astype(np.float64).sum(axis=0)
        mean /= max(n, 1)
    m2 = np.zeros((c, c), np.float64)
    for s in range(0, n, 65536):
        x = bank[s:s + 65536].astype(np.float64) - mean
        m2 += x.T @ x
    m2 /= max(n, 1)
    evals, evecs = np.linalg.eigh(m2)
    order = np.argsort(evals)[::-1][:dim]
    kept = float(evals[order].sum() / max(evals.sum(), 1e-30))
    comps = evecs[:, order]
    # fix the sign so the projection is reproducible across LAPACK builds
    signs = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1.0, signs)
    return mean.astype(np.float32), comps.astype(np.float32), kept


def _project(x: np.ndarray, projection) -> np.ndarray:
    if projection is None:
        return x
    mean, comps = projection
    return (x.astype(np.float32, copy=False) - mean) @ comps


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _store_digest(store, case: str) -> str:
    """A digest of the store's entry for ``case``: its meta.json (input file hash, grids,
    store signature) when the store exposes ``read_meta``, else its files' sizes and times."""
    read_meta = getattr(store, "read_meta", None)
    if callable(read_meta):
        meta = read_meta(case)
        if meta is not None:
            return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(getattr(store, "root", ""))
    h = hashlib.sha256()
    if root.is_dir():
        for p in sorted(list(root.glob(f"{case}*")) + list(root.glob(f"cases/{case}/*"))):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class _KnnBank:
    """A bank for :func:`semisam_o1.kernels.knn_vote`, on the host (``device='cpu'``) or
    moved once to the GPU as torch CUDA tensors (``device='cuda'``, the CUDA kernel)."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, *, device: str, threads):
        from . import kernels

        self.kernels = kernels
        self.device = device
        self.threads = threads
        self.n = int(bank.shape[0])
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        if device == "cuda":
            if not kernels.cuda_available():
                raise InputError("--device cuda: the CUDA kernels are not built or no CUDA device is usable")
            import torch

            self.bank = torch.from_numpy(np.ascontiguousarray(bank)).cuda()
            self.labels = torch.from_numpy(labels).cuda()
        else:
            self.bank = np.ascontiguousarray(bank)
            self.labels = labels

    def vote(self, queries: np.ndarray, k: int, return_topk: bool = False, label_weights=None):
        """knn_vote of host ``queries`` against the bank (optional per-label vote
        weights, see :func:`semisam_o1.kernels.knn_vote`); NumPy results."""
        k = min(int(k), self.n)
        if self.device == "cuda":
            import torch

            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).cuda()
            out = self.kernels.knn_vote(q, self.bank, self.labels, k, return_topk=return_topk,
                                        label_weights=label_weights)
            torch.cuda.synchronize()
            return tuple(o.cpu().numpy() for o in out)
        out = self.kernels.knn_vote(queries, self.bank, self.labels, k, threads=self.threads,
                                    return_topk=return_topk, label_weights=label_weights)
        return tuple(np.asarray(o) for o in out)


def _progress(iterable, quiet: bool, desc: str, total: int | None = None):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)


class _Inputs:
    """Paths of every input, checked before anything is written."""

    def __init__(self, dataset, features, pred, output, template, cases, split, subset, need_template_label=True):
        from .io import Dataset, find_case_file, load_split
        from .store import FeatureStore

        self.dataset = Dataset(dataset)
        self.pred = Path(pred)
        self.output = Path(output)
        if not self.pred.is_dir():
            raise InputError(f"{self.pred}: predictions folder not found")
        sp = load_split(split) if split is not None else None
        if template is None:
            if sp is None or "template" not in sp:
                raise InputError("--template is needed (or a --split file with a 'template' entry)")
            template = sp["template"]
        self.template = str(template)
        self.dataset.image_path(self.template)
        self.template_label_path = self.dataset.label_path(self.template)
        if cases:
            chosen = self.dataset.select(cases=cases)
        elif sp is not None:
            chosen = self.dataset.select(split=sp, subset=subset)
        else:
            raise InputError("give the cases to refine: --cases, or --split with --subset")
        self.cases = [c for c in chosen if c != self.template]
        if not self.cases:
            raise InputError("no case to refine (the template keeps its real label and is not refined)")
        self.label_paths = {c: find_case_file(self.pred, c, what="predicted label") for c in self.cases}
        self.entropy_paths = {c: find_case_file(self.pred, f"{c}_entropy", what=f"entropy map of case {c}")
                              for c in self.cases}
        feat_root = Path(features)
        if not feat_root.is_dir():
            raise InputError(f"{feat_root}: feature store not found")
        self.store = FeatureStore(feat_root)
        for c in [self.template] + self.cases:
            if not self.store.has(c):
                raise InputError(f"{feat_root}: no features for case {c} (run `semisam-o1 encode` on it)")
        if self.output.resolve() == self.pred.resolve():
            raise InputError(f"{self.output}: the output folder must differ from the predictions folder")

    def read_case(self, case: str):
        """(image Volume, predicted class indices uint8 (X,Y,Z), entropy float32 (X,Y,Z)), grids checked."""
        from .io import check_same_grid, read_image, read_label

        image = self.dataset.read_image(case)
        label = read_label(self.label_paths[case], self.dataset.label_map, reference=image)
        ent = read_image(self.entropy_paths[case])
        check_same_grid(ent, image)
        e = ent.array
        if e.min(initial=0.0) < 0:
            raise InputError(f"{ent.path}: negative entropy {float(e.min()):g}")
        return image, label.array, e

    def case_entry(self, case: str, shape):
        """The store's entry of ``case`` (signature checked by the store), voxel grid checked."""
        cf = self.store.load(case)
        if tuple(cf.voxel_shape) != tuple(shape):
            raise InputError(f"features of case {case}: voxel grid {tuple(cf.voxel_shape)} differs from its "
                             f"image {tuple(shape)} (re-encode it)")
        return cf

    def case_features(self, case: str, shape) -> np.ndarray:
        """(C, X, Y, Z) float32 voxel-grid features of ``case``, grid checked."""
        return self.case_entry(case, shape).on_voxel_grid()


# --------------------------------------------------------------------------- main function


def refine(
    dataset: str | Path,
    features: str | Path,
    pred: str | Path,
    output: str | Path,
    *,
    template: str | None = None,
    cases: Sequence[str] | None = None,
    split: str | Path | None = None,
    subset: str = "unlabeled",
    k: int = 5,
    quantile: float = 0.9,
    mode: str = "voxel",
    bank_size: int = DEFAULT_BANK_SIZE,
    project_dim: int = DEFAULT_PROJECT_DIM,
    position_weight: float = DEFAULT_POSITION_WEIGHT,
    class_weights: str = DEFAULT_CLASS_WEIGHTS,
    class_planes=None,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Refine the predicted labels in ``pred`` into ``output`` (see the module docstring).

    Parameters are those of ``semisam-o1 refine``. ``class_planes``: path of a rule
    written by ``propagate`` (``class_planes.json``) or a
    :class:`semisam_o1.class_planes.ClassPlanes`; each refined label's foreground is
    re-split by :func:`semisam_o1.class_planes.apply` before it is written (and
    counted in the changed voxels). Returns the dict written to ``output/refine.json``.

    Raises
    ------
    InputError
        Unknown cases or template, a missing predicted label, entropy map or
        feature entry, grids that differ, bad parameters. Every input is
        checked (and the threshold and bank are built) before any output is
        written.
    """
    if mode not in ("voxel", "volume"):
        raise InputError(f"--mode {mode!r}: choose voxel or volume")
    if k < 1:
        raise InputError(f"--k {k}: must be at least 1")
    if not 0.0 <= quantile <= 1.0:
        raise InputError(f"--quantile {quantile}: must lie in [0, 1]")
    if bank_size < 1:
        raise InputError(f"--bank-size {bank_size}: must be at least 1")
    if project_dim < 0:
        raise InputError(f"--project-dim {project_dim}: must be 0 (off) or positive")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda":
        from . import kernels

        if not kernels.cuda_available():
            raise InputError("--device cuda: the CUDA kernels are not built or no CUDA device is usable")
    from . import class_planes as planes

    rule = planes.read(class_planes) if isinstance(class_planes, (str, Path)) else class_planes
    inputs = _Inputs(dataset, features, pred, output, template, cases, split, subset)
    params = dict(mode=mode, k=int(k), quantile=float(quantile), template=inputs.template, seed=int(seed))
    if rule is not None:
        params["class_planes"] = rule.to_json()  # absent without a rule: old signatures stay valid
    if mode == "voxel":
        if position_weight < 0:
            raise InputError(f"--position-weight {position_weight}: must be >= 0")
        params.update(bank_size=int(bank_size), project_dim=int(project_dim))
        if position_weight:
            params["position_weight"] = float(position_weight)  # absent when 0: old signatures stay valid
        if class_weights not in ("prior", "balanced"):
            raise InputError(f"--class-weights {class_weights!r}: choose prior or balanced")
        params["class_weights"] = class_weights
        return _refine_voxel(inputs, params, device=device, threads=threads, quiet=quiet)
    return _refine_volume(inputs, params, device=device, threads=threads, quiet=quiet)


def _load_previous(output: Path, signature: str) -> dict:
    """Per-case entries of a previous run with the same signature whose label file exists."""
    path = output / "refine.json"
    if not path.is_file():
        return {}
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if prev.get("signature") != signature:
        return {}
    return {c: v for c, v in prev.get("cases", {}).items() if (output / f"{c}.nii.gz").is_file()}


def _apply_planes(label: np.ndarray, params: dict) -> np.ndarray:
    """``label`` re-split by the class-planes rule recorded in ``params`` (see :mod:`semisam_o1.class_planes`);
    ``label`` itself when ``params`` has no rule."""
    if "class_planes" not in params:
        return label
    from . import class_planes as planes

    return planes.apply(label, planes.ClassPlanes.from_json(params["class_planes"]))


def _change_stats(before: np.ndarray, after: np.ndarray, names: Sequence[str]) -> dict:
    changed = before != after
    n_cls = len(names)
    frm = np.bincount(before[changed].ravel(), minlength=n_cls)
    to = np.bincount(after[changed].ravel(), minlength=n_cls)
    return {
        "changed": int(changed.sum()),
        "changed_from": {names[c]: int(frm[c]) for c in range(n_cls)},
        "changed_to": {names[c]: int(to[c]) for c in range(n_cls)},
    }


def _finish(inputs: _Inputs, info: dict, quiet: bool) -> dict:
    from .io import write_json

    names = inputs.dataset.label_map.names
    info["voxels_changed_total"] = int(sum(v["changed"] for v in info["cases"].values()))
    info["voxels_changed_per_class"] = {
        "from": {n: int(sum(v["changed_from"][n] for v in info["cases"].values())) for n in names},
        "to": {n: int(sum(v["changed_to"][n] for v in info["cases"].values())) for n in names},
    }
    write_json(inputs.output / "refine.json", info)
    return info


# --------------------------------------------------------------------------- voxel mode


def _refine_voxel(inputs: _Inputs, params: dict, *, device: str, threads, quiet: bool) -> dict:
    from .io import write_json, write_label

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    label_map = inputs.dataset.label_map
    names = label_map.names
    n_cls = label_map.num_classes
    cases = inputs.cases

    # pass 1: the cohort-wide entropy threshold (entropy values only; labels and grids checked)
    t0 = time.perf_counter()
    values = []
    digests = {}
    for case in _progress(cases, quiet, "refine: entropy"):
        _, _, ent = inputs.read_case(case)
        values.append(ent.ravel())
        digests[case] = [_file_digest(inputs.label_paths[case]), _file_digest(inputs.entropy_paths[case]),
                         _store_digest(inputs.store, case)]
    all_values = np.concatenate(values)
    del values
    threshold = float(np.quantile(all_values, params["quantile"]))
    n_voxels = int(all_values.size)
    del all_values
    timings["threshold_s"] = time.perf_counter() - t0

    # pass 2a: the bank plan (confident candidates per class per case; the template's real label)
    t0 = time.perf_counter()
    from .io import read_label

    t_image = inputs.dataset.read_image(inputs.template)
    t_label = read_label(inputs.template_label_path, label_map, reference=t_image).array
    sources = [inputs.template] + cases
    counts = np.zeros((len(sources), n_cls), np.int64)
    counts[0] = np.bincount(t_label.ravel(), minlength=n_cls)[:n_cls]
    query_counts = {}
    for i, case in enumerate(_progress(cases, quiet, "refine: bank plan"), start=1):
        _, lab, ent = inputs.read_case(case)
        conf = ~query_mask(ent, threshold)
        counts[i] = np.bincount(lab[conf].ravel(), minlength=n_cls)[:n_cls]
        query_counts[case] = int((~conf).sum())
    available = counts.sum(axis=0)
    quotas = class_quotas(available, params["bank_size"])
    rng = np.random.default_rng(params["seed"])
    offsets = np.concatenate([np.zeros((1, n_cls), np.int64), np.cumsum(counts, axis=0)])
    picks: list[list[np.ndarray]] = [[None] * n_cls for _ in sources]  # type: ignore[list-item]
    for c in range(n_cls):
        chosen = np.sort(rng.choice(int(available[c]), size=int(quotas[c]), replace=False)) if quotas[c] else \
            np.zeros(0, np.int64)
        bounds = np.searchsorted(chosen, offsets[:, c])
        for i in range(len(sources)):
            picks[i][c] = chosen[bounds[i]:bounds[i + 1]] - offsets[i, c]
    bank_hash = hashlib.sha256()
    for i in range(len(sources)):
        for c in range(n_cls):
            bank_hash.update(np.ascontiguousarray(picks[i][c], dtype=np.int64).tobytes())
    sig_obj = dict(params, schema=SCHEMA, cases=cases, threshold=repr(threshold), inputs=digests,
                   template_label=_file_digest(inputs.template_label_path),
                   template_features=_store_digest(inputs.store, inputs.template), bank=bank_hash.hexdigest())
    signature = hashlib.sha256(json.dumps(sig_obj, sort_keys=True).encode()).hexdigest()
    timings["bank_plan_s"] = time.perf_counter() - t0

    done = _load_previous(inputs.output, signature)
    todo = [c for c in cases if c not in done]
    bank_info = {
        "size": int(sum(quotas)),
        "per_class": {names[c]: int(quotas[c]) for c in range(n_cls)},
        "from_template": {names[c]: int(len(picks[0][c])) for c in range(n_cls)},
        "candidates": {names[c]: int(available[c]) for c in range(n_cls)},
        "cases_contributing": int(sum(1 for i in range(1, len(sources)) if any(len(p) for p in picks[i]))),
    }
    info = {
        "schema": SCHEMA,
        "mode": "voxel",
        "params": dict(params, device=device, threads=threads),
        "signature": signature,
        "threshold": threshold,
        "threshold_units": "nats (voxel-wise softmax entropy)",
        "voxels_in_cohort": n_voxels,
        "queries_total": int(sum(query_counts.values())),
        "bank": bank_info,
        "cases": dict(done),
        "resumed_cases": len(done),
        "complete": False,
    }
    if not todo:
        info["complete"] = True
        info["timings"] = dict(timings, total_s=time.perf_counter() - t_start)
        return _finish(inputs, info, quiet)

    # pass 2b: the bank's features, case by case
    t0 = time.perf_counter()
    n_bank = int(sum(quotas))
    bank = None
    bank_labels = np.empty(n_bank, np.int32)
    pos_w = float(params.get("position_weight", 0.0))
    bank_pos = np.empty((n_bank, 3), np.float32) if pos_w else None
    pos = 0
    for i, case in enumerate(_progress(sources, quiet, "refine: bank features")):
        if i == 0:
            lab, conf, shape = t_label, np.ones(t_label.shape, bool), t_label.shape
        else:
            _, lab, ent = inputs.read_case(case)
            conf, shape = ~query_mask(ent, threshold), lab.shape
        n_here = sum(len(p) for p in picks[i])
        if n_here == 0:
            inputs.case_entry(case, shape)  # still validate the entry before writing anything
            continue
        feats = inputs.case_features(case, shape)
        flat = feats.reshape(feats.shape[0], -1)
        if bank is None:
            bank = np.empty((n_bank, flat.shape[0]), np.float16)
        lab_flat = lab.ravel()
        conf_flat = conf.ravel()
        for c in range(n_cls):
            if len(picks[i][c]) == 0:
                continue
            where = np.flatnonzero(conf_flat & (lab_flat == c))[picks[i][c]]
            bank[pos:pos + len(where)] = flat[:, where].T
            bank_labels[pos:pos + len(where)] = c
            if pos_w:
                bank_pos[pos:pos + len(where)] = _positions(where, shape)
            pos += len(where)
        del feats, flat
    assert pos == n_bank
    timings["bank_features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    projection = None
    dim_in = int(bank.shape[1])
    if params["project_dim"] and params["project_dim"] < dim_in:
        fit_rows = np.arange(n_bank)
        if n_bank > PCA_FIT_ROWS:  # the second moments of 192-768 dims are settled long before 65,536 rows
            fit_rows = np.sort(np.random.default_rng(params["seed"] + 1).choice(n_bank, PCA_FIT_ROWS, replace=False))
        mean, comps, explained = fit_projection(bank[fit_rows], params["project_dim"])
        projection = (mean, comps)
        bank_k = np.empty((n_bank, comps.shape[1]), np.float32)
        for s in range(0, n_bank, 65536):
            bank_k[s:s + 65536] = _project(bank[s:s + 65536], projection)
        bank = bank_k
        bank_info["projection"] = {"kind": "uncentred-pca", "dim_in": dim_in, "dim": int(comps.shape[1]),
                                   "energy_kept": explained, "fit_rows": int(len(fit_rows))}
    else:
        bank_info["projection"] = {"kind": "none", "dim_in": dim_in, "dim": dim_in}
    if pos_w:
        from .propagate import augment_with_position

        bank = augment_with_position(np.asarray(bank, np.float32), bank_pos, pos_w, "bank")
        bank_info["position_weight"] = pos_w
    knn_bank = _KnnBank(bank, bank_labels, device=device, threads=threads)
    del bank
    vote_w = None
    if params.get("class_weights", "balanced") == "prior":
        # undo the class-balanced sampling: a bank entry of class c stands for
        # available[c] / quota[c] confident voxels, so the vote estimates the class
        # posterior among the cohort's confident voxels instead of favouring rare classes
        q_arr = np.asarray(quotas, np.float64)
        vote_w = np.where(q_arr > 0, available / np.maximum(q_arr, 1), 0.0)
        vote_w = (vote_w / vote_w[q_arr > 0].min()).astype(np.float32)
        bank_info["vote_weight_per_class"] = {names[c]: float(vote_w[c]) for c in range(n_cls)}
    timings["projection_s"] = time.perf_counter() - t0
    k_eff = min(params["k"], n_bank)

    # pass 3: queries, case by case
    t0 = time.perf_counter()
    knn_s = 0.0
    inputs.output.mkdir(parents=True, exist_ok=True)
    for case in _progress(todo, quiet, "refine: vote"):
        tc = time.perf_counter()
        image, lab, ent = inputs.read_case(case)
        qmask = query_mask(ent, threshold)
        new = lab.copy()
        n_q = int(qmask.sum())
        if n_q:
            feats = inputs.case_features(case, lab.shape)
            q = feats.reshape(feats.shape[0], -1)[:, np.flatnonzero(qmask.ravel())].T
            del feats
            q = np.ascontiguousarray(_project(q, projection), dtype=np.float32)
            if pos_w:
                from .propagate import augment_with_position

                q = augment_with_position(q, _positions(np.flatnonzero(qmask.ravel()), lab.shape), pos_w, "query")
            tk = time.perf_counter()
            voted, share = knn_bank.vote(q, k_eff, label_weights=vote_w)
            knn_s += time.perf_counter() - tk
            voted = np.asarray(voted)
            keep = np.asarray(share) <= 0  # every neighbour dissimilar: no evidence, keep the label
            voted = np.where(keep, lab[qmask], voted).astype(np.uint8)
            new[qmask] = voted
        new = _apply_planes(new, params)
        write_label(inputs.output / f"{case}.nii.gz", new, image, label_map)
        entry = {"queries": n_q, **_change_stats(lab, new, names), "seconds": round(time.perf_counter() - tc, 4)}
        info["cases"][case] = entry
        write_json(inputs.output / "refine.json", info)  # progress, so a killed run resumes
    timings["vote_s"] = time.perf_counter() - t0
    timings["knn_kernel_s"] = knn_s
    timings["total_s"] = time.perf_counter() - t_start
    info["cases"] = {c: info["cases"][c] for c in cases}
    info["complete"] = True
    info["timings"] = timings
    return _finish(inputs, info, quiet)


# --------------------------------------------------------------------------- volume mode


def _refine_volume(inputs: _Inputs, params: dict, *, device: str, threads, quiet: bool) -> dict:
    from .io import read_label, write_json, write_label

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    label_map = inputs.dataset.label_map
    names = label_map.names
    n_cls = label_map.num_classes
    cases = inputs.cases

    # pass 1: mean entropy per case, and each case's mean-pooled descriptor
    t0 = time.perf_counter()
    means = {}
    digests = {}
    desc = {}
    for case in _progress(cases, quiet, "refine: volumes"):
        _, lab, ent = inputs.read_case(case)
        means[case] = float(ent.astype(np.float64).mean())
        digests[case] = [_file_digest(inputs.label_paths[case]), _file_digest(inputs.entropy_paths[case]),
                         _store_digest(inputs.store, case)]
        feats = inputs.case_features(case, lab.shape)
        desc[case] = feats.reshape(feats.shape[0], -1).astype(np.float64).mean(axis=1).astype(np.float32)
        del feats
    t_image = inputs.dataset.read_image(inputs.template)
    t_label = read_label(inputs.template_label_path, label_map, reference=t_image).array
    feats = inputs.case_features(inputs.template, t_label.shape)
    desc[inputs.template] = feats.reshape(feats.shape[0], -1).astype(np.float64).mean(axis=1).astype(np.float32)
    del feats
    threshold = float(np.quantile(np.array([means[c] for c in cases]), params["quantile"]))
    uncertain = [c for c in cases if means[c] >= threshold]
    confident = [inputs.template] + [c for c in cases if means[c] < threshold]
    timings["describe_s"] = time.perf_counter() - t0

    sig_obj = dict(params, schema=SCHEMA, cases=cases, threshold=repr(threshold), inputs=digests,
                   template_label=_file_digest(inputs.template_label_path),
                   template_features=_store_digest(inputs.store, inputs.template))
    signature = hashlib.sha256(json.dumps(sig_obj, sort_keys=True).encode()).hexdigest()
    done = _load_previous(inputs.output, signature)

    # neighbours of the uncertain volumes among the confident ones (the kNN kernel, labels = bank index)
    t0 = time.perf_counter()
    neighbours: dict[str, list[tuple[str, float]]] = {}
    if uncertain and confident:
        q = np.stack([desc[c] for c in uncertain])
        b = np.stack([desc[c] for c in confident])
        k_eff = min(params["k"], len(confident))
        knn_bank = _KnnBank(b, np.arange(len(confident), dtype=np.int32), device=device, threads=threads)
        _, _, idx, sim = knn_bank.vote(q, k_eff, return_topk=True)
        for qi, case in enumerate(uncertain):
            neighbours[case] = [(confident[int(j)], float(s)) for j, s in zip(idx[qi], sim[qi])]
    timings["neighbours_s"] = time.perf_counter() - t0

    info = {
        "schema": SCHEMA,
        "mode": "volume",
        "params": dict(params, device=device, threads=threads),
        "signature": signature,
        "threshold": threshold,
        "threshold_units": "nats (mean voxel-wise softmax entropy of a volume)",
        "mean_entropy": means,
        "uncertain_cases": uncertain,
        "confident_cases": confident,
        "neighbours": {c: [{"case": n, "similarity": s} for n, s in v] for c, v in neighbours.items()},
        "resize": "nearest neighbour in index space, centre-aligned: src = min(floor((i + 0.5) * n_src / n_dst), n_src - 1)",
        "cases": dict(done),
        "resumed_cases": len(done),
        "complete": False,
    }

    t0 = time.perf_counter()
    inputs.output.mkdir(parents=True, exist_ok=True)
    label_cache: dict[str, np.ndarray] = {inputs.template: t_label}

    def neighbour_label(case: str) -> np.ndarray:
        if case not in label_cache:
            label_cache[case] = inputs.read_case(case)[1]
        return label_cache[case]

    for case in _progress([c for c in cases if c not in done], quiet, "refine: vote"):
        tc = time.perf_counter()
        image, lab, _ = inputs.read_case(case)
        new = lab
        if case in neighbours:
            new = volume_vote(lab, [(neighbour_label(n), s) for n, s in neighbours[case]], n_cls)
        new = _apply_planes(new, params)
        write_label(inputs.output / f"{case}.nii.gz", new, image, label_map)
        entry = {"uncertain": case in neighbours, "mean_entropy": means[case],
                 **_change_stats(lab, new, names), "seconds": round(time.perf_counter() - tc, 4)}
        info["cases"][case] = entry
        write_json(inputs.output / "refine.json", info)
    timings["vote_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    info["cases"] = {c: info["cases"][c] for c in cases}
    info["complete"] = True
    info["timings"] = timings
    return _finish(inputs, info, quiet)


def volume_vote(own: np.ndarray, neighbours: Sequence[tuple[np.ndarray, float]], n_classes: int) -> np.ndarray:
    """Per-voxel weighted vote of neighbour label maps on ``own``'s grid.

    ``neighbours``: (label map (any 3D shape) of class indices, similarity).
    Each map is resized with :func:`resize_nearest`; weights are
    ``max(similarity, 0)``; each voxel takes the class with the largest sum of
    weights (ties: lowest index). If every weight is 0, ``own`` is returned.
    Returns uint8 (X, Y, Z).
    """
    votes = np.zeros((n_classes,) + own.shape, np.float64)
    total = 0.0
    for lab, sim in neighbours:
        w = max(float(sim), 0.0)
        if w == 0.0:
            continue
        r = resize_nearest(lab, own.shape)
        for c in range(n_classes):
            votes[c] += w * (r == c)
        total += w
    if total == 0.0:
        return own.copy()
    return votes.argmax(axis=0).astype(np.uint8)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main as cli_main

    sys.exit(cli_main(["refine"] + sys.argv[1:]))
