"""Dataset I/O layer (issue 3): each real-world file quirk built as a small
synthetic NIfTI in tmp_path, checked against the values it must give."""

from __future__ import annotations

import gzip
import io as _io
import json
import os
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest

from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, write_json
from semisam_o1.data.cases import case_id_from_path, find_case_file, index_folder, index_label_folder
from semisam_o1.data.dataset import Dataset
from semisam_o1.data.images import check_same_grid, read_image, read_label, read_label_values, write_label, write_map
from semisam_o1.data.labels import LabelMap

SHAPE = (12, 14, 10)
BASE_AFFINE = np.array([[1.0, 0, 0, -20.0], [0, 2.0, 0, 10.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
LM3 = LabelMap((0, 1, 2), ("background", "a", "b"))


def _save(path: Path, data, affine=BASE_AFFINE, dtype=None, qcode=1, scode=1, slope=None, inter=None) -> Path:
    img = nib.Nifti1Image(np.asarray(data), affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))
    return path


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header bytes as stored (nib.load consumes scl_slope / scl_inter)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(_io.BytesIO(f.read(348)))


def _image_data(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


def _label_data(shape=SHAPE):
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 3:9, 2:5] = 1
    lab[6:10, 4:12, 5:9] = 2
    return lab


def _flip01(data, affine):
    """A copy with voxel axes 0 and 1 flipped and the affine changed to match
    (same anatomy: every voxel keeps its world position)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine @ flip


def _swap02(data, affine):
    """A copy with voxel axes 0 and 2 swapped and the affine columns swapped to match."""
    perm = np.eye(4)[:, [2, 1, 0, 3]]
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), affine @ perm


def _world_values(data, affine):
    """{world position (rounded mm): value} of every voxel, for comparing anatomy."""
    idx = np.indices(data.shape).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T
    return {tuple(np.round(w, 4)): v for w, v in zip(world, data.reshape(-1))}


# ------------------------------------------------------------------ orientation


@pytest.mark.parametrize("transform", [_flip01, _swap02], ids=["flip01", "swap02"])
def test_flipped_or_permuted_copy_gives_identical_canonical_arrays_and_world(tmp_path, transform):
    data = _image_data()
    a = _save(tmp_path / "a.nii.gz", data)
    data_b, affine_b = transform(data, BASE_AFFINE)
    b = _save(tmp_path / "b.nii.gz", data_b, affine_b)
    va, vb = read_image(a), read_image(b)
    np.testing.assert_array_equal(va.array, vb.array)
    np.testing.assert_allclose(va.affine, vb.affine, atol=1e-6)
    # canonical RAS+: positive diagonal spacing, same world position for every voxel
    assert va.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert np.all(np.diag(va.affine)[:3] > 0)
    assert _world_values(va.array, va.affine) == _world_values(data, BASE_AFFINE)
    assert _world_values(vb.array, vb.affine) == _world_values(data_b, affine_b)
    # the Volume remembers the file's own affine
    np.testing.assert_allclose(vb.native_affine, affine_b, atol=1e-6)


def test_lps_stored_case_matches_ras_template(tmp_path):
    """An LPS-stored volume (x and y axes pointing left / posterior) is the same anatomy."""
    data = _image_data(1)
    ras = _save(tmp_path / "ras.nii.gz", data)
    lps_data, lps_affine = _flip01(data, BASE_AFFINE)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    lps = _save(tmp_path / "lps.nii.gz", lps_data, lps_affine)
    np.testing.assert_array_equal(read_image(ras).array, read_image(lps).array)


@pytest.mark.parametrize("transform", [_flip01, _swap02], ids=["flip01", "swap02"])
@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (1, 0)], ids=["q1s1", "q0s2", "q1s0"])
def test_write_label_round_trips_to_the_input_voxel_order_affine_and_header(tmp_path, transform, codes):
    qcode, scode = codes
    img_b, affine_b = transform(_image_data(), BASE_AFFINE)
    lab_b, _ = transform(_label_data(), BASE_AFFINE)
    img = nib.Nifti1Image(img_b, affine_b)
    img.set_qform(affine_b, code=qcode)
    img.set_sform(affine_b, code=scode)
    img.header["descrip"] = b"scanner X protocol Y"
    img.header.set_xyzt_units("mm", "sec")
    b = tmp_path / "b.nii.gz"
    img.to_filename(str(b))
    hdr_in = nib.load(str(b)).header
    hdr_in_descrip = bytes(hdr_in["descrip"])
    ref = read_image(b)
    # a label computed on the canonical grid: the canonical view of the file's label
    canon_lab = nib.orientations.apply_orientation(lab_b, ref.ornt).astype(np.uint8)
    out = write_label(tmp_path / "out" / "b_label.nii.gz", canon_lab, ref, LM3)
    written = nib.load(str(out))
    # same voxel order as the input file: the stored array is the file-order label
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), lab_b)
    np.testing.assert_array_equal(written.affine, nib.load(str(b)).affine)
    h = written.header
    assert int(h["qform_code"]) == qcode and int(h["sform_code"]) == scode
    if qcode:
        np.testing.assert_allclose(h.get_qform(), hdr_in.get_qform(), atol=1e-6)
    if scode:
        np.testing.assert_allclose(h.get_sform(), hdr_in.get_sform(), atol=1e-6)
    np.testing.assert_array_equal(h["pixdim"][1:4], hdr_in["pixdim"][1:4])
    assert h["xyzt_units"] == hdr_in["xyzt_units"]
    assert bytes(h["descrip"]) == hdr_in_descrip
    assert hdr_in_descrip.rstrip(b"\x00") == b"scanner X protocol Y"
    assert h.get_data_dtype() == np.uint8
    # and reading it back gives the canonical label
    np.testing.assert_array_equal(read_label(out, LM3, reference=ref).array, canon_lab)


def test_flipped_copy_gives_identical_label_results_in_world_space(tmp_path):
    """The same processing (a threshold on the canonical grid) on a case and its
    flipped copy: outputs agree voxel by voxel in world space, each output has
    its own input's affine."""
    data = _image_data(2)
    a = _save(tmp_path / "a.nii.gz", data)
    data_b, affine_b = _flip01(data, BASE_AFFINE)
    b = _save(tmp_path / "b.nii.gz", data_b, affine_b)
    outs = []
    for p in (a, b):
        v = read_image(p)
        seg = (v.array > 110).astype(np.uint8) + (v.array > 130).astype(np.uint8)
        outs.append(write_label(tmp_path / f"{p.name[0]}_seg.nii.gz", seg, v, LM3))
    oa, ob = nib.load(str(outs[0])), nib.load(str(outs[1]))
    np.testing.assert_array_equal(oa.affine, nib.load(str(a)).affine)
    np.testing.assert_array_equal(ob.affine, nib.load(str(b)).affine)
    wa = _world_values(np.asanyarray(oa.dataobj), oa.affine)
    wb = _world_values(np.asanyarray(ob.dataobj), ob.affine)
    assert wa == wb
    assert set(wa.values()) == {0, 1, 2}


def test_write_map_keeps_voxel_order_and_channels(tmp_path):
    data_b, affine_b = _flip01(_image_data(3), BASE_AFFINE)
    b = _save(tmp_path / "b.nii.gz", data_b, affine_b)
    ref = read_image(b)
    out = write_map(tmp_path / "m.nii.gz", ref.array * 0.5, ref)
    w = nib.load(str(out))
    assert w.get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asanyarray(w.dataobj), data_b * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(w.affine, nib.load(str(b)).affine)
    two = np.stack([ref.array, -ref.array], axis=-1)
    w2 = nib.load(str(write_map(tmp_path / "m2.nii.gz", two, ref)))
    np.testing.assert_allclose(np.asanyarray(w2.dataobj)[..., 1], -data_b, rtol=1e-6)


# ------------------------------------------------------------------ float labels


def test_float_labels_are_rounded_never_truncated(tmp_path):
    lab = _label_data().astype(np.float32)
    noisy = lab.copy()
    noisy[lab == 1] = 0.99999
    noisy[lab == 2] = 2.00001
    noisy[0, 0, 0] = 0.0004
    p = _save(tmp_path / "l.nii.gz", noisy, dtype=np.float32)
    got = read_label(p, LM3).array
    np.testing.assert_array_equal(got, lab.astype(np.uint8))
    assert got.dtype == np.uint8
    # truncation would have turned the 0.99999 voxels into background
    assert int((got == 1).sum()) == int((lab == 1).sum()) > 0


def test_float_label_far_from_an_integer_is_an_error_naming_file_and_value(tmp_path):
    lab = _label_data().astype(np.float32)
    lab[5, 5, 5] = 0.6
    p = _save(tmp_path / "bad_label.nii.gz", lab, dtype=np.float32)
    with pytest.raises(InputError) as exc:
        read_label(p, LM3)
    msg = str(exc.value)
    assert str(p) in msg and "0.6" in msg and "\n" not in msg


def test_label_stored_as_scaled_int16_is_read_as_its_real_values(tmp_path):
    """A label stored int16 with scl_slope 0.5: stored 2 and 4 mean 1 and 2."""
    lab = _label_data()
    p = _save(tmp_path / "scaled.nii.gz", (lab * 2).astype(np.int16), dtype=np.int16, slope=0.5, inter=0.0)
    assert _raw_header(p)["scl_slope"] == 0.5
    np.testing.assert_array_equal(read_label(p, LM3).array, lab)


# ------------------------------------------------------------------ non-consecutive labels


def _brats_like(tmp_path: Path, labels: dict, ending=".nii.gz", file_ending=None) -> Path:
    root = tmp_path / "ds"
    meta = {"name": "t", "labels": labels}
    if file_ending:
        meta["file_ending"] = file_ending
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    lab = _label_data()
    lab[1:3, 1:3, 1:3] = 4
    _save(root / "imagesTr" / f"c1{ending}", _image_data())
    _save(root / "labelsTr" / f"c1{ending}", lab, dtype=np.uint8)
    return root


@pytest.mark.parametrize(
    "labels",
    [{"0": "background", "1": "NCR", "2": "ED", "4": "ET"}, {"background": 0, "NCR": 1, "ED": 2, "ET": 4}],
    ids=["msd", "nnunet_v2"],
)
def test_non_consecutive_labels_map_to_consecutive_indices_and_back(tmp_path, labels):
    root = _brats_like(tmp_path, labels)
    ds = Dataset(root)
    assert ds.label_map.values == (0, 1, 2, 4)
    assert ds.label_map.names == ("background", "NCR", "ED", "ET")
    img = ds.read_image("c1")
    got = ds.read_label("c1", reference=img).array
    raw = np.asanyarray(nib.load(str(ds.labels["c1"])).dataobj)
    expected = np.select([raw == 1, raw == 2, raw == 4], [1, 2, 3], 0)
    np.testing.assert_array_equal(got, expected)
    assert set(np.unique(got)) == {0, 1, 2, 3}
    out = write_label(tmp_path / "back.nii.gz", got, img, ds.label_map)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), raw)
    assert set(np.unique(np.asanyarray(nib.load(str(out)).dataobj))) == {0, 1, 2, 4}


