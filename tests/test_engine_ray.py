"""The Ray engine (semisam_o1.core.engine): encode and predict on a local two-worker Ray cluster equal
the local engine's outputs; the Ray engine resumes (only unfinished cases are sent) and reports a
bad case as one line while the others are written.

Data: three cases of the ``cohort`` fixture (the template and two pool cases; real Hippocampus
when present, else the synthetic cohort) plus, for the error test, one corrupt image. Encoder: a
tiny random convolutional ONNX model (8x8 patches, stride 4, 16 channels, ReLU, 1x1 conv), reduced
to 8 channels by the PCA basis fitted on the template, so both the driver's fit and the actors'
projection run; LiteMedSAM would take minutes here. Network: the ``quick`` UNet preset trained for
a few iterations. One Ray cluster (2 CPUs) serves the module, except the first test, where the
engine starts (and shuts down) its own instance as the command line does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import ray  # the `ray` extra: CI installs it (scripts/setup.sh), so this test never skips

from semisam_o1 import cli
from semisam_o1.core.errors import InputError
from semisam_o1.data.images import read_image
from semisam_o1.data.store import FeatureStore
from semisam_o1.stages.encode import EncodeSettings, encode
from semisam_o1.stages.predict import PredictSettings, entropy_file, label_file, predict
from semisam_o1.stages.train import TrainSettings, train

THREADS = 1  # per worker, and the local engine's, so the driver's PCA fit is the same bit for bit
CHANNELS = 8
# Features are float16 roundings of float32 values; two float32 results that agree to float32
# rounding round to float16 values at most one float16 ulp apart: <= eps16 |x| (eps16 = 2^-10)
# for normal numbers, 2^-24 (the smallest subnormal step) near 0. The store is int8 (encode's
# default): each value is scale[c] * q with |scale[c] * q - x| <= scale[c] / 2, scale[c] =
# max |x_c| / 127 (so two stores' scales agree within eps16), and CaseFeatures.grid rounds the
# dequantised value to float16 (2^-11 relative): two stores whose float16 features agree within
# eps16 give grids within scale_a / 2 + scale_b / 2 + eps16 |x| + 2 * 2^-11 |x|.
F16_RTOL, F16_ATOL = 2.0 ** -10, 2.0 ** -24


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory) -> Path:
    """(B, 3, 256, 256) -> (B, 16, 64, 64): Conv 8x8 stride 4 pad 2 (3 -> 16), ReLU, Conv 1x1 (16 -> 16)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((16, 3, 8, 8)) / 40).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) / 4).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["h"], kernel_shape=[8, 8], strides=[4, 4], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["features"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            ["batch", 3, 256, 256])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16, 64, 64])],
                              initializer=[w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, cohort) -> dict:
    """A dataset folder with the template, two pool cases (images and labels) and one corrupt image."""
    root = tmp_path_factory.mktemp("engine") / "data"
    cases = [cohort.template, *cohort.unlabeled[:2]]
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for c in cases:
            shutil.copy(cohort.root / sub / f"{c}.nii.gz", root / sub / f"{c}.nii.gz")
    meta = json.loads((cohort.root / "dataset.json").read_text())
    meta.pop("training", None)
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "imagesTr" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return {"root": root, "cases": cases, "template": cohort.template}


def _encode(data, onnx, out, cases, **kw) -> dict:
    kw = {"encoder": "onnx", "checkpoint": onnx, "channels": CHANNELS, "reduction_case": data["template"],
          "threads": THREADS, "quiet": True, **kw}
    return encode(EncodeSettings(input=data["root"], output=out, cases=tuple(cases), **kw))


