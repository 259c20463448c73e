"""Hot loops of SemiSAM-O1: prototype similarity and the fused kNN vote.

Both functions run in the C++ core (``semisam_o1._core``: multi-threaded, GIL
released, AVX-512 or AVX2/FMA/F16C when the CPU has them, chosen at call time:
``_core.isa()`` names the active path, ``_core.set_isa("avx2")`` or the environment
variable ``SEMISAM_ISA=scalar|avx2|avx512|auto`` forces one) for host arrays (NumPy arrays,
anything ``numpy.asarray`` accepts, torch CPU tensors), and in the CUDA module
(``semisam_o1._core_cuda``) for device arrays (CuPy arrays, torch CUDA tensors,
anything exposing ``__cuda_array_interface__``); results come back on the same
side (NumPy arrays for host input, CuPy arrays / torch tensors on the input's
device for device input).

Inputs are float16 or float32; every dot product and norm is accumulated in
float32 (float16 values up to 65504 are normalised in float32, no overflow).
Cosine similarity: ``dot(a, b) / (|a| |b|)``. A vector whose L2 norm is 0 (or
below the smallest normal float32, 1.2e-38) is a zero vector: its cosine with
anything is 0, never NaN. Inputs must be finite (NaN/inf rows give unspecified
but non-crashing results).

Non-contiguous host arrays are accepted by these wrappers and copied once into
C-contiguous memory (the ``_core`` functions themselves raise ValueError for
them); device arrays must be C-contiguous.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["prototype_similarity", "knn_vote", "cuda_available", "default_threads"]

_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_INT32 = np.iinfo(np.int32)


def default_threads() -> int:
    """Number of threads used when ``threads=None``: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _core():
    from . import _core  # the compiled extension; ImportError if the package was not built

    return _core


def _core_cuda():
    try:
        from . import _core_cuda
    except ImportError:
        return None
    return _core_cuda


def cuda_available() -> bool:
    """True when the CUDA module was built and at least one CUDA device is usable."""
    mod = _core_cuda()
    if mod is None:
        return False
    try:
        return mod.device_count() > 0
    except Exception:  # no driver, broken runtime: the CPU path is used
        return False


def _is_device_array(x: Any) -> bool:
    if _is_torch(x):  # (a CUDA tensor that requires grad raises on __cuda_array_interface__)
        return bool(getattr(x, "is_cuda", False))
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:
        return False


def _threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads: must be a positive integer or None, got {threads!r}")
    return int(threads)


def _host_float(x: Any, name: str, ndim: int = 2, allow_float64: bool = False) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch CPU tensor
        x = x.detach().numpy()
    a = np.asarray(x)
    if a.dtype == np.float64 and allow_float64:
        a = a.astype(np.float32)
    if a.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: dtype must be float16 or float32, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def _host_labels(x: Any, n: int) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        x = x.detach().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"bank_labels: expected shape ({n},) to match bank, got {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"bank_labels: dtype must be an integer type, got {a.dtype}")
    if a.dtype != np.int32:
        if a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
            raise ValueError("bank_labels: values must fit in int32")
        a = a.astype(np.int32)
    return np.ascontiguousarray(a)


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k: must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k: must be <= the bank size N={n}, got {k}")
    return k


def prototype_similarity(features, prototypes, *, threads: int | None = None):
    """Cosine similarity of every feature vector to every class prototype, and the argmax.

    Args:
        features: (N, C) float16 or float32 feature vectors (e.g. voxels of a feature
            map reshaped to rows). Host array or device array (CuPy / torch CUDA).
        prototypes: (K, C) float16 or float32 class prototypes (float64 is accepted
            and cast to float32, K*C is small). Same side (host/device) as features.
        threads: CPU threads (default: all CPUs this process may use); ignored on GPU.

    Returns:
        (scores, labels): scores (N, K) float32, ``scores[n, k] = cos(features[n],
        prototypes[k])`` in [-1, 1]; labels (N,) int32, the argmax over K (lowest k on
        ties; a zero feature vector scores 0 everywhere and gets label 0).

    Raises:
        ValueError: naming the argument, for a wrong dtype, ndim, a channel mismatch,
            N/K/C of 0 where not allowed (K >= 1, C >= 1), threads < 1.

    Formula: prototype propagation of SemiSAM-O1 (Zhang et al., arXiv 2604.24109):
    normalised features dotted with normalised prototypes, label = argmax.
    """
    if _is_device_array(features) or _is_device_array(prototypes):
        return _cuda_call("prototype_similarity", features, prototypes)
    f = _host_float(features, "features")
    p = _host_float(prototypes, "prototypes", allow_float64=True)
    return _core().prototype_similarity(f, p, _threads(threads))