def test_undeclared_label_value_is_an_error_naming_file_and_value(tmp_path):
    root = _brats_like(tmp_path, {"0": "background", "1": "a", "2": "b"})
    ds = Dataset(root)
    with pytest.raises(InputError) as exc:
        ds.read_label("c1")
    msg = str(exc.value)
    assert str(ds.labels["c1"]) in msg and "label value 4 " in msg


def test_label_map_rejects_bad_declarations():
    with pytest.raises(InputError, match="region"):
        LabelMap.from_dataset_json({"background": 0, "whole": [1, 2]})
    with pytest.raises(InputError, match="background value 0"):
        LabelMap.from_dataset_json({"1": "a", "2": "b"})
    with pytest.raises(InputError, match="twice"):
        LabelMap.from_dataset_json({"0": "bg", "a": 1, "1": "b"})
    with pytest.raises(InputError, match="not an integer"):
        LabelMap.from_dataset_json({"0": "bg", "1.5": "a"})
    assert LabelMap.from_values([2, 0, 7]).values == (0, 2, 7)
    assert LabelMap.from_values([3]).names == ("background", "3")


# ------------------------------------------------------------------ 4D files


def test_4d_with_last_dim_1_is_read_as_3d(tmp_path):
    data = _image_data()
    lab = _label_data()
    pi = _save(tmp_path / "i4.nii.gz", data[..., None])
    pl = _save(tmp_path / "l4.nii.gz", lab[..., None], dtype=np.uint8)
    assert nib.load(str(pi)).shape == SHAPE + (1,)
    vi = read_image(pi)
    assert vi.shape == SHAPE
    np.testing.assert_array_equal(vi.array, data)
    vl = read_label(pl, LM3, reference=vi)
    np.testing.assert_array_equal(vl.array, lab)
    # an output on that grid is written as a 3D file with the input's affine
    w = nib.load(str(write_label(tmp_path / "o.nii.gz", vl.array, vi, LM3)))
    assert w.shape == SHAPE
    np.testing.assert_array_equal(w.affine, nib.load(str(pi)).affine)