def _assert_same_store(a: Path, b: Path, cases) -> None:
    """Same store signature (int8 storage), same cases with the same meta (but seconds; the channel
    scales within float16 rounding), features within the int8 quantisation bound (F16_RTOL's note)."""
    sa, sb = FeatureStore(a), FeatureStore(b)
    assert sa.config["signature"] == sb.config["signature"]
    assert sa.config["storage"] == sb.config["storage"] == "int8"
    assert sorted(sa.cases()) == sorted(sb.cases()) == sorted(cases)
    for case in cases:
        ma, mb = sa.read_meta(case), sb.read_meta(case)
        scales = []
        for m in (ma, mb):
            m.pop("seconds")
            scales.append({axis: np.asarray(g.pop("scale"), np.float32) for axis, g in m["grids"].items()})
        assert ma == mb
        fa, fb = sa.load(case), sb.load(case)
        for axis in fa.axes:
            (qa, scale_a), (qb, scale_b) = fa.stored(axis), fb.stored(axis)
            assert qa.dtype == qb.dtype == np.int8 and qa.shape == qb.shape
            np.testing.assert_array_equal(scale_a, scales[0][str(axis)])
            np.testing.assert_allclose(scale_b, scale_a, rtol=F16_RTOL)
            ga, gb = np.asarray(fa.grid(axis), np.float32), np.asarray(fb.grid(axis), np.float32)
            assert np.abs(ga).max() > 0
            tol = ((scale_a + scale_b) / 2).reshape(-1, 1, 1, 1) + (F16_RTOL + 2.0 ** -10) * np.abs(ga) + F16_ATOL
            assert (np.abs(gb - ga) <= tol).all(), float((np.abs(gb - ga) - tol).max())
            assert np.mean(qa == qb) > 0.99  # one step apart only where float16 rounding tips the int8 rounding


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data, conv_onnx) -> dict:
    """The local engine's store of the three cases, and the Ray engine's from the command line (its
    own local instance of 2 workers, started and shut down by the call) of the same cases and the
    corrupt one: ``{"local", "ray", "ray_rc" (exit status), "ray_stderr" (its error lines)}``."""
    root = tmp_path_factory.mktemp("stores")
    local = _encode(data, conv_onnx, root / "local", data["cases"])
    assert local["encoded"] == 3
    assert not ray.is_initialized()
    argv = ["encode", "-i", str(data["root"]), "-o", str(root / "ray"), "--cases", *data["cases"], "broken",
            "--encoder", "onnx", "--checkpoint", str(conv_onnx), "--channels", str(CHANNELS),
            "--reduction-case", data["template"], "--threads", str(THREADS), "--quiet",
            "--engine", "ray", "--workers", "2"]
    with _stderr_lines() as err:
        rc = cli.main(argv)
    assert not ray.is_initialized()  # the engine shut down the instance it started
    return {"local": root / "local", "ray": root / "ray", "ray_rc": rc,
            "ray_stderr": [ln for ln in err if "error" in ln]}


@contextlib.contextmanager
def _stderr_lines():
    """Collect what is written to sys.stderr inside the block, as a list of lines (filled on exit)."""
    lines: list[str] = []
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield lines
    lines.extend(buf.getvalue().splitlines())


@pytest.fixture(scope="module")
def cluster(stores):
    """One local Ray cluster of 2 CPUs for the rest of the module (the engine uses a connected process as is)."""
    os.environ.setdefault("RAY_worker_niceness", "0")  # as the engine's own instance: not niced below the test
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def test_ray_encode_equals_local_and_reports_a_bad_case(stores, data):
    """Same store as the local engine's; the corrupt case is one error line (exit 2), the others are written."""
    _assert_same_store(stores["local"], stores["ray"], data["cases"])
    assert stores["ray_rc"] == 2
    assert len(stores["ray_stderr"]) == 1 and stores["ray_stderr"][0].startswith("semisam-o1 encode: error: ")
    assert "broken" in stores["ray_stderr"][0]


def test_ray_encode_resumes(stores, data, conv_onnx, cluster):
    again = _encode(data, conv_onnx, stores["ray"], data["cases"], engine="ray", workers=2)
    assert (again["encoded"], again["skipped"]) == (0, 3)
    shutil.rmtree(stores["ray"] / "cases" / data["cases"][2])
    before = (stores["ray"] / "cases" / data["cases"][1] / "meta.json").stat().st_mtime_ns
    once = _encode(data, conv_onnx, stores["ray"], data["cases"], engine="ray", workers=2)
    assert (once["encoded"], once["skipped"]) == (1, 2)
    assert (stores["ray"] / "cases" / data["cases"][1] / "meta.json").stat().st_mtime_ns == before
    _assert_same_store(stores["local"], stores["ray"], data["cases"])


def test_a_worker_that_cannot_start_stops_the_stage_with_one_line(cluster, tmp_path):
    """A worker whose machine does not see the dataset: its InputError, naming the machine, comes
    back through Ray and stops the stage (the driver never got to the case)."""
    from functools import partial

    from semisam_o1.core.engine import run_cases
    from semisam_o1.stages.encode import encode_worker

    s = EncodeSettings(input=tmp_path / "not-here", output=tmp_path / "store", engine="ray", workers=1, quiet=True)
    never = partial(pytest.fail, "the case ran in the driver")
    with pytest.raises(InputError, match=r"^a Ray worker on .+: .*not-here"):
        list(run_cases(s, ["case"], never, partial(encode_worker, job=None, store=None, input_hash={})))


