"""Slices of a volume for a 2D encoder: intensity windows, scaling, tile sizes and how slices
are resized and packed onto the encoder's square canvas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semisam_o1.core.errors import InputError


def intensity_range(array: np.ndarray, percentiles=(0.5, 99.5), window=None) -> tuple[float, float]:
    """The clipping range of one volume: ``window`` (low, high) when given (e.g. a CT window), else the
    0.5 / 99.5 percentiles of the voxels above 0 (all voxels when none is), as MedSAM's MR
    preprocessing does."""
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise InputError(f"intensity window {window}: high must be above low")
        return lo, hi
    vals = array[array > 0]
    if vals.size == 0:
        vals = array.ravel()
    lo, hi = np.percentile(vals, percentiles)
    return float(lo), float(hi)


def scale_volume(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and scale to 0-255 float32 (all 0 for a constant volume)."""
    if hi <= lo:
        return np.zeros(array.shape, np.float32)
    out = (np.clip(array, lo, hi) - lo) * (255.0 / (hi - lo))
    return out.astype(np.float32)


def auto_tile(largest_side: int, input_size: int) -> int:
    """The tile side in pixels ``encode`` packs slices into when ``--tile-size`` is not given:
    half the canvas when the reduction case's (else the first case's) largest side in voxels fits
    in it (four slices per canvas, each still enlarged), else the whole canvas."""
    half = input_size // 2
    return half if largest_side <= half else input_size


@dataclass(frozen=True)
class SliceLayout:
    """How slices of one in-plane shape (su, sv) are resized into a tile and which cells are valid.

    ``ru, rv``: resized size in pixels (longest side = tile); ``nu, nv``: valid feature cells
    (cells that overlap the resized image); voxel coordinate of cell ``j`` along u is
    ``offset_u + step_u * j`` with ``step_u = cell * su / ru`` and ``offset_u = step_u / 2 - 0.5``
    (bilinear resize with align_corners=False maps pixel p to voxel (p + 0.5) * su / ru - 0.5).
    """

    su: int
    sv: int
    tile: int
    cell: int

    @property
    def scale(self) -> float:
        return self.tile / max(self.su, self.sv)

    @property
    def ru(self) -> int:
        return max(1, min(self.tile, int(round(self.su * self.scale))))

    @property
    def rv(self) -> int:
        return max(1, min(self.tile, int(round(self.sv * self.scale))))

    @property
    def nu(self) -> int:
        return -(-self.ru // self.cell)

    @property
    def nv(self) -> int:
        return -(-self.rv // self.cell)

    def mapping(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((offset_u, offset_v), (step_u, step_v)) in voxels."""
        step_u = self.cell * self.su / self.ru
        step_v = self.cell * self.sv / self.rv
        return (step_u / 2 - 0.5, step_v / 2 - 0.5), (step_u, step_v)


def resize_slices(slices: np.ndarray, plan: SliceLayout) -> np.ndarray:
    """(N, su, sv) float32 0-255 -> (N, ru, rv) float32, bilinear (antialiased when shrinking);
    RGB slices (N, su, sv, 3) -> (N, ru, rv, 3), each channel alike."""
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(slices, np.float32)
    rgb = arr.ndim == 4
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 1)) if rgb else arr[:, None])
    if (plan.ru, plan.rv) == (plan.su, plan.sv):
        return arr
    shrink = plan.ru < plan.su or plan.rv < plan.sv
    out = F.interpolate(t, size=(plan.ru, plan.rv), mode="bilinear", align_corners=False, antialias=shrink)
    return np.moveaxis(out.numpy(), 1, -1) if rgb else out[:, 0].numpy()