def test_real_4d_is_rejected(tmp_path):
    data = np.stack([_image_data(0), _image_data(1)], axis=-1)
    p = _save(tmp_path / "two_channels.nii.gz", data)
    with pytest.raises(InputError, match="4D image with 2 channels") as exc:
        read_image(p)
    assert str(p) in str(exc.value)
    pl = _save(tmp_path / "lab4d.nii.gz", np.stack([_label_data()] * 3, axis=-1), dtype=np.uint8)
    with pytest.raises(InputError, match="4D"):
        read_label(pl, LM3)


# ------------------------------------------------------------------ file naming


def _dataset(root: Path, images: list[str], labels: list[str], meta_extra: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": "t", "labels": {"0": "background", "1": "a", "2": "b"}, **(meta_extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, name in enumerate(images):
        _save(root / "imagesTr" / name, _image_data(i))
    for name in labels:
        _save(root / "labelsTr" / name, _label_data(), dtype=np.uint8)
    return root


def test_nii_and_nii_gz_both_accepted(tmp_path):
    root = _dataset(tmp_path / "ds", ["a.nii", "b.nii.gz"], ["a.nii", "b.nii.gz"])
    ds = Dataset(root)
    assert ds.cases == ["a", "b"]
    assert ds.images["a"].name == "a.nii" and ds.labels["b"].name == "b.nii.gz"
    for case in ds.cases:
        img = ds.read_image(case)
        np.testing.assert_array_equal(ds.read_label(case, reference=img).array, _label_data())
    np.testing.assert_array_equal(read_image(ds.images["a"]).array, _image_data(0))


def test_nnunet_channel_suffix_is_stripped(tmp_path):
    root = _dataset(tmp_path / "ds", ["case_01_0000.nii.gz", "case_02_0000.nii.gz"],
                    ["case_01.nii.gz", "case_02.nii.gz"])
    ds = Dataset(root)
    assert ds.cases == ["case_01", "case_02"]
    assert ds.image_path("case_02").name == "case_02_0000.nii.gz"
    assert ds.label_path("case_02").name == "case_02.nii.gz"
    assert case_id_from_path("x/case_7_0000.nii") == "case_7"
    assert find_case_file(root / "imagesTr", "case_01", what="image").name == "case_01_0000.nii.gz"


def test_names_ending_in_four_digits_without_channel_suffix(tmp_path):
    """MSD-style names that happen to end in _ + 4 digits keep them when the labels say so."""
    root = _dataset(tmp_path / "ds", ["img_0001.nii.gz", "img_0002.nii.gz"], ["img_0001.nii.gz", "img_0002.nii.gz"])
    assert Dataset(root).cases == ["img_0001", "img_0002"]


def test_dataset_json_file_ending_is_honoured(tmp_path):
    root = _dataset(tmp_path / "ds", ["a.nii", "b.nii", "c.nii.gz"], ["a.nii", "b.nii", "c.nii.gz"],
                    {"file_ending": ".nii"})
    ds = Dataset(root)
    assert ds.cases == ["a", "b"] and set(ds.labels) == {"a", "b"}
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}, "file_ending": ".nrrd"}))
    with pytest.raises(InputError, match="file_ending"):
        Dataset(root)


