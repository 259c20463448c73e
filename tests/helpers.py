"""Shared test pieces, written once: the NumPy kNN reference, a NIfTI writer, a feature
store writer (the real store format, through semisam_o1.data.store) and a synthetic cohort.

The synthetic cohort is an MSD-layout dataset of small volumes with a known structure:
an ellipsoid whose two foreground classes follow each other along axis 1 (as MSD
Hippocampus' Anterior | Posterior), placed with a small random shift in each box, brighter
than the background, with noise. The pipeline tests run on it when ../shared/data is
absent, and on real data when present (see conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

LABELS = {"background": 0, "anterior": 1, "posterior": 2}


# --------------------------------------------------------------------------- references


def normalise_rows(x) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm in float64; zero rows stay zero."""
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0.0)


def knn_reference(queries, bank, bank_labels, k, *, label_weights=None, return_topk=False, **_ignored):
    """Plain NumPy reference of :func:`semisam_o1.core.kernels.knn_vote`.

    Cosine similarity, top-k (ties: lower bank index first), vote weights max(sim, 0)
    (times ``label_weights[label]`` when given) summed per label, the highest total wins
    (ties: lowest label); all weights 0 -> the nearest neighbour's label with share 0.

    Returns ``(labels int32 (Q,), share float32 (Q,))`` and, with ``return_topk``, also
    ``(indices int64 (Q, k), similarities float32 (Q, k))``.
    """
    sim = normalise_rows(queries) @ normalise_rows(bank).T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sim, idx, axis=1)
    lab = np.asarray(bank_labels)[idx]
    n_lab = int(np.max(bank_labels)) + 1
    w = np.maximum(top, 0)
    if label_weights is not None:
        n_lab = max(n_lab, len(label_weights))
        w = w * np.asarray(label_weights, np.float64)[lab]
    tot = np.zeros((len(sim), n_lab))
    for j in range(idx.shape[1]):
        np.add.at(tot, (np.arange(len(sim)), lab[:, j]), w[:, j])
    s = w.sum(axis=1)
    share = np.where(s > 0, tot.max(axis=1) / np.where(s > 0, s, 1), 0).astype(np.float32)
    labels = np.where(s > 0, tot.argmax(axis=1), lab[:, 0]).astype(np.int32)
    if return_topk:
        return labels, share, idx.astype(np.int64), top.astype(np.float32)
    return labels, share


def dice_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks by counting; 1 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = a.sum() + b.sum()
    return 1.0 if n == 0 else float(2 * (a & b).sum() / n)


# --------------------------------------------------------------------------- files


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray | None = None, *,
                dtype=None, spacing: Sequence[float] | None = None, slope: float | None = None,
                inter: float | None = None, qcode: int = 1, scode: int = 1) -> Path:
    """Write ``data`` as NIfTI-1 (``.nii`` or ``.nii.gz`` from the name) and return the path.

    ``affine`` defaults to ``diag(spacing or 1, 1)``; ``dtype`` to the array's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, np.float64))
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    if slope is not None or inter is not None:
        img.header.set_slope_inter(1.0 if slope is None else slope, 0.0 if inter is None else inter)
    nib.save(img, str(path))
    return path


def write_feature_store(root: str | Path, features: dict, *, affine: np.ndarray | None = None,
                        config: dict | None = None) -> Path:
    """A real feature store (``semisam_o1.data.store`` format) holding given features.

    Args:
        root: store folder to create.
        features: {case: (C, X, Y, Z) array on the case's canonical voxel grid} (one axis,
            axis 0, cell grid = voxel grid), or {case: {axis: (C, X, Y, Z)}} for several axes.
        affine: canonical affine of every case (default identity).
        config: extra store.json fields.
    """
    from semisam_o1.data import store

    root = Path(root)
    first = next(iter(features.values()))
    per_axis = first if isinstance(first, dict) else {0: first}
    axes = sorted(int(a) for a in per_axis)
    channels = int(next(iter(per_axis.values())).shape[0])
    cfg = store.write_config(root, {"format": store.STORE_FORMAT, "encoder": "synthetic", "axes": axes,
                                    "channels": channels, **(config or {})})
    affine = np.eye(4) if affine is None else np.asarray(affine, np.float64)
    for case, f in features.items():
        grids = f if isinstance(f, dict) else {0: f}
        shape = next(iter(grids.values())).shape[1:]
        maps = {int(a): (np.zeros(3), np.ones(3)) for a in grids}
        meta = {"case": case, "voxel_shape": [int(s) for s in shape], "affine": affine.tolist(),
                "axes": sorted(int(a) for a in grids), "store_signature": cfg["signature"]}
        store.write_case(root, case, {int(a): np.asarray(g, np.float16) for a, g in grids.items()}, maps, meta)
    return root


def onehot_features(label: np.ndarray, num_classes: int, noise: float, rng: np.random.Generator,
                    extra: int = 5) -> np.ndarray:
    """(num_classes + extra, X, Y, Z) float16 features that encode ``label`` (one-hot plus
    Gaussian noise of sd ``noise`` in every channel): a kNN or prototype vote on them recovers
    the label when the noise is small."""
    f = rng.normal(0, noise, size=(num_classes + extra, *label.shape)).astype(np.float32)
    for c in range(num_classes):
        f[c] += label == c
    return f.astype(np.float16)


# --------------------------------------------------------------------------- a synthetic cohort


def synthetic_case(rng: np.random.Generator, shape=(24, 24, 24), radii=(5.0, 7.0, 4.0),
                   max_shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: ``(image float32 (X, Y, Z), label uint8 (X, Y, Z))``.

    The label is an ellipsoid with the given radii (voxels) around the box centre shifted by up
    to ``max_shift`` voxels per axis; voxels below its centre along axis 1 are class 1, the rest
    class 2. The image is 100 + 60 * (class 1) + 90 * (class 2) + a smooth gradient + noise (sd 8).
    """
    shape = tuple(int(s) for s in shape)
    centre = np.array(shape, float) / 2 + rng.integers(-max_shift, max_shift + 1, size=3)
    scale = rng.uniform(0.9, 1.1, size=3)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    r = sum(((grid[d] - centre[d]) / (radii[d] * scale[d])) ** 2 for d in range(3))
    inside = r <= 1.0
    label = np.zeros(shape, np.uint8)
    label[inside & (grid[1] < centre[1])] = 1
    label[inside & (grid[1] >= centre[1])] = 2
    image = 100.0 + 60.0 * (label == 1) + 90.0 * (label == 2) + 0.5 * grid[0] + rng.normal(0, 8, size=shape)
    return image.astype(np.float32), label


