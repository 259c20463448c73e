"""Class planes: a shape prior learned from the one template's label.

Some structures are divided into sub-regions that follow each other along one
anatomical axis, separated by planes across it: MSD Hippocampus's Anterior
(head) and Posterior (body and tail) meet at a coronal plane, so that the best
single plane across the posterior-anterior axis misassigns almost none of the
foreground voxels of the real labels (docs/experiments.md, "Class planes";
``benchmarks/bench_class_planes.py``). Label transfer and a UNet trained on
transferred labels do not know this: their Anterior/Posterior boundary is
ragged.

:func:`learn` checks the template's label for that property: for each canonical
axis it finds the monotone assignment of slices to foreground classes (classes
ordered by their mean coordinate along the axis) that agrees with the most
foreground voxels; if the best axis misassigns at most ``tolerance`` of the
template's foreground, the rule :class:`ClassPlanes` (axis, class order) holds
for the template and is assumed for the cohort. :func:`apply` then gives a
label map the same structure: the foreground (whatever the label or network
says is foreground) is kept, and its voxels are re-assigned to classes by
slices along the axis, choosing the monotone slice-to-class assignment that
agrees best with the given classes (on MSD Hippocampus this did better than
maximising the summed softmax probabilities: docs/experiments.md, "Class
planes"). Background is never changed.

Only the template's label is read. The slice assignment is an exact dynamic
programme over the slices (O(slices x classes)).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import write_json

#: file name of the learned rule (written by ``propagate`` next to the pseudo-labels)
CLASS_PLANES_JSON = "class_planes.json"
#: default largest fraction of the template's foreground the planes may misassign
DEFAULT_TOLERANCE = 0.01
AXIS_NAMES = ("left-right", "posterior-anterior", "inferior-superior")  # canonical RAS axes


@dataclass(frozen=True)
class ClassPlanes:
    """Foreground classes stacked along one canonical axis.

    axis : 0, 1 or 2, a canonical (RAS+) voxel axis.
    order : foreground class indices from low to high coordinate along ``axis``.
    template_error : fraction of the template's foreground voxels the best planes misassign.
    tolerance : the largest ``template_error`` that was accepted.
    """

    axis: int
    order: tuple[int, ...]
    template_error: float
    tolerance: float

    def to_json(self, class_names: Sequence[str] | None = None) -> dict:
        d = asdict(self)
        d["order"] = list(self.order)
        d["axis_name"] = AXIS_NAMES[self.axis]
        if class_names is not None:
            d["order_names"] = [class_names[c] for c in self.order]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClassPlanes":
        """The rule of a :meth:`to_json` dict. Raises KeyError, TypeError or ValueError if it is not one."""
        return cls(int(d["axis"]), tuple(int(c) for c in d["order"]), float(d["template_error"]),
                   float(d["tolerance"]))

    def describe(self, class_names: Sequence[str] | None = None) -> str:
        names = [class_names[c] if class_names else str(c) for c in self.order]
        return (f"classes {' | '.join(names)} follow each other along the {AXIS_NAMES[self.axis]} axis "
                f"(the template's planes misassign {100 * self.template_error:.2f}% of its foreground)")


def _slice_counts(label: np.ndarray, axis: int, classes: Sequence[int]) -> np.ndarray:
    """(n_slices, len(classes)) float64: per slice along ``axis``, the voxels of each class."""
    other = tuple(a for a in range(3) if a != axis)
    return np.stack([(label == c).sum(axis=other, dtype=np.float64) for c in classes], 1)


def _monotone_assignment(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-decreasing assignment a[0] <= a[1] <= ... of slices to columns maximising
    sum_i weights[i, a[i]] (exact dynamic programme). Returns (a, best total)."""
    n, m = weights.shape
    best = np.empty((n, m))
    arg = np.zeros((n, m), dtype=np.int64)  # best previous column for (slice i, column j)
    best[0] = weights[0]
    for i in range(1, n):
        run_arg = np.zeros(m, dtype=np.int64)  # column of the best of best[i - 1, :j + 1]
        for j in range(1, m):
            run_arg[j] = run_arg[j - 1] if best[i - 1, run_arg[j - 1]] >= best[i - 1, j] else j
        best[i] = weights[i] + best[i - 1, run_arg]
        arg[i] = run_arg
    a = np.empty(n, dtype=np.int64)
    a[-1] = int(np.argmax(best[-1]))
    for i in range(n - 1, 0, -1):
        a[i - 1] = arg[i, a[i]]
    return a, float(best[-1, a[-1]])


