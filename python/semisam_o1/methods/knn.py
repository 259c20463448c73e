"""kNN refinement primitives (SemiSAM-O1's refine step): which voxels are uncertain, class
quotas for the confident bank, the vote's prior weights, the whole-volume vote, and a kNN bank
held on the chosen device.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from semisam_o1.core import kernels
from semisam_o1.core.device import to_device, to_host
from semisam_o1.methods.template_vote import normalised_coords


def query_mask(entropy: np.ndarray, threshold: float) -> np.ndarray:
    """Voxels to relabel: entropy at or above ``threshold`` and above 0.

    Args:
        entropy: (X, Y, Z) float voxel-wise softmax entropy (nats).
        threshold: entropy threshold (nats).

    Returns:
        (X, Y, Z) bool. Every other voxel is *confident* (a voxel of zero entropy always
        is, even when the quantile is 0, as happens when most voxels have zero entropy).
    """
    return (entropy >= threshold) & (entropy > 0)


def resize_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 3D label map to ``shape`` in index space, centre-aligned.

    Target index ``i`` on an axis reads source index
    ``min(floor((i + 0.5) * n_src / n_dst), n_src - 1)`` (PyTorch's ``nearest-exact``).

    Args:
        labels: (X, Y, Z) label map, any dtype.
        shape: target (X', Y', Z').

    Returns:
        array of ``labels.dtype`` and ``shape``.
    """
    idx = []
    for n_src, n_dst in zip(labels.shape, shape):
        i = np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.int64)
        idx.append(np.minimum(i, n_src - 1))
    return labels[np.ix_(*idx)]


def class_quotas(available: Sequence[int], total: int) -> list[int]:
    """Class-balanced quotas: equal shares of ``total`` by water-filling.

    Each class gets ``min(available[c], share)`` with the share raised until the quotas
    add up to ``min(total, sum(available))``; leftovers of the integer division go to the
    classes with the most candidates left.

    Args:
        available: candidates per class.
        total: the bank size asked for.

    Returns:
        one int per class.
    """
    avail = [int(a) for a in available]
    quota = [0] * len(avail)
    remaining = min(int(total), sum(avail))
    open_classes = [c for c in range(len(avail)) if avail[c] > 0]
    while remaining > 0 and open_classes:
        share = remaining // len(open_classes)
        if share == 0:  # fewer units left than classes: one each to the largest leftovers
            open_classes.sort(key=lambda c: avail[c] - quota[c], reverse=True)
            for c in open_classes[:remaining]:
                quota[c] += 1
            break
        for c in list(open_classes):
            take = min(share, avail[c] - quota[c])
            quota[c] += take
            remaining -= take
        open_classes = [c for c in open_classes if quota[c] < avail[c]]
    return quota


def prior_vote_weights(available: Sequence[int], quotas: Sequence[int]) -> np.ndarray:
    """Per-class vote weights that undo a class-balanced sample.

    A bank entry of class c stands for ``available[c] / quotas[c]`` confident voxels, so
    weighting its vote by that ratio makes the vote estimate the class posterior among
    the cohort's confident voxels instead of favouring rare classes.

    Args:
        available: (n_classes,) candidates per class in the cohort.
        quotas: (n_classes,) entries per class in the bank (at least one positive).

    Returns:
        (n_classes,) float32, scaled so that the smallest weight of a class in the bank is 1;
        0 for classes absent from the bank.
    """
    q = np.asarray(quotas, np.float64)
    w = np.where(q > 0, np.asarray(available, np.float64) / np.maximum(q, 1), 0.0)
    return (w / w[q > 0].min()).astype(np.float32)


def flat_positions(flat_index: np.ndarray, shape) -> np.ndarray:
    """(n, 3) float32 normalised positions p = (2 i + 1) / n - 1 per axis of flat voxel indices
    (:func:`semisam_o1.methods.template_vote.normalised_coords`, mode ``extent``)."""

    coords = normalised_coords(shape, mode="extent")
    idx = np.unravel_index(np.asarray(flat_index), tuple(shape))
    return np.stack([coords[d][idx[d]] for d in range(3)], axis=1).astype(np.float32)


def project(x: np.ndarray, projection) -> np.ndarray:
    """``(x - mean) @ basis`` in float32 for a projection ``(mean, basis)``; ``x`` when None."""
    if projection is None:
        return x
    mean, basis = projection
    return (x.astype(np.float32, copy=False) - mean) @ basis


def volume_vote(own: np.ndarray, neighbours: Sequence[tuple[np.ndarray, float]], n_classes: int) -> np.ndarray:
    """Per-voxel weighted vote of neighbour label maps on ``own``'s grid.

    Each map is resized with :func:`resize_nearest`; weights are ``max(similarity, 0)``;
    each voxel takes the class with the largest sum of weights (ties: lowest index).

    Args:
        own: (X, Y, Z) class indices of the case.
        neighbours: (label map (any 3D shape) of class indices, cosine similarity) pairs.
        n_classes: number of classes (background included).

    Returns:
        (X, Y, Z) uint8; ``own`` (a copy) when every weight is 0.
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


def change_stats(before: np.ndarray, after: np.ndarray, names: Sequence[str]) -> dict:
    """Voxels changed between two label maps, in total and per class they left / joined."""
    changed = before != after
    n_cls = len(names)
    frm = np.bincount(before[changed].ravel(), minlength=n_cls)
    to = np.bincount(after[changed].ravel(), minlength=n_cls)
    return {"changed": int(changed.sum()),
            "changed_from": {names[c]: int(frm[c]) for c in range(n_cls)},
            "changed_to": {names[c]: int(to[c]) for c in range(n_cls)}}


class KnnBank:
    """A kNN bank on the chosen device: moved there once (:func:`semisam_o1.core.device.to_device`);
    :func:`semisam_o1.core.kernels.knn_vote` dispatches on where the arrays are."""

    def __init__(self, bank: np.ndarray, labels: np.ndarray, *, device: str, threads: int | None):
        self.device, self.threads, self.n = device, threads, int(bank.shape[0])
        self.bank = to_device(bank, device)
        self.labels = to_device(np.asarray(labels, dtype=np.int32), device)

    def vote(self, queries: np.ndarray, k: int, *, return_topk: bool = False, label_weights=None) -> tuple:
        """:func:`semisam_o1.core.kernels.knn_vote` of host ``queries`` (Q, C) against the bank;
        the results as NumPy arrays (labels (Q,) int32, share (Q,) float32[, topk index, sim])."""

        out = kernels.knn_vote(to_device(queries, self.device), self.bank, self.labels, min(int(k), self.n),
                               threads=self.threads, return_topk=return_topk, label_weights=label_weights)
        return tuple(to_host(o) for o in out)