def make_cohort(root: str | Path, *, n_unlabeled: int = 4, n_test: int = 2, shape=(24, 24, 24),
                spacing=(1.0, 1.0, 1.0), seed: int = 0, name: str = "Synthetic") -> dict:
    """Write an MSD-layout synthetic dataset at ``root``: ``dataset.json``, ``imagesTr/``,
    ``labelsTr/`` (every case has its real label, for evaluation) and ``splits.json``.

    Returns the split: ``{"template": id, "unlabeled": [...], "test": [...]}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    ids = [f"syn_{i:03d}" for i in range(1 + n_unlabeled + n_test)]
    for case in ids:
        image, label = synthetic_case(rng, shape)
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine, dtype=np.uint8)
    meta = {"name": name, "modality": {"0": "MRI"}, "labels": {k: v for k, v in LABELS.items()},
            "numTraining": len(ids), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    split = {"template": ids[0], "unlabeled": ids[1:1 + n_unlabeled], "test": ids[1 + n_unlabeled:]}
    (root / "splits.json").write_text(json.dumps(split, indent=1))
    return split


# --------------------------------------------------------------------------- a small file system


import contextlib
import subprocess


@contextlib.contextmanager
def small_filesystem(folder: Path, size_kb: int):
    """A tmpfs of ``size_kb`` KiB mounted at ``folder`` (root only; pytest.skip elsewhere), to test
    what a stage does when the disk fills up. ``resize(kb)`` on the yielded object frees space."""
    import pytest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()})")

    class _Fs:
        path = folder

        @staticmethod
        def resize(kb: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={kb}k", str(folder)], check=True)

    try:
        yield _Fs()
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --------------------------------------------------------------------------- a damaged .gz


def corrupt_gzip_stream(path: Path) -> Path:
    """Rewrite the ``.nii.gz`` at ``path`` so that it still decompresses to its full length but one
    voxel byte in the middle of the compressed stream is changed (stored deflate blocks, so the
    change does not break the stream itself): only gzip's CRC-32 check at the end can tell."""
    import gzip

    raw = gzip.decompress(Path(path).read_bytes())
    blob = bytearray(gzip.compress(raw, compresslevel=0))
    blob[len(blob) // 2] ^= 0x5A  # the header (first 352 bytes of raw) and the trailer are untouched
    Path(path).write_bytes(bytes(blob))
    return Path(path)


# --------------------------------------------------------------------------- 2D cohorts


def synthetic_2d(rng: np.random.Generator, shape=(56, 72), radius=12.0, rgb: bool = False):
    """A 2D image with one bright (reddish, for ``rgb``) disc near the centre on a textured background.

    Returns ``(pixels uint8 (H, W) or (H, W, 3), mask uint8 (H, W) 0/1)``."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2 + rng.uniform(-4, 4), w / 2 + rng.uniform(-4, 4)
    r = radius * rng.uniform(0.85, 1.15)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
    base = 60 + 20 * rng.standard_normal((h, w))
    grey = np.clip(base + 120 * mask, 0, 255)
    if not rgb:
        return grey.astype(np.uint8), mask
    pix = np.stack([grey, np.clip(base + 30 * mask, 0, 255), np.clip(base + 10 * mask, 0, 255)], axis=-1)
    return pix.astype(np.uint8), mask


def make_2d_cohort(root: str | Path, seed: int = 0) -> dict:
    """A folder cohort of 2D images for ``run --images``: ``images/`` (the template t.png, RGB and
    greyscale PNG, a JPEG, a 16-bit TIFF, sizes differing), ``template_label.png`` (0 / 255),
    ``test/`` (2 images) and ``test_labels/`` (0 / 1 PNG).

    Returns the paths and each image's (rows, columns)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "test_labels").mkdir()
    sizes = {}
    pix, mask = synthetic_2d(rng, rgb=True)
    Image.fromarray(pix).save(root / "images" / "t.png")
    Image.fromarray(mask * 255).save(root / "template_label.png")
    sizes["t"] = mask.shape
    specs = [("a", ".png", True, (56, 72)), ("b", ".png", False, (60, 70)), ("c", ".jpg", True, (52, 76)),
             ("d", ".tif", False, (58, 74))]
    for name, ext, rgb, shape in specs:
        pix, mask = synthetic_2d(rng, shape=shape, rgb=rgb)
        if ext == ".tif":
            Image.fromarray(pix.astype(np.uint16) * 256).save(root / "images" / f"{name}{ext}")  # 16-bit
        else:
            Image.fromarray(pix).save(root / "images" / f"{name}{ext}", quality=95)
        sizes[name] = shape
    for name, rgb, shape in (("s1", True, (56, 72)), ("s2", False, (62, 68))):
        pix, mask = synthetic_2d(rng, shape=shape, rgb=rgb)
        Image.fromarray(pix).save(root / "test" / f"{name}.png")
        Image.fromarray(mask).save(root / "test_labels" / f"{name}.png")
        sizes[name] = shape
    return {"images": root / "images", "template_image": root / "images" / "t.png",
            "template_label": root / "template_label.png", "test_images": root / "test",
            "test_labels": root / "test_labels", "sizes": sizes}


def make_nnunet_2d(root: str | Path, channels: str = "rgb", seed: int = 0) -> dict:
    """An nnU-Net v2 2D dataset of :func:`synthetic_2d` images: ``imagesTr/<case>_0000.png`` (cases
    ``t`` (the template), ``a``, ``b``, ``c``, ``s1``, ``s2``; sizes differ), ``labelsTr/<case>.png``
    (0 / 1), ``dataset.json`` (``file_ending`` ``.png``, ``labels`` {"background": 0, "lesion": 1})
    and ``splits.json`` (template ``t``, unlabeled ``a b c``, test ``s1 s2``).

    ``channels``: ``rgb`` (one RGB PNG per case, ``channel_names`` R, G, B), ``split`` (nnU-Net's
    three greyscale files ``_0000`` .. ``_0002`` per case) or ``grey`` (one greyscale PNG).

    Returns the root, the split file, each case's (rows, columns) and its RGB / grey pixels."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    sizes, pixels = {}, {}
    for case, shape in (("t", (56, 72)), ("a", (56, 72)), ("b", (60, 70)), ("c", (52, 76)), ("s1", (56, 72)),
                        ("s2", (62, 68))):
        pix, mask = synthetic_2d(rng, shape=shape, rgb=channels != "grey")
        if channels == "split":
            for k in range(3):
                Image.fromarray(np.ascontiguousarray(pix[..., k])).save(root / "imagesTr" / f"{case}_{k:04d}.png")
        else:
            Image.fromarray(pix).save(root / "imagesTr" / f"{case}_0000.png")
        Image.fromarray(mask).save(root / "labelsTr" / f"{case}.png")
        sizes[case], pixels[case] = shape, pix
    names = {"0": "gray"} if channels == "grey" else {"0": "R", "1": "G", "2": "B"}
    (root / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {"background": 0, "lesion": 1},
                                                   "numTraining": len(sizes), "file_ending": ".png"}))
    split = root / "splits.json"
    split.write_text(json.dumps({"template": "t", "unlabeled": ["a", "b", "c"], "test": ["s1", "s2"]}))
    return {"root": root, "split": split, "sizes": sizes, "pixels": pixels}


#: the hue cohort's colours: equal luma (120.0 and 120.1, ITU-R BT.601), different hue
HUE_BACKGROUND = (120, 120, 120)
HUE_STRUCTURE = (200, 95, 40)


def hue_image(rng: np.random.Generator, shape=(40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose structure (an ellipse of radii 4..6.5 pixels anywhere in the image) differs
    from the background in hue only: the two colours have the same luma to 0.1 grey level, and
    every channel carries Gaussian noise (sd 6), so the luma alone cannot separate them.

    Returns ``(pixels uint8 (H, W, 3), mask uint8 (H, W) 0/1)``."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(8, h - 8), rng.uniform(8, w - 8)
    ry, rx = rng.uniform(4, 6.5), rng.uniform(4, 6.5)
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    pix = np.where(mask[..., None] > 0, np.array(HUE_STRUCTURE, float), np.array(HUE_BACKGROUND, float))
    return np.clip(pix + rng.normal(0, 6, pix.shape), 0, 255).astype(np.uint8), mask


def make_hue_dataset(root: str | Path, n: int = 4, rgb: bool = True, seed: int = 0) -> Path:
    """An MSD-layout dataset of ``n`` :func:`hue_image` images ``c0`` .. ``c<n-1>`` as 2D NIfTI (as
    ``run --images`` converts PNG: colour ``(X, Y, 1, 3)``), or, with ``rgb=False``, the same
    images' rounded luma (greyscale); ``labelsTr/`` holds every true mask and ``pseudo/`` those of
    ``c1`` .. (the pseudo-labels a training reads beside the template's real label)."""
    from semisam_o1.data.folder_input import nifti_2d
    from semisam_o1.data.images import luma

    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "pseudo"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pix, mask = hue_image(rng)
        img = pix if rgb else np.rint(luma(pix)).astype(np.uint8)
        nib.save(nifti_2d(img, None), str(root / "imagesTr" / f"c{i}.nii.gz"))
        for folder in ("labelsTr", "pseudo") if i else ("labelsTr",):
            nib.save(nifti_2d(mask, None), str(root / folder / f"c{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    return root


# --------------------------------------------------------------------------- an interrupted training


def interrupt_training(monkeypatch, nets, at_forward: int, train):
    """Run ``train()`` with every network ``nets.build_net`` builds raising KeyboardInterrupt on the
    ``at_forward``-th forward pass (counted over all networks); the real builder is restored after.

    Raises:
        AssertionError: ``train()`` finished without being interrupted.
    """
    import pytest

    real_build = nets.build_net
    calls = {"n": 0}

    def build_interrupting(params):
        net = real_build(params)
        forward = net.forward

        def counted(x):
            calls["n"] += 1
            if calls["n"] == at_forward:
                raise KeyboardInterrupt
            return forward(x)

        net.forward = counted
        return net

    monkeypatch.setattr(nets, "build_net", build_interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            train()
    finally:
        monkeypatch.setattr(nets, "build_net", real_build)


def damage_itk_stream(path: Path, how: str) -> Path:
    """Rewrite the compressed .nrrd (gzip) / .mha (zlib) that SimpleITK wrote at ``path`` with its
    voxel data re-compressed into stored deflate blocks and then damaged: ``"changed"``, one byte of
    the data changed (the stream still decompresses to its full length: only the gzip CRC-32 /
    zlib Adler-32 check can tell; SimpleITK returns the changed voxels of an .mha), or ``"cut"``,
    the stream's 4-byte trailer cut off (every voxel is there; SimpleITK reads both formats). An
    .mha's ``CompressedDataSize`` is set to the new stream's length."""
    import gzip
    import re
    import zlib

    blob = Path(path).read_bytes()
    nrrd = blob.startswith(b"NRRD")
    marker = b"\n\n" if nrrd else b"ElementDataFile = LOCAL\n"
    start = blob.index(marker) + len(marker)
    raw = zlib.decompress(blob[start:], wbits=47)
    stream = bytearray(gzip.compress(raw, compresslevel=0) if nrrd else zlib.compress(raw, 0))
    if how == "changed":
        stream[len(stream) // 2] ^= 0x5A
    else:
        del stream[-4:]
    header = blob[:start]
    if not nrrd:
        header = re.sub(rb"CompressedDataSize = \d+", b"CompressedDataSize = %d" % len(stream), header)
    Path(path).write_bytes(header + bytes(stream))
    return Path(path)