def test_case_under_two_endings_is_one_error_listing_the_paths(tmp_path):
    root = _dataset(tmp_path / "ds", ["a.nii", "a.nii.gz", "b.nii", "b.nii.gz", "c.nii.gz"],
                    ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    with pytest.raises(InputError) as exc:
        Dataset(root)
    msg = str(exc.value)
    for name in ("a.nii", "a.nii.gz", "b.nii", "b.nii.gz"):
        assert str(root / "imagesTr" / name) in msg
    assert "\n" not in msg


def test_labels_without_image_is_one_error_listing_the_paths(tmp_path):
    root = _dataset(tmp_path / "ds", ["a.nii.gz"], ["a.nii.gz", "x.nii.gz", "y.nii.gz"])
    with pytest.raises(InputError) as exc:
        Dataset(root)
    msg = str(exc.value)
    assert str(root / "labelsTr" / "x.nii.gz") in msg and str(root / "labelsTr" / "y.nii.gz") in msg
    assert "a.nii.gz" not in msg.replace(str(root), "")


def test_images_without_label_where_needed_is_one_error_listing_the_paths(tmp_path):
    root = _dataset(tmp_path / "ds", ["a.nii.gz", "b.nii.gz", "c.nii.gz"], ["a.nii.gz"])
    ds = Dataset(root)
    assert ds.missing_labels(ds.cases) == ["b", "c"]
    assert ds.require_labels(["a"]) == {"a": root / "labelsTr" / "a.nii.gz"}
    with pytest.raises(InputError) as exc:
        ds.require_labels(ds.cases, purpose="training")
    msg = str(exc.value)
    assert str(root / "imagesTr" / "b.nii.gz") in msg and str(root / "imagesTr" / "c.nii.gz") in msg
    with pytest.raises(InputError, match="no label"):
        ds.label_path("b")


def test_plain_label_folder_index(tmp_path):
    _save(tmp_path / "p" / "a.nii.gz", _label_data(), dtype=np.uint8)
    _save(tmp_path / "p" / "b.nii", _label_data(), dtype=np.uint8)
    (tmp_path / "p" / "notes.txt").write_text("x")
    assert set(index_label_folder(tmp_path / "p")) == {"a", "b"}
    with pytest.raises(InputError, match="no label file for case z"):
        find_case_file(tmp_path / "p", "z")


# ------------------------------------------------------------------ scaling and written dtypes


def test_image_scl_slope_and_inter_are_applied(tmp_path):
    stored = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 200
    p = _save(tmp_path / "s.nii.gz", stored, dtype=np.int16, slope=2.5, inter=-10.0)
    h = _raw_header(p)
    assert (h["scl_slope"], h["scl_inter"]) == (2.5, -10.0)
    v = read_image(p)
    assert v.array.dtype == np.float32
    np.testing.assert_allclose(v.array, stored * 2.5 - 10.0, rtol=0, atol=1e-4)


def test_written_labels_are_uint8_slope_1_intercept_0(tmp_path):
    p = _save(tmp_path / "img.nii.gz", _image_data(), dtype=np.int16, slope=3.0, inter=7.0)
    ref = read_image(p)
    out = write_label(tmp_path / "lab.nii.gz", _label_data(), ref, LM3)
    h = _raw_header(out)
    assert h.get_data_dtype() == np.uint8
    assert (float(h["scl_slope"]), float(h["scl_inter"])) == (1.0, 0.0)
    assert np.asanyarray(nib.load(str(out)).dataobj).dtype == np.uint8


def test_written_labels_are_uint16_when_a_value_exceeds_255(tmp_path):
    lm = LabelMap.from_dataset_json({"0": "bg", "1": "a", "300": "big"})
    ref = read_image(_save(tmp_path / "img.nii.gz", _image_data()))
    out = write_label(tmp_path / "lab.nii", _label_data(), ref, lm)
    h = _raw_header(out)
    assert h.get_data_dtype() == np.uint16
    assert (float(h["scl_slope"]), float(h["scl_inter"])) == (1.0, 0.0)
    stored = np.asanyarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(stored, np.where(_label_data() == 2, 300, _label_data().astype(np.int64)))
    np.testing.assert_array_equal(read_label(out, lm).array, _label_data())


# ------------------------------------------------------------------ broken files


def test_nan_image_is_an_error(tmp_path):
    data = _image_data()
    data[1, 2, 3] = np.nan
    data[4, 5, 6] = np.inf
    p = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError) as exc:
        read_image(p)
    assert str(p) in str(exc.value) and "2 voxels are NaN or Inf" in str(exc.value)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_truncated_file_is_an_error(tmp_path, ending):
    p = _save(tmp_path / f"full{ending}", _image_data(shape=(30, 30, 30)))
    blob = p.read_bytes()
    cut = tmp_path / f"cut{ending}"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as exc:
        read_image(cut)
    assert str(cut) in str(exc.value)
    tiny = tmp_path / f"tiny{ending}"
    tiny.write_bytes(blob[:100])
    with pytest.raises(InputError, match="tiny"):
        read_image(tiny)


