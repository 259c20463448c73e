"""Ctrl-C (SIGINT to the command's process group, as a terminal sends it) in the work loop of every
long stage: encode, propagate, train, predict, refine and run. Each: exit status 130, one last line on
stderr and no traceback, no temporary or half-written file, and the same command run again finishes
without redoing the cases finished before the interrupt (their files keep their mtime). A killed
``train`` (SIGINT or kill -9) resumes from its last checkpoint's iteration.

The inputs are a synthetic MSD cohort (tests/helpers.py: template + 3 pool + 2 test cases) of 48^3
volumes, so that one case of each stage takes a second or more on 2 cores and the interrupt lands
while the later cases are still to do; the encoder is an ONNX graph on LiteMedSAM's 256 px canvas
(4x4 average pooling, after a chain of identity matrix products that makes it slow enough to be
interrupted mid-cohort); the UNet is the ``quick`` preset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest

THREADS = "2"
RESUME = "finished outputs are kept, re-run to resume"


# --------------------------------------------------------------------------- inputs


def _onnx_encoder(path: Path, products: int) -> Path:
    """(B,3,256,256) -> (B,3,64,64): ``products`` multiplications by the 256x256 identity, then 4x4
    average pooling (features = the image, at a cost that grows with ``products``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    eye = numpy_helper.from_array(np.eye(256, dtype=np.float32), name="eye")
    nodes, x = [], "image"
    for i in range(products):
        nodes.append(helper.make_node("MatMul", [x, "eye"], [f"m{i}"]))
        x = f"m{i}"
    nodes.append(helper.make_node("AveragePool", [x], ["features"], kernel_shape=[4, 4], strides=[4, 4]))
    graph = helper.make_graph(
        nodes, "slow_pool", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 256])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 64, 64])], initializer=[eye])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The cohort, the encoders, a feature store, pool labels, a quick model and its pool predictions."""
    from semisam_o1.stages.encode import EncodeSettings, encode
    from semisam_o1.stages.predict import PredictSettings, predict
    from semisam_o1.stages.train import TrainSettings, train

    root = tmp_path_factory.mktemp("interrupt")
    split = helpers.make_cohort(root / "ds", n_unlabeled=3, n_test=2, shape=(48, 48, 48))
    ds, tpl, pool = root / "ds", split["template"], split["unlabeled"]
    fast, slow = _onnx_encoder(root / "pool.onnx", 0), _onnx_encoder(root / "slow.onnx", 12)
    encode(EncodeSettings(input=ds, output=root / "features", cases=(tpl, *pool), encoder="onnx", checkpoint=fast,
                          channels=0, quiet=True, threads=2))
    labels = root / "labels"
    labels.mkdir()
    for c in pool:
        shutil.copy(ds / "labelsTr" / f"{c}.nii.gz", labels)
    train(TrainSettings(input=ds, labels=labels, template=tpl, cases=tuple(pool), output=root / "model",
                        preset="quick", device="cpu", threads=2, quiet=True))
    predict(PredictSettings(input=ds, model=root / "model", output=root / "pred", cases=tuple(pool), device="cpu",
                            threads=2, quiet=True))
    return {"root": root, "ds": ds, "split": split, "template": tpl, "pool": pool, "fast": fast, "slow": slow,
            "features": root / "features", "labels": labels, "model": root / "model", "pred": root / "pred"}


# --------------------------------------------------------------------------- the interrupt


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "semisam_o1", *[str(a) for a in args]]


def _patched_cli(setup: str, *args) -> list[str]:
    """The CLI after ``setup`` (Python statements) ran in the same process."""
    code = f"import sys\n{setup}\nfrom semisam_o1.cli import main\nsys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *[str(a) for a in args]]


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt even when
    pytest itself runs in the background (a shell starts background jobs with SIGINT ignored, and an
    ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(cmd: list[str], ready, tmp: Path, sig=signal.SIGINT, timeout: float = 600) -> tuple[int, str]:
    """Start ``cmd`` in its own process group, wait until ``ready()`` is true (polled every 20 ms),
    send ``sig`` to the whole group (a terminal's Ctrl-C reaches every process of the foreground
    group), and return ``(exit status, stderr)``."""
    err_path = tmp / f"stderr_{time.monotonic_ns()}.txt"
    with open(err_path, "wb") as err, open(os.devnull, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True, preexec_fn=_default_sigint,
                                env=dict(os.environ, OMP_NUM_THREADS=THREADS))
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"ended ({proc.returncode}) before the interrupt:\n{err_path.read_text()}"
                assert time.monotonic() < deadline, "the stage did not reach its work loop in time"
                time.sleep(0.02)
            assert proc.poll() is None, f"finished before the interrupt:\n{err_path.read_text()}"
            os.killpg(proc.pid, sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, err_path.read_text(errors="replace")


def _assert_interrupted(rc: int, err: str, stage: str, sig=signal.SIGINT) -> None:
    """Exit 130 (Ctrl-C) or 128 + the signal's number (SIGTERM 143, SIGHUP 129), no traceback, and
    the last line on stderr (progress bars redraw with \\r) is the CLI's one stop line, printed once."""
    reason = "interrupted" if sig == signal.SIGINT else f"terminated ({signal.Signals(sig).name})"
    message = f"{reason}; {RESUME}"
    assert rc == (130 if sig == signal.SIGINT else 128 + sig), err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [part.strip() for line in err.splitlines() for part in line.split("\r") if part.strip()]
    assert lines[-1] == f"semisam-o1 {stage}: {message}", lines[-3:]
    assert sum(RESUME in line for line in lines) == 1


