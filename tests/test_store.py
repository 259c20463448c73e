"""Feature store: layout, memory mapping, cell -> voxel mapping and on_voxel_grid, against NumPy;
verification of finished cases; exclusive creation of a store's files by parallel shards."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest

from semisam_o1.core.errors import InputError
from semisam_o1.data import store as store_module
from semisam_o1.data.store import FeatureStore, config_signature, linear_weights, voxel_features


def _make_store(root, grids, maps, voxel_shape, case="c1"):
    """A store of one case with the given per-axis grids and cell -> voxel maps, written by the
    store's own writers."""
    config = store_module.write_config(root, {"format": 1, "axes": sorted(grids),
                                              "channels": next(iter(grids.values())).shape[0]})
    meta = {"case": case, "voxel_shape": list(voxel_shape), "affine": np.eye(4).tolist(),
            "axes": sorted(grids), "store_signature": config["signature"], "input_sha256": "x"}
    store_module.write_case(root, case, grids, maps, meta)
    return FeatureStore(root)


def test_linear_weights_reproduce_linear_functions():
    # voxel = offset + step * cell; a linear function of the voxel coordinate sampled on cells
    # must come back exactly inside the grid, and clamp outside it
    offset, step, n_cells, n_out = 0.3, 1.7, 12, 20
    w = linear_weights(n_out, n_cells, offset, step)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    cell_pos = offset + step * np.arange(n_cells)
    f = 2.0 * cell_pos - 1.0
    got = w @ f
    vox = np.arange(n_out)
    inside = (vox >= cell_pos[0]) & (vox <= cell_pos[-1])
    np.testing.assert_allclose(got[inside], 2.0 * vox[inside] - 1.0, atol=1e-4)
    assert got[0] == pytest.approx(f[0], abs=1e-5)


def test_voxel_features_matches_scipy_map_coordinates():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    grid = rng.normal(size=(3, 5, 7, 6)).astype(np.float16)
    offset, step, shape = np.array([0.0, 0.4, 0.2]), np.array([1.0, 1.6, 1.9]), (5, 11, 10)
    got = voxel_features(grid, offset, step, shape)
    coords = np.meshgrid(*[(np.arange(n) - o) / s for n, o, s in zip(shape, offset, step)], indexing="ij")
    coords = [np.clip(c, 0, g - 1) for c, g in zip(coords, grid.shape[1:])]
    for c in range(3):
        ref = map_coordinates(grid[c].astype(np.float64), coords, order=1, mode="nearest")
        np.testing.assert_allclose(got[c], ref, atol=1e-4)


def test_store_roundtrip_memmap_and_on_voxel_grid(tmp_path):
    rng = np.random.default_rng(1)
    shape = (6, 9, 8)
    grids, maps = {}, {}
    for axis, cells in ((0, (6, 5, 4)), (2, (4, 5, 8))):
        grids[axis] = rng.normal(size=(4,) + cells).astype(np.float16)
        off, st = [0.25, 0.4, 0.5], [2.0, 1.8, 2.0]
        off[axis], st[axis] = 0.0, 1.0
        maps[axis] = (off, st)
    store = _make_store(tmp_path / "s", grids, maps, shape)
    assert store.cases() == ["c1"] and store.has("c1") and not store.has("c2")
    assert store.axes == (0, 2)
    cf = store.load("c1")
    assert cf.voxel_shape == shape
    for axis in (0, 2):
        g = cf.grid(axis)
        assert isinstance(g, np.memmap) and g.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(g), grids[axis])
        off, st = cf.cell_to_voxel(axis)
        np.testing.assert_allclose(off, maps[axis][0])
        np.testing.assert_allclose(st, maps[axis][1])
    v = cf.on_voxel_grid()
    assert v.shape == (8,) + shape and v.dtype == np.float32
    # dot product of two voxels = mean of the per-axis cosine similarities
    per_axis = [voxel_features(grids[a], *map(np.asarray, maps[a]), shape) for a in (0, 2)]
    p, q = (1, 2, 3), (4, 7, 0)

    def cos(f):
        a, b = f[(slice(None),) + p], f[(slice(None),) + q]
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    expected = np.mean([cos(f) for f in per_axis])
    assert float(v[(slice(None),) + p] @ v[(slice(None),) + q]) == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose((v * v).sum(0), 1.0, atol=1e-5)
    assert cf.on_voxel_grid(axes=[2]).shape == (4,) + shape


def test_store_errors(tmp_path):
    with pytest.raises(InputError, match="not a feature store"):
        FeatureStore(tmp_path)
    store = FeatureStore(helpers.write_feature_store(tmp_path / "s", {"c1": np.zeros((2, 3, 2, 2), np.float16)}))
    assert store.cases() == ["c1"]
    with pytest.raises(InputError, match="case nope"):
        store.load("nope")
    # a case written with another signature is not finished for this store
    meta_path = store.case_dir("c1") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["store_signature"] = "other"
    meta_path.write_text(json.dumps(meta))
    assert store.cases() == [] and not store.has("c1")
    with pytest.raises(InputError, match="case c1.*signature"):
        store.load("c1")