def test_corrupt_gzip_stream_is_an_error(tmp_path):
    """A .nii.gz whose compressed voxels were changed (it still decompresses, with one wrong byte)
    fails gzip's CRC check: an error naming the file, for an image and for a label, never silently
    different voxels (nibabel alone stops before the check)."""
    for name, data, reader in (("img.nii.gz", _image_data(shape=(30, 30, 30)), read_image),
                               ("lab.nii.gz", np.ones((30, 30, 30), np.uint8), read_label_values)):
        p = helpers.corrupt_gzip_stream(_save(tmp_path / name, data))
        assert nib.load(str(p)).get_fdata().shape == (30, 30, 30)  # nibabel alone reads it
        with pytest.raises(InputError) as exc:
            reader(p)
        assert str(exc.value) == f"{p}: the file is corrupt (gzip CRC check failed)"


ITK_DAMAGE = {  # (ending, damage) -> the line
    (".mha", "changed"): "the file is corrupt (zlib Adler-32 check failed)",
    (".mha", "cut"): "the file is truncated (its zlib stream ends early)",
    (".nrrd", "changed"): "the file is corrupt (gzip CRC check failed)",
    (".nrrd", "cut"): "the file is truncated (its gzip stream ends early)",
}


@pytest.mark.parametrize("ending,damage", list(ITK_DAMAGE), ids=[f"{e[1:]}-{d}" for e, d in ITK_DAMAGE])
def test_corrupt_compressed_nrrd_and_mha_are_errors(tmp_path, ending, damage):
    """A compressed .mha (zlib) or .nrrd (gzip encoding) whose stream holds a changed byte (stored
    blocks: only the checksum can tell; SimpleITK returns the changed voxels of an .mha) or lacks its
    trailer (SimpleITK reads both): one line naming the file, as a .nii.gz; the intact file reads."""
    import SimpleITK as sitk
    from semisam_o1.data.images import label_values, read_itk

    data = np.random.default_rng(0).integers(0, 3, size=(12, 14, 16)).astype(np.uint8)
    good = tmp_path / f"good{ending}"
    sitk.WriteImage(sitk.GetImageFromArray(data), str(good), useCompression=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_itk(good)), data)
    bad = tmp_path / f"bad{ending}"
    bad.write_bytes(good.read_bytes())
    helpers.damage_itk_stream(bad, damage)
    for reader in (read_itk, label_values):
        with pytest.raises(InputError) as exc:
            reader(bad)
        assert str(exc.value) == f"{bad}: {ITK_DAMAGE[ending, damage]}"