def _temporaries(folder: Path) -> list[Path]:
    """Every temporary file or folder (atomic_path's files, the store's case folders: names made by
    ``io.temporary_prefix``, ``.~PID@HOST~NAME.XXXX``) under ``folder``."""
    from semisam_o1.core.files import TEMPORARY_MARK

    return [p for p in folder.rglob(".*") if p.name.startswith(TEMPORARY_MARK) or ".tmp" in p.name]


def _mtimes(paths) -> dict:
    return {p: p.stat().st_mtime_ns for p in paths}


def _run_again(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS=THREADS))
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 0, err
    return err + out.stdout.decode(errors="replace")


def _label_files(folder: Path, cases) -> list[Path]:
    return [folder / f"{c}.nii.gz" for c in cases if (folder / f"{c}.nii.gz").is_file()]


def _check_per_case_stage(cmd, stage: str, out: Path, cases, finished_files, tmp: Path, sig=signal.SIGINT) -> None:
    """Interrupt a per-case stage once its first case is written, then run it again: the finished
    cases are kept as they were, the others written, the record finished."""
    rc, err = _interrupt(cmd, lambda: len(finished_files()) > 0, tmp, sig=sig)
    _assert_interrupted(rc, err, stage, sig)
    assert not _temporaries(out)
    done = finished_files()
    assert done
    kept = _mtimes(done)
    assert len(_label_files(out, cases)) < len(cases), "every case was finished before the interrupt"
    assert not json.loads((out / "stage.json").read_text())["finished"]
    _run_again(cmd)
    assert _mtimes(kept) == kept  # not redone
    assert len(_label_files(out, cases)) == len(cases)
    assert json.loads((out / "stage.json").read_text())["finished"] and not _temporaries(out)


# --------------------------------------------------------------------------- the stages


def test_interrupt_encode(inputs, tmp_path):
    v = inputs
    out = tmp_path / "features"
    cases = [v["template"], *v["pool"]]
    cmd = _cli("encode", "-i", v["ds"], "-o", out, "--cases", *cases, "--encoder", "onnx", "--checkpoint", v["slow"],
               "--channels", "0", "--threads", THREADS)

    def finished():
        return sorted((out / "cases").glob("*/meta.json")) if (out / "cases").is_dir() else []

    rc, err = _interrupt(cmd, lambda: len(finished()) > 0, tmp_path)
    _assert_interrupted(rc, err, "encode")
    assert not _temporaries(out)
    done = [p.parent for p in finished()]
    assert 1 <= len(done) < len(cases)
    kept = _mtimes(f for d in done for f in d.iterdir())
    log = _run_again(cmd)
    assert f"encode: {len(cases) - len(done)} encoded, {len(done)} skipped, 0 failed" in log
    assert _mtimes(kept) == kept
    assert len(finished()) == len(cases) and not _temporaries(out)
    assert json.loads((out / "stage.json").read_text())["finished"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["sigint", "sighup"])
