"""Linear-algebra primitives shared by encode and refine."""

from __future__ import annotations

import numpy as np


def pca_basis(rows, dim: int, *, centred: bool = False, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, float]:
    """Principal axes of a set of feature vectors.

    Args:
        rows: (N, C) array (any float dtype; read in chunks of ``chunk`` rows), or an
            iterable of such arrays (all with the same C), e.g. the cells of several grids.
        dim: number of axes kept (at most C).
        centred: False (default): *uncentred* PCA, the top eigenvectors of the second-moment
            matrix ``X^T X``, the rank-``dim`` subspace that best preserves the rows' dot
            products (what a cosine similarity uses); True: ordinary PCA of the covariance.

    Returns:
        ``(mean, basis, kept)``: mean (C,) float32 (zeros unless ``centred``), basis (C, dim)
        float32 with each column's largest-magnitude entry positive (reproducible across
        LAPACK builds), and the fraction of the total energy (or variance) kept.
        Project with ``(x - mean) @ basis``.

    Raises:
        ValueError: no rows, or ``dim`` < 1.
    """
    blocks = [rows] if isinstance(rows, np.ndarray) else list(rows)
    if not blocks or sum(b.shape[0] for b in blocks) == 0:
        raise ValueError("pca_basis: no rows")
    if dim < 1:
        raise ValueError(f"pca_basis: dim must be at least 1, not {dim}")
    c = blocks[0].shape[1]
    n = sum(b.shape[0] for b in blocks)
    mean = np.zeros(c, np.float64)
    if centred:
        for b in blocks:
            for s in range(0, b.shape[0], chunk):
                mean += b[s:s + chunk].astype(np.float64).sum(axis=0)
        mean /= n
    m2 = np.zeros((c, c), np.float64)
    for b in blocks:
        for s in range(0, b.shape[0], chunk):
            x = b[s:s + chunk].astype(np.float64) - mean
            m2 += x.T @ x
    evals, evecs = np.linalg.eigh(m2)
    order = np.argsort(evals)[::-1][:min(dim, c)]
    kept = float(evals[order].sum() / max(evals.sum(), 1e-30))
    basis = evecs[:, order]
    signs = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(basis.shape[1])])
    basis = basis * np.where(signs == 0, 1.0, signs)
    return mean.astype(np.float32), basis.astype(np.float32), kept