def test_broken_link_in_a_dataset_folder_is_an_error(tmp_path):
    """A NIfTI name in imagesTr that is a broken symbolic link: an error naming it, not a case
    silently missing from the cohort."""
    folder = tmp_path / "imagesTr"
    folder.mkdir()
    _save(folder / "a.nii.gz", _image_data())
    (folder / "b.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError) as exc:
        index_folder(folder, strip_channel="auto")
    assert str(exc.value) == f"{folder / 'b.nii.gz'}: a broken symbolic link (its target {tmp_path / 'gone.nii.gz'} " \
                             "does not exist)"


def test_zero_size_image_is_an_error(tmp_path):
    p = _save(tmp_path / "empty.nii.gz", np.zeros((0, 5, 5), np.float32))
    with pytest.raises(InputError, match="empty image"):
        read_image(p)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_image(tmp_path / "nope.nii.gz")


def test_label_shape_or_affine_mismatch_with_its_image(tmp_path):
    img = read_image(_save(tmp_path / "img.nii.gz", _image_data()))
    small = _save(tmp_path / "small.nii.gz", _label_data()[:-1], dtype=np.uint8)
    with pytest.raises(InputError) as exc:
        read_label(small, LM3, reference=img)
    assert str(small) in str(exc.value) and "shape" in str(exc.value)
    moved = BASE_AFFINE.copy()
    moved[0, 3] += 1.0
    shifted = _save(tmp_path / "shifted.nii.gz", _label_data(), moved, dtype=np.uint8)
    with pytest.raises(InputError) as exc:
        read_label(shifted, LM3, reference=img)
    assert str(shifted) in str(exc.value) and "affine" in str(exc.value)
    # a label stored flipped, with its affine changed to match, is the same grid
    lab_f, aff_f = _flip01(_label_data(), BASE_AFFINE)
    flipped = _save(tmp_path / "flipped.nii.gz", lab_f, aff_f, dtype=np.uint8)
    np.testing.assert_array_equal(read_label(flipped, LM3, reference=img).array, _label_data())
    check_same_grid(read_label(flipped, LM3), img)


def test_read_label_values_keeps_raw_values(tmp_path):
    lab = _label_data().astype(np.float32)
    lab[lab == 2] = 300.00001
    v = read_label_values(_save(tmp_path / "l.nii.gz", lab, dtype=np.float32))
    assert v.array.dtype == np.uint16
    assert set(np.unique(v.array)) == {0, 1, 300}
    neg = _save(tmp_path / "neg.nii.gz", -_label_data().astype(np.int16), dtype=np.int16)
    with pytest.raises(InputError, match="negative label value -2"):
        read_label_values(neg)


# ------------------------------------------------------------------ atomic writes


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.json"]


def _killed_writer(code: str, tmp_path) -> None:
    """Run ``code`` in a child Python that dies with os._exit (no cleanup, as under SIGKILL)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport os; os._exit(9)"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr


def test_sweep_removes_a_killed_writers_temporaries_only(tmp_path):
    """A writer killed inside atomic_path (a file) or store.write_case (a case folder) leaves its
    temporary; sweep_temporaries removes those two and keeps a live process's temporary, another
    host's and every other file."""
    from semisam_o1.core.files import TEMPORARY_MARK, sweep_temporaries, temporary_prefix

    out = tmp_path / "out"
    _killed_writer(f"from semisam_o1.data.images import atomic_path\nwith atomic_path({str(out / 'x.nii.gz')!r}) as tmp:\n"
                   "    tmp.write_bytes(b'half')\n    import os; os._exit(9)", tmp_path)
    _killed_writer("import numpy as np\nfrom semisam_o1.data import store\n"
                   "def dies(*a, **k): import os; os._exit(9)\nstore.np.save = dies\n"
                   f"store.write_case({str(out)!r}, 'c1', {{0: np.zeros((2, 3, 3, 3), np.float16)}}, "
                   "{0: ([0.0] * 3, [1.0] * 3)}, {'case': 'c1'})", tmp_path)
    left = sorted(p.name for p in out.rglob(f"{TEMPORARY_MARK}*"))
    assert len(left) == 2 and any(n.endswith(".tmp.nii.gz") for n in left), left
    assert not (out / "x.nii.gz").exists() and not (out / "cases" / "c1").exists()
    live = out / f"{temporary_prefix('y.json')}abc.tmp.json"
    live.write_text("being written")
    pid, host = live.name[len(TEMPORARY_MARK):].split("~")[0].split("@")
    other_host = out / f"{TEMPORARY_MARK}{pid}@not-{host}~z.json.abc.tmp.json"
    other_host.write_text("another machine's")
    (out / "keep.json").write_text("{}")
    removed = sweep_temporaries(out) + sweep_temporaries(out / "cases")
    assert sorted(p.name for p in removed) == left
    assert sorted(p.name for p in out.iterdir()) == sorted(["cases", "keep.json", live.name, other_host.name])
    assert list((out / "cases").iterdir()) == []
    assert sweep_temporaries(tmp_path / "missing") == []


# ------------------------------------------------------------------ real data


def test_cohort_cases_read_with_their_labels(cohort):
    """Two cohort cases (real Hippocampus: 001 stores its label as uint8, 003 as float32):
    image and label share the grid and the labels hold exactly {0, 1, 2}."""
    ds = Dataset(cohort.root)
    assert ds.label_map.values == (0, 1, 2)
    for case in [cohort.template, cohort.unlabeled[0]]:
        img = ds.read_image(case)
        lab = ds.read_label(case, reference=img)
        assert img.shape == lab.shape and img.array.dtype == np.float32
        np.testing.assert_allclose(img.affine, lab.affine, atol=1e-3)
        assert set(np.unique(lab.array)) == {0, 1, 2}
        raw = np.asanyarray(nib.load(str(ds.labels[case])).dataobj)
        assert sorted(np.unique(raw).tolist()) == [0, 1, 2]
        np.testing.assert_array_equal(
            lab.array, nib.orientations.apply_orientation(np.rint(raw), lab.ornt).astype(np.uint8))
        assert img.spacing == pytest.approx((1.0, 1.0, 1.0), abs=1e-3)
        assert np.isfinite(img.array).all() and img.array.std() > 0


def test_nifti2_with_oblique_affine_round_trips(tmp_path):
    """NIfTI-2 input, rotated 20 degrees about z with a flipped x axis: the output is
    NIfTI-2 with the exact input affine and the same stored voxel order."""
    data = _image_data(4)
    th = np.deg2rad(20.0)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.5, 1.0, 2.0])
    affine[:3, 3] = [5.0, 6.0, 7.0]
    p = tmp_path / "n2.nii"
    nib.Nifti2Image(data, affine).to_filename(str(p))
    v = read_image(p)
    assert v.spacing == pytest.approx((1.5, 1.0, 2.0))
    seg = (v.array > 100).astype(np.uint8)
    out = nib.load(str(write_label(tmp_path / "o.nii", seg, v, LM3)))
    assert isinstance(out, nib.Nifti2Image)
    np.testing.assert_allclose(out.affine, nib.load(str(p)).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), (data > 100).astype(np.uint8))