def test_interrupt_propagate(inputs, tmp_path, sig):
    """Ctrl-C, and SIGHUP (the terminal closed) handled the same way: exit 129."""
    v = inputs
    out = tmp_path / "pseudo"
    cmd = _cli("propagate", "-i", v["ds"], "-f", v["features"], "--template", v["template"], "-o", out, "--cases",
               *v["pool"], "--threads", THREADS)
    _check_per_case_stage(cmd, "propagate", out, v["pool"], lambda: _label_files(out, v["pool"]), tmp_path, sig)


def test_interrupt_predict(inputs, tmp_path):
    v = inputs
    out = tmp_path / "pred"
    cmd = _cli("predict", "-i", v["ds"], "-m", v["model"], "-o", out, "--cases", *v["pool"], "--threads", THREADS)

    def finished():  # a case is finished once its label and its entropy map are there
        return [f for c in v["pool"] for f in (out / f"{c}.nii.gz", out / f"{c}_entropy.nii.gz")
                if (out / f"{c}_entropy.nii.gz").is_file() and (out / f"{c}.nii.gz").is_file()]

    _check_per_case_stage(cmd, "predict", out, v["pool"], finished, tmp_path)


def test_interrupt_refine(inputs, tmp_path):
    v = inputs
    out = tmp_path / "refined"
    cmd = _cli("refine", "-i", v["ds"], "-f", v["features"], "--pred", v["pred"], "-o", out, "--template",
               v["template"], "--cases", *v["pool"], "--threads", THREADS)
    _check_per_case_stage(cmd, "refine", out, v["pool"], lambda: _label_files(out, v["pool"]), tmp_path)


