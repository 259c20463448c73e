"""benchmarks.bench_thickness_floor: the grid's round trip and the floor read from its law."""

import numpy as np
import pytest

from benchmarks import bench_thickness_floor as btf


def _slab(thick: int, n: int = 48) -> np.ndarray:
    label = np.zeros((n, n, n), np.int16)
    lo = (n - thick) // 2
    label[lo:lo + thick] = 1
    return label


def test_round_trip_of_a_slab_loses_about_one_voxel_over_its_thickness():
    """A slab t voxels thick taken to twice the spacing and back: Dice 1 on the same grid; below 1
    when coarsened, and the thicker slab keeps more (the k / t law the floor is read from)."""
    same = btf.round_trip(_slab(12), [1.0] * 3, [1.0] * 3, [1])
    assert same[1] == pytest.approx(1.0)
    thin = btf.round_trip(_slab(5), [1.0] * 3, [2.0] * 3, [1])[1]
    thick = btf.round_trip(_slab(21), [1.0] * 3, [2.0] * 3, [1])[1]
    assert thin < thick < 1.0
    # an odd slab at a 2x grid loses one boundary voxel layer at most: Dice >= 1 - 1 / t
    assert thin >= 1.0 - 1.0 / 5 - 1e-6 and thick >= 1.0 - 1.0 / 21 - 1e-6


def test_floor_is_the_worst_class_law_over_the_tolerance():
    """Records that follow 1 - Dice = k / t exactly (k 0.3 and 0.5 for two classes): k is read back
    per class and the floor is ceil(0.5 / 0.05) = 10 voxels for a 0.95 ceiling."""
    records = [{"dataset": "d", "class": c, "case": "x", "factor": 2.0, "thickness_mm": t,
                "thickness_vox": t, "ceiling_dice": 1.0 - k / t}
               for c, k in ((1, 0.3), (2, 0.5)) for t in (1.5, 3.0, 6.0, 12.0)]
    floor, ks = btf.floor_voxels(records, 0.95)
    assert ks == {"d/1": pytest.approx(0.3), "d/2": pytest.approx(0.5)}
    assert floor == 10
    assert btf.floor_voxels(records, 0.9)[0] == 5
    # a record under 2 voxels thick (the class breaking up) does not enter k
    broken = records + [{"dataset": "d", "class": 2, "case": "y", "factor": 8.0, "thickness_mm": 1.0,
                         "thickness_vox": 1.0, "ceiling_dice": 0.0}]
    assert btf.floor_voxels(broken, 0.95)[0] == 10
