"""`run` validates every input before any stage starts (semisam_o1.pipeline.validate): each bad input is one
line naming the file, exit 2, and no work folder; the feature-store size estimate against a store
that encode really wrote; the free-disk check (a monkeypatched shutil.disk_usage and a small tmpfs).

Runs ``semisam_o1.cli.main`` in-process on a damaged copy of the ``cohort`` fixture (real
Hippocampus cases, or the synthetic cohort)."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import helpers
import nibabel as nib
import numpy as np
import pytest

from semisam_o1 import cli
from semisam_o1.pipeline import validate


def _copy_cohort(cohort, root: Path) -> Path:
    """A copy of the cohort's files (template, pool, test) that a test may damage."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(cohort.root / "dataset.json", root)
    for case in [cohort.template, *cohort.unlabeled, *cohort.test]:
        shutil.copy(cohort.root / "imagesTr" / f"{case}.nii.gz", root / "imagesTr")
        shutil.copy(cohort.root / "labelsTr" / f"{case}.nii.gz", root / "labelsTr")
    return root


def _run_main(capsys, root: Path, split: Path, work: Path) -> str:
    """``semisam-o1 run`` in-process; asserts exit 2 and one stderr line (warnings aside), returns it."""
    rc = cli.main(["run", "-i", str(root), "--split", str(split), "-o", str(work), "--preset", "quick", "--quiet"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning" not in line]
    assert rc == 2, err
    assert len(err) == 1, err
    return err[0]


def _rewrite(path: Path, change) -> None:
    """Rewrite a NIfTI file with ``change(data)`` applied, same affine."""
    img = nib.load(str(path))
    data = change(np.asarray(img.dataobj))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _nan(data):
    data = data.astype(np.float32)
    data[1, 2, 3] = np.nan
    return data


def _undeclared(data):
    data = data.copy()
    data[tuple(np.argwhere(data > 0)[0])] = 7  # dataset.json declares 0, 1, 2
    return data


FAULTS = {  # fault -> (file to damage: (folder, which case), change or None for a cut file, words of the line)
    "corrupt pool image": (("imagesTr", "pool"), None, ""),
    "template label off its image": (("labelsTr", "template"), lambda d: d[:-2], "shape"),
    "empty template label": (("labelsTr", "template"), np.zeros_like, "no foreground"),
    "template label with a class not in dataset.json": (("labelsTr", "template"), _undeclared, "7"),
    "NaN in a test image": (("imagesTr", "test"), _nan, "NaN"),
    "test label off its image": (("labelsTr", "test"), lambda d: d[:, :-1], "shape"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_run_checks_inputs_before_writing(tmp_path, cohort, capsys, fault):
    """A corrupt pool image, a template label on another grid, without foreground or with an
    undeclared class, a NaN voxel in a test image, a test label on another grid: one line naming the
    file, exit 2, and no work folder (nothing encoded first)."""
    root = _copy_cohort(cohort, tmp_path / "ds")
    (folder, which), change, words = FAULTS[fault]
    case = {"pool": cohort.unlabeled[1], "template": cohort.template, "test": cohort.test[-1]}[which]
    bad = root / folder / f"{case}.nii.gz"
    if change is None:
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        _rewrite(bad, change)
    line = _run_main(capsys, root, cohort.split_file, tmp_path / "w")
    assert str(bad) in line and words in line, line
    assert not (tmp_path / "w").exists()


def test_run_refuses_a_corrupt_gzip_stream(tmp_path, cohort, capsys):
    """A pool image whose gzip stream fails its CRC check (it decompresses, with one byte changed):
    one line naming it, exit 2, no work folder."""
    root = _copy_cohort(cohort, tmp_path / "ds")
    bad = helpers.corrupt_gzip_stream(root / "imagesTr" / f"{cohort.unlabeled[1]}.nii.gz")
    line = _run_main(capsys, root, cohort.split_file, tmp_path / "w")
    assert line == f"semisam-o1 run: error: {bad}: the file is corrupt (gzip CRC check failed)"
    assert not (tmp_path / "w").exists()


class _Validated(Exception):
    """Raised where ``run`` takes its lock, i.e. once every input check passed."""


def test_run_refuses_a_declared_class_the_template_lacks(tmp_path, cohort, capsys, monkeypatch):
    """dataset.json declaring a class (value 3) that the template's label does not hold: refused before
    anything is encoded (as ``run --images`` refuses ``--labels 1=A,2=B,3=C`` with a template lacking
    3), one line naming dataset.json and the class, exit 2, no work folder."""
    from semisam_o1.pipeline import run as run_module

    root = _copy_cohort(cohort, tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    msd = all(str(k).isdigit() for k in meta["labels"])  # MSD {"0": name} or nnU-Net v2 {name: 0}
    meta["labels"] = {**meta["labels"], **({"3": "extra"} if msd else {"extra": 3})}
    (root / "dataset.json").write_text(json.dumps(meta))

    def checked(work):
        raise _Validated(work)

    monkeypatch.setattr(run_module, "FolderLock", checked)  # past the checks: the test fails here
    line = _run_main(capsys, root, cohort.split_file, tmp_path / "w")
    assert line == (f"semisam-o1 run: error: {root / 'dataset.json'}: declares the class extra=3, which the "
                    f"template's label {root / 'labelsTr' / (cohort.template + '.nii.gz')} does not hold (each class "
                    "is learnt from its template voxels); drop it from labels or label it in the template"), line
    assert not (tmp_path / "w").exists()


def test_run_refuses_a_test_case_without_label(tmp_path, cohort, capsys):
    root = _copy_cohort(cohort, tmp_path / "ds")
    (root / "labelsTr" / f"{cohort.test[0]}.nii.gz").unlink()
    line = _run_main(capsys, root, cohort.split_file, tmp_path / "w")
    assert f"{cohort.test[0]}.nii.gz" in line and "scored" in line
    assert not (tmp_path / "w").exists()


def test_run_refuses_too_little_free_disk(tmp_path, cohort, capsys, monkeypatch):
    """A file system with less room than the feature store needs (shutil.disk_usage says 1 MB free):
    one line with the folder, the needed and the free bytes; no work folder."""
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(validate.shutil, "disk_usage",
                        lambda p: usage(10**9, 10**9 - 10**6, 10**6) if str(p).startswith(str(tmp_path)) else real(p))
    work = tmp_path / "w"
    line = _run_main(capsys, cohort.root, cohort.split_file, work)
    assert line.startswith(f"semisam-o1 run: error: {work}: not enough free disk")
    assert "(1000000 bytes) free" in line and str(tmp_path) in line
    needed = int(line.split("need about ")[1].split("(")[1].split(" bytes")[0])
    assert needed > 10**6
    assert not work.exists()


def test_free_disk_check_on_a_small_filesystem(tmp_path, cohort):
    """The same check against a real 1 MiB tmpfs (root only; skipped elsewhere)."""
    from semisam_o1.core.errors import InputError
    from semisam_o1.data.dataset import Dataset

    with helpers.small_filesystem(tmp_path / "fs", 1024) as fs:
        with pytest.raises(InputError, match="not enough free disk") as exc:
            validate.validate_run(Dataset(cohort.root), cohort.template, cohort.unlabeled[:3], cohort.test,
                                  fs.path / "work", rounds=1, quiet=True)
        assert str(fs.path) in str(exc.value)
        assert list(fs.path.iterdir()) == []


@pytest.fixture(scope="module")
def pool_store(tmp_path_factory, cohort):
    """A feature store encode really wrote: the pooling ONNX encoder (4x4 average pooling of the 256 px
    canvas: LiteMedSAM's canvas and cell, 3 channels) reduced to 2 channels, on template + 2 pool cases."""
    import onnx
    from onnx import TensorProto, helper

    from semisam_o1.stages.encode import EncodeSettings, encode

    root = tmp_path_factory.mktemp("vstore")
    node = helper.make_node("AveragePool", ["image"], ["features"], kernel_shape=[4, 4], strides=[4, 4])
    graph = helper.make_graph(
        [node], "pool", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 256])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(root / "pool.onnx"))
    cases = (cohort.template, *cohort.unlabeled[:2])
    encode(EncodeSettings(input=cohort.root, output=root / "features", cases=cases, encoder="onnx",
                          checkpoint=root / "pool.onnx", channels=2, quiet=True, threads=2))
    return root / "features", cases


def test_store_estimate_matches_a_written_store(pool_store, cohort):
    """estimate_store_bytes from the images' headers and encode's settings against the bytes of a store
    encode wrote with its default storage, int8 (per-case grids exactly: 1 byte per value; meta.json,
    which holds the channel scales, and the records within their allowance); the same store in float16
    is twice the grid bytes."""
    from semisam_o1.data.dataset import Dataset
    from semisam_o1.data.images import canonical_shape
    from semisam_o1.data.store import (
        NPY_HEADER_BYTES,
        RECORD_BYTES,
        FeatureStore,
        StoreGeometry,
        case_store_bytes,
        estimate_store_bytes,
        meta_bytes,
    )

    features, cases = pool_store
    assert json.loads((features / "store.json").read_text())["storage"] == "int8"
    ds = Dataset(cohort.root)
    shapes = {c: canonical_shape(ds.image_path(c)) for c in cases}
    geo = StoreGeometry(input_size=256, cell=4, raw_channels=3, channels=2, axes=(0, 1, 2))
    assert geo.storage == "int8"
    f16 = StoreGeometry(input_size=256, cell=4, raw_channels=3, channels=2, axes=(0, 1, 2), storage="float16")
    tile = geo.tile_for(shapes[cohort.template])
    assert tile == json.loads((features / "store.json").read_text())["packing"]["tile"]
    for c in cases:  # the grids: exact
        grids = sum((features / "cases" / c / f"axis{a}.npy").stat().st_size for a in range(3))
        assert case_store_bytes(shapes[c], tile, geo) - meta_bytes(geo) == grids
        assert case_store_bytes(shapes[c], tile, f16) - meta_bytes(f16) - 3 * NPY_HEADER_BYTES == \
            2 * (grids - 3 * NPY_HEADER_BYTES)
        assert meta_bytes(f16) < (features / "cases" / c / "meta.json").stat().st_size <= meta_bytes(geo)
    est = estimate_store_bytes(shapes, shapes[cohort.template], geo)
    real = FeatureStore(features).size_bytes()
    assert real <= est <= real + RECORD_BYTES + len(cases) * meta_bytes(geo)


def test_the_estimate_of_a_resumed_run_follows_its_float16_store(cohort, tmp_path):
    """A run resumed on a float16 store (written before int8 became the default) adds float16 cases:
    validate estimates them at 2 bytes per value, a new run at 1 (int8)."""
    from semisam_o1.data.dataset import Dataset
    from semisam_o1.data.store import estimate_store_bytes, write_config

    ds = Dataset(cohort.root)
    pool = cohort.unlabeled[:2]
    fresh = validate.validate_run(ds, cohort.template, pool, [], tmp_path / "new", rounds=1, quiet=True)
    write_config(tmp_path / "old" / "features", {"format": 2, "storage": "float16", "axes": [0, 1, 2]})
    resumed = validate.validate_run(ds, cohort.template, pool, [], tmp_path / "old", rounds=1, quiet=True)
    shapes = {c: ds.read_image(c).shape for c in (cohort.template, *pool)}
    for summary, storage in ((fresh, "int8"), (resumed, "float16")):
        geo = validate.run_store_geometry({"storage": storage})
        assert geo.storage == storage
        assert summary["store_bytes"] == estimate_store_bytes(shapes, shapes[cohort.template], geo)
    assert validate.run_store_geometry().storage == "int8"
    assert 1.9 < resumed["store_bytes"] / fresh["store_bytes"] < 2.0


def test_run_store_geometry_is_the_run_store():
    """run's store: LiteMedSAM (256 px canvas, 4 px cells, 800 channels of stage1-3) reduced to
    encode's default 64 channels on the three axes (the values store.json records)."""
    geo = validate.run_store_geometry()
    assert (geo.input_size, geo.cell, geo.raw_channels, geo.stored_channels, geo.axes) == (256, 4, 800, 64, (0, 1, 2))
    assert geo.tile_for((35, 51, 35)) == 128 and geo.tile_for((320, 320, 88)) == 256


def test_training_spill_estimate_covers_what_train_writes(tmp_path, cohort):
    """validate counts TRAIN_SPILL_BYTES_PER_VOXEL per training voxel for the volumes train spills to
    disk: the files spill_volume really writes for a cohort case (with a confidence weight) are within
    that bound and above 80% of it (the .npy headers aside)."""
    from semisam_o1.data.dataset import Dataset
    from semisam_o1.stages import nets
    from semisam_o1.stages import train as T

    ds = Dataset(cohort.root)
    case = cohort.template
    entry = T.read_volume(ds, case, ds.label_path(case), dict(nets.NORMALISATION))
    entry["weight"] = np.ones_like(entry["image"])
    T.add_indices(entry)
    rec = T.spill_volume(entry, tmp_path / "v")
    written = sum(f.stat().st_size for f in rec["files"].values())
    voxels = int(np.prod(entry["label"].shape))
    assert 0.8 * validate.TRAIN_SPILL_BYTES_PER_VOXEL * voxels < written
    assert written <= validate.TRAIN_SPILL_BYTES_PER_VOXEL * voxels + 5 * 256  # five .npy headers
    base = validate.needed_bytes(0, 1000, 0, 1)
    assert validate.needed_bytes(0, 1000, 0, 1, template_voxels=100) - base == validate.TRAIN_SPILL_BYTES_PER_VOXEL * 100
