"""Connected components of label maps (scipy.ndimage.label, 26-connectivity).

One place for the largest-component post-processing that round 0 (``propagate``) and the
networks' predictions (``predict``) share, and for the template count that the plan reads to
decide which classes it applies to (nnU-Net's "keep the largest connected component"
post-processing, Isensee et al., Nature Methods 2021, decided there on cross-validation with
labels; here from the one label there is: a class the template shows as one piece).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

#: 26-connectivity: voxels that share a face, an edge or a corner are connected
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def count(mask: np.ndarray) -> int:
    """Number of 26-connected components of a (X, Y, Z) boolean mask (0 for an empty mask)."""
    from scipy import ndimage

    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=STRUCTURE)[1])


def largest_component(labels: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """Keep the largest 26-connected component of each listed class; the class's other voxels
    become background (0). Classes not listed, and background, are left as they are.

    Args:
        labels: (X, Y, Z) integer class indices.
        classes: the class indices (>= 1) to reduce to one component.

    Returns:
        a copy of ``labels`` with the same shape and dtype (ties between equally large
        components: the one scipy numbers first).
    """
    from scipy import ndimage

    out = np.array(labels, copy=True)
    for c in classes:
        mask = labels == int(c)
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=STRUCTURE)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        out[mask & (comp != int(np.argmax(sizes)))] = 0
    return out