def test_qform_sform_orientation_disagreement_is_warned_once(tmp_path, capsys):
    """qform RAS and sform LAS: the sform is used, and the user is told so (one line per file)."""
    ras, las = np.diag([1.0, 1, 1, 1]), np.diag([-1.0, 1, 1, 1])
    img = nib.Nifti1Image(_image_data(), las)
    img.set_qform(ras, code=1)
    path = tmp_path / "forms.nii.gz"
    nib.save(img, str(path))
    vol = read_image(path)
    read_image(path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "forms.nii.gz" in err[0] and "qform (RAS)" in err[0] and "sform (LAS)" in err[0]
    # the sform's orientation is the one used: canonical array is the stored one flipped along x
    np.testing.assert_array_equal(vol.array, _image_data()[::-1])
    agreeing = _save(tmp_path / "agree.nii.gz", _image_data())
    read_image(agreeing)
    assert capsys.readouterr().err == ""


def test_atomic_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        from semisam_o1.core.files import write_json

        write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_disk_full_is_one_line_naming_the_file_and_nothing_half_written(tmp_path):
    import helpers

    from semisam_o1.core.files import write_json

    with helpers.small_filesystem(tmp_path / "fs", 64) as fs:
        target = fs.path / "big.json"
        with pytest.raises(InputError) as info:
            write_json(target, {"x": "y" * 200_000})
        msg = str(info.value)
        assert "big.json" in msg and "No space left" in msg and "\n" not in msg
        assert list(fs.path.iterdir()) == []  # no temporary file left behind
        fs.resize(2048)
        write_json(target, {"x": "y" * 200_000})  # the same call succeeds once space is freed
        assert json.loads(target.read_text())["x"] == "y" * 200_000
