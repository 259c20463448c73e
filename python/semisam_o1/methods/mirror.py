"""Which mirror flips keep the template's classes apart: the flip axes of training augmentation.

A flip along an axis is a safe augmentation only when the mirrored anatomy still carries the same
class names. Two kinds of label break it: sub-regions that follow each other along the axis (MSD
Hippocampus' Anterior | Posterior along the posterior-anterior axis) and left / right pairs
(OpenKBP's right and left parotid along the left-right axis; a right kidney and a left kidney).
Mirrored, each such class lands where the other one is, and a network trained with that flip sees
the same image context under both names.

:func:`swapped_classes` tests this on the template's label: the label is mirrored about the centre
of its foreground's extent along the axis, and a class counts as swapped when its mirrored centroid
(in mm) is nearer another class's centroid than its own. A class on the mirror plane (the brainstem,
the spinal cord, a mandible across the midline) stays nearest itself; one class alone never swaps.
Only the template's label is read.
"""

from __future__ import annotations

import numpy as np


def class_centroids(label: np.ndarray, spacing) -> dict[int, np.ndarray]:
    """Centroid of every foreground class present, in mm from the array's first voxel.

    Args:
        label: (X, Y, Z) or (X, Y) integer class indices.
        spacing: voxel size in mm per axis (len == label.ndim).

    Returns:
        {class index: (ndim,) float64 centroid in mm}.
    """
    lab = np.asarray(label)
    sp = np.asarray(spacing, dtype=np.float64)
    out = {}
    for c in np.unique(lab):
        if c == 0:
            continue
        out[int(c)] = np.argwhere(lab == c).mean(axis=0) * sp
    return out


def swapped_classes(label: np.ndarray, axis: int, spacing) -> list[tuple[int, int]]:
    """The classes a flip along ``axis`` would give another class's place.

    Args:
        label: (X, Y, Z) or (X, Y) integer class indices (the template's real label).
        axis: the flip axis, 0 <= axis < label.ndim.
        spacing: voxel size in mm per axis.

    Returns:
        Sorted ``(c, d)`` pairs: class ``c`` mirrored (about the centre of the foreground's extent
        along ``axis``) has its centroid nearer class ``d``'s centroid than its own. Empty when
        the flip keeps every class nearest itself (always so for fewer than two classes).
    """
    lab = np.asarray(label)
    cents = class_centroids(lab, spacing)
    if len(cents) < 2:
        return []
    fg = np.nonzero(np.any(lab > 0, axis=tuple(a for a in range(lab.ndim) if a != axis)))[0]
    centre_mm = 0.5 * (fg[0] + fg[-1]) * float(spacing[axis])
    pairs = []
    for c, mu in cents.items():
        mirrored = mu.copy()
        mirrored[axis] = 2.0 * centre_mm - mu[axis]
        own = np.linalg.norm(mirrored - mu)
        nearest = min((np.linalg.norm(mirrored - nu), d) for d, nu in cents.items() if d != c)
        if nearest[0] < own:
            pairs.append((c, nearest[1]))
    return sorted(pairs)
