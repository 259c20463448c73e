"""The GPU check (issue #34 item 6): is the GPU really used, and how fast is each stage's work on it.

Run through ``bash benchmarks/device_check.sh`` (which first runs tests/test_kernels.py's CUDA
tests and passes their outcome here with ``--kernel-tests``). On ``--device cuda``:

* ONNX Runtime: the LiteMedSAM encoder (stages 1-3, 256 px canvas) opened with ``--device cuda``
  (:func:`semisam_o1.stages.encoders.load_encoder`, which refuses a session that did not get the CUDA
  provider); the providers the session really got (``session.get_providers()``) are recorded and
  ``CUDAExecutionProvider`` must come first;
* encode: canvases per second of that session on random 0-255 canvases, batches of 4 (``encode``'s
  default ``--batch-size``), after one warm-up batch;
* train: optimiser steps per second of the ``paper`` preset's UNet (its patch and batch, DiceCE,
  AdamW: :func:`semisam_o1.stages.train.training_step`, no teacher) on random patches, after warm-up;
* predict: seconds per case of :func:`semisam_o1.stages.predict.predict_volume` (sliding window,
  Gaussian blending) with that net on a 100 x 72 x 44 volume (a Left Atrium case's size);
* kNN vote: :func:`semisam_o1.core.kernels.knn_vote` on torch CUDA tensors, Q=20k x N=200k x C=64,
  k=10 (propagate's k), seconds and GFLOP/s (2 Q N C / s), labels compared with the CPU path on
  the first 500 queries.

``--dry-run`` does the same on the CPU with tiny sizes (a 4x4 average-pooling ONNX encoder, the
``quick`` preset, a 24^3 volume, Q=200 x N=2,000 x C=16) in a few seconds, to check the script itself.

Writes ``--out`` (default benchmarks/results/gpu.json) with the device's name and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_model
from semisam_o1.core import kernels
from semisam_o1.core.files import write_json
from semisam_o1.stages import nets
from semisam_o1.stages.encoders import load_encoder
from semisam_o1.stages.predict import predict_volume
from semisam_o1.stages.train import training_step

FULL = {"canvases": 100, "preset": "paper", "train_iterations": 50, "volume": (100, 72, 44), "predict_cases": 3,
        "knn": (20_000, 200_000, 64, 10)}
TINY = {"canvases": 8, "preset": "quick", "train_iterations": 3, "volume": (24, 24, 24), "predict_cases": 1,
        "knn": (200, 2_000, 16, 10)}
BATCH = 4  # encode's default --batch-size


def _pool_onnx(folder: Path) -> Path:
    """A tiny encoder for the dry run: (B, 3, 256, 256) -> (B, 3, 64, 64), 4x4 average pooling."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("AveragePool", ["image"], ["features"], kernel_shape=[4, 4], strides=[4, 4])
    graph = helper.make_graph([node], "pool",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 256, 256])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = folder / "pool.onnx"
    onnx.save(model, str(path))
    return path


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def check_onnx(device: str, sizes: dict, scratch: Path, threads: int | None) -> tuple[dict, dict]:
    """ONNX Runtime's providers and encode's canvases per second."""
    import onnxruntime as ort

    if device == "cuda":
        enc = load_encoder("litemedsam", device="cuda", threads=threads)
    else:
        enc = load_encoder("onnx", checkpoint=_pool_onnx(scratch), device="cpu", threads=threads)
    providers = list(enc.session.get_providers())
    want = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    onnx = {"version": ort.__version__, "available_providers": list(ort.get_available_providers()),
            "session_providers": providers, "cuda_active": providers[:1] == ["CUDAExecutionProvider"],
            "ok": providers[:1] == [want]}
    rng = np.random.default_rng(0)
    batch = (rng.random((BATCH, 3, enc.input_size, enc.input_size)) * 255).astype(np.float32)
    out = enc.run(batch)  # warm-up (CUDA: kernels chosen, memory allocated)
    n_batches = max(1, sizes["canvases"] // BATCH)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        out = enc.run(batch)
    sec = time.perf_counter() - t0
    encode = {"encoder": enc.name, "layers": list(enc.layers), "canvas": enc.input_size, "batch": BATCH,
              "canvases": n_batches * BATCH, "seconds": round(sec, 3),
              "canvases_per_s": round(n_batches * BATCH / sec, 2), "output_shape": list(out.shape)}
    return onnx, encode


def check_train_predict(device: str, sizes: dict) -> tuple[dict, dict]:
    """The preset's UNet: optimiser steps per second, then seconds per predicted case."""
    import torch
    from monai.losses import DiceCELoss

    dev = torch.device(device)
    cfg = nets.preset(sizes["preset"])
    num_classes = 3
    torch.manual_seed(0)
    net = nets.build_net(nets.net_params(cfg, num_classes)).to(dev)
    optim = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    shape = (int(cfg["batch_size"]), 1, *[int(p) for p in cfg["patch"]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dev)
    y = torch.randint(0, num_classes, shape, generator=g).to(dev)
    n = int(sizes["train_iterations"])
    net.train()
    for it in range(2):  # warm-up
        training_step(net, None, optim, loss_fn, x, y, it, n, cfg)
    _sync(device)
    t0 = time.perf_counter()
    losses = [training_step(net, None, optim, loss_fn, x, y, it, n, cfg)[0] for it in range(n)]
    _sync(device)
    sec = time.perf_counter() - t0
    train = {"preset": sizes["preset"], "patch": list(cfg["patch"]), "batch": int(cfg["batch_size"]),
             "iterations": n, "seconds": round(sec, 3), "iterations_per_s": round(n / sec, 3),
             "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
             "finite": bool(np.all(np.isfinite(losses)))}
    net.eval()
    config = {"preset_params": cfg, "normalisation": None, "patch": list(cfg["patch"]), "spacing": None}
    image = np.random.default_rng(1).normal(100, 20, sizes["volume"]).astype(np.float32)
    predict_volume(net, image, config, dev)  # warm-up
    _sync(device)
    times = []
    for _ in range(int(sizes["predict_cases"])):
        t0 = time.perf_counter()
        probs = predict_volume(net, image, config, dev)
        _sync(device)
        times.append(time.perf_counter() - t0)
    predict = {"volume": list(sizes["volume"]), "cases": len(times), "mirror": False,
               "seconds_per_case": round(float(np.median(times)), 4), "probs_shape": list(probs.shape),
               "probs_sum_to_1": bool(np.allclose(probs.sum(0), 1.0, atol=1e-4))}
    return train, predict


def check_knn(device: str, sizes: dict, threads: int | None) -> dict:
    """kernels.knn_vote on the device, and the CPU path's labels on the first queries."""
    Q, N, C, k = sizes["knn"]
    rng = np.random.default_rng(2)
    q = rng.standard_normal((Q, C)).astype(np.float16)
    b = rng.standard_normal((N, C)).astype(np.float16)
    bl = rng.integers(0, 3, N).astype(np.int32)
    if device == "cuda":
        import torch

        args = (torch.from_numpy(q).cuda(), torch.from_numpy(b).cuda(), torch.from_numpy(bl).cuda())
        kernels.knn_vote(args[0][:100], args[1], args[2], k)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        lab, share = kernels.knn_vote(*args, k)
        _sync(device)
        sec = time.perf_counter() - t0
        lab = lab.cpu().numpy()
    else:
        t0 = time.perf_counter()
        lab, share = kernels.knn_vote(q, b, bl, k, threads=threads)
        sec = time.perf_counter() - t0
    m = min(Q, 500)
    ref, _ = kernels.knn_vote(q[:m], b, bl, k, threads=threads)
    return {"Q": Q, "N": N, "C": C, "k": k, "dtype": "float16", "seconds": round(sec, 4),
            "gflops": round(2.0 * Q * N * C / sec / 1e9, 1),
            "cpu_labels_agree": round(float(np.mean(np.asarray(lab)[:m] == ref)), 4)}


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU: {cpu_model()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (checks the script, measures nothing)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default benchmarks/results/gpu.json)")
    ap.add_argument("--kernel-tests", default=None, help="outcome of tests/test_kernels.py -k cuda (from the .sh)")
    ap.add_argument("--kernel-tests-rc", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--command", default=None, help="the command line to record (the .sh passes its own)")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    sizes = TINY if args.dry_run else FULL
    if device == "cuda":
        import torch

        if not torch.cuda.is_available() or not kernels.cuda_available():
            print("device_check: no CUDA GPU (torch.cuda.is_available() / semisam_o1.core._core_cuda); "
                  "use --dry-run on a CPU", file=sys.stderr)
            return 2
    if device == "cpu":
        import torch

        torch.set_num_threads(args.threads or 2)
    out = args.out or Path(__file__).resolve().parent / "results" / "gpu.json"
    t_all = time.perf_counter()
    result = {"command": args.command or "python -m benchmarks.device_check " + shlex.join(argv or sys.argv[1:]),
              "device": device_name(device), "dry_run": bool(args.dry_run), "cpu": cpu_model(),
              "kernel_tests": {"outcome": args.kernel_tests, "rc": args.kernel_tests_rc}}
    with tempfile.TemporaryDirectory(prefix="device_check_") as scratch:
        t0 = time.perf_counter()
        result["onnxruntime"], result["encode"] = check_onnx(device, sizes, Path(scratch), args.threads)
        result["encode"]["check_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result["train"], result["predict"] = check_train_predict(device, sizes)
    result["train"]["check_seconds"] = round(time.perf_counter() - t0, 1)
    result["knn_vote"] = check_knn(device, sizes, args.threads)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    ok = (result["onnxruntime"]["ok"] and result["train"]["finite"] and result["predict"]["probs_sum_to_1"]
          and result["knn_vote"]["cpu_labels_agree"] >= 0.99 and args.kernel_tests_rc in (None, 0))
    result["ok"] = bool(ok)
    write_json(out, result)
    print(json.dumps({"out": str(out), "ok": result["ok"], "device": result["device"],
                      "providers": result["onnxruntime"]["session_providers"],
                      "canvases_per_s": result["encode"]["canvases_per_s"],
                      "iterations_per_s": result["train"]["iterations_per_s"],
                      "predict_s_per_case": result["predict"]["seconds_per_case"],
                      "knn_s": result["knn_vote"]["seconds"]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
