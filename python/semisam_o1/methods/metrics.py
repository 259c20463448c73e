"""Mask primitives shared by every stage: one Dice, one empty-mask rule, one extent.

The rule (the field's convention, also :mod:`semisam_o1.stages.evaluate`'s): a class
absent from both volumes has Dice 1 (they agree); a class present in exactly one
has Dice 0. Dice = 2|A & B| / (|A| + |B|) (Dice, Ecology 1945).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty.

    Raises:
        ValueError: shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / denom if denom else 1.0


def dice_per_class(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> list[float]:
    """:func:`dice` of ``a == c`` and ``b == c`` for each class index ``c``.

    Args:
        a, b: (X, Y, Z) integer class-index arrays of the same shape.
        classes: class indices.

    Returns:
        one float in [0, 1] per class.

    Raises:
        ValueError: shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"label shapes differ: {a.shape} vs {b.shape}")
    return [dice(a == c, b == c) for c in classes]


def mean_dice(a: np.ndarray, b: np.ndarray, classes: Sequence[int]) -> float:
    """Mean over ``classes`` (foreground class indices, at least one) of :func:`dice_per_class`.

    Raises:
        ValueError: shapes differ, or ``classes`` is empty.
    """
    if not len(classes):
        raise ValueError("classes: need at least one foreground class")
    return float(np.mean(dice_per_class(a, b, classes)))


def mask_extent(mask: np.ndarray) -> list[int]:
    """The extent, in voxels per axis, of the bounding box of a non-empty boolean mask
    (``max - min + 1`` of its voxel indices along each axis)."""
    return [int(i.max() - i.min() + 1) for i in np.nonzero(mask)]
