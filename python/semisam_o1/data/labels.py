"""Label maps: the declared label values on disk <-> consecutive class indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from semisam_o1.core.errors import InputError


@dataclass(frozen=True)
class LabelMap:
    """The declared classes: label values on disk <-> consecutive class indices.

    ``values[i]`` is the value written on disk for class index ``i``;
    ``names[i]`` its name from ``dataset.json``. Index 0 is value 0, background
    (declared in every MSD / nnU-Net dataset). Values are 0 .. 65535 (they are
    written as uint8 or uint16); class indices are uint8 (uint16 beyond 256
    classes).

    Example: BraTS ``{"0": "background", "1": "NCR", "2": "ED", "4": "ET"}``
    gives ``values == (0, 1, 2, 4)``: a voxel of value 4 is class index 3
    inside, and index 3 is written back as 4.
    """

    values: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        values = tuple(int(v) for v in self.values)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if not values:
            raise InputError("no label values declared")
        if len(self.names) != len(values):
            raise ValueError("LabelMap: values and names differ in length")
        if list(values) != sorted(set(values)):
            raise InputError(f"label values {list(values)} must be distinct (and are kept sorted)")
        if values[0] != 0:
            raise InputError(f"label values {list(values)}: background value 0 must be declared")
        if values[-1] > 65535:
            raise InputError(f"label value {values[-1]} is too large (at most 65535)")

    @classmethod
    def from_dataset_json(cls, labels: dict, source: str = "dataset.json") -> "LabelMap":
        """Parse MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``) labels.

        Raises InputError for regions (nnU-Net v2 lists), non-integer values,
        duplicates, a missing background 0 or values above 65535.
        """
        if not isinstance(labels, dict):
            raise InputError(f"{source}: 'labels' must be an object")
        pairs = []
        for key, val in labels.items():
            if isinstance(val, list):  # nnU-Net v2 region: not supported
                raise InputError(f"{source}: label {key!r} is a region ({val}); only plain label values are supported")
            if isinstance(val, bool):
                raise InputError(f"{source}: label {key!r}: {val!r} is not a label value")
            if isinstance(val, (int, float)):  # nnU-Net v2: name -> value
                value, name = val, key
            else:  # MSD: "value" -> name
                value, name = key, val
            try:
                fval = float(value)
            except (TypeError, ValueError):
                raise InputError(f"{source}: label {key!r}: {value!r} is not an integer label value") from None
            if not np.isfinite(fval) or fval != int(fval):
                raise InputError(f"{source}: label {key!r}: {value!r} is not an integer label value")
            if fval < 0:
                raise InputError(f"{source}: negative label value {int(fval)}")
            pairs.append((int(fval), str(name)))
        if not pairs:
            raise InputError(f"{source}: 'labels' is empty")
        pairs.sort()
        values = tuple(v for v, _ in pairs)
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})
            raise InputError(f"{source}: label value {dup[0]} is declared twice in 'labels'")
        try:
            return cls(values=values, names=tuple(n for _, n in pairs))
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None

    @classmethod
    def from_values(cls, values: Iterable[int], names: Sequence[str] | None = None) -> "LabelMap":
        """A label map from label values found in files (0 is always added);
        names are the values as text unless given."""
        values = sorted({0, *(int(v) for v in values)})
        names = list(names) if names is not None else [("background" if v == 0 else str(v)) for v in values]
        return cls(values=tuple(values), names=tuple(names))

    @property
    def num_classes(self) -> int:
        return len(self.values)

    @property
    def foreground(self) -> list[int]:
        """Class indices other than 0 (background)."""
        return list(range(1, self.num_classes))

    @property
    def index_dtype(self):
        """dtype of class-index arrays: uint8, or uint16 beyond 256 classes."""
        return np.uint8 if self.num_classes <= 256 else np.uint16

    @property
    def value_dtype(self):
        """dtype of label files written: uint8 when the largest value fits, else uint16."""
        return np.uint8 if max(self.values) <= 255 else np.uint16

    def lut(self) -> np.ndarray:
        """Lookup table value -> index (-1 for undeclared values), int32."""
        lut = np.full(max(self.values) + 1, -1, dtype=np.int32)
        lut[list(self.values)] = np.arange(self.num_classes, dtype=np.int32)
        return lut

    def to_index(self, values: np.ndarray, source: str = "label") -> np.ndarray:
        """Integer label values -> class indices (:attr:`index_dtype`).

        Raises InputError naming ``source`` and the undeclared values when a
        value is not declared.
        """
        values = np.asarray(values)
        if values.size == 0:
            return np.zeros(values.shape, dtype=self.index_dtype)
        vmin, vmax = int(values.min()), int(values.max())
        lut = self.lut()
        if vmin >= 0 and vmax < lut.size:
            idx = lut[values]
            if idx.min() >= 0:
                return idx.astype(self.index_dtype)
        uniq = np.unique(values)
        bad = [int(u) for u in uniq if u < 0 or u >= lut.size or lut[int(u)] < 0]
        shown = ", ".join(str(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise InputError(
            f"{source}: label value{'s' if len(bad) > 1 else ''} {shown} not declared in dataset.json labels "
            f"{list(self.values)}"
        )

    def to_value(self, indices: np.ndarray) -> np.ndarray:
        """Class indices -> label values, uint8 if the largest value fits, else uint16.

        Raises ValueError for an index outside ``0 .. num_classes - 1``.
        """
        indices = np.asarray(indices)
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= self.num_classes):
            raise ValueError(
                f"class index {int(indices.max()) if int(indices.max()) >= self.num_classes else int(indices.min())}"
                f" outside 0..{self.num_classes - 1}"
            )
        return np.asarray(self.values, dtype=self.value_dtype)[indices]