def learn(label: np.ndarray, num_classes: int, tolerance: float = DEFAULT_TOLERANCE) -> tuple[ClassPlanes | None, list]:
    """Check whether the template's foreground classes are separated by planes across one axis.

    Args:
        label: (X, Y, Z) integer class indices in canonical (RAS+) order, the template's real label.
        num_classes: K, background included.
        tolerance: largest accepted fraction of misassigned foreground voxels, in [0, 1).

    Returns:
        ``(rule, errors)``: ``rule`` is a :class:`ClassPlanes` for the best axis when its error is at
        most ``tolerance`` and at least two foreground classes are present, else None; ``errors``
        lists the misassigned fraction of the foreground for each axis (None each when fewer than
        two classes are present).

    Raises:
        InputError: a tolerance outside [0, 1), or a label without foreground.
    """
    if not (0.0 <= float(tolerance) < 1.0):
        raise InputError(f"class planes: tolerance {tolerance} must be in [0, 1)")
    lab = np.asarray(label)
    fg = lab > 0
    n_fg = int(fg.sum())
    if n_fg == 0:
        raise InputError("class planes: the template label has no foreground voxel")
    present = [c for c in range(1, num_classes) if np.any(lab == c)]
    if len(present) < 2:
        return None, [None, None, None]
    errors, rules = [], []
    for axis in range(3):
        counts = _slice_counts(lab, axis, present)
        mean_slice = (np.arange(len(counts))[:, None] * counts).sum(0) / counts.sum(0)
        by_mean = np.argsort(mean_slice, kind="stable")  # classes ordered by their mean coordinate
        order = [present[j] for j in by_mean]
        _, agree = _monotone_assignment(counts[:, by_mean])
        errors.append(1.0 - agree / n_fg)
        rules.append(ClassPlanes(axis, tuple(order), errors[-1], float(tolerance)))
    best = int(np.argmin(errors))
    return (rules[best] if errors[best] <= tolerance else None), errors


def apply(label: np.ndarray, rule: ClassPlanes) -> np.ndarray:
    """Re-assign the foreground of ``label`` to the rule's classes by slices along its axis.

    Args:
        label: (X, Y, Z) integer class indices, canonical order (a pseudo-label or a prediction).
        rule: from :func:`learn` (or :func:`read`).

    Returns:
        (X, Y, Z) array of ``label``'s dtype: background as in ``label``; every foreground voxel of
        slice i takes the class assigned to slice i by the monotone slice-to-class assignment that
        agrees with the most voxels of ``label``; foreground classes outside ``rule.order`` are kept.
    """
    lab = np.asarray(label)
    fg = np.isin(lab, rule.order)
    if not fg.any():
        return lab.copy()
    a, _ = _monotone_assignment(_slice_counts(lab, rule.axis, rule.order))
    per_slice = np.asarray(rule.order, dtype=lab.dtype)[a]
    shape = [1, 1, 1]
    shape[rule.axis] = -1
    out = lab.copy()
    out[fg] = np.broadcast_to(per_slice.reshape(shape), lab.shape)[fg]
    return out


def write(path, rule: ClassPlanes, class_names: Sequence[str] | None = None) -> None:
    """Write the rule as JSON (atomic, :func:`semisam_o1.core.files.write_json`), with the class names of
    its order when ``class_names`` is given."""

    write_json(Path(path), rule.to_json(class_names))


def read(path) -> ClassPlanes:
    """The rule of a file written by :func:`write`.

    Raises:
        InputError: the file is unreadable or holds no rule (the line names it).
    """
    try:
        d = json.loads(Path(path).read_text())
        rule = ClassPlanes.from_json(d)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a class-planes file ({exc})") from None
    if rule.axis not in (0, 1, 2) or len(rule.order) < 2:
        raise InputError(f"{path}: not a class-planes file (axis {rule.axis}, order {list(rule.order)})")
    return rule
