"""Progress bars (tqdm), one wrapper for every stage."""

from __future__ import annotations

from typing import Iterable


def progress(iterable: Iterable, *, quiet: bool = False, desc: str = "", total: int | None = None, unit: str = "case"):
    """``iterable`` wrapped in a tqdm bar on stderr (or bare when ``quiet``)."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