def test_check_case_finds_damaged_files(tmp_path):
    rng = np.random.default_rng(2)
    feats = {0: rng.normal(size=(3, 5, 4, 6)).astype(np.float16), 2: rng.normal(size=(3, 5, 4, 6)).astype(np.float16)}
    store = FeatureStore(helpers.write_feature_store(tmp_path / "s", {"c1": feats}))
    assert store.check_case("c1") is None
    path = store.case_dir("c1") / "axis2.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 10])  # cut short
    assert "axis2.npy" in store.check_case("c1") and "cannot be read" in store.check_case("c1")
    np.save(path, np.zeros((3, 5, 4, 5), np.float16))  # another shape
    assert "meta.json says float16 (3, 5, 4, 6)" in store.check_case("c1")
    np.save(path, np.zeros((3, 5, 4, 6), np.float32))  # another dtype
    assert "float32" in store.check_case("c1")
    path.unlink()
    assert "axis2.npy" in store.check_case("c1")
    path.write_bytes(raw)
    assert store.check_case("c1") is None
    assert "axis 1 missing" in store.check_case("c1", axes=(0, 1))
    assert "meta.json" in store.check_case("nope")


def test_exclusive_writes_keep_the_first_shards_files(tmp_path):
    root = tmp_path / "s"
    first = store_module.write_config(root, {"format": 1, "axes": [0], "channels": 2, "created": "a"},
                                      exclusive=True)
    second = store_module.write_config(root, {"format": 1, "axes": [0], "channels": 3, "created": "b"},
                                       exclusive=True)
    assert second == first and FeatureStore(root).channels == 2
    # the creation time, notes and command are not signed
    assert first["signature"] == config_signature({"format": 1, "axes": [0], "channels": 2, "command": "x"})
    basis = store_module.write_reduction(root, np.eye(3, 2, dtype=np.float32))
    again = store_module.write_reduction(root, np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(again, np.eye(3, 2))
    np.testing.assert_array_equal(basis, again)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_quantise_int8_error_bound_and_zero_channel():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(5, 4, 3, 6)).astype(np.float32) * np.array([1, 10, 0.01, 0, 3])[:, None, None, None]
    q, scale = store_module.quantise_int8(g)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    ref = np.abs(g.reshape(5, -1)).max(1) / 127.0
    np.testing.assert_allclose(scale[[0, 1, 2, 4]], ref[[0, 1, 2, 4]], rtol=1e-6)
    assert scale[3] == 1.0 and not q[3].any()  # an all-zero channel stays zero
    err = np.abs(q.astype(np.float32) * scale[:, None, None, None] - g)
    assert (err <= scale[:, None, None, None] / 2 + 1e-7).all()
    assert int(np.abs(q).max()) == 127


def test_int8_store_memmaps_and_on_voxel_grid_equals_the_dequantised_reference(tmp_path):
    rng = np.random.default_rng(4)
    shape = (6, 9, 8)
    grids = {1: rng.normal(size=(4, 5, 3, 4)).astype(np.float16)}
    maps = {1: ([0.5, 1.0, 0.25], [1.2, 3.0, 2.0])}  # stride 3 along the slicing axis, first slice 1
    config = store_module.write_config(tmp_path / "s", {"format": 2, "storage": "int8", "axes": [1], "channels": 4})
    meta = {"case": "c1", "voxel_shape": list(shape), "affine": np.eye(4).tolist(), "axes": [1],
            "store_signature": config["signature"], "input_sha256": "x"}
    store_module.write_case(tmp_path / "s", "c1", grids, maps, meta, storage="int8")
    store = FeatureStore(tmp_path / "s")
    assert store.check_case("c1") is None
    cf = store.load("c1")
    arr, scale = cf.stored(1)
    assert isinstance(arr, np.memmap) and arr.dtype == np.int8 and scale.shape == (4,)
    q, ref_scale = store_module.quantise_int8(grids[1])
    np.testing.assert_array_equal(np.asarray(arr), q)
    np.testing.assert_array_equal(scale, ref_scale)
    deq = q.astype(np.float32) * ref_scale[:, None, None, None]
    np.testing.assert_allclose(cf.grid(1).astype(np.float32), deq, rtol=1e-3, atol=1e-4)
    ref = voxel_features(deq, *map(np.asarray, maps[1]), shape)
    ref /= np.linalg.norm(ref, axis=0, keepdims=True)
    np.testing.assert_allclose(cf.on_voxel_grid(), ref, atol=1e-5)
    # the voxel features are within the int8 rounding of the float16 ones
    f16 = voxel_features(grids[1], *map(np.asarray, maps[1]), shape)
    f16 /= np.linalg.norm(f16, axis=0, keepdims=True)
    assert float(np.abs(cf.on_voxel_grid() - f16).max()) < 0.05
    # a scale list that does not match the channels is found
    meta_path = store.case_dir("c1") / "meta.json"
    m = json.loads(meta_path.read_text())
    m["grids"]["1"]["scale"] = m["grids"]["1"]["scale"][:3]
    meta_path.write_text(json.dumps(m))
    assert "3 channel scales" in store.check_case("c1")


def test_format_1_is_read_and_an_unknown_format_refused_in_one_line(tmp_path):
    store = _make_store(tmp_path / "old", {0: np.ones((2, 3, 2, 2), np.float16)}, {0: ([0, 0, 0], [1, 1, 1])},
                        (3, 2, 2))
    assert store.config["format"] == 1 and store.load("c1").grid(0).dtype == np.float16
    store_module.write_config(tmp_path / "new", {"format": 99, "axes": [0], "channels": 2})
    with pytest.raises(InputError, match=r"store.json: feature store format 99 is not one this version reads"):
        FeatureStore(tmp_path / "new")