def knn_vote(queries, bank, bank_labels, k, *, threads: int | None = None, return_topk=False,
             label_weights=None):
    """Weighted vote of the k most cosine-similar bank vectors, fused and streaming.

    For each query: the k bank rows with the highest cosine similarity (ties: lowest
    bank index), weights ``w = max(similarity, 0)`` (as in the SemiSAM-O1 authors'
    code, arXiv 2604.24109), per-label weight sums accumulated in rank order, winner =
    highest sum (ties: lowest label), ``share = winner's sum / sum of all k weights``.
    If every weight is 0 (no neighbour has positive similarity), the label of the most
    similar neighbour wins and share is 0. The Q x N similarity matrix is never formed
    (memory O(Q*k) plus fixed per-thread blocks).

    With ``label_weights`` w, a neighbour of label L counts ``w[L] * max(similarity, 0)``
    (in the winner's sum and in the share's denominator): e.g. w[c] = n_c / m_c undoes a
    class-balanced sampling of the bank (n_c voxels of class c stood for by m_c entries).

    Args:
        queries: (Q, C) float16 or float32 (host, or device for the CUDA path).
        bank: (N, C) float16 or float32, same side as queries.
        bank_labels: (N,) integer labels of the bank rows (any integer dtype whose
            values fit in int32; host path converts to int32, device path needs int32).
        k: number of neighbours, 1 <= k <= N.
        threads: CPU threads (default: all CPUs this process may use); ignored on GPU.
        return_topk: also return the neighbours.
        label_weights: optional (L,) non-negative finite float weights, one per label
            value 0..L-1; every bank label must be below L. Host array on both paths.

    Returns:
        (labels, share) or, with ``return_topk``, (labels, share, topk_index, topk_sim):
        labels (Q,) int32; share (Q,) float32 in [0, 1]; topk_index (Q, k) int64 bank
        rows in rank order (most similar first); topk_sim (Q, k) float32 cosines.

    Raises:
        ValueError: naming the argument, for a wrong dtype/ndim/shape, a channel
            mismatch, bank_labels of the wrong length or type, k < 1 or k > N,
            threads < 1, a negative or non-finite label weight, or a bank label
            without a weight.
    """
    if _is_device_array(queries) or _is_device_array(bank) or _is_device_array(bank_labels):
        return _cuda_call("knn_vote", queries, bank, bank_labels, k, return_topk=return_topk,
                          label_weights=_label_weights(label_weights))
    q = _host_float(queries, "queries")
    b = _host_float(bank, "bank")
    lab = _host_labels(bank_labels, b.shape[0])
    kk = _check_k(k, b.shape[0])
    return _core().knn_vote(q, b, lab, kk, _threads(threads), bool(return_topk),
                            _label_weights(label_weights))


def _label_weights(w):
    """None, or a C-contiguous (L,) float32 host copy of ``w``; ValueError otherwise."""
    if w is None:
        return None
    if hasattr(w, "get") and _is_cupy(w):
        w = w.get()
    elif _is_torch(w):
        w = w.detach().cpu().numpy()
    arr = np.asarray(w)
    if arr.ndim != 1 or arr.size < 1 or arr.dtype.kind not in "fiu":
        raise ValueError(f"label_weights: expected a 1-D numeric array with one weight per label, "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


# ---- device (CUDA) path ---------------------------------------------------------------


def _cuda_call(fn: str, *args, return_topk: bool = False, label_weights=None):
    mod = _core_cuda()
    if mod is None:
        raise RuntimeError(
            "device arrays given but semisam_o1._core_cuda is not built (install with a "
            "CUDA compiler and SEMISAM_CUDA=ON), move the arrays to the host instead"
        )
    args = tuple(_prepare_device(a) for a in args)
    if fn == "prototype_similarity":
        args = (args[0], _as_float32_if_float64(args[1]))
    else:
        args = (args[0], args[1], _as_int32_labels(args[2]), args[3])
    arrays = [a for a in args if not isinstance(a, (int, np.integer))]
    kind = "raw"
    for a in arrays:
        if _is_torch(a):
            kind = "torch"
            break
        if _is_cupy(a):
            kind = "cupy"
    stream = _current_stream(kind, arrays)
    if fn == "prototype_similarity":
        features, prototypes = args
        out = mod.prototype_similarity(features, prototypes, stream=stream)
    else:
        queries, bank, bank_labels, k = args
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k: must be an integer, got {k!r}")
        out = mod.knn_vote(queries, bank, bank_labels, int(k), return_topk=bool(return_topk),
                           stream=stream, label_weights=label_weights)
    return tuple(_wrap(o, kind, arrays) for o in out)


def _prepare_device(a):
    # torch tensors that require grad refuse __cuda_array_interface__
    if _is_torch(a) and getattr(a, "requires_grad", False):
        return a.detach()
    return a


def _as_float32_if_float64(a):
    if _is_torch(a):
        import torch

        return a.to(torch.float32) if a.dtype == torch.float64 else a
    if _is_cupy(a) and a.dtype == np.float64:
        return a.astype(np.float32)
    return a


def _as_int32_labels(a):
    if _is_torch(a):
        import torch

        if a.dtype in (torch.int64, torch.int16, torch.int8, torch.uint8):
            return a.to(torch.int32)
        return a
    if _is_cupy(a) and a.dtype.kind in "iu" and a.dtype != np.int32:
        return a.astype(np.int32)
    return a


def _is_torch(a) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _current_stream(kind: str, arrays) -> int:
    if kind == "torch":
        import torch

        dev = next(a.device for a in arrays if _is_torch(a) and a.is_cuda)
        return int(torch.cuda.current_stream(dev).cuda_stream)
    if kind == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _wrap(buf, kind: str, arrays):
    """A _core_cuda DeviceBuffer (owns cudaMalloc memory) as a torch tensor / CuPy array."""
    if kind == "torch":
        import torch

        dev = next(a.device for a in arrays if _is_torch(a) and a.is_cuda)
        return torch.as_tensor(buf, device=dev)
    if kind == "cupy":
        import cupy

        return cupy.asarray(buf)
    return buf