def test_engine_options_are_checked(data, conv_onnx, tmp_path):
    with pytest.raises(InputError, match="--workers 2: only with --engine ray"):
        EncodeSettings(input=data["root"], output=tmp_path / "x", workers=2)
    with pytest.raises(InputError, match="--engine dask"):
        PredictSettings(input=data["root"], model=tmp_path, output=tmp_path / "x", engine="dask")


def test_ray_encode_refuses_more_than_the_cluster(data, conv_onnx, cluster, tmp_path):
    with pytest.raises(InputError, match=r"\(CPUs: 2\) have room for 1"):
        _encode(data, conv_onnx, tmp_path / "s", data["cases"], engine="ray", workers=2, threads=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, data) -> Path:
    """A quick UNet trained on the template and the two pool cases' real labels."""
    out = tmp_path_factory.mktemp("model") / "model"
    train(TrainSettings(input=data["root"], labels=data["root"] / "labelsTr", template=data["template"],
                        cases=tuple(data["cases"]), output=out, preset="quick", iterations=4, device="cpu",
                        threads=2, quiet=True))
    return out


def _voxels(path: Path) -> np.ndarray:
    """The stored voxel values of a NIfTI file (no scaling, the file's voxel order)."""
    return np.asarray(nib.load(str(path)).dataobj)


def test_ray_predict_equals_local(data, model, cluster, tmp_path):
    kw = dict(input=data["root"], model=model, cases=tuple(data["cases"]), device="cpu", threads=THREADS, quiet=True)
    local = predict(PredictSettings(output=tmp_path / "local", **kw))
    remote = predict(PredictSettings(output=tmp_path / "ray", engine="ray", workers=2, **kw))
    assert local["predicted"] == remote["predicted"] == 3
    labels = set()
    for case in data["cases"]:
        a = _voxels(label_file(tmp_path / "local", case))
        b = _voxels(label_file(tmp_path / "ray", case))
        np.testing.assert_array_equal(b, a)
        labels |= set(np.unique(a).tolist())
        # the same float32 network on the same threads: entropies equal to float32 rounding (ln 3 < 1.1 nats)
        ea = read_image(entropy_file(tmp_path / "local", case)).array
        eb = read_image(entropy_file(tmp_path / "ray", case)).array
        np.testing.assert_allclose(eb, ea, rtol=0, atol=1e-6)
        assert ea.max() > ea.min()
        assert remote["entropy"][case] == pytest.approx(local["entropy"][case], abs=1e-6)
    assert len(labels) > 1  # the labels compared are not one constant value


def test_workers_threads_and_gpus_from_the_cluster(data, tmp_path):
    """engine._size: CPU actors fill the machines' CPUs; on a GPU cluster one GPU per actor; an actor
    never spans machines."""
    from semisam_o1.core.engine import _size

    def s(**kw):
        return EncodeSettings(input=data["root"], output=tmp_path / "x", engine="ray", **kw)

    two = [{"CPU": 8.0}, {"CPU": 8.0}]  # two 8-CPU machines
    gpus = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert _size(s(), two, 100) == (16, 1, 0)  # T = 1: one actor per CPU
    assert _size(s(threads=3), two, 100) == (4, 3, 0)  # 8 // 3 = 2 per machine
    assert _size(s(workers=4), two, 100) == (4, 4, 0)  # T = CPUs // N
    assert _size(s(workers=1), two, 100) == (1, 8, 0)  # at most one machine's CPUs
    assert _size(s(), two, 5) == (5, 1, 0)  # no more actors than cases
    assert _size(s(device="cpu"), gpus, 100) == (24, 1, 0)  # --device cpu leaves the GPUs alone
    assert _size(s(), gpus, 100) == (3, 8, 1)  # auto on a GPU cluster: one actor per GPU
    assert _size(s(device="cuda", workers=2, threads=2), gpus, 100) == (2, 2, 1)
    with pytest.raises(InputError, match=r"\(GPUs: 1, 2\) have room for 3"):
        _size(s(workers=4), gpus, 100)
    with pytest.raises(InputError, match=r"\(CPUs: 8, 8\) have room for 2"):
        _size(s(workers=3, threads=5), two, 100)
    with pytest.raises(InputError, match="the Ray cluster has no GPU"):
        _size(s(device="cuda"), two, 100)
