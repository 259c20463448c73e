"""The template's label pasted at the centre of a case's box: no features, no registration.

This is the one-template baseline every other way of carrying the label must beat: it is what
a cohort of consistently cropped images gives for free. The run uses it to judge its
registration referee (:mod:`semisam_o1.pipeline.referee`: a warped label that agrees with the
round-0 labels no better than the pasted one has learnt nothing from the registration), and the
benchmarks report it as a baseline.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


def paste_at_centre(label: np.ndarray, shape: Sequence[int], label_spacing: Sequence[float] | None = None,
                    spacing: Sequence[float] | None = None) -> np.ndarray:
    """``label`` placed with its box centre on the centre of a box of ``shape``, in millimetres.

    Each output voxel takes the label of the nearest template voxel at the same physical offset
    from the box centre (nearest neighbour); voxels outside the template's box are background.
    With equal spacings this is the template's label cropped or zero-padded about the centre.

    Args:
        label: (X, Y, Z) integer class indices of the template, canonical voxel order.
        shape: (X, Y, Z) of the case.
        label_spacing, spacing: voxel sizes (mm) of the template and the case (default: equal).

    Returns:
        (X, Y, Z) array of ``label``'s dtype.

    Raises:
        ValueError: ``shape`` or a spacing has another number of axes than ``label``.
    """
    label = np.asarray(label)
    ndim = label.ndim
    label_spacing = np.ones(ndim) if label_spacing is None else np.asarray(label_spacing, np.float64)
    spacing = label_spacing if spacing is None else np.asarray(spacing, np.float64)
    if len(shape) != ndim or len(label_spacing) != ndim or len(spacing) != ndim:
        raise ValueError(f"shape {tuple(shape)} and spacings must have {ndim} axes like the label")
    index, inside = [], []
    for n_c, n_t, sp_c, sp_t in zip(shape, label.shape, spacing, label_spacing):
        offset_mm = (np.arange(n_c) - (n_c - 1) / 2.0) * sp_c
        i = np.rint(offset_mm / sp_t + (n_t - 1) / 2.0).astype(np.int64)
        inside.append((i >= 0) & (i < n_t))
        index.append(np.clip(i, 0, n_t - 1))
    keep = functools.reduce(np.logical_and, np.meshgrid(*inside, indexing="ij", sparse=True))
    return np.where(keep, label[np.ix_(*index)], 0).astype(label.dtype)
