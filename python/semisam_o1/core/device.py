"""One meaning of ``--device`` for every stage, and moving arrays to and from it.

``auto`` is CUDA when torch sees a GPU (and, for the C++ kernels, when the CUDA
build ``semisam_o1._core_cuda`` is installed), else the CPU. The kernels in
:mod:`semisam_o1.core.kernels` dispatch on the arrays they are given (NumPy: the CPU
build; torch CUDA tensors or CuPy arrays: the CUDA build), so a stage only has to
put its arrays on the chosen device with :func:`to_device` and bring results back
with :func:`to_host`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from semisam_o1.core import kernels as k
from semisam_o1.core.errors import InputError


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str | None, *, kernels: bool = False) -> str:
    """``"cpu"`` or ``"cuda"`` for a ``--device`` value.

    Args:
        device: ``"auto"`` (or None), ``"cpu"`` or ``"cuda"``.
        kernels: the caller runs the C++ kernels, so CUDA also needs their CUDA build.

    Returns:
        ``"cpu"`` or ``"cuda"``.

    Raises:
        InputError: ``cuda`` asked for and not usable on this machine (one line saying why).
    """
    if device in (None, "", "auto"):
        if not _torch_cuda():
            return "cpu"
        if kernels:
            return "cuda" if k.cuda_available() else "cpu"
        return "cuda"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not _torch_cuda():
            raise InputError("--device cuda: no CUDA device is available to torch on this machine (use --device cpu)")
        if kernels:
            if not k.cuda_available():
                raise InputError("--device cuda: the CUDA kernels (semisam_o1._core_cuda) are not built in this "
                                 "install (use --device cpu)")
        return "cuda"
    raise InputError(f"--device {device}: choose auto, cpu or cuda")


def torch_device(device: str | None):
    """The ``torch.device`` for a ``--device`` value (see :func:`resolve_device`)."""
    import torch

    return torch.device(resolve_device(device))


def to_device(x: np.ndarray, device: str) -> Any:
    """``x`` as a C-contiguous NumPy array (``"cpu"``) or a torch CUDA tensor (``"cuda"``)."""
    if device == "cuda":
        import torch

        return torch.as_tensor(np.ascontiguousarray(x), device="cuda")
    return np.ascontiguousarray(x)


def to_host(x: Any) -> np.ndarray:
    """A NumPy array from a NumPy array, a torch tensor (any device) or a CuPy array."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        return x.get()
    return np.asarray(x)