ITERATIONS, EVERY = 12, 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["sigint", "sigterm", "kill-9"])
def test_interrupted_train_resumes_from_its_checkpoint(inputs, tmp_path, sig):
    """train (quick preset with a checkpoint every 4 iterations) stopped after its first checkpoint:
    the same command resumes from the checkpoint's iteration (not from 0) and ends with every
    iteration logged once. SIGTERM (a scheduler's kill) is handled like Ctrl-C: exit 143."""
    import torch

    v = inputs
    out = tmp_path / "model"
    setup = f"from semisam_o1.stages import nets\nnets.PRESETS['quick']['checkpoint_every'] = {EVERY}"
    cmd = _patched_cli(setup, "train", "-i", v["ds"], "-l", v["labels"], "--template", v["template"], "--cases",
                       *v["pool"], "-o", out, "--preset", "quick", "--iterations", ITERATIONS, "--device", "cpu",
                       "--threads", THREADS)
    ckpt = out / "checkpoint.pt"
    rc, err = _interrupt(cmd, ckpt.is_file, tmp_path, sig=sig)
    if sig != signal.SIGKILL:
        _assert_interrupted(rc, err, "train", sig)
        assert not _temporaries(out)
    else:
        assert rc == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    it = int(torch.load(ckpt, weights_only=False)["iteration"])
    assert 0 < it < ITERATIONS and it % EVERY == 0
    log = _run_again(cmd)
    assert f"train: resuming {out} from iteration {it}" in log
    config = json.loads((out / "config.json").read_text())
    assert config["iterations_this_run"] == ITERATIONS - it
    rows = (out / "train_log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, ITERATIONS + 1))
    assert not ckpt.exists() and json.loads((out / "stage.json").read_text())["finished"]


def _fast_run(v: dict, work: Path, *extra) -> list[str]:
    """``semisam-o1 run --preset quick`` on the cohort, its encode stage given the fast ONNX encoder."""
    setup = ("from pathlib import Path\nfrom semisam_o1.stages import encode\nchecked = encode.EncodeSettings.__post_init__\n"
             "def fast(self):\n"
             f"    self.encoder, self.checkpoint, self.channels = 'onnx', Path({str(v['fast'])!r}), 0\n"
             "    checked(self)\n"
             "encode.EncodeSettings.__post_init__ = fast")
    return _patched_cli(setup, "run", "-i", v["ds"], "--split", v["ds"] / "splits.json", "-o", work, "--preset",
                        "quick", "--threads", THREADS, *extra)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupt_run(inputs, tmp_path, sig):
    """run (its encode stage given the fast ONNX encoder) interrupted (Ctrl-C, or SIGTERM: exit 143)
    while propagate writes the round-0 pseudo-labels: the same command reuses the store and the
    finished pseudo-labels and runs to the report."""
    v = inputs
    work = tmp_path / "work"
    cmd = _fast_run(v, work)
    pseudo = work / "round0" / "pseudo"
    rc, err = _interrupt(cmd, lambda: len(_label_files(pseudo, v["pool"])) > 0, tmp_path, sig=sig)
    _assert_interrupted(rc, err, "run", sig)
    assert not _temporaries(work)
    done = _label_files(pseudo, v["pool"])
    assert len(done) < len(v["pool"])
    store = [p for p in (work / "features").rglob("*") if p.is_file() and p.name != "stage.json"]
    kept = _mtimes(done + store)
    log = _run_again(cmd)
    assert "encode: done earlier" in log
    assert _mtimes(kept) == kept
    assert (work / "report.json").is_file() and not _temporaries(work)


def test_run_resumes_after_a_case_features_were_deleted(inputs, tmp_path):
    """A finished run whose features of one pool case were deleted (WORK/features/cases/CASE), run
    again with the same command: exit 0, encode says it re-encoded that case (not "done earlier"),
    propagate rewrites that case's pseudo-label only (the others keep their mtime) and says so, no
    stage asks for --overwrite; run once more untouched, every stage is done earlier, skipped."""
    v = inputs
    work = tmp_path / "work"
    cmd = _fast_run(v, work, "--referee", "none", "--position", "on")
    _run_again(cmd)
    gone, kept = v["pool"][1], [c for c in v["pool"] if c != v["pool"][1]]
    pseudo = work / "round0" / "pseudo"
    before = _mtimes(_label_files(pseudo, v["pool"]))
    shutil.rmtree(work / "features" / "cases" / gone)

    log = _run_again(cmd)
    assert "--overwrite" not in log, log
    assert "[run] encode: 1 case re-encoded (its features were missing)" in log, log
    assert "encode: done earlier" not in log
    assert f"[run] propagate: 1 case redone (its inputs changed: inputs.features.{gone})" in log, log
    assert (work / "features" / "cases" / gone / "meta.json").is_file()
    after = _mtimes(_label_files(pseudo, v["pool"]))
    assert after[pseudo / f"{gone}.nii.gz"] != before[pseudo / f"{gone}.nii.gz"]  # rewritten
    assert all(after[pseudo / f"{c}.nii.gz"] == before[pseudo / f"{c}.nii.gz"] for c in kept)
    record = json.loads((pseudo / "stage.json").read_text())
    assert record["finished"] and record["redone"]["cases"] == [gone]
    assert (work / "report.json").is_file() and not _temporaries(work)

    log = _run_again(cmd)
    assert "[run] encode: done earlier" in log and "[run] propagate: done earlier" in log, log
    assert "redone" not in log and "re-encoded" not in log, log
    assert _mtimes(_label_files(pseudo, v["pool"])) == after


# --------------------------------------------------------------------------- a signal inside a finaliser


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_stop_signal_inside_a_finaliser_stops_the_loop_at_its_next_case(sig, capfd):
    """A signal that arrives while a ``__del__`` runs (e.g. nibabel's, when an image is freed) would
    raise inside it, where Python prints "Exception ignored" and goes on: the stage then ran to its
    end. The handler only notes it there, and the next case of the loop stops with it."""
    from semisam_o1 import cli
    from semisam_o1.core.errors import Terminated
    from semisam_o1.core.progress import progress

    class Freed:
        def __del__(self):
            os.kill(os.getpid(), sig)  # the handler runs at the next bytecode: still in __del__
            time.sleep(0.01)

    seen = []
    expected = KeyboardInterrupt if sig == signal.SIGINT else Terminated
    before = signal.getsignal(sig)
    with cli._signals_as_interrupts():
        with pytest.raises(expected) as info:
            for quiet in (True, False):
                for i in progress(range(3), quiet=quiet):
                    seen.append(i)
                    if i == 0:
                        Freed()  # freed at once, its __del__ sends the signal
    assert seen == [0] and (sig == signal.SIGINT or info.value.signum == sig)
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(sig) == before  # the handlers are restored
    assert list(progress(range(2), quiet=True)) == [0, 1]  # and a loop outside the command runs on
